"""The gateway's pure parts: bodies, results into HTTP, API keys, waiting
calls, the backlog's hysteresis. The service itself runs in
tests/integration/test_gateway.py."""

from __future__ import annotations

import asyncio
import base64

import numpy as np
import orjson
import pytest

from producers.gateway import api
from producers.gateway.api import ApiError
from producers.gateway.keys import ApiKeys, digest
from producers.replies import Waiting
from schemas.service.lag import GroupOffsets, Overload


# -- bodies ------------------------------------------------------------------------
def test_embeddings_take_a_string_or_a_list_and_refuse_what_they_cannot_honour():
    assert api.embeddings_call({"input": "hi", "model": "m"}, 10).inputs == ["hi"]
    call = api.embeddings_call({"input": ["a", "b"], "encoding_format": "base64"}, 10)
    assert call.inputs == ["a", "b"] and call.encoding_format == "base64" and call.model is None
    for body, param in (
        ({"input": "x", "dimensions": 64}, "dimensions"),
        ({"input": [[1, 2]]}, "input"),
        ({"input": [1, 2]}, "input"),
        ({"input": []}, "input"),
        ({}, "input"),
        ({"input": "x", "encoding_format": "int8"}, "encoding_format"),
        ({"input": "x", "model": 3}, "model"),
        ({"input": "x", "stream": "yes"}, "stream"),
    ):
        with pytest.raises(ApiError) as err:
            api.embeddings_call(body, 10)
        assert (err.value.status, err.value.param) == (400, param), body
    with pytest.raises(ApiError) as err:
        api.embeddings_call({"input": ["x"] * 11}, 10)
    assert err.value.status == 413 and "SLUICE_GATEWAY_MAX_INPUTS" in err.value.message


def test_tei_bodies_use_tei_statuses():
    assert api.tei_call({"inputs": ["a"], "truncate": True}, 5).truncate is True
    with pytest.raises(ApiError) as err:
        api.tei_call({"inputs": "a", "normalize": False}, 5)
    assert err.value.status == 422
    with pytest.raises(ApiError) as err:
        api.tei_call({"inputs": 7}, 5)
    assert err.value.status == 422
    body = orjson.loads(ApiError(429, "overloaded", "busy").body("tei"))
    assert body == {"error": "busy", "error_type": "Overloaded", "code": "overloaded"}


def test_classify_needs_labels():
    assert api.classify_call({"input": "x", "labels": ["a", "b"]}, 5).labels == ["a", "b"]
    for labels in (None, [], ["a", ""], "a,b"):
        with pytest.raises(ApiError) as err:
            api.classify_call({"input": "x", "labels": labels}, 5)
        assert err.value.param == "labels"


def test_a_body_that_is_not_a_json_object_is_a_400():
    for raw in (b"{", b"[1]", b"nope"):
        with pytest.raises(ApiError) as err:
            api.parse_json(raw)
        assert err.value.status == 400


# -- results into HTTP --------------------------------------------------------------
def test_each_result_status_becomes_the_http_status_a_client_can_act_on():
    def status(doc):
        e = api.result_error(doc, 0, 1.5)
        return None if e is None else (e.status, e.code, e.retry_after_s)

    assert status({"status": "ok"}) is None
    rejected = {"status": "rejected", "error": {"code": "rate_limited", "retry_after_ms": 2500}}
    assert status(rejected) == (429, "rate_limited", 2.5)
    assert status({"status": "rejected", "error": {"code": "kill_switch"}}) == (503, "kill_switch", 1.5)
    assert status({"status": "expired"}) == (503, "expired", 1.5)
    assert status({"status": "error", "error": {"code": "unknown_model"}})[:2] == (404, "model_not_found")
    assert status({"status": "error", "error": {"code": "model_error"}})[:2] == (500, "model_error")
    assert status({"status": "error", "error": {"code": "input_too_long"}})[:2] == (400, "input_too_long")


def test_retry_after_is_whole_seconds_rounded_up_and_also_in_ms():
    assert ApiError(429, "x", "y", retry_after_s=2.2).headers() == {"Retry-After": "3", "retry-after-ms": "2200"}
    assert ApiError(429, "x", "y", retry_after_s=0.0).headers()["Retry-After"] == "1"
    assert ApiError(400, "x", "y").headers() == {}
    body = orjson.loads(ApiError(401, "invalid_api_key", "no").body("openai"))
    assert body["error"]["type"] == "authentication_error" and body["error"]["code"] == "invalid_api_key"


def test_base64_embeddings_decode_as_the_openai_sdk_decodes_them():
    vector = [0.1, -0.25, 3.0e-5, 1.0]
    encoded = api.encode_embedding(vector, "base64")
    decoded = np.frombuffer(base64.b64decode(encoded), dtype="float32")  # what openai-python does
    assert np.array_equal(decoded, np.asarray(vector, dtype=np.float32))
    assert api.encode_embedding(vector, "float") is vector


