import base64

import orjson
import pytest

from schemas.errors import RequestError
from schemas.records import Limits, Request, dlq_record, encode, parse_request

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


@pytest.mark.parametrize("payload, code, field, has_id", [
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
    (raw(id="a", input="x", task="classify", labels=["a", "b", "c", "d"]), "too_many_labels",
     "SLUICE_MAX_LABELS", True),
    (raw(id="a", input="x", task="classify", labels=["a", "a"]), "invalid_field", "distinct", True),
    (raw(id="a", input="x", task="classify", labels=["x" * 11]), "invalid_field",
     "SLUICE_MAX_LABEL_CHARS", True),
    (raw(id="a", input="x", cache="maybe"), "invalid_field", "'cache'", True),
    (raw(id="a", input="x", deadline_ms="soon"), "invalid_field", "'deadline_ms'", True),
    (raw(id="a", input="x", v=2), "unsupported_version", "'v'", True),
    (raw(id="a", input="x", reply_to="bad topic!"), "invalid_field", "'reply_to'", True),
])
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
    doc = dlq_record(b"\xff\x00junk", b"k", "not JSON", "invalid_json", topic="t", partition=2,
                     offset=9, worker="w")
    assert base64.b64decode(doc["value_b64"]) == b"\xff\x00junk"
    assert (doc["topic"], doc["partition"], doc["offset"], doc["code"]) == ("t", 2, 9, "invalid_json")


def test_encode_serialises_numpy_embeddings():
    import numpy as np
    out = orjson.loads(encode({"e": np.array([0.5, 0.25], dtype=np.float32)}))
    assert out == {"e": [0.5, 0.25]}
