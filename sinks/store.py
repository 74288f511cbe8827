"""Where telemetry is stored: one interface, two back ends, the same SQL.

- `ChdbStore`: embedded chDB (in-process ClickHouse) in a folder. One process
  owns a folder at a time (a second one fails with "Cannot lock file
  .../status"), so in embedded mode the sink answers queries for others.
- `ServerStore`: a ClickHouse server through clickhouse-connect (HTTP).

Both take the same DDL (schemas/clickhouse/telemetry.sql), the same
JSONEachRow insert body and return query results parsed from the same
JSONCompact output, so a query gives identical values on either back end.
Every method is blocking; the sink calls them from threads of its own.

`query` is for user SQL and `execute` for ours: user SQL is vetted and run
read-only within a budget on connections of its own (sinks.query_guard).
"""

from __future__ import annotations

import contextlib
import logging
import queue
import re
from collections.abc import Callable, Iterator
from importlib import resources
from importlib.resources.abc import Traversable
from pathlib import Path
from typing import Any, Protocol

import orjson

from schemas.errors import require_extra
from sinks.config import SinkConfig
from sinks.errors import QueryError, SinkError
from sinks.query_guard import QueryBudget, QueryGuard, vet

log = logging.getLogger(__name__)

# package data of schemas (the contract), installed with the code
DDL_PATH = resources.files("schemas").joinpath("clickhouse/telemetry.sql")
TABLE = "telemetry"

# Every insert: the token names the block (a replay of it is dropped), and the
# rollups drop it too (the rollup table has its own deduplication window).
_INSERT_SETTINGS = {"deduplicate_blocks_in_dependent_materialized_views": 1}
# Numbers as JSON numbers, not strings, so both back ends return the same types.
_QUERY_SETTINGS = {"output_format_json_quote_64bit_integers": 0, "output_format_json_quote_decimals": 0}
# User queries also read `sum(requests) AS requests` the way dashboards mean
# it (the column inside, the alias outside); the named queries rely on it, and
# a user cannot set it in the query (no SETTINGS under readonly).
_USER_QUERY_SETTINGS = {**_QUERY_SETTINGS, "prefer_column_name_to_alias": 1}


def ddl_statements(database: str, ttl_days: int, path: Traversable = DDL_PATH) -> list[str]:
    """The DDL file as statements: {db}/{ttl_days} filled, `--` lines dropped,
    split on `;`."""
    text = path.read_text().replace("{db}", database).replace("{ttl_days}", str(int(ttl_days)))
    body = "\n".join(line for line in text.splitlines() if not line.lstrip().startswith("--"))
    return [s.strip() for s in body.split(";") if s.strip()]


def _parse_json_compact(raw: bytes) -> tuple[list[str], list[tuple]]:
    if not raw.strip():
        return [], []
    doc = orjson.loads(raw)
    return [m["name"] for m in doc["meta"]], [tuple(r) for r in doc["data"]]


class Store(Protocol):
    database: str

    def start(self) -> None: ...
    def insert(self, rows: list[dict[str, Any]] | list[bytes], dedup_token: str, table: str = TABLE) -> None: ...
    def query(self, sql: str) -> tuple[list[str], list[tuple]]: ...
    def execute(self, sql: str) -> tuple[list[str], list[tuple]]: ...
    def close(self) -> None: ...


def encode_rows(rows: list[dict[str, Any]] | list[bytes]) -> bytes:
    """JSONEachRow body; rows may already be encoded lines (the sink's hot path)."""
    return b"\n".join(r if isinstance(r, bytes) else orjson.dumps(r) for r in rows)


class _Readers:
    """Connections that run user queries, one per concurrent query, each held
    by one thread at a time. They are not the writer's connection: a user's
    scan never waits behind an insert, nor an insert behind a scan.

    A connection whose query failed is closed and replaced by a new one when
    next taken: chDB 26.9 hands the rest of a failed query's output to the
    next query on the same connection (a result-row limit hit mid-stream came
    back glued to the following answer), and one user's rows must never reach
    another's answer."""

    def __init__(self, opener: Callable[[], Any], closer: Callable[[Any], None], size: int) -> None:
        self._open, self._close = opener, closer
        self._free: queue.SimpleQueue[Any] = queue.SimpleQueue()
        for _ in range(size):
            self._free.put(None)  # opened on first use

    @contextlib.contextmanager
    def take(self) -> Iterator[Any]:
        conn = self._free.get()
        try:
            if conn is None:
                conn = self._open()
            yield conn
        except BaseException:
            if conn is not None:
                self._discard(conn)
            conn = None
            raise
        finally:
            self._free.put(conn)

    def _discard(self, conn: Any) -> None:
        try:
            self._close(conn)
        except Exception:
            log.exception("error while closing a query connection")

    def close(self) -> None:
        while True:
            try:
                conn = self._free.get_nowait()
            except queue.Empty:
                return
            if conn is not None:
                self._discard(conn)


