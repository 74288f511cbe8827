"""What HTTP costs: the highest rate under p99 < 500 ms through `sluice
gateway` against the direct Kafka client, and against the FastAPI
per-request peer, on one stack, one worker, the same open-loop generator.

Three ways to offer the same load:

- Kafka: the librdkafka client (`sluice loadtest`'s default) produces each
  request and reads its result;
- gateway: each request one HTTP POST to `/v1/embeddings` (one input,
  base64 as the openai SDK asks), through `sluice gateway`, which produces it
  and answers from its reply topic (`sluice loadtest --transport http`);
- peer: `bench/peer.py`, FastAPI + uvicorn running the model per request
  (no Kafka, no batching, no cache).

Two workloads: Zipf 1.1 over 1,000 texts (mostly cache hits: what the
transport costs shows) and unique texts (every request computed: the model
bounds all three). Each step sends texts no earlier step sent, to a tenant of
its own per transport (cache scopes are per tenant), Redis flushed first.
A fixed-rate run also measures the gateway's own CPU per call.

    python -m bench.gateway_bench [--step-s 6] [--max-rate 4000] [--quick]

Writes bench/out/gateway_bench.json and bench/plots/gateway_rate_search.png,
and prints the markdown for bench/RESULTS.md.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from bench.harness import (
    OUT,
    PLOTS,
    ROOT,
    broker_pid,
    cpu_seconds,
    create_topics_async,
    machine,
    new_prefix,
    stack,
    worker,
)
from bench.suite import MODEL, SLO_MS, plot_searches, say, search_peer
from producers.corpus import Workload
from producers.gateway.keys import digest
from producers.http_transport import HttpTransport
from producers.loadgen import RateSearch, find_max_rate, kafka_transport, run_load
from schemas.topics import KafkaConfig
from sluice.supervisor import WorkerProcess


@contextmanager
def gateway(bootstrap: str, prefix: str, keys: Path) -> Iterator[WorkerProcess]:
    """`sluice gateway` on the prefix's topics, ready; stopped afterwards."""
    gw = WorkerProcess(
        {
            "SLUICE_BOOTSTRAP_SERVERS": bootstrap,
            "SLUICE_TOPIC_PREFIX": prefix,
            "SLUICE_GROUP_ID": f"{prefix}-workers",
            "SLUICE_GATEWAY_API_KEYS_FILE": str(keys),
            "SLUICE_GATEWAY_ID": f"{prefix}-gw",
        },
        log_path=OUT / f"gateway-{prefix}.log",
        cwd=ROOT,
        command="gateway",
    )
    gw.start()
    try:
        yield gw
    finally:
        gw.stop()


async def search(client: Any, workload: Workload, tenant: str, args: argparse.Namespace, label: str) -> RateSearch:
    say(f"rate search: {label}")

    async def step(rate: float, n: int):
        return await run_load(
            None,
            rate=rate,
            duration_s=args.step_s,
            workload=workload.step(n),
            tenant=tenant,
            client=client,
            progress=None,
            drain_timeout_s=max(20.0, 3 * args.step_s),
        )

    return await find_max_rate(
        step, slo_ms=SLO_MS, start_rate=args.start_rate, factor=1.6, max_rate=args.max_rate, refine=1, progress=say
    )


async def fixed_rate(
    client: Any, workload: Workload, tenant: str, rate: float, seconds: float, pids: dict[str, int | None]
) -> dict[str, Any]:
    """One run at `rate`: its latencies, and the CPU ms per answered call of
    each process in `pids` (None: this one, the load generator)."""
    before = {name: cpu_seconds(pid) for name, pid in pids.items()}
    report = await run_load(
        None, rate=rate, duration_s=seconds, workload=workload, tenant=tenant, client=client, progress=None
    )
    n = max(1, report.answered)
    return {
        "rate": rate,
        "p50_ms": report.latency_ms.get("p50"),
        "p99_ms": report.latency_ms.get("p99"),
        "answered": report.answered,
        "sent": report.sent,
        "cpu_ms_per_call": {name: 1000 * (cpu_seconds(pid) - before[name]) / n for name, pid in pids.items()},
    }


