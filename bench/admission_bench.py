"""What the admission hop costs: the same load with and without `sluice admission`.

One worker on its own topics; in the `admission` runs the producers write to
PREFIX.ingress and one `sluice admission` process (limits set, none
reached: every request is counted, tokenised and reserved) lets them
through to PREFIX.requests. Both on this machine's two cores, as the
worker. Measured side by side, interleaved (direct, admission, direct,
admission) so drift on a shared machine falls on both:

- p50 / p99 latency at a fixed open-loop rate (Zipf 1.1 over 1,000 texts, the
  headline mix: mostly cache hits, where a hop shows most);
- the highest rate whose p99 stays under 500 ms (`--find-max`'s search).

    python -m bench.admission_bench [--rate 300] [--duration 15]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import time
from typing import Any

from bench.harness import OUT, ROOT, create_topics, machine, new_prefix, stack, worker
from sluice.supervisor import WorkerProcess


def admission_stage(bootstrap: str, prefix: str) -> WorkerProcess:
    stage = WorkerProcess(
        {
            "SLUICE_BOOTSTRAP_SERVERS": bootstrap,
            "SLUICE_TOPIC_PREFIX": prefix,
            "SLUICE_GROUP_ID": f"{prefix}-workers",
            "SLUICE_ADMISSION_GROUP_ID": f"{prefix}-admission",
        },
        log_path=OUT / f"admission-{prefix}.log",
        cwd=ROOT,
        command="admission",
    )
    stage.start(60)
    return stage


async def limits(bootstrap: str, prefix: str) -> None:
    """Generous limits, so every request goes through all the checks and passes."""
    from processors.admission.control import write_control
    from schemas.topics import Topics

    await write_control(
        bootstrap,
        Topics(prefix).control,
        {
            "tenant:loadtest": {
                "requests_per_minute": 10**7,
                "tokens_per_minute": 10**9,
                "daily_usd": 10**6,
                "monthly_usd": 10**7,
            }
        },
    )


def one_mode(bootstrap: str, mode: str, rate: float, duration: float, find_max: bool) -> dict[str, Any]:
    from producers.corpus import Workload
    from producers.loadgen import find_max_rate, kafka_transport, run_load
    from schemas.topics import KafkaConfig

    prefix = new_prefix(f"adm-{mode}")
    create_topics(bootstrap, prefix, partitions=12)
    cfg = KafkaConfig(bootstrap_servers=bootstrap, topic_prefix=prefix, admission=mode == "admission")
    stage = None
    if mode == "admission":
        asyncio.run(limits(bootstrap, prefix))
        stage = admission_stage(bootstrap, prefix)
    out: dict[str, Any] = {"mode": mode}
    try:
        with worker(bootstrap, prefix):

            async def go() -> None:
                client = kafka_transport(cfg)
                await client.start()
                try:
                    # warm the caches and the JIT-less paths a little, uncounted
                    await run_load(None, client=client, rate=rate, duration_s=5, progress=None)
                    rep = await run_load(
                        None, client=client, rate=rate, duration_s=duration, workload=Workload(seed=11), progress=None
                    )
                    out["fixed"] = {
                        "rate": rate,
                        "p50_ms": rep.latency_ms["p50"],
                        "p99_ms": rep.latency_ms["p99"],
                        "answered": rep.answered,
                        "sent": rep.sent,
                    }
                    print(
                        f"  {mode}: {rate:g}/s p50 {rep.latency_ms['p50']:.0f} ms, p99 {rep.latency_ms['p99']:.0f} ms",
                        flush=True,
                    )
                    if find_max:

                        async def step(r: float, n: int):
                            return await run_load(
                                None,
                                client=client,
                                rate=r,
                                duration_s=10,
                                workload=Workload(seed=100 + n, offset=10_000 * n),
                                progress=None,
                            )

                        search = await find_max_rate(
                            step,
                            start_rate=400,
                            factor=1.5,
                            max_rate=6000,
                            refine=1,
                            progress=lambda m: print(f"  {mode}: {m.strip()}", flush=True),
                        )
                        out["max_rps"] = search.max_rate
                        out["search"] = search.steps
                finally:
                    await client.stop()

            asyncio.run(go())
    finally:
        if stage is not None:
            stage.stop()
    return out


def stage_throughput(bootstrap: str, n: int = 20_000) -> float:
    """Requests per second one stage decides: `n` requests produced to PREFIX.ingress
    first (200 tenants), then the stage started; from its first decision to its last."""
    from producers.client import make_request
    from producers.corpus import text
    from producers.loadgen import kafka_transport
    from schemas.topics import KafkaConfig

    prefix = new_prefix("adm-stage")
    create_topics(bootstrap, prefix, partitions=12)
    cfg = KafkaConfig(bootstrap_servers=bootstrap, topic_prefix=prefix, admission=True)

    async def produce() -> None:
        client = kafka_transport(cfg)
        await client.start()
        try:
            for i in range(n):
                await client.send(make_request(text(i, seed=5), tenant=f"t{i % 200}"))
            await client.flush()
        finally:
            await client.stop()

    asyncio.run(limits(bootstrap, prefix))
    asyncio.run(produce())
    stage = admission_stage(bootstrap, prefix)
    try:
        first = last = None
        done = 0.0
        deadline = time.monotonic() + 120
        while done < n and time.monotonic() < deadline:
            done = stage.scrape().get('sluice_admission_requests_total{outcome="admitted"}', 0.0)
            now = time.monotonic()
            if done > 0 and first is None:
                first = (now, done)
            last = (now, done)
            time.sleep(0.05)
    finally:
        stage.stop()
    if first is None or last is None or last[0] <= first[0]:
        return float("nan")
    rate = (last[1] - first[1]) / (last[0] - first[0])
    print(f"  one stage decided {last[1]:.0f} of {n} at {rate:,.0f} requests/s", flush=True)
    return rate


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rate", type=float, default=300.0)
    ap.add_argument("--duration", type=float, default=15.0)
    args = ap.parse_args()
    OUT.mkdir(parents=True, exist_ok=True)
    began = time.time()
    runs: list[dict[str, Any]] = []
    with stack() as (bootstrap, _):
        for i, mode in enumerate(("direct", "admission", "direct", "admission")):
            print(f"[{time.time() - began:5.0f} s] {mode} (run {i + 1} of 4)", flush=True)
            runs.append(one_mode(bootstrap, mode, args.rate, args.duration, find_max=i >= 2))
        print(f"[{time.time() - began:5.0f} s] one stage alone, on a backlog", flush=True)
        stage_rps = stage_throughput(bootstrap)
    (OUT / "admission_bench.json").write_text(
        json.dumps({"machine": machine(), "runs": runs, "stage_rps": stage_rps}, indent=1)
    )
    rows = ["| | direct to PREFIX.requests | through `sluice admission` | ratio |", "|---|---|---|---|"]
    for stat in ("p50_ms", "p99_ms"):
        d = [r["fixed"][stat] for r in runs if r["mode"] == "direct"]
        a = [r["fixed"][stat] for r in runs if r["mode"] == "admission"]
        rows.append(
            f"| {stat[:3]} at {args.rate:g}/s (two runs each) | {', '.join(f'{x:.0f}' for x in d)} ms | "
            f"{', '.join(f'{x:.0f}' for x in a)} ms | {sum(a) / max(sum(d), 1e-9):.2f}x |"
        )
    d_max = next(r["max_rps"] for r in runs if r["mode"] == "direct" and "max_rps" in r)
    a_max = next(r["max_rps"] for r in runs if r["mode"] == "admission" and "max_rps" in r)
    rows.append(f"| max rate with p99 < 500 ms | {d_max:.0f}/s | {a_max:.0f}/s | {a_max / max(d_max, 1e-9):.2f}x |")
    rows.append(f"| one stage alone, deciding a backlog (200 tenants, limits checked) | | {stage_rps:,.0f}/s | |")
    print("\n".join(rows))
    print(f"done in {time.time() - began:.0f} s; {machine()}")


if __name__ == "__main__":
    main()
