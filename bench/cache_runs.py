"""Repeated cold-cache Zipf runs, variants alternating run by run (A/B).

    .venv/bin/python -m bench.cache_runs --runs 3 \\
        --variant default: --variant nice10:SLUICE_MODEL_NICE=10 \\
        --variant before@/path/to/other/checkout:

The issue-3 workload (Zipf s=1.1 over 1,000 inputs, 1,000 requests/s) with
the cache only, a new worker, new topics and a flushed Redis each run.
On a shared 2-core machine one run's hit p99 moves by a factor of two, so a
change is judged by several runs of each variant, interleaved so that both
see the same machine. A variant is `name[@checkout]:SLUICE_X=V,...`: worker
settings (`topic.X=V` ones are configs of the run's topics instead,
SLUICE_RESULTS_PARTITIONS the partitions of its results topic;
SLUICE_SCHED_SLICE_US is also applied to the broker and the load generator,
and stays until another variant sets it), and
optionally another checkout to run the worker from (an older commit, for
before/after). For each run: hit p50 and p99, hits over 25 ms in the
first second (a new worker's start), seconds 1-8 (the miss backlog) and
after, the p50/p99 of the requests that waited for the model, and the CPU
each process used per request (ms): broker, worker, its model process, and
this one (the load generator); the CPU figures move far less from run to
run than the tails do. The last column is the share of the machine's CPU
time the hypervisor gave to other tenants during the run: on a shared VM it
comes in stretches of minutes, and a run inside one is slow whatever the
variant (runs with 1.5-6.5% stolen gave hit p99s of 32-78 ms, median 42).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import time
from pathlib import Path

import numpy as np
import redis

from bench.harness import OUT, broker_pid, cpu_seconds, create_topics, machine, new_prefix, stack, steal_seconds
from processors.scheduling import slice_problem
from producers.corpus import Workload
from producers.loadgen import run_load
from schemas.topics import KafkaConfig
from sluice.supervisor import WorkerProcess


def parse_variant(spec: str) -> tuple[str, Path | None, dict[str, str]]:
    head, _, settings = spec.partition(":")
    name, _, root = head.partition("@")
    env = dict(kv.split("=", 1) for kv in settings.split(",") if kv)
    return name, Path(root).resolve() if root else None, env


def one_run(
    bootstrap: str, redis_url: str, root: Path | None, env: dict[str, str], seconds: float, dump: Path | None = None
) -> dict:
    prefix = new_prefix("cache-runs")
    topic_config = {k.removeprefix("topic."): v for k, v in env.items() if k.startswith("topic.")}
    env = {k: v for k, v in env.items() if not k.startswith("topic.")}
    results = int(env["SLUICE_RESULTS_PARTITIONS"]) if "SLUICE_RESULTS_PARTITIONS" in env else None
    create_topics(bootstrap, prefix, config=topic_config, results=results)
    redis.Redis.from_url(redis_url).flushdb()
    settings = {
        "SLUICE_BOOTSTRAP_SERVERS": bootstrap,
        "SLUICE_TOPIC_PREFIX": prefix,
        "SLUICE_GROUP_ID": f"{prefix}-workers",
        "SLUICE_REDIS_URL": redis_url,
        **env,
    }
    if root is not None:  # the other checkout has no models of its own: use ours
        settings.setdefault("SLUICE_MODELS_DIR", json.dumps([str(Path(".sluice/models").resolve())]))
    w = WorkerProcess(settings, log_path=OUT / f"worker-{prefix}.log", cwd=root)
    w.start()
    assert w.proc is not None
    pids = {"broker": broker_pid(), "worker": w.proc.pid, "model": w.model_pid(), "loadgen": None}
    if "SLUICE_SCHED_SLICE_US" in env:
        # a variant's slice is the broker's and this load generator's too, for
        # this run: the whole latency path, as the defaults set it
        for pid in (pids["broker"], None):
            slice_problem(int(env["SLUICE_SCHED_SLICE_US"]), pid)
    cpu0 = {k: cpu_seconds(pid) for k, pid in pids.items()}
    steal0, wall0 = steal_seconds(), time.monotonic()
    rows: list[tuple[float, float, bool, float, float]] = []

    def keep(doc: dict, latency_ms: float) -> None:
        tm = doc.get("timings_ms") or {}
        rows.append(
            (
                doc["_received_at_ms"] - latency_ms,
                latency_ms,
                doc.get("cache") in ("l1", "l2"),
                tm.get("queue", 0),
                tm.get("total", 0),
            )
        )

    try:
        asyncio.run(
            run_load(
                KafkaConfig(bootstrap_servers=bootstrap, topic_prefix=prefix),
                rate=1000,
                duration_s=seconds,
                workload=Workload("zipf", 1000, 1.1, 7),
                progress=None,
                drain_timeout_s=120,
                on_answer=keep,
            )
        )
        cpu = {k: (cpu_seconds(pid) - cpu0[k]) * 1000 / len(rows) for k, pid in pids.items()}
        steal = (steal_seconds() - steal0) / ((time.monotonic() - wall0) * (os.cpu_count() or 1))
    finally:
        w.stop()
    a = np.asarray(rows)
    if dump is not None:
        # per result: scheduled send (epoch ms, to line up with other logs),
        # latency, hit, and the worker's own timings: send -> its intake
        # (queue), send -> answered (total); latency - total is the way back
        np.save(dump, a)
    t = (a[:, 0] - a[:, 0].min()) / 1000
    hit, lat = a[:, 2] > 0, a[:, 1]
    slow = hit & (lat > 25)
    return {
        "hit_p50": float(np.percentile(lat[hit], 50)),
        "hit_p99": float(np.percentile(lat[hit], 99)),
        "hits": int(hit.sum()),
        "over_25": [int((slow & (t < 1)).sum()), int((slow & (t >= 1) & (t < 8)).sum()), int((slow & (t >= 8)).sum())],
        "model_p50": float(np.percentile(lat[~hit], 50)),
        "model_p99": float(np.percentile(lat[~hit], 99)),
        "cpu_ms": cpu,
        "steal": steal,
    }


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--variant", action="append", required=True, metavar="NAME[@CHECKOUT]:SLUICE_X=V,...")
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--seconds", type=float, default=20)
    ap.add_argument(
        "--dump",
        action="store_true",
        help="save each run's rows (send time, latency, hit, queue, total) to bench/out/cache-runs-NAME-I.npy",
    )
    args = ap.parse_args()
    variants = [parse_variant(v) for v in args.variant]
    OUT.mkdir(parents=True, exist_ok=True)
    lines = []
    with stack() as (bootstrap, redis_url):
        redis_url = redis_url.rsplit("/", 1)[0] + "/1"  # db 1: flushed each run
        for i in range(1, args.runs + 1):
            for name, root, env in variants:
                dump = OUT / f"cache-runs-{name}-{i}.npy" if args.dump else None
                r = one_run(bootstrap, redis_url, root, env, args.seconds, dump)
                o = r["over_25"]
                c = r["cpu_ms"]
                lines.append(
                    f"| {name} | {i} | {r['hit_p50']:.0f} / {r['hit_p99']:.0f} | {sum(o)} of {r['hits']} | {o[0]} / {o[1]} / {o[2]} "
                    f"| {r['model_p50']:.0f} / {r['model_p99']:.0f} "
                    f"| {c['broker']:.2f} / {c['worker']:.2f} / {c['model']:.2f} / {c['loadgen']:.2f} "
                    f"| {100 * r['steal']:.1f}% |"
                )
                print(lines[-1], flush=True)
    print(f"\nMachine: {machine()}\n")
    print(
        "| variant | run | hit p50 / p99 ms | hits over 25 ms | of them in s 0-1 / 1-8 / 8- | "
        "miss + coalesced p50 / p99 ms | CPU ms per request: broker / worker / model / load generator "
        "| stolen by the hypervisor |\n|---|---|---|---|---|---|---|---|"
    )
    print("\n".join(lines))


if __name__ == "__main__":
    main()
