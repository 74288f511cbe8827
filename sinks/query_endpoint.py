"""The sink's POST /query: user SQL, read-only, within the query budget.

The store vets and runs the SQL (sinks.query_guard); this is its HTTP side:
a bearer token when one is set, at most `sink_query_concurrency` queries at
once (429 past that), each on a thread and store connection of its own so a
scan never holds up an insert.
"""

from __future__ import annotations

import asyncio
import hmac
import urllib.error
import urllib.request
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import orjson
from aiohttp import web
from prometheus_client import Counter

from sinks.config import SinkConfig
from sinks.errors import QueryError, SinkError
from sinks.store import Store


def remote_runner(host: str, port: int, token: str = "", timeout_s: float = 60.0):
    """Run SQL through a running sink's POST /query (the sink owns the embedded
    database, so other processes ask it). Raises QueryError when the sink
    refuses, OSError when it does not answer."""
    headers = {"Content-Type": "application/json"}
    if token:
        headers["Authorization"] = f"Bearer {token}"

    def via_sink(sql: str) -> tuple[list[str], list[Any]]:
        req = urllib.request.Request(f"http://{host}:{port}/query", data=orjson.dumps({"sql": sql}), headers=headers)
        try:
            with urllib.request.urlopen(req, timeout=timeout_s) as r:
                doc = orjson.loads(r.read())
        except urllib.error.HTTPError as exc:
            raise QueryError(f"sink refused the query: {exc.read().decode(errors='replace')}") from None
        return doc["columns"], doc["rows"]

    return via_sink


class QueryEndpoint:
    """`handle` answers POST /query; `close` drops queries still running."""

    def __init__(self, config: SinkConfig, store: Store, outcomes: Counter, store_ready: Callable[[], bool]) -> None:
        self._store = store
        self._outcomes = outcomes  # sluice_sink_queries_total, by outcome
        self._store_ready = store_ready
        self._concurrency = config.sink_query_concurrency
        # User queries run on threads (and store connections) of their own, so
        # a scan never holds up an insert; past this many at once: 429.
        self._queries = ThreadPoolExecutor(
            max_workers=config.sink_query_concurrency, thread_name_prefix="sluice-sink-query"
        )
        self._queries_running = 0
        self._token = config.sink_query_token.get_secret_value().encode()

    def close(self) -> None:
        self._queries.shutdown(wait=False, cancel_futures=True)

    async def handle(self, request: web.Request) -> web.Response:
        """User SQL, answered read-only within the query budget (sinks.query_guard)."""
        if self._token and not _bearer_matches(request, self._token):
            return _json(
                {"error": "POST /query needs 'Authorization: Bearer <SLUICE_SINK_QUERY_TOKEN>'"},
                401,
                {"WWW-Authenticate": 'Bearer realm="sluice-sink"'},
            )
        if self._queries_running >= self._concurrency:
            self._outcomes.labels("busy").inc()
            return _json(
                {"error": f"{self._queries_running} queries running (SLUICE_SINK_QUERY_CONCURRENCY); retry shortly"},
                429,
                {"Retry-After": "1"},
            )
        self._queries_running += 1
        try:
            doc = await request.json(loads=orjson.loads)
            sql = doc.get("sql") if isinstance(doc, dict) else None
            if not isinstance(sql, str):
                raise QueryError('expected a JSON object {"sql": "SELECT ..."}')
            if not self._store_ready():
                return _json({"error": "store not started"}, 503)
            loop = asyncio.get_running_loop()
            columns, rows = await loop.run_in_executor(self._queries, self._store.query, sql)
        except (QueryError, ValueError) as exc:
            self._outcomes.labels("refused").inc()
            return _json({"error": str(exc)}, 400)
        except SinkError as exc:
            self._outcomes.labels("error").inc()
            return _json({"error": str(exc)}, 503)
        finally:
            self._queries_running -= 1
        self._outcomes.labels("ok").inc()
        return _json({"columns": columns, "rows": rows})


def _bearer_matches(request: web.Request, token: bytes) -> bool:
    scheme, _, given = request.headers.get("Authorization", "").partition(" ")
    return scheme.lower() == "bearer" and hmac.compare_digest(given.strip().encode(), token)


def _json(doc: dict[str, Any], status: int = 200, headers: dict[str, str] | None = None) -> web.Response:
    return web.Response(body=orjson.dumps(doc), status=status, content_type="application/json", headers=headers)
