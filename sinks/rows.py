"""Telemetry records off the wire -> rows of the ClickHouse table (JSONEachRow)."""

from __future__ import annotations

from typing import Any

import orjson
from pydantic import ValidationError

from schemas.errors import SluiceError
from schemas.records import Telemetry

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


def to_row(raw: bytes | None) -> bytes:
    """A telemetry record off the wire -> one JSONEachRow line for the table.

    Epoch milliseconds become seconds with three decimals (ClickHouse reads a
    bare integer as seconds, and ms would overflow DateTime64(3)); the decimal
    text is exact, so the milliseconds round-trip."""
    if raw is None:
        raise BadRecord("record has no value (tombstone)")
    try:
        t = Telemetry.model_validate_json(raw)
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(str(p) for p in first["loc"]) or "record"
        raise BadRecord(f"field '{where}': {first['msg']}") from None
    row: dict[str, Any] = {name: getattr(t, name) for name in _PLAIN}
    for name, bound in _UNSIGNED.items():
        if not 0 <= row[name] < bound:
            raise BadRecord(f"field '{name}': {row[name]} is out of range")
    for src, dst in _TIMESTAMPS:
        ms = getattr(t, src)
        if not 0 <= ms < 10_000_000_000_000:  # DateTime64(3) ends in 2299
            raise BadRecord(f"field '{src}': {ms} is not an epoch time in milliseconds")
        row[dst] = orjson.Fragment(b"%d.%03d" % divmod(ms, 1000))
    return orjson.dumps(row)