def test_a_response_keeps_input_order_and_sums_usage():
    call = api.Call(["a", "b"], "embed", "m")
    docs = [
        {"output": {"embedding": [1.0]}, "tokens": 3, "model": "m@1"},
        {"output": {"embedding": [2.0]}, "tokens": 0, "model": "m@1"},
    ]
    body = orjson.loads(api.openai_body(call, docs))
    assert [(d["index"], d["embedding"]) for d in body["data"]] == [(0, [1.0]), (1, [2.0])]
    assert body["usage"] == {"prompt_tokens": 3, "total_tokens": 3} and body["model"] == "m@1"
    assert orjson.loads(api.tei_body(docs)) == [[1.0], [2.0]]


# -- API keys --------------------------------------------------------------------------
def test_keys_in_the_clear_or_as_digests_name_their_tenant(tmp_path):
    path = tmp_path / "keys"
    path.write_text(f"# comment\nacme sha256:{digest('k1')}  # trailing\n\nglobex k2\n")
    keys = ApiKeys.load(path)
    assert keys.tenant_of("Bearer k1") == "acme" and keys.tenant_of("bearer  k2 ") == "globex"
    for header in (None, "", "Bearer", "Basic k1", "Bearer k3", f"Bearer sha256:{digest('k1')}"):
        assert keys.tenant_of(header) is None, header


@pytest.mark.parametrize(
    ("text", "says"),
    [
        ("acme\n", "line 1"),
        ("acme k1 extra\n", "line 1"),
        ("ok k\nbad/tenant k2\n", "line 2"),
        ("acme sha256:abc\n", "64 hex"),
        ("# nothing\n", "no keys"),
    ],
)
def test_a_bad_keys_file_names_the_setting_and_the_line(tmp_path, text, says):
    path = tmp_path / "keys"
    path.write_text(text)
    with pytest.raises(ValueError, match="SLUICE_GATEWAY_API_KEYS_FILE") as err:
        ApiKeys.load(path)
    assert says in str(err.value)


def test_gateway_settings_refuse_a_resume_level_at_or_above_the_limit(monkeypatch):
    from schemas.errors import ConfigError
    from sluice.settings import load_settings

    monkeypatch.setenv("SLUICE_GATEWAY_BACKLOG_LIMIT", "100")
    monkeypatch.setenv("SLUICE_GATEWAY_BACKLOG_RESUME", "100")
    with pytest.raises(ConfigError, match="SLUICE_GATEWAY_BACKLOG_RESUME=100"):
        load_settings()


# -- waiting calls -------------------------------------------------------------------
async def test_a_wait_that_times_out_is_forgotten():
    waiting = Waiting()
    fut = waiting.add("a")
    waiting.add("b")
    with pytest.raises(TimeoutError):
        await asyncio.wait_for(fut, 0.01)
    await asyncio.sleep(0)  # the done-callback runs
    assert len(waiting) == 1
    assert waiting.resolve({"id": "a"}) is False  # a late answer finds no one
    assert waiting.resolve({"id": "b", "status": "ok"}) is True and len(waiting) == 0


async def test_a_failed_reader_fails_every_waiting_call_at_once():
    waiting = Waiting()
    futs = [waiting.add(str(i)) for i in range(3)]
    waiting.fail_all(RuntimeError("reader died"))
    assert len(waiting) == 0
    for f in futs:
        with pytest.raises(RuntimeError, match="reader died"):
            await f


# -- the backlog -----------------------------------------------------------------------
def offsets(end: int, committed: int) -> GroupOffsets:
    return GroupOffsets(end={0: end}, start={0: 0}, committed={0: committed}, members=1)


def test_overload_turns_on_at_the_limit_off_under_resume_and_estimates_the_drain():
    o = Overload(None, limit=1000, resume=200, interval_s=0.5)  # type: ignore[arg-type]
    assert o.retry_after_s(1.0) == 1.0  # nothing measured yet
    o.observe(offsets(end=2000, committed=0), at=0.0)
    assert o.overloaded and o.lag == 2000
    o.observe(offsets(end=2000, committed=500), at=1.0)  # drained 500 in 1 s
    assert o.overloaded and o.drain_per_s == pytest.approx(500)
    assert o.retry_after_s(1.0) == pytest.approx((1500 - 200) / 500)
    o.observe(offsets(end=2000, committed=1500), at=2.0)  # lag 500: still above resume
    assert o.overloaded
    o.observe(offsets(end=2000, committed=1900), at=3.0)
    assert not o.overloaded
    assert o.retry_after_s(1.0, most_s=60) >= 1.0
