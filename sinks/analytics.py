"""Named analytics queries: one .sql file each under sinks/queries/.

A file's first line, `-- answers: ...`, says what it answers; its body may
use `{db}`, `{since_s}` and `{slo_ms}`, filled in here from validated
numbers (never from free text). The same SQL runs on embedded chDB and on a
ClickHouse server.
"""

from __future__ import annotations

import csv
import io
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from importlib import resources
from importlib.resources.abc import Traversable
from typing import Any

import orjson

from schemas.errors import SluiceError

QUERIES_DIR = resources.files("sinks").joinpath("queries")  # package data: installed with the code
_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([smhdw]?)\s*$")
_UNIT_S = {"": 1, "s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800}
_DB_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")

Runner = Callable[[str], tuple[list[str], list[Sequence[Any]]]]


class AnalyticsError(SluiceError):
    code = "analytics"


@dataclass(frozen=True)
class NamedQuery:
    name: str
    answers: str
    sql: str

    def render(self, *, db: str, since_s: int, slo_ms: float = 500.0) -> str:
        if not _DB_NAME.match(db):
            raise AnalyticsError(f"SLUICE_CLICKHOUSE_DATABASE={db!r}: not a plain identifier")
        return self.sql.format(db=db, since_s=int(since_s), slo_ms=float(slo_ms))


def load_queries(folder: Traversable = QUERIES_DIR) -> dict[str, NamedQuery]:
    out = {}
    for path in sorted((p for p in folder.iterdir() if p.name.endswith(".sql")), key=lambda p: p.name):
        text = path.read_text()
        first = text.splitlines()[0] if text else ""
        answers = first.removeprefix("-- answers:").strip() if first.startswith("-- answers:") else ""
        name = path.name.removesuffix(".sql")
        out[name] = NamedQuery(name, answers, text)
    return out


def parse_since(text: str) -> int:
    """'90s', '15m', '2h', '7d', '1w' or plain seconds -> seconds."""
    m = _DURATION.match(text)
    if not m or float(m.group(1)) <= 0:
        raise AnalyticsError(f"--since {text!r}: expected a duration like 30m, 2h or 7d")
    return int(float(m.group(1)) * _UNIT_S[m.group(2)])


def run(
    name: str, runner: Runner, *, db: str = "sluice", since_s: int = 3600, slo_ms: float = 500.0
) -> tuple[list[str], list[Sequence[Any]]]:
    queries = load_queries()
    if name not in queries:
        raise AnalyticsError(f"unknown query {name!r} (known: {', '.join(queries)})")
    return runner(queries[name].render(db=db, since_s=since_s, slo_ms=slo_ms))


def format_result(columns: list[str], rows: list[Sequence[Any]], fmt: str = "table") -> str:
    if fmt == "json":
        return "\n".join(orjson.dumps(dict(zip(columns, map(_plain, r)))).decode() for r in rows)
    if fmt == "csv":
        buf = io.StringIO()
        w = csv.writer(buf, lineterminator="\n")
        w.writerow(columns)
        w.writerows([[_plain(v) for v in r] for r in rows])
        return buf.getvalue().rstrip("\n")
    cells = [[_cell(v) for v in r] for r in rows]
    widths = [max([len(c)] + [len(r[i]) for r in cells]) for i, c in enumerate(columns)]
    line = "  ".join(c.ljust(w) for c, w in zip(columns, widths))
    body = ["  ".join(v.rjust(w) if _numeric(v) else v.ljust(w) for v, w in zip(r, widths)) for r in cells]
    return "\n".join([line, "  ".join("-" * w for w in widths), *body] if rows else [line, "(no rows)"])


def _cell(v: Any) -> str:
    """Table text: floats to 6 significant digits (costs are tiny, rates are not)."""
    return f"{v:.6g}" if isinstance(v, float) else str(_plain(v))


def _plain(v: Any) -> Any:
    if hasattr(v, "isoformat"):
        return v.isoformat(sep=" ") if hasattr(v, "hour") else v.isoformat()
    return v


def _numeric(v: str) -> bool:
    try:
        float(v)
        return True
    except ValueError:
        return False
