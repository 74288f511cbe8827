"""The wire contract: request, result, telemetry and DLQ records.

JSON, UTF-8, one record per Kafka message, versioned by `v`. Requests are
validated here so that every error names the field at fault. Results,
telemetry and DLQ records are built here too, as plain dicts (the hot path:
no model validation per record) by `result_doc`, `telemetry_doc` and
`dlq_record`, and checked against the Result and Telemetry models in tests.
"""

from __future__ import annotations

import base64
import time
from typing import Any, Literal

import orjson
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from schemas.errors import RequestError
from schemas.topics import check_topic_name

SCHEMA_VERSION = 1

Task = Literal["embed", "classify"]
CacheMode = Literal["use", "bypass", "refresh"]
Status = Literal["ok", "error", "rejected", "expired"]
CacheLevel = Literal["l1", "l2", "coalesced", "miss", "none"]


class Limits(BaseModel):
    """Input limits a worker enforces; each is a named setting with a default."""

    model_config = ConfigDict(frozen=True, extra="ignore")

    max_input_chars: int = Field(8192, ge=1, description="Longest accepted `input`, in characters.")
    max_labels: int = Field(64, ge=1, description="Most labels a classify request may name.")
    max_label_chars: int = Field(200, ge=1, description="Longest accepted label, in characters.")
    max_id_chars: int = Field(256, ge=1, description="Longest accepted request `id`, in characters.")
    max_tenant_chars: int = Field(
        64, ge=1, description="Longest accepted `tenant`, in characters; a longer one is refused."
    )
    max_model_chars: int = Field(
        128, ge=1, description="Longest accepted `model` name, in characters; a longer one is refused."
    )


class Request(BaseModel):
    model_config = ConfigDict(frozen=True, extra="ignore")

    v: int = SCHEMA_VERSION
    id: str
    input: str
    task: Task = "embed"
    model: str | None = None
    tenant: str = "default"
    labels: tuple[str, ...] | None = None
    reply_to: str | None = None
    deadline_ms: int | None = None
    cache: CacheMode = "use"
    sent_at_ms: int | None = None


class Timings(BaseModel):
    queue: float
    cache: float
    inference: float
    total: float


class ErrorInfo(BaseModel):
    code: str
    message: str
    retry_after_ms: int | None = None  # a rejection that may succeed later says when


class Result(BaseModel):
    """A result as clients read it (the worker writes the same shape)."""

    model_config = ConfigDict(extra="allow")

    v: int
    id: str
    status: Status
    task: str | None = None
    model: str | None = None
    output: dict[str, Any] | None = None
    cache: CacheLevel | None = None
    error: ErrorInfo | None = None
    timings_ms: Timings | None = None
    tokens: int = 0
    batch_size: int = 0
    cost_usd: float = 0.0
    worker: str | None = None


class Telemetry(BaseModel):
    """One per request handled, any status; the ClickHouse sink stores these."""

    model_config = ConfigDict(extra="allow")

    v: int
    id: str
    tenant: str
    model: str
    model_version: str
    task: str
    status: Status
    error_code: str
    cache: CacheLevel
    tokens: int
    batch_size: int
    worker: str
    partition: int
    offset: int
    sent_at_ms: int
    received_at_ms: int
    inference_start_ms: int
    inference_end_ms: int
    published_at_ms: int
    queue_ms: float
    cache_ms: float
    inference_ms: float
    total_ms: float
    compute_ms: float = 0.0  # share of model busy time (by tokens): sums to the compute seconds
    cost_usd: float


class ScaleDecision(BaseModel):
    """One decision of `sluice autoscale`, with the evidence it was made on;
    the sink stores these in autoscale_events."""

    model_config = ConfigDict(extra="allow")

    v: int
    at_ms: int
    autoscaler: str  # the instance that decided
    group: str  # the worker group it sizes
    mode: Literal["local", "recommend"]
    desired: int = Field(ge=0)
    current: int = Field(ge=0)  # workers asked for when deciding (ready + starting)
    ready: int = Field(ge=0)
    recommended: int = Field(ge=0)  # this interval's need, before stabilisation
    reason: str
    lag: int = Field(ge=0)
    arrival_rps: float
    service_rps: float
    service_source: str
    cold_start_s: float
    partitions: int = Field(ge=0)
    stuck: list[int] = []
    missing: list[str] = []


def now_ms() -> int:
    return time.time_ns() // 1_000_000


