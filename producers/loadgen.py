"""Open-loop load generator, and the search for the highest rate under an SLO.

Requests go out on a fixed schedule (request i at t0 + i/rate) whatever the
answers do, and each latency runs from the request's *scheduled* send time
to its result's arrival: a slow pipeline cannot slow the generator down and
hide its own queueing (no coordinated omission).

The transport is anything with `send(doc) -> future of the result` and
`flush()`: the Kafka client here, or the HTTP one the benchmarks point at a
request/response peer, so both face the same schedule and the same clock.
"""

from __future__ import annotations

import asyncio
import time
from collections import Counter
from collections.abc import Awaitable, Callable
from dataclasses import asdict, dataclass, field
from typing import Any, Protocol

import numpy as np

from producers.client import SluiceClient, make_request
from producers.corpus import Workload
from schemas.records import now_ms
from schemas.topics import KafkaConfig


class Transport(Protocol):
    async def send(self, doc: dict[str, Any]) -> asyncio.Future[dict[str, Any]]: ...
    async def flush(self) -> None: ...


KAFKA_TRANSPORTS = ("librdkafka", "aiokafka")


def kafka_transport(config: KafkaConfig, kind: str = "librdkafka") -> Any:
    """The Kafka client a run offers its load through (started by the caller).
    librdkafka by default: it takes half the CPU per request of aiokafka's,
    and on one machine the generator's CPU is taken from what it measures."""
    if kind == "librdkafka":
        from producers.rdkafka_client import RdKafkaClient

        return RdKafkaClient(config)
    if kind == "aiokafka":
        return SluiceClient(config)
    raise ValueError(f"transport {kind!r}: one of {', '.join(KAFKA_TRANSPORTS)}")


@dataclass
class LoadReport:
    rate: float
    duration_s: float
    sent: int = 0
    answered: int = 0
    unanswered: int = 0
    statuses: dict[str, int] = field(default_factory=dict)
    cache: dict[str, int] = field(default_factory=dict)
    throughput_rps: float = 0.0
    send_lag_max_ms: float = 0.0
    latency_ms: dict[str, float] = field(default_factory=dict)
    latency_by_cache_ms: dict[str, dict[str, float]] = field(default_factory=dict)
    cost_usd: float = 0.0
    cost_known: bool = True  # answers carried cost_usd (HTTP answers do not)
    # (scheduled send, seconds since start; latency ms; cache level), when asked for
    samples: list[tuple[float, float, str]] = field(default_factory=list, repr=False)

    @property
    def errors(self) -> int:
        return sum(n for s, n in self.statuses.items() if s != "ok")

    def as_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d.pop("samples", None)
        d["errors"] = self.errors
        return d

    def summary(self) -> str:
        lat = self.latency_ms
        lines = [
            f"rate {self.rate:g}/s for {self.duration_s:g} s: sent {self.sent}, answered "
            f"{self.answered}, unanswered {self.unanswered}, errors {self.errors}",
            f"throughput {self.throughput_rps:.0f} results/s; statuses "
            + ", ".join(f"{k} {v}" for k, v in sorted(self.statuses.items())),
            "latency ms (scheduled send -> result): "
            + ", ".join(f"{k} {lat[k]:.1f}" for k in ("p50", "p95", "p99", "max") if k in lat),
        ]
        if self.cache:
            total = sum(self.cache.values()) or 1
            hits = sum(v for k, v in self.cache.items() if k in ("l1", "l2", "coalesced"))
            lines.append(
                f"cache: hit rate {hits / total:.1%} ("
                + ", ".join(f"{k} {v}" for k, v in sorted(self.cache.items()))
                + ")"
            )
            for level, q in sorted(self.latency_by_cache_ms.items()):
                lines.append(f"  {level:>9}: p50 {q['p50']:.1f}  p95 {q['p95']:.1f}  p99 {q['p99']:.1f} ms")
        if self.cost_known:
            lines.append(f"cost ${self.cost_usd:.6f} (${self.cost_usd / max(1, self.answered) * 1e6:.3f} per million)")
        else:
            lines.append("cost: not in these answers (`sluice analytics cost_by_tenant_day` has it)")
        return "\n".join(lines)