class ChdbStore:
    """Embedded chDB in `path` (created if missing).

    One connection writes (DDL, inserts, `execute`); `readers` more answer
    user queries (`query`) under readonly = 1 and the budget, set on their
    sessions before anything else runs there."""

    def __init__(
        self,
        path: Path,
        database: str = "sluice",
        ttl_days: int = 30,
        budget: QueryBudget | None = None,
        readers: int = 2,
    ) -> None:
        self.path = Path(path)
        self.database = database
        self.ttl_days = ttl_days
        self.budget = budget or QueryBudget()
        self._n_readers = readers
        self._session: Any = None
        self._readers: _Readers | None = None
        self._guard: QueryGuard | None = None

    def start(self) -> None:
        import chdb
        import chdb.session

        if self._session is None:
            self.path.mkdir(parents=True, exist_ok=True)
            try:
                self._session = chdb.session.Session(str(self.path))
            except Exception as exc:  # chDB raises plain RuntimeErrors
                raise SinkError(
                    f"cannot open chDB folder {self.path}: {exc} (is another sink "
                    "running on it? Ask it through POST /query instead)"
                ) from exc
            # session settings: every later query returns numbers as numbers
            for k, v in _QUERY_SETTINGS.items():
                self._session.query(f"SET {k} = {v}")
        for stmt in ddl_statements(self.database, self.ttl_days):
            self._run(stmt)
        if self._guard is None:
            self._guard = QueryGuard.from_catalog(self.execute(QueryGuard.CATALOG_SQL)[1])
            self._readers = _Readers(self._open_reader, lambda c: c.close(), self._n_readers)

    def _open_reader(self) -> Any:
        import chdb

        conn = chdb.connect(str(self.path))
        try:
            for k, v in {**_USER_QUERY_SETTINGS, **self.budget.settings()}.items():
                conn.query(f"SET {k} = {_literal(v)}")
        except Exception as exc:
            conn.close()
            raise SinkError(f"chDB: cannot open a query connection: {_first_line(exc)}") from exc
        return conn

    def _run(self, sql: str, fmt: str = "CSV") -> Any:
        if self._session is None:
            raise SinkError("store is not started")
        try:
            return self._session.query(sql, fmt)
        except Exception as exc:
            raise SinkError(f"chDB: {exc}") from exc

    def insert(self, rows: list[dict[str, Any]] | list[bytes], dedup_token: str, table: str = TABLE) -> None:
        if not rows:
            return
        settings = ", ".join(
            [f"insert_deduplication_token = '{_quote(dedup_token)}'"]
            + [f"{k} = {v}" for k, v in _INSERT_SETTINGS.items()]
        )
        body = encode_rows(rows).decode()
        self._run(f"INSERT INTO {self.database}.{table} SETTINGS {settings} FORMAT JSONEachRow\n{body}")

    def execute(self, sql: str) -> tuple[list[str], list[tuple]]:
        """Our own SQL (DDL, bulk loads, maintenance) with full rights; never user text."""
        try:
            res = self._run(sql, "JSONCompact")
        except SinkError as exc:
            raise QueryError(str(exc)) from exc
        return _parse_json_compact(res.bytes())

    def query(self, sql: str) -> tuple[list[str], list[tuple]]:
        """User SQL: vetted (sinks.query_guard), then run read-only within the budget."""
        if self._guard is None or self._readers is None:
            raise SinkError("store is not started")
        with self._readers.take() as conn:

            def ask(text: str, params: dict[str, str] | None = None) -> bytes:
                try:
                    return conn.query(text, "JSONCompact", params=params).bytes()
                except Exception as exc:
                    raise QueryError(f"chDB: {_first_line(exc)}") from exc

            def canonical(text: str) -> str:
                return str(
                    _parse_json_compact(ask("SELECT formatQuery({sql:String})", {"sql": _tsv_escape(text)}))[1][0][0]
                )

            def explain(text: str) -> str:
                return "\n".join(str(r[0]) for r in _parse_json_compact(ask("EXPLAIN AST " + text))[1])

            return _parse_json_compact(ask(vet(sql, canonical, explain, self._guard)))

    def close(self) -> None:
        if self._readers is not None:
            self._readers.close()
            self._readers = None
        self._guard = None
        if self._session is not None:
            try:
                self._session.close()
            finally:
                self._session = None


