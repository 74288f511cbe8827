"""What exactly-once costs: one worker in at-least-once and in exactly-once
mode (SLUICE_DELIVERY), side by side on one stack, interleaved (ALO, EOS,
ALO, EOS) so drift on a shared machine falls on both.

Each run gets a fresh worker on topics of its own and, per phase, a tenant
of its own: cache keys are scoped by tenant, so L1 and Redis start cold in
every phase of every run, and the same draws of the same corpus (Zipf 1.1
over 1,000 texts) give every run the same cache hit ratio. Two phases:

- throughput at saturation: a backlog of N requests waits in Kafka before
  the worker starts; N over the seconds from the worker's readiness (model
  loaded, partitions assigned) to the last result, so start-up is left out
  and exactly-once's bursts (a round's answers appear at its commit) count
  as they end;
- latency at a fixed moderate open-loop rate: p50 and p99 from each
  request's scheduled send to its result, read read_committed (an
  exactly-once answer is visible when its round's transaction commits).

    python -m bench.delivery_bench [--backlog 6000] [--rate 150] [--duration 20] [--rounds 2]
    python -m bench.delivery_bench --quick    # a small run that proves it works

Prints a table with the EOS/ALO ratios and writes bench/out/delivery_bench.json.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from bench.harness import OUT, ROOT, create_topics, machine, new_prefix, stack
from sluice.supervisor import WorkerProcess

MODES = ("at-least-once", "exactly-once")
SHORT = {"at-least-once": "ALO", "exactly-once": "EOS"}
# the suite's model (`sluice model build`), else the PyPI one every install has
DEFAULT_MODEL = (
    "all-minilm-l6-v2-sq8" if (ROOT / ".sluice" / "models" / "all-minilm-l6-v2-sq8").is_dir() else "all-minilm-l6-v2"
)


async def backlog_throughput(cfg: Any, n: int, tenant: str, start_worker: Callable[[], float]) -> dict[str, Any]:
    """n requests produced, then the worker started; n over the seconds from its readiness to the last result."""
    from producers.client import make_request
    from producers.corpus import Workload
    from producers.loadgen import kafka_transport

    client = await started(kafka_transport(cfg))
    try:
        texts = Workload(seed=11).texts(n)
        futs = [await client.send(make_request(t, id=f"{tenant}-{i}", tenant=tenant)) for i, t in enumerate(texts)]
        await client.flush()
        ready_s = await asyncio.get_running_loop().run_in_executor(None, start_worker)
        ready_ms = time.time() * 1000
        docs = await asyncio.wait_for(asyncio.gather(*futs), timeout=max(120.0, n / 5))
    finally:
        await client.stop()
    # from the worker's readiness to the last result: the middle 80% of the
    # arrivals would flatter exactly-once, whose answers arrive in bursts,
    # one per committed transaction
    last_ms = max(d["_received_at_ms"] for d in docs)
    levels: dict[str, int] = {}
    for d in docs:
        levels[d.get("cache") or "none"] = levels.get(d.get("cache") or "none", 0) + 1
    return {
        "n": n,
        "answered_per_s": n / max(1e-3, (last_ms - ready_ms) / 1000),
        "errors": sum(1 for d in docs if d.get("status") != "ok"),
        "cache": levels,
        "worker_ready_s": ready_s,
    }


async def started(client: Any, timeout_s: float = 30.0) -> Any:
    """Start a client on topics just made: their leaders may take a moment
    ("Not leader for partition" from the first watermark query)."""
    from producers.client import ClientError

    deadline = time.monotonic() + timeout_s
    while True:
        try:
            await client.start()
            return client
        except ClientError:
            if time.monotonic() > deadline:
                raise
            await client.stop()
            await asyncio.sleep(0.5)


async def fixed_rate(cfg: Any, rate: float, duration_s: float, tenant: str) -> dict[str, Any]:
    from producers.corpus import Workload
    from producers.loadgen import kafka_transport, run_load

    client = await started(kafka_transport(cfg))
    try:
        rep = await run_load(
            None,
            client=client,
            rate=rate,
            duration_s=duration_s,
            workload=Workload(seed=12),
            tenant=tenant,
            progress=None,
        )
    finally:
        await client.stop()
    return {
        "rate": rate,
        "sent": rep.sent,
        "answered": rep.answered,
        "errors": rep.errors,
        "p50_ms": rep.latency_ms.get("p50", float("nan")),
        "p99_ms": rep.latency_ms.get("p99", float("nan")),
        "cache": rep.cache,
    }


def one_run(bootstrap: str, redis_url: str, mode: str, args: argparse.Namespace) -> dict[str, Any]:
    from schemas.topics import KafkaConfig

    prefix = new_prefix(f"dlv-{SHORT[mode].lower()}")
    create_topics(bootstrap, prefix, partitions=12)
    cfg = KafkaConfig(bootstrap_servers=bootstrap, topic_prefix=prefix)
    w = WorkerProcess(
        {
            "SLUICE_BOOTSTRAP_SERVERS": bootstrap,
            "SLUICE_TOPIC_PREFIX": prefix,
            "SLUICE_GROUP_ID": f"{prefix}-workers",
            "SLUICE_REDIS_URL": redis_url,
            "SLUICE_DEFAULT_MODEL": args.model,
            "SLUICE_DELIVERY": mode,
            "SLUICE_WORKER_ID": f"{prefix}-w1",
        },
        log_path=OUT / f"worker-{prefix}.log",
        cwd=ROOT,
    )
    out: dict[str, Any] = {"mode": mode, "prefix": prefix}
    try:
        # the worker starts once the backlog waits for it
        out["backlog"] = asyncio.run(backlog_throughput(cfg, args.backlog, f"{prefix}-a", w.start))
        out["fixed"] = asyncio.run(fixed_rate(cfg, args.rate, args.duration, f"{prefix}-b"))
    finally:
        w.stop()
    b, f = out["backlog"], out["fixed"]
    print(
        f"  {SHORT[mode]}: backlog {b['answered_per_s']:.0f} answered/s; "
        f"{f['rate']:g}/s: p50 {f['p50_ms']:.0f} ms, p99 {f['p99_ms']:.0f} ms "
        f"({f['answered']}/{f['sent']} answered)",
        flush=True,
    )
    return out


def hit_rate(cache: dict[str, int]) -> float:
    total = sum(cache.values()) or 1
    return sum(n for level, n in cache.items() if level in ("l1", "l2", "coalesced")) / total


def table(runs: list[dict[str, Any]], args: argparse.Namespace) -> str:
    def col(mode: str, get: Any) -> list[float]:
        return [get(r) for r in runs if r["mode"] == mode]

    def mean(xs: list[float]) -> float:
        return sum(xs) / max(1, len(xs))

    rows = [
        "| | at-least-once | exactly-once | EOS/ALO |",
        "|---|---|---|---|",
    ]
    stats = (
        (f"throughput on a backlog of {args.backlog} (answered/s)", lambda r: r["backlog"]["answered_per_s"], "{:.0f}"),
        (f"p50 at {args.rate:g}/s (ms)", lambda r: r["fixed"]["p50_ms"], "{:.0f}"),
        (f"p99 at {args.rate:g}/s (ms)", lambda r: r["fixed"]["p99_ms"], "{:.0f}"),
    )
    for name, get, fmt in stats:
        a, e = col("at-least-once", get), col("exactly-once", get)
        rows.append(
            f"| {name} | {', '.join(fmt.format(x) for x in a)} | {', '.join(fmt.format(x) for x in e)} | "
            f"{mean(e) / max(mean(a), 1e-9):.2f}x |"
        )

    def hits(mode: str) -> str:
        return ", ".join(
            f"{hit_rate(r['backlog']['cache']):.0%}/{hit_rate(r['fixed']['cache']):.0%}"
            for r in runs
            if r["mode"] == mode
        )

    rows.append(f"| cache hit rate, backlog/fixed phase | {hits('at-least-once')} | {hits('exactly-once')} | |")
    return "\n".join(rows)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--backlog", type=int, default=6000, help="requests waiting before the worker starts")
    ap.add_argument("--rate", type=float, default=150.0, help="fixed open-loop rate of the latency phase, per second")
    ap.add_argument("--duration", type=float, default=20.0, help="seconds of the latency phase")
    ap.add_argument("--rounds", type=int, default=2, help="ALO+EOS pairs, interleaved")
    ap.add_argument("--model", default=DEFAULT_MODEL)
    ap.add_argument("--quick", action="store_true", help="backlog 600, 40/s for 8 s, one round")
    ap.add_argument("--out", type=Path, default=OUT / "delivery_bench.json")
    args = ap.parse_args()
    if args.quick:
        args.backlog, args.rate, args.duration, args.rounds = 600, 40.0, 8.0, 1
    OUT.mkdir(parents=True, exist_ok=True)
    began = time.time()
    runs: list[dict[str, Any]] = []
    with stack() as (bootstrap, redis_url):
        for r in range(args.rounds):
            for mode in MODES:
                print(f"[{time.time() - began:5.0f} s] {mode} (round {r + 1} of {args.rounds})", flush=True)
                runs.append(one_run(bootstrap, redis_url, mode, args))
    text = table(runs, args)
    args.out.write_text(
        json.dumps(
            {
                "machine": machine(),
                "model": args.model,
                "backlog": args.backlog,
                "rate": args.rate,
                "duration_s": args.duration,
                "runs": runs,
                "table": text,
            },
            indent=1,
        )
    )
    print(text)
    print(f"done in {time.time() - began:.0f} s; {machine()}; model {args.model}; wrote {args.out}")


if __name__ == "__main__":
    main()