def percentiles(values: list[float] | np.ndarray) -> dict[str, float]:
    if len(values) == 0:
        return {}
    a = np.asarray(values, dtype=np.float64)
    p50, p95, p99 = np.percentile(a, [50, 95, 99])
    return {"p50": float(p50), "p95": float(p95), "p99": float(p99), "max": float(a.max()), "mean": float(a.mean())}


async def run_load(
    config: KafkaConfig | None,
    *,
    rate: float,
    duration_s: float,
    workload: Workload | None = None,
    task: str = "embed",
    labels: list[str] | None = None,
    tenant: str = "loadtest",
    cache: str = "use",
    drain_timeout_s: float = 30.0,
    progress: Callable[[str], None] | None = print,
    client: Transport | None = None,
    keep_samples: bool = False,
    on_answer: Callable[[dict[str, Any], float], None] | None = None,
    transport: str = "librdkafka",
) -> LoadReport:
    """One open-loop run, through `client` or else a Kafka client of the
    `transport` kind made here. `on_answer(result, latency_ms)` sees every
    result as it arrives (for figures the report does not keep)."""
    if rate <= 0 or duration_s <= 0:
        raise ValueError(f"rate={rate}, duration_s={duration_s}: both must be > 0")
    n = max(1, int(rate * duration_s))
    texts = (workload or Workload()).texts(n)
    own: Any = None  # a Kafka client made here, started and stopped here
    if client is None:
        if config is None:
            raise ValueError("run_load needs a KafkaConfig or a client")
        client = own = kafka_transport(config, transport)
        await own.start()
    report = LoadReport(rate=rate, duration_s=duration_s)
    scheduled: dict[str, int] = {}
    latencies: list[float] = []
    by_level: dict[str, list[float]] = {}
    statuses: Counter[str] = Counter()
    levels: Counter[str] = Counter()
    last_arrival = [0]
    cost = [0.0]
    costed = [False]

    def on_result(fut: asyncio.Future) -> None:
        pending.discard(fut)
        if fut.cancelled() or fut.exception() is not None:
            return
        doc = fut.result()
        lat = doc["_received_at_ms"] - scheduled[doc["id"]]
        latencies.append(lat)
        statuses[doc.get("status", "?")] += 1
        level = doc.get("cache") or "none"
        levels[level] += 1
        by_level.setdefault(level, []).append(lat)
        if "cost_usd" in doc:
            cost[0] += float(doc["cost_usd"] or 0.0)
            costed[0] = True
        if keep_samples:
            report.samples.append(((scheduled[doc["id"]] - t0_wall) / 1000, lat, level))
        last_arrival[0] = doc["_received_at_ms"]
        if on_answer is not None:
            on_answer(doc, lat)

    # Only unanswered futures are kept: holding every answer (an embedding is
    # hundreds of objects) made the generator's own GC passes long enough to
    # show in the latencies it measures.
    pending: set[asyncio.Future] = set()
    run_id = f"lt-{now_ms()}-"
    t0_wall = now_ms()
    t0 = time.monotonic()
    next_progress = t0 + 2.0
    try:
        for i, text in enumerate(texts):
            due = t0 + i / rate
            ahead = due - time.monotonic()
            # Never early: a request sent before its scheduled time would
            # report a latency shorter than the truth (even below zero).
            while ahead > 0:
                await asyncio.sleep(ahead)
                ahead = due - time.monotonic()
            report.send_lag_max_ms = max(report.send_lag_max_ms, -ahead * 1000)
            rid = f"{run_id}{i}"
            sched_ms = t0_wall + int(i * 1000 / rate)
            scheduled[rid] = sched_ms
            doc = make_request(text, id=rid, task=task, labels=labels, tenant=tenant, cache=cache)
            doc["sent_at_ms"] = sched_ms
            fut = await client.send(doc)
            pending.add(fut)
            fut.add_done_callback(on_result)
            report.sent += 1
            if progress and time.monotonic() >= next_progress:
                next_progress += 2.0
                q = percentiles(latencies[-2000:])
                progress(
                    f"  t={time.monotonic() - t0:5.1f}s sent {report.sent} answered "
                    f"{len(latencies)} p99(recent) {q.get('p99', 0):.0f} ms"
                )
        await client.flush()
        deadline = time.monotonic() + drain_timeout_s
        if pending:
            await asyncio.wait(set(pending), timeout=max(0.0, deadline - time.monotonic()))
    finally:
        for f in list(pending):
            f.cancel()
        if own is not None:
            await own.stop()
    report.answered = len(latencies)
    report.unanswered = report.sent - report.answered
    report.statuses = dict(statuses)
    report.cache = dict(levels)
    span_s = max(1e-3, (last_arrival[0] - t0_wall) / 1000)
    report.throughput_rps = report.answered / span_s
    report.latency_ms = percentiles(latencies)
    report.latency_by_cache_ms = {k: percentiles(v) for k, v in by_level.items()}
    report.cost_usd = cost[0]
    report.cost_known = costed[0] or not report.answered
    return report


