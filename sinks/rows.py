"""Records off the wire -> rows of their ClickHouse tables (JSONEachRow):
telemetry -> telemetry, the autoscaler's decisions -> autoscale_events."""

from __future__ import annotations

from typing import Any

import orjson
from pydantic import ValidationError

from schemas.errors import SluiceError
from schemas.records import ScaleDecision, Telemetry

# epoch-ms fields of the record -> DateTime64(3) columns of the table
_TIMESTAMPS = (
    ("sent_at_ms", "sent_at"),
    ("received_at_ms", "received_at"),
    ("inference_start_ms", "inference_start"),
    ("inference_end_ms", "inference_end"),
    ("published_at_ms", "published_at"),
)
_PLAIN = (
    "id",
    "tenant",
    "model",
    "model_version",
    "task",
    "status",
    "error_code",
    "cache",
    "tokens",
    "batch_size",
    "worker",
    "partition",
    "offset",
    "queue_ms",
    "cache_ms",
    "inference_ms",
    "total_ms",
    "compute_ms",
    "cost_usd",
)
_UNSIGNED = {"tokens": 1 << 32, "batch_size": 1 << 32, "partition": 1 << 16, "offset": 1 << 64}


class BadRecord(SluiceError, ValueError):
    """A telemetry record the table cannot take; skipped and counted."""

    code = "bad_record"


def _validated(model: type[Telemetry] | type[ScaleDecision], raw: bytes | None) -> Any:
    if raw is None:
        raise BadRecord("record has no value (tombstone)")
    try:
        return model.model_validate_json(raw)
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(str(p) for p in first["loc"]) or "record"
        raise BadRecord(f"field '{where}': {first['msg']}") from None


def _epoch_ms(name: str, ms: int) -> orjson.Fragment:
    if not 0 <= ms < 10_000_000_000_000:  # DateTime64(3) ends in 2299
        raise BadRecord(f"field '{name}': {ms} is not an epoch time in milliseconds")
    return orjson.Fragment(b"%d.%03d" % divmod(ms, 1000))


def to_row(raw: bytes | None) -> bytes:
    """A telemetry record off the wire -> one JSONEachRow line for the table.

    Epoch milliseconds become seconds with three decimals (ClickHouse reads a
    bare integer as seconds, and ms would overflow DateTime64(3)); the decimal
    text is exact, so the milliseconds round-trip."""
    t = _validated(Telemetry, raw)
    row: dict[str, Any] = {name: getattr(t, name) for name in _PLAIN}
    for name, bound in _UNSIGNED.items():
        if not 0 <= row[name] < bound:
            raise BadRecord(f"field '{name}': {row[name]} is out of range")
    for src, dst in _TIMESTAMPS:
        row[dst] = _epoch_ms(src, getattr(t, src))
    return orjson.dumps(row)


_DECISION_COUNTS = ("desired", "current", "ready", "recommended", "partitions")


def decision_row(raw: bytes | None) -> bytes:
    """An autoscaler decision off the wire -> one row of autoscale_events."""
    d = _validated(ScaleDecision, raw)
    row: dict[str, Any] = d.model_dump(exclude={"v", "at_ms"})
    for name in _DECISION_COUNTS:
        if row[name] >= 1 << 16:
            raise BadRecord(f"field '{name}': {row[name]} is out of range")
    if any(not 0 <= p < 1 << 16 for p in d.stuck):
        raise BadRecord("field 'stuck': a partition number is out of range")
    row = {k: v for k, v in row.items() if k in _DECISION_COLUMNS}
    row["at"] = _epoch_ms("at_ms", d.at_ms)
    return orjson.dumps(row)


_DECISION_COLUMNS = frozenset(ScaleDecision.model_fields) - {"v", "at_ms"}
