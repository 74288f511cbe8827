import base64

import orjson
import pytest

from schemas.errors import RequestError
from schemas.records import (
    SCHEMA_VERSION,
    Limits,
    Request,
    Result,
    Telemetry,
    dlq_record,
    encode,
    parse_request,
    result_doc,
    telemetry_doc,
)

LIMITS = Limits(max_input_chars=100, max_labels=3, max_label_chars=10)


def raw(**doc) -> bytes:
    return orjson.dumps(doc)


def test_valid_request_gets_defaults():
    r = parse_request(raw(id="a", input="hello"), LIMITS)
    assert isinstance(r, Request)
    assert (r.task, r.tenant, r.cache, r.model, r.labels) == ("embed", "default", "use", None, None)


def test_classify_request_keeps_labels_in_order():
    r = parse_request(raw(id="a", input="x", task="classify", labels=["b", "a"]), LIMITS)
    assert r.labels == ("b", "a")


@pytest.mark.parametrize(
    "payload, code, field, has_id",
    [
        (b"{not json", "invalid_json", "JSON", False),
        (b"[1, 2]", "invalid_json", "object", False),
        (raw(input="x"), "invalid_id", "'id'", False),
        (raw(id=5, input="x"), "invalid_id", "'id'", False),
        (raw(id="   ", input="x"), "invalid_id", "'id'", False),
        (raw(id="a" * 300, input="x"), "invalid_id", "SLUICE_MAX_ID_CHARS", False),
        (raw(id="a"), "invalid_input", "'input'", True),
        (raw(id="a", input=["x"]), "invalid_input", "'input'", True),
        (raw(id="a", input=" \n\t "), "empty_input", "'input'", True),
        (raw(id="a", input="x" * 101), "input_too_large", "SLUICE_MAX_INPUT_CHARS", True),
        (raw(id="a", input="x", task="summarise"), "unknown_task", "'task'", True),
        (raw(id="a", input="x", task="classify"), "missing_labels", "'labels'", True),
        (raw(id="a", input="x", task="classify", labels=[]), "missing_labels", "'labels'", True),
        (
            raw(id="a", input="x", task="classify", labels=["a", "b", "c", "d"]),
            "too_many_labels",
            "SLUICE_MAX_LABELS",
            True,
        ),
        (raw(id="a", input="x", task="classify", labels=["a", "a"]), "invalid_field", "distinct", True),
        (raw(id="a", input="x", task="classify", labels=["x" * 11]), "invalid_field", "SLUICE_MAX_LABEL_CHARS", True),
        (raw(id="a", input="x", cache="maybe"), "invalid_field", "'cache'", True),
        (raw(id="a", input="x", deadline_ms="soon"), "invalid_field", "'deadline_ms'", True),
        (raw(id="a", input="x", v=2), "unsupported_version", "'v'", True),
        (raw(id="a", input="x", reply_to="bad topic!"), "invalid_field", "'reply_to'", True),
    ],
)
def test_bad_request_names_the_problem(payload, code, field, has_id):
    with pytest.raises(RequestError) as exc:
        parse_request(payload, LIMITS)
    assert exc.value.code == code
    assert field in exc.value.message
    assert (exc.value.request_id == "a") is has_id


def test_invalid_utf8_still_answers_its_sender_when_the_id_is_readable():
    with pytest.raises(RequestError) as exc:
        parse_request(b'{"id": "u1", "input": "caf\xe9", "reply_to": "mine"}', LIMITS)
    assert exc.value.code == "invalid_utf8"
    assert (exc.value.request_id, exc.value.reply_to) == ("u1", "mine")


def test_tombstone_is_an_error_without_id():
    with pytest.raises(RequestError) as exc:
        parse_request(None, LIMITS)
    assert exc.value.code == "empty_record" and exc.value.request_id is None


def test_dlq_record_keeps_the_original_bytes():
    doc = dlq_record(b"\xff\x00junk", b"k", "not JSON", "invalid_json", topic="t", partition=2, offset=9, worker="w")
    assert base64.b64decode(doc["value_b64"]) == b"\xff\x00junk"
    assert (doc["topic"], doc["partition"], doc["offset"], doc["code"]) == ("t", 2, 9, "invalid_json")


def test_encode_serialises_numpy_embeddings():
    import numpy as np

    out = orjson.loads(encode({"e": np.array([0.5, 0.25], dtype=np.float32)}))
    assert out == {"e": [0.5, 0.25]}


RESULT_ARGS = dict(
    id="r1",
    status="ok",
    task="embed",
    model="mini@1",
    cache="miss",
    sent_ms=1000,
    started_ms=1012,
    cache_ms=0.12345,
    inference_start_ms=1020,
    inference_end_ms=1050,
    done_ms=1060,
    tokens=7,
    batch_size=4,
    cost_usd=1.5e-7,
    worker="w1",
)