class ServerStore:
    """A ClickHouse server through clickhouse-connect; the URL carries host,
    port and credentials (http://user:pass@host:8123/). User queries run on
    clients of their own (no session, so they may run at once) with the
    budget and readonly = 1 as settings of each request."""

    def __init__(
        self,
        url: str,
        database: str = "sluice",
        ttl_days: int = 30,
        budget: QueryBudget | None = None,
        readers: int = 2,
    ) -> None:
        self.url = url
        self.database = database
        self.ttl_days = ttl_days
        self.budget = budget or QueryBudget()
        self._n_readers = readers
        self._client: Any = None
        self._readers: _Readers | None = None
        self._guard: QueryGuard | None = None

    def _connect(self, **kw: Any) -> Any:
        clickhouse_connect = require_extra(
            "clickhouse_connect", "server", "a ClickHouse server (SLUICE_CLICKHOUSE_URL)"
        )

        try:
            return clickhouse_connect.get_client(dsn=self.url, database="default", connect_timeout=5, **kw)
        except Exception as exc:
            raise SinkError(f"ClickHouse at {_redact(self.url)}: {exc}") from exc

    def start(self) -> None:
        if self._client is None:
            self._client = self._connect()
        for stmt in ddl_statements(self.database, self.ttl_days):
            try:
                self._client.command(stmt)
            except Exception as exc:
                raise SinkError(f"ClickHouse DDL failed: {exc}") from exc
        if self._guard is None:
            self._guard = QueryGuard.from_catalog(self.execute(QueryGuard.CATALOG_SQL)[1])
            self._readers = _Readers(
                lambda: self._connect(autogenerate_session_id=False), lambda c: c.close(), self._n_readers
            )

    def insert(self, rows: list[dict[str, Any]] | list[bytes], dedup_token: str, table: str = TABLE) -> None:
        if not rows:
            return
        if self._client is None:
            raise SinkError("store is not started")
        try:
            self._client.raw_insert(
                f"{self.database}.{table}",
                insert_block=encode_rows(rows),
                settings={"insert_deduplication_token": dedup_token, **_INSERT_SETTINGS},
                fmt="JSONEachRow",
            )
        except Exception as exc:
            raise SinkError(f"ClickHouse insert failed: {exc}") from exc

    def execute(self, sql: str) -> tuple[list[str], list[tuple]]:
        """Our own SQL (DDL, bulk loads, maintenance) with full rights; never user text."""
        if self._client is None:
            raise SinkError("store is not started")
        try:
            raw = self._client.raw_query(sql, settings=_QUERY_SETTINGS, fmt="JSONCompact")
        except Exception as exc:
            raise QueryError(f"ClickHouse: {exc}") from exc
        return _parse_json_compact(raw)

    def query(self, sql: str) -> tuple[list[str], list[tuple]]:
        """User SQL: vetted (sinks.query_guard), then run read-only within the budget."""
        if self._guard is None or self._readers is None:
            raise SinkError("store is not started")
        with self._readers.take() as client:

            def ask(text: str, settings: dict[str, Any], params: dict[str, str] | None = None) -> bytes:
                try:
                    return client.raw_query(text, parameters=params, settings=settings, fmt="JSONCompact")
                except Exception as exc:
                    raise QueryError(f"ClickHouse: {_first_line(exc)}") from exc

            def canonical(text: str) -> str:
                raw = ask("SELECT formatQuery({sql:String})", _USER_QUERY_SETTINGS, {"sql": text})
                return str(_parse_json_compact(raw)[1][0][0])

            def explain(text: str) -> str:
                raw = ask("EXPLAIN AST " + text, _USER_QUERY_SETTINGS)
                return "\n".join(str(r[0]) for r in _parse_json_compact(raw)[1])

            text = vet(sql, canonical, explain, self._guard)
            return _parse_json_compact(ask(text, {**_USER_QUERY_SETTINGS, **self.budget.settings()}))

    def close(self) -> None:
        if self._readers is not None:
            self._readers.close()
            self._readers = None
        self._guard = None
        if self._client is not None:
            try:
                self._client.close()
            finally:
                self._client = None


def open_store(config: SinkConfig) -> Store:
    """The configured back end, not yet started."""
    budget, readers = config.query_budget(), config.sink_query_concurrency
    if config.embedded:
        return ChdbStore(
            config.chdb_path, config.clickhouse_database, config.telemetry_ttl_days, budget=budget, readers=readers
        )
    return ServerStore(
        config.clickhouse_url, config.clickhouse_database, config.telemetry_ttl_days, budget=budget, readers=readers
    )


def _literal(v: Any) -> str:
    return f"'{_quote(v)}'" if isinstance(v, str) else str(v)


def _tsv_escape(text: str) -> str:
    """A query parameter's value as ClickHouse reads it (TSV escaping)."""
    return text.replace("\\", "\\\\").replace("\n", "\\n").replace("\t", "\\t").replace("\r", "\\r")


def _first_line(exc: BaseException) -> str:
    """ClickHouse's message without the stack trace it sometimes appends."""
    return str(exc).strip().split("\n", 1)[0]


def _quote(s: str) -> str:
    return s.replace("\\", "\\\\").replace("'", "\\'")


def _redact(url: str) -> str:
    return re.sub(r"//([^:/@]+):[^@/]*@", r"//\1:***@", url)
