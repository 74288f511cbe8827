"""`sluice sink`, `analytics` and `report`: store the telemetry, query it, plot it."""

from __future__ import annotations

import argparse
import asyncio
import socket
import urllib.error
import urllib.request

import orjson

from schemas.errors import SluiceError
from sluice.settings import Settings


def cmd_sink(s: Settings, args: argparse.Namespace) -> int:
    from sinks.sink import serve

    asyncio.run(serve(s.sink()))
    return 0


def sink_runner(host: str, port: int, token: str = ""):
    """Run SQL through a sink's POST /query."""
    headers = {"Content-Type": "application/json"}
    if token:
        headers["Authorization"] = f"Bearer {token}"

    def via_sink(sql: str):
        req = urllib.request.Request(f"http://{host}:{port}/query", data=orjson.dumps({"sql": sql}), headers=headers)
        try:
            with urllib.request.urlopen(req, timeout=60) as r:
                doc = orjson.loads(r.read())
        except urllib.error.HTTPError as exc:
            raise SluiceError(f"sink refused the query: {exc.read().decode(errors='replace')}") from None
        return doc["columns"], doc["rows"]

    return via_sink


def _query_runner(s: Settings):
    """Ask the running sink (it owns the embedded database); with none
    running, open the store here (a ClickHouse server, or the chDB folder)."""
    from sinks.store import open_store

    if not s.clickhouse_url:
        try:
            with socket.create_connection((s.sink_host, s.sink_port), timeout=0.5):
                return sink_runner(s.sink_host, s.sink_port, s.sink_query_token.get_secret_value()), None
        except OSError:
            pass
    store = open_store(s.sink())
    store.start()
    return store.query, store


def cmd_analytics(s: Settings, args: argparse.Namespace) -> int:
    from sinks.analytics import format_result, load_queries, parse_since, run

    if args.list or not args.name:
        for name, q in load_queries().items():
            print(f"{name:26} {q.answers}")
        return 0
    runner, store = _query_runner(s)
    try:
        cols, rows = run(
            args.name, runner, db=s.clickhouse_database, since_s=parse_since(args.since), slo_ms=args.slo_ms
        )
    finally:
        if store is not None:
            store.close()
    print(format_result(cols, rows, args.format))
    return 0


def cmd_report(s: Settings, args: argparse.Namespace) -> int:
    from pathlib import Path

    from sinks.analytics import parse_since
    from sinks.report import pyplot, write_report

    pyplot()  # before opening the store: a missing `report` extra says so first

    runner, store = _query_runner(s)
    try:
        path = write_report(
            Path(args.out), runner, db=s.clickhouse_database, since_s=parse_since(args.since), slo_ms=args.slo_ms
        )
    finally:
        if store is not None:
            store.close()
    print(f"report written: {path}")
    return 0