def _salvage(raw: bytes) -> tuple[str | None, str | None]:
    """Best effort id and reply_to from a record that failed validation, so
    its sender still gets an error result rather than silence."""
    try:
        doc = orjson.loads(raw.decode("utf-8", errors="replace"))
    except orjson.JSONDecodeError:
        return None, None
    if not isinstance(doc, dict):
        return None, None
    rid, reply_to = doc.get("id"), doc.get("reply_to")
    rid = rid if isinstance(rid, str) and rid.strip() else None
    if not isinstance(reply_to, str):
        reply_to = None
    else:
        try:
            check_topic_name(reply_to)
        except ValueError:
            reply_to = None
    return rid, reply_to


def _describe(err: ValidationError) -> str:
    first = err.errors()[0]
    field = ".".join(str(p) for p in first["loc"]) or "record"
    return f"field '{field}': {first['msg']}"


def parse_request(raw: bytes | None, limits: Limits) -> Request:
    """Bytes off the wire -> a valid Request, or RequestError naming the fault.

    The error carries the request id when one could be read, so the caller
    answers with an error result; without an id the record goes to the DLQ.
    """
    if raw is None:
        raise RequestError("record has no value (tombstone)", code="empty_record")
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        rid, reply_to = _salvage(raw)
        raise RequestError(
            f"record is not valid UTF-8 (byte {exc.start})", code="invalid_utf8", request_id=rid, reply_to=reply_to
        ) from None
    try:
        doc = orjson.loads(text)
    except orjson.JSONDecodeError as exc:
        raise RequestError(f"record is not valid JSON: {exc}", code="invalid_json") from None
    if not isinstance(doc, dict):
        raise RequestError("record must be a JSON object", code="invalid_json")

    rid = doc.get("id")
    if not isinstance(rid, str) or not rid.strip():
        raise RequestError("field 'id': must be a non-empty string", code="invalid_id")
    if len(rid) > limits.max_id_chars:
        raise RequestError(
            f"field 'id': longer than {limits.max_id_chars} characters (SLUICE_MAX_ID_CHARS)", code="invalid_id"
        )
    reply_to = doc.get("reply_to")
    if reply_to is not None:
        try:
            check_topic_name(reply_to if isinstance(reply_to, str) else "")
        except ValueError:
            raise RequestError(
                "field 'reply_to': must be a valid topic name", code="invalid_field", request_id=rid
            ) from None
        if reply_to.startswith("__"):  # the broker refuses writes there, and a transaction with it
            raise RequestError(
                "field 'reply_to': Kafka's internal topics (__*) take no results",
                code="invalid_field",
                request_id=rid,
            )

    def fail(message: str, code: str = "invalid_field") -> RequestError:
        return RequestError(message, code=code, request_id=rid, reply_to=reply_to)

    inp = doc.get("input")
    if not isinstance(inp, str):
        raise fail("field 'input': must be a string", "invalid_input")
    if not inp.strip():
        raise fail("field 'input': is empty", "empty_input")
    if len(inp) > limits.max_input_chars:
        raise fail(
            f"field 'input': {len(inp)} characters, more than the limit "
            f"{limits.max_input_chars} (SLUICE_MAX_INPUT_CHARS)",
            "input_too_large",
        )
    v = doc.get("v", SCHEMA_VERSION)
    if v != SCHEMA_VERSION:
        raise fail(
            f"field 'v': version {v!r} is not supported (this worker speaks {SCHEMA_VERSION})", "unsupported_version"
        )
    # every other string field: the right type and a bounded length (a
    # tenant and a model name end up in cache keys, metrics and analytics)
    for name, limit, setting in (
        ("tenant", limits.max_tenant_chars, "SLUICE_MAX_TENANT_CHARS"),
        ("model", limits.max_model_chars, "SLUICE_MAX_MODEL_CHARS"),
    ):
        value = doc.get(name)
        if value is None:
            continue
        if not isinstance(value, str) or not value.strip():
            raise fail(f"field '{name}': must be a non-empty string")
        if len(value) > limit:
            raise fail(f"field '{name}': longer than {limit} characters ({setting})")
    task = doc.get("task", "embed")
    if task not in ("embed", "classify"):
        raise fail(f"field 'task': unknown task {task!r} (embed, classify)", "unknown_task")
    labels = doc.get("labels")
    if task == "classify":
        if not isinstance(labels, list) or not labels:
            raise fail("field 'labels': classify needs a non-empty list of labels", "missing_labels")
        if len(labels) > limits.max_labels:
            raise fail(
                f"field 'labels': {len(labels)} labels, more than the limit {limits.max_labels} (SLUICE_MAX_LABELS)",
                "too_many_labels",
            )
        for lab in labels:
            if not isinstance(lab, str) or not lab.strip():
                raise fail("field 'labels': every label must be a non-empty string")
            if len(lab) > limits.max_label_chars:
                raise fail(
                    f"field 'labels': a label is longer than {limits.max_label_chars} "
                    "characters (SLUICE_MAX_LABEL_CHARS)"
                )
        if len(set(labels)) != len(labels):
            raise fail("field 'labels': labels must be distinct")
    try:
        return Request.model_validate(doc)
    except ValidationError as exc:
        raise fail(_describe(exc)) from None


