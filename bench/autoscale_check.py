"""The capacity simulation's service model against one real run of the autoscaler.

A real local run: the local stack, the sink, and `sluice autoscale --local`
(compressed settings: a 2 s interval, a 20 s window) under an open-loop
trace of unique texts (every request a miss, so the service rate holds
still): quiet, a step well past one worker, quiet, nothing. Recorded every
0.5 s from the autoscaler's /metrics: desired and ready workers, lag,
arrivals, the service rate it measured; and every request's latency from its
scheduled send time.

Then the same arrivals go through the simulation twice (bench.capacity_sim):
  forced  - the simulated fleet follows the real run's ready workers, which
            checks the service model alone (lag and latency for a given fleet);
  policy  - the simulation's own autoscaler (the same Policy) with the rate
            and cold start the real run measured, which checks the decisions.
Side by side: the timelines (a plot) and a table of peak lag, time to drain,
worker-seconds and p99 latency.

    python -m bench.autoscale_check            # about 3 minutes
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import time
from pathlib import Path

import numpy as np

from bench.harness import OUT, PLOTS, ROOT, create_topics, new_prefix, stack
from sluice.supervisor import WorkerProcess, free_port

# (seconds from start, requests per second until the next step)
TRACE = ((0, 20.0), (20, 400.0), (50, 20.0), (100, 0.0), (150, None))
SETTINGS = {
    "SLUICE_AUTOSCALE_INTERVAL_S": "2",
    "SLUICE_AUTOSCALE_LOOKBACK_S": "10",
    "SLUICE_AUTOSCALE_TARGET_DRAIN_S": "10",
    "SLUICE_AUTOSCALE_SCALE_DOWN_WINDOW_S": "20",
    "SLUICE_AUTOSCALE_IDLE_S": "20",
    "SLUICE_AUTOSCALE_MAX_WORKERS": "2",  # two cores: a third worker would only share them
    "SLUICE_AUTOSCALE_INITIAL_SERVICE_RPS": "100",
}


def rate_at(t: float) -> float:
    current = 0.0
    for start, rate in TRACE:
        if rate is None or t < start:
            break
        current = rate
    return current


async def real_run(bootstrap: str, prefix: str) -> dict:
    from producers.client import make_request
    from producers.corpus import text
    from producers.loadgen import kafka_transport
    from schemas.records import now_ms
    from schemas.topics import KafkaConfig

    base = {
        "SLUICE_BOOTSTRAP_SERVERS": bootstrap,
        "SLUICE_TOPIC_PREFIX": prefix,
        "SLUICE_GROUP_ID": f"{prefix}-workers",
        "SLUICE_STATE_DIR": str(ROOT / ".sluice"),
    }
    sink = WorkerProcess(
        {**base, "SLUICE_SINK_GROUP_ID": f"{prefix}-sink", "SLUICE_CHDB_PATH": str(OUT / f"{prefix}-chdb")},
        log_path=OUT / f"sink-{prefix}.log",
        cwd=ROOT,
        command="sink",
    )
    sink.start(60)
    port = free_port()
    scaler = WorkerProcess(
        {**base, **SETTINGS, "SLUICE_SINK_PORT": str(sink.port), "SLUICE_AUTOSCALE_PORT": str(port)},
        log_path=OUT / f"autoscale-{prefix}.log",
        cwd=ROOT,
        command="autoscale",
        args=("--local",),
    )
    scaler.start(60)
    client = kafka_transport(KafkaConfig(bootstrap_servers=bootstrap, topic_prefix=prefix))
    await client.start()
    timeline: list[dict] = []
    latencies: list[tuple[float, float]] = []  # (scheduled s from start, latency ms)
    pending: set[asyncio.Future] = set()
    end_s = TRACE[-1][0]
    t0 = time.monotonic()
    t0_ms = now_ms()

    async def watch() -> None:
        while True:
            try:
                m = await asyncio.to_thread(scaler.scrape)
                timeline.append(
                    {
                        "t": time.monotonic() - t0,
                        "desired": m["sluice_autoscale_desired_workers"],
                        "ready": m["sluice_autoscale_ready_workers"],
                        "starting": m["sluice_autoscale_starting_workers"],
                        "lag": m["sluice_autoscale_lag_records"],
                        "arrival_rps": m["sluice_autoscale_arrival_rps"],
                        "service_rps": m["sluice_autoscale_service_rps"],
                        "cold_start_s": m["sluice_autoscale_cold_start_seconds"],
                    }
                )
            except OSError:
                pass
            await asyncio.sleep(0.5)

    watcher = asyncio.create_task(watch())
    arrivals = [0] * int(end_s)
    try:
        i = 0
        sent_at = 0.0  # scheduled time of the next request
        next_line = 10.0
        while sent_at < end_s:
            rate = rate_at(sent_at)
            if rate <= 0:
                sent_at = next(start for start, _ in TRACE if start > sent_at)
                continue
            ahead = t0 + sent_at - time.monotonic()
            if ahead > 0:
                await asyncio.sleep(ahead)
            doc = make_request(text(i, seed=1234), id=f"{prefix}-{i}")
            doc["sent_at_ms"] = t0_ms + int(sent_at * 1000)
            fut = await client.send(doc)
            pending.add(fut)
            fut.add_done_callback(
                lambda f, s=sent_at: (
                    pending.discard(f),
                    None
                    if f.cancelled() or f.exception()
                    else latencies.append((s, f.result()["_received_at_ms"] - t0_ms - s * 1000)),
                )
            )
            arrivals[int(sent_at)] += 1
            i += 1
            sent_at += 1.0 / rate
            if sent_at >= next_line:
                print(f"  t={sent_at:5.0f}s sent {i} answered {len(latencies)}", flush=True)
                next_line += 10
        await client.flush()
        await asyncio.sleep(max(0.0, t0 + end_s - time.monotonic()))
        if pending:
            await asyncio.wait(set(pending), timeout=60)
        signal = await asyncio.to_thread(telemetry_figures, sink.port)
    finally:
        watcher.cancel()
        await client.stop()
        scaler.stop()
        sink.stop()
    quiet = [lat for s, lat in latencies if s < 20]
    return {
        "trace": TRACE,
        "settings": SETTINGS,
        "partitions": 12,
        "arrivals": arrivals,
        "timeline": timeline,
        "latencies": latencies,
        "sent": i,
        "answered": len(latencies),
        # one worker's rate: what the autoscaler planned with at the end, learned from the step's backlog
        "service_rps": timeline[-1]["service_rps"] if timeline else 0.0,
        "model_bound_rps": signal["model_bound_rps"],
        "base_latency_ms": float(np.median(quiet)) if quiet else 50.0,
    }


def telemetry_figures(port: int) -> dict:
    """The whole run's model-time bound, from the sink's telemetry."""
    from sinks.query_endpoint import remote_runner

    _, rows = remote_runner("127.0.0.1", port)(
        "SELECT count() / (sum(compute_ms) / 1000) AS bound FROM sluice.telemetry WHERE cache = 'miss'"
    )
    return {"model_bound_rps": float(rows[0][0]) if rows and rows[0][0] else None}


class Forced:
    """A scaler that asks for what the real autoscaler asked for, when it did."""

    name = "forced"

    def __init__(self, timeline: list[dict], interval_s: float) -> None:
        self.timeline = timeline
        self.interval_s = interval_s

    def decide(self, view) -> int:
        seen = [p["desired"] for p in self.timeline if p["t"] <= view.at_s]
        return int(seen[-1]) if seen else 0


def per_window_p99_ms(lat_s: np.ndarray, weight: np.ndarray, window_s: int) -> list[float]:
    from bench.capacity_sim import weighted_quantile

    out = []
    for start in range(0, lat_s.shape[0], window_s):
        out.append(
            1000
            * weighted_quantile(lat_s[start : start + window_s].ravel(), weight[start : start + window_s].ravel(), 0.99)
        )
    return out


def compare(run: dict, plot_path: Path, window_s: int = 10) -> str:
    """The real run against the simulation, forced to the real fleet and under its own policy."""
    from bench.capacity_sim import latencies, replay, simulate
    from sluice.autoscale.config import AutoscaleConfig

    tl = run["timeline"]
    arrivals = np.asarray(run["arrivals"], dtype=float)
    seconds = len(arrivals)
    mu = run["service_rps"]
    cold = tl[-1]["cold_start_s"]  # the median the actuator measured (before any start: the setting)
    cfg = AutoscaleConfig(**{k.removeprefix("SLUICE_").lower(): float(v) for k, v in run["settings"].items()})
    common = {
        "service_rps": mu,
        "model_bound_rps": run.get("model_bound_rps"),
        "cold_start_s": cold,
        "partitions": run["partitions"],
        "base_latency_s": run["base_latency_ms"] / 1000,
    }
    forced = simulate(arrivals, Forced(tl, cfg.autoscale_interval_s), **common)
    policy = replay(arrivals, autoscaler="policy", config=cfg, **common)
    # what the fleet answered per second while saturated, by ready workers: on
    # one machine's two cores a second worker shares the first one's cores
    lat = np.array(run["latencies"])
    done = np.floor(lat[:, 0] + lat[:, 1] / 1000).astype(int)
    answered = np.bincount(done[done < seconds], minlength=seconds)[:seconds]
    ready_at = np.interp(np.arange(seconds), [p["t"] for p in tl], [p["ready"] for p in tl])
    lag_at = np.interp(np.arange(seconds), [p["t"] for p in tl], [p["lag"] for p in tl])
    by_ready = {}
    for n in (1, 2):
        busy = (np.round(ready_at) == n) & (lag_at > 500)
        busy[1:] &= busy[:-1]  # whole seconds inside a saturated stretch
        if busy.sum() >= 3:
            by_ready[n] = float(answered[busy].mean())
    print(f"saturated fleet rate by ready workers (requests/s): {by_ready}")
    shared = by_ready.get(2, 2 * mu) / 2
    forced_shared = simulate(arrivals, Forced(tl, cfg.autoscale_interval_s), **{**common, "service_rps": shared})

    real_t = np.array([p["t"] for p in tl])
    real_ready = np.interp(np.arange(seconds), real_t, [p["ready"] for p in tl])
    real_billed = np.interp(np.arange(seconds), real_t, [p["ready"] + p["starting"] for p in tl])
    real_lag = np.interp(np.arange(seconds), real_t, [p["lag"] for p in tl])
    real_p99 = []
    for start in range(0, seconds, window_s):
        sel = lat[(lat[:, 0] >= start) & (lat[:, 0] < start + window_s), 1] if len(lat) else np.array([])
        real_p99.append(float(np.percentile(sel, 99)) if len(sel) else float("nan"))

    def sim_p99(r) -> list[float]:
        served = arrivals + np.concatenate([[0.0], r.queue[:-1]]) - r.queue
        cum = np.concatenate([[0.0], np.cumsum(served)])
        lat_s, w = latencies(arrivals, cum, common["base_latency_s"])
        return per_window_p99_ms(lat_s, w, window_s)

    def drained(lag: np.ndarray) -> float:
        """Seconds after the step's end until the lag is under a second of the quiet rate."""
        end = next(start for start, rate in TRACE if start > 20)
        after = np.flatnonzero(lag[end:] <= TRACE[2][1])
        return float(after[0]) if len(after) else float("nan")

    rows = [
        ("peak lag (records)", real_lag.max(), forced.lag.max(), forced_shared.lag.max(), policy.lag.max()),
        (
            "seconds after the step until lag < 1 s of arrivals",
            drained(real_lag),
            drained(forced.lag),
            drained(forced_shared.lag),
            drained(policy.lag),
        ),
        (
            "worker-seconds billed",
            real_billed.sum(),
            forced.billed.sum(),
            forced_shared.billed.sum(),
            policy.billed.sum(),
        ),
        ("most workers ready", real_ready.max(), forced.ready.max(), forced_shared.ready.max(), policy.ready.max()),
        (
            "p99 latency over the run, ms",
            float(np.percentile(lat[:, 1], 99)),
            1000 * forced.p99_s,
            1000 * forced_shared.p99_s,
            1000 * policy.p99_s,
        ),
    ]
    table = (
        f"| | real run | simulation, the real fleet ({mu:.0f}/s a worker) | the same at the shared-core rate "
        f"({shared:.0f}/s a worker) | simulation, its own policy ({mu:.0f}/s) |\n|---|---|---|---|---|\n"
    )
    table += "\n".join(f"| {name} | {a:,.0f} | {b:,.0f} | {c:,.0f} | {d:,.0f} |" for name, a, b, c, d in rows)
    print(table)

    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(3, 1, figsize=(10, 9), sharex=True)
    t = np.arange(seconds)
    axes[0].fill_between(t, arrivals, step="post", color="0.8", label="arrivals (requests/s)")
    axes[0].set_ylabel("requests/s")
    twin = axes[0].twinx()
    twin.plot(t, real_ready, label="real: ready", color="k")
    twin.plot(t, forced.ready, label="sim, real fleet: ready", color="tab:blue", ls="--")
    twin.plot(t, policy.ready, label="sim, policy: ready", color="tab:orange", ls=":")
    twin.set_ylabel("workers ready")
    axes[0].legend(loc="upper left", fontsize=8)
    twin.legend(loc="upper right", fontsize=8)
    axes[1].plot(t, real_lag, label="real", color="k")
    axes[1].plot(t, forced.lag, label="sim, real fleet", color="tab:blue", ls="--")
    axes[1].plot(t, forced_shared.lag, label="sim, real fleet, shared-core rate", color="tab:green", ls="-.")
    axes[1].plot(t, policy.lag, label="sim, policy", color="tab:orange", ls=":")
    axes[1].set_ylabel("lag (records)")
    axes[1].legend(fontsize=8)
    w = np.arange(0, seconds, window_s) + window_s / 2
    axes[2].plot(w, real_p99, "o-", label="real", color="k")
    axes[2].plot(w, sim_p99(forced), "s--", label="sim, real fleet", color="tab:blue")
    axes[2].plot(w, sim_p99(forced_shared), "d-.", label="sim, real fleet, shared-core rate", color="tab:green")
    axes[2].plot(w, sim_p99(policy), "^:", label="sim, policy", color="tab:orange")
    axes[2].set_yscale("log")
    axes[2].set_ylabel(f"p99 latency per {window_s} s (ms)")
    axes[2].set_xlabel("seconds from start")
    axes[2].legend(fontsize=8)
    fig.suptitle(f"capacity simulation against a real run (mu {mu:.0f}/s per worker, cold start {cold:.1f} s)")
    fig.tight_layout()
    fig.savefig(plot_path, dpi=110)
    print(f"plot: {plot_path}")
    return table


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--reuse", action="store_true", help="compare a previous run's recording again")
    args = ap.parse_args()
    OUT.mkdir(parents=True, exist_ok=True)
    record = OUT / "autoscale_run.json"
    if not args.reuse:
        with stack() as (bootstrap, _):
            prefix = new_prefix("autoscale")
            create_topics(bootstrap, prefix)
            run = asyncio.run(real_run(bootstrap, prefix))
        record.write_text(json.dumps(run))
    run = json.loads(record.read_text())
    print(f"real run: sent {run['sent']}, answered {run['answered']}")
    os.environ.setdefault("MPLBACKEND", "Agg")
    compare(run, PLOTS / "autoscale_check.png")


if __name__ == "__main__":
    main()
