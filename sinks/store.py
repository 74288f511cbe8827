"""Where telemetry is stored: one interface, two back ends, the same SQL.

- `ChdbStore`: embedded chDB (in-process ClickHouse) in a folder. One process
  owns a folder at a time (a second one fails with "Cannot lock file
  .../status"), so in embedded mode the sink answers queries for others.
- `ServerStore`: a ClickHouse server through clickhouse-connect (HTTP).

Both take the same DDL (schemas/clickhouse/telemetry.sql), the same
JSONEachRow insert body and return query results parsed from the same
JSONCompact output, so a query gives identical values on either back end.
Every method is blocking; the sink calls them through `asyncio.to_thread`.
"""

from __future__ import annotations

import logging
import re
from pathlib import Path
from typing import Any, Protocol

import orjson

from schemas.errors import SluiceError
from sinks.config import SinkConfig

log = logging.getLogger(__name__)

DDL_PATH = Path(__file__).resolve().parents[1] / "schemas" / "clickhouse" / "telemetry.sql"
TABLE = "telemetry"

# Every insert: the token names the block (a replay of it is dropped), and the
# rollups drop it too (the rollup table has its own deduplication window).
_INSERT_SETTINGS = {"deduplicate_blocks_in_dependent_materialized_views": 1}
# Numbers as JSON numbers, not strings, so both back ends return the same types.
_QUERY_SETTINGS = {"output_format_json_quote_64bit_integers": 0,
                   "output_format_json_quote_decimals": 0}


class SinkError(SluiceError):
    """The store failed (unreachable, rejected an insert, bad query)."""

    code = "sink"
    retriable = True


class QueryError(SinkError):
    """A query was refused or failed; the caller's fault, not retriable."""

    code = "query"
    retriable = False


def ddl_statements(database: str, ttl_days: int, path: Path = DDL_PATH) -> list[str]:
    """The DDL file as statements: {db}/{ttl_days} filled, `--` lines dropped,
    split on `;`."""
    text = path.read_text().replace("{db}", database).replace("{ttl_days}", str(int(ttl_days)))
    body = "\n".join(line for line in text.splitlines() if not line.lstrip().startswith("--"))
    return [s.strip() for s in body.split(";") if s.strip()]


_READ_ONLY = re.compile(r"^\s*(select|with)\b", re.IGNORECASE)
_COMMENTS = re.compile(r"--[^\n]*|/\*.*?\*/", re.DOTALL)


def check_read_only(sql: str) -> str:
    """A single SELECT/WITH statement, or QueryError. A trailing `;` is allowed."""
    stripped = _COMMENTS.sub(" ", sql).strip()
    if stripped.endswith(";"):
        stripped = stripped[:-1].rstrip()
    if not stripped:
        raise QueryError("empty query")
    if not _READ_ONLY.match(stripped):
        raise QueryError("only SELECT or WITH statements are allowed")
    if ";" in re.sub(r"'(?:[^'\\]|\\.)*'", "''", stripped):
        raise QueryError("one statement at a time")
    return stripped


def _parse_json_compact(raw: bytes) -> tuple[list[str], list[tuple]]:
    if not raw.strip():
        return [], []
    doc = orjson.loads(raw)
    return [m["name"] for m in doc["meta"]], [tuple(r) for r in doc["data"]]


class Store(Protocol):
    database: str

    def start(self) -> None: ...
    def insert(self, rows: list[dict[str, Any]] | list[bytes], dedup_token: str) -> None: ...
    def query(self, sql: str) -> tuple[list[str], list[tuple]]: ...
    def close(self) -> None: ...


def encode_rows(rows: list[dict[str, Any]] | list[bytes]) -> bytes:
    """JSONEachRow body; rows may already be encoded lines (the sink's hot path)."""
    return b"\n".join(r if isinstance(r, bytes) else orjson.dumps(r) for r in rows)


