"""`sluice demo`: stack, worker, sink and gateway, a load run with repeats,
the analytics, and a call over HTTP."""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import time
import urllib.request
from typing import Any

from sluice.cli.traffic import generator_slice, workload_of
from sluice.settings import Settings


def call_over_http(url: str) -> bool:
    """One call as an OpenAI client makes it, printed; True when answered."""
    body = {"input": ["Sluice answers over HTTP too", "one request per input, batched and cached"]}
    print("\n== over HTTP: sluice gateway ==")
    print(f"POST {url} {json.dumps(body)}")
    req = urllib.request.Request(url, data=json.dumps(body).encode(), headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=30) as r:
            doc = json.loads(r.read())
    except (OSError, ValueError) as exc:
        print(f"failed: {exc}")
        return False
    dims = [len(d["embedding"]) for d in doc["data"]]
    print(f"200: {len(dims)} embeddings of {dims[0]} floats from {doc['model']}, usage {doc['usage']}")
    print("(the OpenAI SDK works with base_url=http://HOST:PORT/v1; see docs/gateway.md)")
    return True


def cmd_demo(s: Settings, args: argparse.Namespace) -> int:
    """Stack up (if needed), a worker and the sink, an open-loop run with
    repeats, the summary and the analytics; then stop what it started."""
    from producers.http_transport import HttpTransport
    from producers.loadgen import run_load
    from sinks.analytics import format_result, run
    from sinks.query_endpoint import remote_runner
    from sluice.stack import LocalStack
    from sluice.supervisor import WorkerProcess

    stack = LocalStack(s.stack())
    started_stack = stack.up(s.topic_partitions(), **s.topic_replication()) == "started"
    generator_slice(s)
    common = {k: v for k, v in os.environ.items() if k.startswith("SLUICE_")}
    common["SLUICE_BOOTSTRAP_SERVERS"] = s.bootstrap_servers
    worker = WorkerProcess({**common, "SLUICE_METRICS_PORT": str(args.metrics_port or 0)})
    sink = WorkerProcess({**common, "SLUICE_SINK_PORT": "0"}, command="sink")
    # the HTTP API, open to anonymous calls (tenant default) for the demo only
    gateway = WorkerProcess(
        {
            **common,
            "SLUICE_GATEWAY_PORT": "0",
            "SLUICE_GATEWAY_ALLOW_ANONYMOUS": "true",
            "SLUICE_GATEWAY_ID": f"demo-{os.getpid()}",
        },
        command="gateway",
    )
    try:
        ready_s = worker.start()
        sink.start()
        gateway.start()
        url = f"http://127.0.0.1:{gateway.port}/v1/embeddings"
        runner = remote_runner(s.sink_host, sink.port, s.sink_query_token.get_secret_value())
        count_sql = (
            f"SELECT count() FROM {s.clickhouse_database}.telemetry "
            f"WHERE published_at >= toDateTime64({time.time():.3f}, 3)"
        )
        print(
            f"worker ready in {ready_s:.1f} s; sending {int(args.rate * args.duration)} requests "
            f"at {args.rate:g}/s ({args.distribution} over {args.distinct} inputs)"
        )

        async def load() -> Any:
            if args.transport == "http":  # through the gateway, one input per call
                async with HttpTransport(url) as http:
                    return await run_load(
                        s.kafka(), rate=args.rate, duration_s=args.duration, workload=workload_of(args), client=http
                    )
            return await run_load(
                s.kafka(),
                rate=args.rate,
                duration_s=args.duration,
                workload=workload_of(args),
                transport=args.transport,
            )

        report = asyncio.run(load())
        print("\n== demo summary ==")
        print(report.summary())
        deadline = time.monotonic() + 30
        while runner(count_sql)[1][0][0] < report.answered and time.monotonic() < deadline:
            time.sleep(0.5)
        for name in ("latency_by_model_minute", "cache_hit_rate", "worker_throughput"):
            cols, rows = run(name, runner, db=s.clickhouse_database, since_s=600)
            print(f"\n== sluice analytics {name} --since 10m ==")
            print(format_result(cols, rows))
        from pathlib import Path

        from schemas.errors import MissingExtra
        from sinks.report import write_report

        try:
            path = write_report(Path(s.state_dir) / "report.html", runner, db=s.clickhouse_database, since_s=600)
            print(f"\nreport written: {path} (open it in a browser)")
        except MissingExtra as exc:  # the plots are optional; the run above is the demo
            print(f"\nno report: {exc}")
        http_ok = call_over_http(url)
        return 0 if report.unanswered == 0 and report.errors == 0 and http_ok else 1
    finally:
        gateway.stop()
        worker.stop()
        sink.stop()
        if started_stack and not args.keep_stack:
            stack.down()