def encode(doc: dict[str, Any]) -> bytes:
    """Records to wire bytes; numpy arrays (embeddings) serialise natively."""
    return orjson.dumps(doc, option=orjson.OPT_SERIALIZE_NUMPY)


def result_doc(
    *,
    id: str | None,
    status: str,
    task: str | None,
    model: str | None,
    cache: str,
    sent_ms: int,
    started_ms: int,
    cache_ms: float,
    inference_start_ms: int,
    inference_end_ms: int,
    done_ms: int,
    tokens: int,
    batch_size: int,
    cost_usd: float,
    worker: str,
    truncated: bool = False,
    output: bytes | None = None,
    error_code: str | None = None,
    error_message: str | None = None,
    retry_after_ms: int | None = None,
) -> dict[str, Any]:
    """A result as the worker publishes it. `model` is the model's ref
    (name@version); `output` the serialised output (what the cache stores),
    sent when the status is ok; otherwise the error, when there is one.
    Timings are milliseconds from the request's `sent_ms` (never negative)."""
    doc: dict[str, Any] = {
        "v": SCHEMA_VERSION,
        "id": id,
        "status": status,
        "task": task,
        "model": model,
        "cache": cache,
        "timings_ms": {
            "queue": max(0, started_ms - sent_ms),
            "cache": round(cache_ms, 3),
            "inference": max(0, inference_end_ms - inference_start_ms),
            "total": max(0, done_ms - sent_ms),
        },
        "tokens": tokens,
        "batch_size": batch_size,
        "cost_usd": cost_usd,
        "worker": worker,
    }
    if truncated:
        doc["truncated"] = True  # the input ran past the model's max tokens
    if status == "ok" and output is not None:
        doc["output"] = orjson.Fragment(output)
    elif error_code is not None:
        doc["error"] = {"code": error_code, "message": error_message}
        if retry_after_ms is not None:
            doc["error"]["retry_after_ms"] = retry_after_ms
    return doc


def telemetry_doc(
    *,
    id: str,
    tenant: str,
    model: str,
    model_version: str,
    task: str,
    status: str,
    error_code: str,
    cache: str,
    tokens: int,
    batch_size: int,
    worker: str,
    partition: int,
    offset: int,
    sent_at_ms: int,
    received_at_ms: int,
    started_ms: int,
    inference_start_ms: int,
    inference_end_ms: int,
    published_at_ms: int,
    cache_ms: float,
    compute_ms: float,
    cost_usd: float,
) -> dict[str, Any]:
    """One telemetry record (the sink's row), for a request of any status.
    `started_ms` is when the worker took the request up (queue time ends);
    durations are derived from the timestamps, never negative."""
    return {
        "v": SCHEMA_VERSION,
        "id": id,
        "tenant": tenant,
        "model": model,
        "model_version": model_version,
        "task": task,
        "status": status,
        "error_code": error_code,
        "cache": cache,
        "tokens": tokens,
        "batch_size": batch_size,
        "worker": worker,
        "partition": partition,
        "offset": offset,
        "sent_at_ms": sent_at_ms,
        "received_at_ms": received_at_ms,
        "inference_start_ms": inference_start_ms,
        "inference_end_ms": inference_end_ms,
        "published_at_ms": published_at_ms,
        "queue_ms": max(0, started_ms - sent_at_ms),
        "cache_ms": cache_ms,
        "inference_ms": max(0, inference_end_ms - inference_start_ms),
        "total_ms": max(0, published_at_ms - sent_at_ms),
        "compute_ms": round(compute_ms, 3),
        "cost_usd": cost_usd,
    }


def dlq_record(
    raw: bytes | None,
    key: bytes | None,
    reason: str,
    code: str,
    *,
    topic: str,
    partition: int,
    offset: int,
    worker: str,
) -> dict[str, Any]:
    return {
        "v": SCHEMA_VERSION,
        "code": code,
        "reason": reason,
        "topic": topic,
        "partition": partition,
        "offset": offset,
        "key_b64": base64.b64encode(key).decode() if key is not None else None,
        "value_b64": base64.b64encode(raw).decode() if raw is not None else None,
        "worker": worker,
        "at_ms": now_ms(),
    }
