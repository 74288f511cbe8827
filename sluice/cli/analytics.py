"""`sluice sink`, `analytics` and `report`: store the telemetry, query it, plot it."""

from __future__ import annotations

import argparse
import asyncio
import socket

from sluice.settings import Settings


def cmd_sink(s: Settings, args: argparse.Namespace) -> int:
    from sinks.sink import serve

    asyncio.run(serve(s.sink()))
    return 0


def _query_runner(s: Settings):
    """Ask the running sink (it owns the embedded database); with none
    running, open the store here (a ClickHouse server, or the chDB folder)."""
    from sinks.query_endpoint import remote_runner
    from sinks.store import open_store

    if not s.clickhouse_url:
        try:
            with socket.create_connection((s.sink_host, s.sink_port), timeout=0.5):
                return remote_runner(s.sink_host, s.sink_port, s.sink_query_token.get_secret_value()), None
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
