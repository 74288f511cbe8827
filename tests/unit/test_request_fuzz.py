"""The request decoder under fuzzing (hypothesis): whatever bytes arrive, it
returns a Request within every limit or raises a RequestError with a known
code, never anything else. Bounded: a fixed number of examples per property
and no per-example deadline, so CI time stays a few seconds."""

from __future__ import annotations

import json

import orjson
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from schemas.errors import RequestError
from schemas.records import Limits, Request, parse_request

LIMITS = Limits(
    max_input_chars=64, max_labels=4, max_label_chars=16, max_id_chars=24, max_tenant_chars=12, max_model_chars=20
)
CODES = {
    "empty_record",
    "invalid_utf8",
    "invalid_json",
    "invalid_id",
    "invalid_field",
    "invalid_input",
    "empty_input",
    "input_too_large",
    "unsupported_version",
    "unknown_task",
    "missing_labels",
    "too_many_labels",
}
BOUNDED = settings(max_examples=600, deadline=None, suppress_health_check=[HealthCheck.too_slow])

# JSON values of every kind, small enough to be quick
json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**70), 2**70) | st.floats(allow_nan=False) | st.text(max_size=30),
    lambda inner: st.lists(inner, max_size=5) | st.dictionaries(st.text(max_size=8), inner, max_size=5),
    max_leaves=12,
)
FIELDS = ["v", "id", "input", "task", "model", "tenant", "labels", "reply_to", "deadline_ms", "cache", "sent_at_ms"]
# documents near the contract: its field names with any values, plus good values, so the
# fuzzer reaches the checks deep in the decoder and not only the JSON parser
near_values = {
    "v": st.just(1) | json_values,
    "id": st.text(min_size=1, max_size=30) | json_values,
    "input": st.text(min_size=1, max_size=80) | json_values,
    "task": st.sampled_from(["embed", "classify"]) | json_values,
    "model": st.text(max_size=30) | json_values,
    "tenant": st.text(max_size=20) | json_values,
    "labels": st.lists(st.text(max_size=20), max_size=6) | json_values,
    "reply_to": st.from_regex(r"[a-z.]{1,12}", fullmatch=True) | json_values,
    "deadline_ms": st.integers(0, 2**45) | json_values,
    "cache": st.sampled_from(["use", "bypass", "refresh"]) | json_values,
    "sent_at_ms": st.integers(0, 2**45) | json_values,
}
near_docs = st.fixed_dictionaries({}, optional={k: v for k, v in near_values.items()})


def check(raw: bytes | None) -> None:
    try:
        req = parse_request(raw, LIMITS)
    except RequestError as exc:
        assert exc.code in CODES, exc.code
        assert exc.message  # says what was wrong
        if exc.request_id is not None:  # an id it answers to is one it accepted
            assert isinstance(exc.request_id, str) and 0 < len(exc.request_id) <= LIMITS.max_id_chars
        return
    assert isinstance(req, Request)
    assert 0 < len(req.id) <= LIMITS.max_id_chars
    assert 0 < len(req.input) <= LIMITS.max_input_chars and req.input.strip()
    assert 0 < len(req.tenant) <= LIMITS.max_tenant_chars
    assert req.model is None or 0 < len(req.model) <= LIMITS.max_model_chars
    if req.task == "classify":
        assert req.labels and len(req.labels) <= LIMITS.max_labels
        assert all(0 < len(lab) <= LIMITS.max_label_chars for lab in req.labels)


@BOUNDED
@given(st.binary(max_size=200))
def test_any_bytes_decode_or_fail_with_a_known_code(raw):
    check(raw)


@BOUNDED
@given(json_values)
def test_any_json_value_decodes_or_fails_with_a_known_code(value):
    check(json.dumps(value).encode())  # the stdlib writes what orjson may refuse (huge ints)


@BOUNDED
@given(near_docs)
def test_documents_near_the_contract_decode_within_the_limits_or_fail_clearly(doc):
    check(json.dumps(doc).encode())


def test_over_long_tenant_and_model_are_refused_naming_their_setting():
    for field, setting in (("tenant", "SLUICE_MAX_TENANT_CHARS"), ("model", "SLUICE_MAX_MODEL_CHARS")):
        raw = orjson.dumps({"id": "a", "input": "x", field: "t" * 100})
        try:
            parse_request(raw, LIMITS)
        except RequestError as exc:
            assert setting in exc.message and exc.request_id == "a"
        else:
            raise AssertionError(f"a {field} of 100 characters was accepted")