class ChdbStore:
    """Embedded chDB in `path` (created if missing)."""

    def __init__(self, path: Path, database: str = "sluice", ttl_days: int = 30) -> None:
        self.path = Path(path)
        self.database = database
        self.ttl_days = ttl_days
        self._session: Any = None

    def start(self) -> None:
        import chdb.session
        if self._session is None:
            self.path.mkdir(parents=True, exist_ok=True)
            try:
                self._session = chdb.session.Session(str(self.path))
            except Exception as exc:  # chDB raises plain RuntimeErrors
                raise SinkError(f"cannot open chDB folder {self.path}: {exc} (is another sink "
                                "running on it? Ask it through POST /query instead)") from exc
            # session settings: every later query returns numbers as numbers
            for k, v in _QUERY_SETTINGS.items():
                self._session.query(f"SET {k} = {v}")
        for stmt in ddl_statements(self.database, self.ttl_days):
            self._run(stmt)

    def _run(self, sql: str, fmt: str = "CSV") -> Any:
        if self._session is None:
            raise SinkError("store is not started")
        try:
            return self._session.query(sql, fmt)
        except Exception as exc:
            raise SinkError(f"chDB: {exc}") from exc

    def insert(self, rows: list[dict[str, Any]] | list[bytes], dedup_token: str) -> None:
        if not rows:
            return
        settings = ", ".join([f"insert_deduplication_token = '{_quote(dedup_token)}'"]
                             + [f"{k} = {v}" for k, v in _INSERT_SETTINGS.items()])
        body = encode_rows(rows).decode()
        self._run(f"INSERT INTO {self.database}.{TABLE} SETTINGS {settings} FORMAT JSONEachRow\n{body}")

    def query(self, sql: str) -> tuple[list[str], list[tuple]]:
        try:
            res = self._run(sql, "JSONCompact")
        except SinkError as exc:
            raise QueryError(str(exc)) from exc
        return _parse_json_compact(res.bytes())

    def close(self) -> None:
        if self._session is not None:
            try:
                self._session.close()
            finally:
                self._session = None


class ServerStore:
    """A ClickHouse server through clickhouse-connect; the URL carries host,
    port and credentials (http://user:pass@host:8123/)."""

    def __init__(self, url: str, database: str = "sluice", ttl_days: int = 30) -> None:
        self.url = url
        self.database = database
        self.ttl_days = ttl_days
        self._client: Any = None

    def start(self) -> None:
        import clickhouse_connect
        if self._client is None:
            try:
                self._client = clickhouse_connect.get_client(dsn=self.url, database="default",
                                                             connect_timeout=5)
            except Exception as exc:
                raise SinkError(f"ClickHouse at {_redact(self.url)}: {exc}") from exc
        for stmt in ddl_statements(self.database, self.ttl_days):
            try:
                self._client.command(stmt)
            except Exception as exc:
                raise SinkError(f"ClickHouse DDL failed: {exc}") from exc

    def insert(self, rows: list[dict[str, Any]] | list[bytes], dedup_token: str) -> None:
        if not rows:
            return
        if self._client is None:
            raise SinkError("store is not started")
        try:
            self._client.raw_insert(f"{self.database}.{TABLE}", insert_block=encode_rows(rows),
                                    settings={"insert_deduplication_token": dedup_token,
                                              **_INSERT_SETTINGS},
                                    fmt="JSONEachRow")
        except Exception as exc:
            raise SinkError(f"ClickHouse insert failed: {exc}") from exc

    def query(self, sql: str) -> tuple[list[str], list[tuple]]:
        if self._client is None:
            raise SinkError("store is not started")
        try:
            raw = self._client.raw_query(sql, settings=_QUERY_SETTINGS, fmt="JSONCompact")
        except Exception as exc:
            raise QueryError(f"ClickHouse: {exc}") from exc
        return _parse_json_compact(raw)

    def close(self) -> None:
        if self._client is not None:
            try:
                self._client.close()
            finally:
                self._client = None


def open_store(config: SinkConfig) -> Store:
    """The configured back end, not yet started."""
    if config.embedded:
        return ChdbStore(config.chdb_path, config.clickhouse_database, config.telemetry_ttl_days)
    return ServerStore(config.clickhouse_url, config.clickhouse_database, config.telemetry_ttl_days)


def _quote(s: str) -> str:
    return s.replace("\\", "\\\\").replace("'", "\\'")


def _redact(url: str) -> str:
    return re.sub(r"//([^:/@]+):[^@/]*@", r"//\1:***@", url)
