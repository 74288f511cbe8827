"""All Prometheus collectors of a worker, built in one place, and its HTTP
server for /metrics, /healthz and /readyz (the one the sink uses too, from
schemas/service/http.py). Processing code calls these hooks."""

from __future__ import annotations

import asyncio
import collections
import gc
import time
from collections.abc import Callable, Iterable
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from schemas.service import http as service_http

_LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
_POW2 = tuple(float(2**i) for i in range(0, 14))


class WorkerMetrics:
    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        r = self.registry = registry or CollectorRegistry()
        self.requests = Counter(
            "sluice_requests_total",
            "Requests answered, by status and cache level.",
            ["model", "status", "cache"],
            registry=r,
        )
        self.errors = Counter(
            "sluice_request_errors_total", "Error results and DLQ records, by code.", ["code"], registry=r
        )
        self.dlq = Counter("sluice_dlq_records_total", "Records sent to the DLQ.", registry=r)
        self.tenant_overrides = Counter(
            "sluice_tenant_overrides_total",
            "Requests on a tenant's topic whose tenant or reply_to named another, replaced by the topic's.",
            ["field"],
            registry=r,
        )
        self.latency = Histogram(
            "sluice_stage_seconds", "Time per request in each stage.", ["stage"], buckets=_LATENCY_BUCKETS, registry=r
        )
        self.batch_items = Histogram("sluice_batch_items", "Records per model hand-off.", buckets=_POW2, registry=r)
        self.batch_tokens = Histogram(
            "sluice_inference_padded_tokens", "Padded tokens per ONNX Runtime call.", buckets=_POW2, registry=r
        )
        self.inference = Histogram(
            "sluice_inference_seconds",
            "Model process time per hand-off (as the event loop waits for it).",
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.compute_seconds = Counter("sluice_compute_seconds_total", "Model compute time.", registry=r)
        self.cost = Counter("sluice_cost_usd_total", "Cost attributed to requests.", ["model"], registry=r)
        self.pending = Gauge("sluice_pending_items", "Records read and not yet handed to the model.", registry=r)
        self.inflight = Gauge("sluice_inflight_items", "Records handed to the model and not yet committed.", registry=r)
        self.assigned = Gauge("sluice_assigned_partitions", "Partitions this worker owns.", registry=r)
        self.rebalances = Counter("sluice_rebalances_total", "Partition revocations handled.", registry=r)
        self.commits = Counter("sluice_commits_total", "Offset commits.", ["outcome"], registry=r)

        self.gc_pause = Histogram(
            "sluice_gc_pause_seconds",
            "Python garbage collection pauses, by generation.",
            ["generation"],
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.loop_lag = Histogram(
            "sluice_event_loop_lag_seconds",
            "How late the event loop runs a timer: what a cache hit waits for CPU.",
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self._gc_started = 0.0
        self._stages: dict[str, Any] = {}

    def stage(self, name: str) -> Any:
        """One stage's histogram. labels() builds and looks up its key on
        every call, which costs more than the observation itself; the
        publish stage observes two per request."""
        child = self._stages.get(name)
        if child is None:
            child = self._stages[name] = self.latency.labels(name)
        return child

    def observe_stage(self, stage: str, seconds: float) -> None:
        self.stage(stage).observe(seconds)

    def count_requests(self, outcomes: Iterable[tuple[str, str, str]], errors: Iterable[str]) -> None:
        """Add a publish round's answers: one increment per (model, status,
        cache level) and per error code, not one per request."""
        for labels, n in collections.Counter(outcomes).items():
            self.requests.labels(*labels).inc(n)
        for code, n in collections.Counter(errors).items():
            self.errors.labels(code).inc(n)

    def watch_gc(self, on: bool = True) -> None:
        """Time every collection (a full one can hold the loop for tens of ms)."""
        if on and self._on_gc not in gc.callbacks:
            gc.callbacks.append(self._on_gc)
        elif not on and self._on_gc in gc.callbacks:
            gc.callbacks.remove(self._on_gc)

    def _on_gc(self, phase: str, info: dict) -> None:
        if phase == "start":
            self._gc_started = time.perf_counter()
        else:
            self.gc_pause.labels(str(info.get("generation", "?"))).observe(time.perf_counter() - self._gc_started)

    async def watch_loop(self, interval_s: float = 0.01) -> None:
        """Runs until cancelled: each tick's lateness is the loop's lag."""
        while True:
            t = time.perf_counter()
            await asyncio.sleep(interval_s)
            self.loop_lag.observe(max(0.0, time.perf_counter() - t - interval_s))


class HealthServer(service_http.HealthServer):
    """/metrics, /healthz (event loop alive) and /readyz (model loaded and
    partitions assigned) on one port: the shared server
    (schemas/service/http.py) over a worker's metrics."""

    def __init__(
        self,
        metrics: WorkerMetrics,
        host: str,
        port: int,
        ready: Callable[[], tuple[bool, str]],
        heartbeat_age_s: Callable[[], float],
        stale_after_s: float = 30.0,
    ) -> None:
        super().__init__(
            metrics.registry, host, port, ready=ready, heartbeat_age_s=heartbeat_age_s, stale_after_s=stale_after_s
        )