def test_result_doc_is_the_published_result():
    doc = result_doc(**RESULT_ARGS, output=b'{"embedding":[0.5,1.0]}')
    assert encode(doc) == orjson.dumps(
        {
            "v": 1,
            "id": "r1",
            "status": "ok",
            "task": "embed",
            "model": "mini@1",
            "cache": "miss",
            "timings_ms": {"queue": 12, "cache": 0.123, "inference": 30, "total": 60},
            "tokens": 7,
            "batch_size": 4,
            "cost_usd": 1.5e-7,
            "worker": "w1",
            "output": {"embedding": [0.5, 1.0]},
        }
    )
    assert SCHEMA_VERSION == 1
    r = Result.model_validate_json(encode(doc))
    assert r.output == {"embedding": [0.5, 1.0]} and r.timings_ms.total == 60


def test_result_doc_of_an_error_carries_the_error_and_no_output():
    args = {
        **RESULT_ARGS,
        "status": "error",
        "model": None,
        "cache": "none",
        "sent_ms": 2000,
        "started_ms": 1990,
        "inference_start_ms": 0,
        "inference_end_ms": 0,
        "done_ms": 1999,
    }
    doc = result_doc(**args, truncated=True, output=b"[1]", error_code="unknown_model", error_message="no model 'x'")
    assert doc == {
        "v": 1,
        "id": "r1",
        "status": "error",
        "task": "embed",
        "model": None,
        "cache": "none",
        "timings_ms": {"queue": 0, "cache": 0.123, "inference": 0, "total": 0},
        "tokens": 7,
        "batch_size": 4,
        "cost_usd": 1.5e-7,
        "worker": "w1",
        "truncated": True,
        "error": {"code": "unknown_model", "message": "no model 'x'"},
    }
    assert list(doc) == [
        "v",
        "id",
        "status",
        "task",
        "model",
        "cache",
        "timings_ms",
        "tokens",
        "batch_size",
        "cost_usd",
        "worker",
        "truncated",
        "error",
    ]
    assert Result.model_validate_json(encode(doc)).error.code == "unknown_model"


def test_result_doc_without_error_or_output_has_neither():
    doc = result_doc(**{**RESULT_ARGS, "status": "expired"})
    assert "output" not in doc and "error" not in doc and "truncated" not in doc


def test_telemetry_doc_is_the_sinks_row():
    doc = telemetry_doc(
        id="r1",
        tenant="acme",
        model="mini",
        model_version="1",
        task="embed",
        status="ok",
        error_code="",
        cache="l2",
        tokens=7,
        batch_size=4,
        worker="w1",
        partition=3,
        offset=42,
        sent_at_ms=1000,
        received_at_ms=1005,
        started_ms=1012,
        inference_start_ms=1020,
        inference_end_ms=1050,
        published_at_ms=1070,
        cache_ms=0.25,
        compute_ms=12.34567,
        cost_usd=2e-7,
    )
    expected = {
        "v": 1,
        "id": "r1",
        "tenant": "acme",
        "model": "mini",
        "model_version": "1",
        "task": "embed",
        "status": "ok",
        "error_code": "",
        "cache": "l2",
        "tokens": 7,
        "batch_size": 4,
        "worker": "w1",
        "partition": 3,
        "offset": 42,
        "sent_at_ms": 1000,
        "received_at_ms": 1005,
        "inference_start_ms": 1020,
        "inference_end_ms": 1050,
        "published_at_ms": 1070,
        "queue_ms": 12,
        "cache_ms": 0.25,
        "inference_ms": 30,
        "total_ms": 70,
        "compute_ms": 12.346,
        "cost_usd": 2e-7,
    }
    assert encode(doc) == orjson.dumps(expected)
    Telemetry.model_validate_json(encode(doc))


def test_telemetry_doc_clamps_durations_at_zero():
    doc = telemetry_doc(
        id="r1",
        tenant="",
        model="",
        model_version="",
        task="",
        status="error",
        error_code="invalid_input",
        cache="none",
        tokens=0,
        batch_size=1,
        worker="w1",
        partition=0,
        offset=0,
        sent_at_ms=5000,
        received_at_ms=4000,
        started_ms=4000,
        inference_start_ms=0,
        inference_end_ms=0,
        published_at_ms=4500,
        cache_ms=0.0,
        compute_ms=0.0,
        cost_usd=0.0,
    )
    assert (doc["queue_ms"], doc["inference_ms"], doc["total_ms"]) == (0, 0, 0)
    Telemetry.model_validate_json(encode(doc))