async def main_async(args: argparse.Namespace) -> dict[str, Any]:
    import redis

    started = time.monotonic()
    if args.fixed_only:
        args.no_peer = True
    with stack() as (bootstrap, redis_url):
        prefix = new_prefix("gateway")
        await create_topics_async(bootstrap, prefix)
        redis.Redis.from_url(redis_url).flushdb()
        run = prefix.rsplit("-", 1)[1]
        tenants = {
            k: f"{k}-{run}" for k in ("kafka-zipf", "gw-zipf", "kafka-unique", "gw-unique", "kafka-fixed", "gw-fixed")
        }
        keys = OUT / f"gateway-keys-{run}.txt"
        keys.write_text("".join(f"{t} sha256:{digest('key-' + t)}\n" for k, t in tenants.items() if k.startswith("gw")))
        cfg = KafkaConfig(bootstrap_servers=bootstrap, topic_prefix=prefix)
        zipf, unique = Workload("zipf", 1000, 1.1, 7), Workload("unique", seed=9)
        searches: dict[str, RateSearch] = {}
        fixed: dict[str, Any] = {}
        with worker(bootstrap, prefix) as w, gateway(bootstrap, prefix, keys) as gw:
            url = f"http://127.0.0.1:{gw.port}/v1/embeddings"
            async with kafka_transport(cfg) as kafka:
                # unscored: the first batches of a new worker and the first calls of a new
                # gateway are slow (connections, the model's first runs), and would decide the first step
                say("warm-up, 4 s at 100/s through each")
                warm = Workload("unique", seed=3)
                await run_load(None, rate=100, duration_s=4, workload=warm, tenant="warm", client=kafka, progress=None)
                async with HttpTransport(url, api_key=f"key-{tenants['gw-fixed']}") as http:
                    await run_load(None, rate=100, duration_s=4, workload=warm.step(1), client=http, progress=None)
                for name, workload in () if args.fixed_only else (("zipf", zipf), ("unique", unique)):
                    searches[f"Kafka client, {name}"] = await search(
                        kafka, workload, tenants[f"kafka-{name}"], args, f"Kafka client, {name}"
                    )
                    async with HttpTransport(url, api_key=f"key-{tenants[f'gw-{name}']}") as http:
                        searches[f"gateway, {name}"] = await search(
                            http, workload, tenants[f"gw-{name}"], args, f"gateway, {name}"
                        )
                say(f"fixed rate {args.fixed_rate:g}/s, {args.fixed_s:g} s: Kafka client, then gateway")
                pids = {"generator": None, "broker": broker_pid(), "worker": w.proc.pid if w.proc else None}
                fixed["kafka"] = await fixed_rate(
                    kafka, zipf.step(50), tenants["kafka-fixed"], args.fixed_rate, args.fixed_s, pids
                )
            async with HttpTransport(url, api_key=f"key-{tenants['gw-fixed']}") as http:
                pids["gateway"] = gw.proc.pid if gw.proc else None
                fixed["gateway"] = await fixed_rate(
                    http, zipf.step(50), tenants["gw-fixed"], args.fixed_rate, args.fixed_s, pids
                )
        if not args.no_peer:
            searches["FastAPI peer, zipf"] = await search_peer(
                zipf, start=args.start_rate, step_s=args.step_s, max_rate=args.max_rate
            )
    figures = {
        "machine": machine(),
        "model": MODEL,
        "step_s": args.step_s,
        "elapsed_s": time.monotonic() - started,
        "searches": {k: {"max_rate": v.max_rate, "steps": v.steps} for k, v in searches.items()},
        "fixed": fixed,
    }
    name = "gateway_bench_fixed" if args.fixed_only else "gateway_bench"
    (OUT / f"{name}.json").write_text(json.dumps(figures, indent=1, default=str))
    if searches:
        plot_searches(searches, PLOTS / "gateway_rate_search.png")
    return figures


def markdown(f: dict[str, Any]) -> str:
    s = {k: v["max_rate"] for k, v in f["searches"].items()}
    rows = (
        ["| transport | workload | max rate, p99 < 500 ms | ratio to the Kafka client |", "|---|---|---|---|"]
        if s
        else []
    )
    for name in ("zipf", "unique"):
        k = s.get(f"Kafka client, {name}", 0)
        for label in (f"Kafka client, {name}", f"gateway, {name}", f"FastAPI peer, {name}"):
            if label in s:
                ratio = f"{s[label] / k:.2f}" if k else "-"
                rows.append(f"| {label.split(',')[0]} | {name} | {s[label]:.0f} req/s | {ratio} |")
    fx = f["fixed"]
    names = ["generator", "gateway", "broker", "worker"]
    rows += [
        "",
        f"| fixed {fx['kafka']['rate']:.0f}/s, Zipf | p50 ms | p99 ms | "
        + " | ".join(f"{n} CPU ms/call" for n in names)
        + " |",
        "|---" * (3 + len(names)) + "|",
    ]
    for label, key in (("Kafka client", "kafka"), ("gateway", "gateway")):
        cpu = fx[key]["cpu_ms_per_call"]
        cells = " | ".join(f"{cpu[n]:.2f}" if cpu.get(n) is not None else "-" for n in names)
        rows.append(f"| {label} | {fx[key]['p50_ms']:.0f} | {fx[key]['p99_ms']:.0f} | {cells} |")
    return "\n".join(rows)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--step-s", type=float, default=6.0)
    ap.add_argument("--start-rate", type=float, default=100.0)
    ap.add_argument("--max-rate", type=float, default=4000.0)
    ap.add_argument("--fixed-rate", type=float, default=300.0)
    ap.add_argument("--fixed-s", type=float, default=10.0)
    ap.add_argument("--no-peer", action="store_true")
    ap.add_argument("--fixed-only", action="store_true", help="only the fixed-rate runs and their CPU per call")
    ap.add_argument("--quick", action="store_true", help="short steps and a low cap: proves it runs")
    args = ap.parse_args()
    if args.quick:
        args.step_s, args.max_rate, args.fixed_s = 2.0, 300.0, 3.0
    figures = asyncio.run(main_async(args))
    print(markdown(figures))


if __name__ == "__main__":
    main()
