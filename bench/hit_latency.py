"""Where a cache hit's latency goes, by stage, at a few rates.

    .venv/bin/python -m bench.hit_latency [--rates 50,300,1000] [--seconds 10]

One worker on the local stack (default model), its cache warmed by a first
pass; then open-loop Zipf runs (1,000 inputs, exponent 1.1) at each rate.
Each hit's end-to-end latency (scheduled send -> result at the client) is
split with the result's own `timings_ms`: scheduled send -> lookup started
at the worker (`queue`: client linger, broker, fetch, the partition batch
window), -> answered at the worker (`total`), and answered -> result at the
client (worker publish linger, broker, client fetch). Also the CPU each
process used per request (broker, worker, load generator): on one small
machine they share the cores, and a tail grows once they fill them. Prints
markdown tables for bench/RESULTS.md.
"""

from __future__ import annotations

import argparse
import asyncio

import numpy as np

from bench.harness import broker_pid, cpu_seconds, create_topics, machine, new_prefix, stack, worker
from producers.corpus import Workload
from producers.loadgen import run_load
from schemas.topics import KafkaConfig


async def run(config: KafkaConfig, rate: float, seconds: float) -> dict[str, np.ndarray]:
    rows: list[tuple[float, float, float]] = []

    def keep_hit(doc: dict, latency_ms: float) -> None:
        if doc.get("cache") in ("l1", "l2"):
            rows.append((latency_ms, doc["timings_ms"]["queue"], doc["timings_ms"]["total"]))

    await run_load(
        config,
        rate=rate,
        duration_s=seconds,
        workload=Workload("zipf", 1000, 1.1, 7),
        progress=None,
        drain_timeout_s=120,
        on_answer=keep_hit,
    )
    a = np.asarray(rows, dtype=np.float64)
    return {
        "end to end": a[:, 0],
        "scheduled send -> lookup at the worker": a[:, 1],
        "scheduled send -> answered at the worker": a[:, 2],
        "answered -> result at the client": a[:, 0] - a[:, 2],
    }


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rates", default="50,300,1000")
    ap.add_argument("--seconds", type=float, default=10.0)
    ap.add_argument(
        "--set", action="append", default=[], metavar="SLUICE_X=V", help="a worker setting for this run (repeatable)"
    )
    args = ap.parse_args()
    extra = dict(kv.split("=", 1) for kv in args.set)
    rates = [float(r) for r in args.rates.split(",")]
    out, cpu = [], []
    with stack() as (bootstrap, redis_url):
        prefix = new_prefix("hit-latency")
        create_topics(bootstrap, prefix)
        config = KafkaConfig(bootstrap_servers=bootstrap, topic_prefix=prefix)
        with worker(bootstrap, prefix, SLUICE_REDIS_URL=redis_url, **extra) as w:
            asyncio.run(run(config, 300, 5))  # fills the cache (and warms the broker)
            pids = {"broker": broker_pid(), "worker": w.proc.pid, "load generator": None}
            for rate in rates:
                before = {k: cpu_seconds(pid) for k, pid in pids.items()}
                parts = asyncio.run(run(config, rate, args.seconds))
                used = {k: (cpu_seconds(pid) - before[k]) * 1000 / (rate * args.seconds) for k, pid in pids.items()}
                cpu.append(
                    f"| {rate:g}/s | "
                    + " | ".join(f"{v:.2f}" for v in used.values())
                    + f" | {sum(used.values()):.2f} | {sum(used.values()) * rate / 1000:.2f} |"
                )
                for name, v in parts.items():
                    p50, p95, p99 = np.percentile(v, [50, 95, 99])
                    out.append(f"| {rate:g}/s | {name} | {p50:.0f} | {p95:.0f} | {p99:.0f} |")
                print(f"rate {rate:g}/s: {len(parts['end to end'])} hits", flush=True)
    print(f"\nMachine: {machine()}; worker settings: {extra or 'defaults'}\n")
    print("| rate | hits only: stage | p50 ms | p95 ms | p99 ms |\n|---|---|---|---|---|")
    print("\n".join(out))
    print(
        "\n| rate | CPU ms per request: broker | worker | load generator | all | cores busy |\n"
        "|---|---|---|---|---|---|"
    )
    print("\n".join(cpu))


if __name__ == "__main__":
    main()