@dataclass
class RateSearch:
    """Steps of a search for the highest rate whose p99 stays under the SLO."""

    slo_ms: float
    steps: list[dict[str, Any]] = field(default_factory=list)

    @property
    def max_rate(self) -> float:
        """Highest offered rate that passed (0 when none did)."""
        return max((s["rate"] for s in self.steps if s["pass"]), default=0.0)

    @property
    def best(self) -> dict[str, Any] | None:
        passed = [s for s in self.steps if s["pass"]]
        return max(passed, key=lambda s: s["rate"]) if passed else None

    def table(self) -> str:
        rows = ["| offered/s | answered/s | p50 ms | p99 ms | unanswered | p99 < SLO |", "|---|---|---|---|---|---|"]
        for s in self.steps:
            rows.append(
                f"| {s['rate']:.0f} | {s['throughput_rps']:.0f} | {s['p50_ms']:.0f} | "
                f"{s['p99_ms']:.0f} | {s['unanswered']} | {'pass' if s['pass'] else 'FAIL'} |"
            )
        return "\n".join(rows)


def step_passes(report: LoadReport, slo_ms: float) -> bool:
    """Every request answered, none failed, and p99 (from scheduled send) under the SLO."""
    return report.unanswered == 0 and report.errors == 0 and report.latency_ms.get("p99", float("inf")) < slo_ms


async def find_max_rate(
    run_step: Callable[[float, int], Awaitable[LoadReport]],
    *,
    slo_ms: float = 500.0,
    start_rate: float = 50.0,
    factor: float = 1.5,
    max_rate: float = 10_000.0,
    refine: int = 1,
    progress: Callable[[str], None] | None = print,
) -> RateSearch:
    """Raise the offered rate by `factor` from `start_rate` until a step fails
    or `max_rate` (tried last) passes, then bisect `refine` times between the last pass and the
    first failure. `run_step(rate, step_number)` runs one open-loop step; the
    step number lets it send texts no earlier step sent."""
    if start_rate <= 0 or factor <= 1 or slo_ms <= 0:
        raise ValueError(
            f"start_rate={start_rate}, factor={factor}, slo_ms={slo_ms}: need start_rate > 0, factor > 1, slo_ms > 0"
        )
    search = RateSearch(slo_ms=slo_ms)

    async def step(rate: float) -> bool:
        report = await run_step(rate, len(search.steps))
        ok = step_passes(report, slo_ms)
        search.steps.append(
            {
                "rate": rate,
                "pass": ok,
                "throughput_rps": report.throughput_rps,
                "p50_ms": report.latency_ms.get("p50", float("nan")),
                "p99_ms": report.latency_ms.get("p99", float("nan")),
                "sent": report.sent,
                "unanswered": report.unanswered,
                "errors": report.errors,
                "cache": report.cache,
            }
        )
        if progress:
            progress(
                f"  step {rate:7.0f}/s: answered {report.throughput_rps:6.0f}/s, p99 "
                f"{report.latency_ms.get('p99', float('nan')):7.0f} ms, unanswered {report.unanswered}"
                f" -> {'pass' if ok else 'FAIL'} (SLO p99 < {slo_ms:g} ms)"
            )
        return ok

    rate, failed = min(start_rate, max_rate), None
    while True:
        if not await step(rate):
            failed = rate
            break
        if rate >= max_rate:
            break
        rate = min(rate * factor, max_rate)
    low = search.max_rate
    for _ in range(refine if failed is not None and low > 0 else 0):
        assert failed is not None
        mid = (low + failed) / 2
        if await step(mid):
            low = mid
        else:
            failed = mid
    return search
