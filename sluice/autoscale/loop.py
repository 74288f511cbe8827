"""`sluice autoscale`: read, decide, act, record; once per interval.

Each tick:
  1. read the group's offsets from the broker (lag per partition, end
     offsets for the arrival rate, the group's membership);
  2. read the answered rate per worker from the analytics store;
  3. estimate one worker's service rate (below);
  4. let the policy decide, and the actuator act on it;
  5. record the decision: a log line, metrics, and a record on
     PREFIX.autoscale, which the sink stores in autoscale_events.

A worker's service rate is measured, never assumed past the first minutes
(policy.ServiceRate): when the fleet has been saturated for at least two
ticks (lag above half a second of arrivals at each, the same workers ready
throughout, so no rebalance pause is in it), what it answered over that span
per worker is what a worker can do, cache hits included. Otherwise the
model-time bound from telemetry, scaled by the last saturated measurement,
follows the hit rate. A missing input is logged once when it goes and once
when it comes back; the policy decides what missing means (never a smaller
fleet).
"""

from __future__ import annotations

import asyncio
import logging
import signal
import time
from dataclasses import asdict

from aiokafka import AIOKafkaProducer
from aiokafka.errors import KafkaError
from prometheus_client import CollectorRegistry, Counter, Gauge

from schemas.errors import SluiceError
from schemas.records import encode, now_ms
from schemas.service.http import HealthServer
from schemas.topics import KafkaConfig
from sluice.autoscale.actuators import Actuator
from sluice.autoscale.config import AutoscaleConfig
from sluice.autoscale.policy import ArrivalRate, Decision, Observation, Policy, Saturation, ServiceRate
from sluice.autoscale.signals import AnalyticsSignals, BrokerSignals, GroupOffsets, ServiceReading

log = logging.getLogger("sluice.autoscale")


class AutoscaleMetrics:
    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        r = self.registry = registry or CollectorRegistry()
        self.desired = Gauge("sluice_autoscale_desired_workers", "Workers the last decision asked for.", registry=r)
        self.recommended = Gauge(
            "sluice_autoscale_recommended_workers",
            "Workers the last interval needed, before stabilisation.",
            registry=r,
        )
        self.ready = Gauge(
            "sluice_autoscale_ready_workers", "Workers answering when the last decision was made.", registry=r
        )
        self.starting = Gauge("sluice_autoscale_starting_workers", "Workers started and not ready yet.", registry=r)
        self.lag = Gauge("sluice_autoscale_lag_records", "The worker group's lag on the requests topic.", registry=r)
        self.arrival = Gauge(
            "sluice_autoscale_arrival_rps", "Requests produced per second over the look-back.", registry=r
        )
        self.service = Gauge(
            "sluice_autoscale_service_rps", "Requests one worker serves per second, as planned with.", registry=r
        )
        self.cold_start = Gauge("sluice_autoscale_cold_start_seconds", "Start-to-ready time planned with.", registry=r)
        self.stuck = Gauge("sluice_autoscale_stuck_partitions", "Partitions reported stuck.", registry=r)
        self.decisions = Counter("sluice_autoscale_decisions_total", "Decisions, by reason.", ["reason"], registry=r)
        self.missing = Counter(
            "sluice_autoscale_missing_inputs_total",
            "Ticks that lacked an input: broker, analytics, commits.",
            ["input"],
            registry=r,
        )


class Autoscaler:
    def __init__(
        self,
        config: AutoscaleConfig,
        kafka: KafkaConfig,
        group: str,
        actuator: Actuator,
        analytics: AnalyticsSignals | None,
        *,
        instance: str,
        metrics: AutoscaleMetrics | None = None,
    ) -> None:
        self.config = config
        self.kafka = kafka
        self.group = group
        self.actuator = actuator
        self.analytics = analytics
        self.instance = instance
        self.metrics = metrics or AutoscaleMetrics()
        self.policy = Policy(config)
        self.arrivals = ArrivalRate(config.autoscale_lookback_s)
        self.service = ServiceRate()
        self.saturation = Saturation(
            config.autoscale_lookback_s, config.autoscale_interval_s, config.autoscale_saturation_backlog_s
        )
        requests = kafka.topics.tenant_requests_pattern if kafka.tenant_topics else kafka.topics.requests
        self.broker = BrokerSignals(kafka, requests, group)
        self._producer: AIOKafkaProducer | None = None
        self._http: HealthServer | None = None
        self._stopping = asyncio.Event()
        self._missing: set[str] = set()
        self._members = 0
        self._last_tick = time.monotonic()
        self.port: int | None = None

    # -- lifecycle -----------------------------------------------------------
    async def start(self) -> None:
        cfg = self.config
        await self.broker.start()
        self._producer = AIOKafkaProducer(**self.kafka.aiokafka(), client_id="sluice-autoscale", acks="all")
        try:
            await asyncio.wait_for(self._producer.start(), 10)
        except (KafkaError, OSError) as exc:
            log.warning("decision records not published until the broker answers: %s", exc)
        self._http = HealthServer(
            self.metrics.registry,
            cfg.autoscale_host,
            cfg.autoscale_port,
            ready=lambda: (self.policy.last is not None, "deciding" if self.policy.last else "no decision yet"),
            heartbeat_age_s=lambda: time.monotonic() - self._last_tick,
            stale_after_s=3 * cfg.autoscale_interval_s + 30,
            banner="autoscaler HTTP on http://{host}:{port} (/metrics, /readyz)",
        )
        await self._http.start()
        self.port = self._http.port
        log.info(
            "autoscaling group %s (%s) every %g s: drain within %g s, down after %g s, to zero after %g s idle",
            self.group,
            self.actuator.mode,
            cfg.autoscale_interval_s,
            cfg.autoscale_target_drain_s,
            cfg.autoscale_scale_down_window_s,
            cfg.autoscale_idle_s,
        )

    def stop(self) -> None:
        self._stopping.set()

    async def run(self) -> None:
        try:
            while not self._stopping.is_set():
                t0 = time.monotonic()
                await self.tick()
                wait = self.config.autoscale_interval_s - (time.monotonic() - t0)
                if wait > 0:
                    try:
                        await asyncio.wait_for(self._stopping.wait(), wait)
                    except TimeoutError:
                        pass
        finally:
            await self.close()

    async def close(self) -> None:
        await self.actuator.close()
        await self.broker.close()
        if self._producer is not None:
            await self._producer.stop()
        if self._http is not None:
            await self._http.stop()
        log.info("autoscaler stopped")

    # -- one tick --------------------------------------------------------------
    async def tick(self) -> Decision:
        now = time.monotonic()
        self._last_tick = now
        offsets = await self._read_broker()
        if offsets is not None:
            self._members = offsets.members
        ready, starting = self.actuator.counts(self._members)
        lag = offsets.lag if offsets is not None else None
        arrivals = self.arrivals.add(now, sum(offsets.end.values())) if offsets is not None else None
        span = self.saturation.add(now, sum(lag.values()) if lag else 0, arrivals or 0.0, ready)
        reading = await self._read_analytics(span or self.config.autoscale_lookback_s)
        service, source = (None, "")
        if reading is not None and ready > 0:
            # outside a saturated span the fleet may have changed: per worker of the look-back's mean
            workers = ready if span is not None else self.saturation.mean_ready()
            service, source = self.service.estimate(
                answered_per_worker_rps=reading.answered_rps / max(workers, 1e-9),
                model_bound_rps=reading.model_bound_rps,
                saturated=span is not None,
            )
        decision = self.policy.decide(
            Observation(
                at_s=now,
                lag=lag,
                partitions=len(offsets.end)
                if offsets is not None
                else (self.policy.last.partitions if self.policy.last else 0),
                ready=ready,
                starting=starting,
                arrival_rps=arrivals,
                service_rps=service,
                service_source=source,
                analytics_ok=reading is not None or self.analytics is None,
                uncommitted=offsets.uncommitted if offsets is not None else {},
                committed=offsets.committed if offsets is not None else {},
                cold_start_s=self.actuator.cold_start_s(),
            )
        )
        self._note("commits", "commits" in decision.missing, self._uncommitted_why(offsets))
        await self.actuator.scale(decision.desired)
        self._record(decision, starting)
        await self._publish(decision)
        return decision

    async def _read_broker(self) -> GroupOffsets | None:
        try:
            offsets = await self.broker.read()
        except (KafkaError, OSError) as exc:  # TimeoutError is an OSError
            self._note("broker", True, f"{type(exc).__name__}: {exc}")
            return None
        self._note("broker", False)
        return offsets

    async def _read_analytics(self, window_s: float) -> ServiceReading | None:
        if self.analytics is None:
            return None
        try:
            reading = await self.analytics.read(window_s)
        except (SluiceError, OSError, KeyError) as exc:
            self._note("analytics", True, f"{type(exc).__name__}: {exc}")
            return None
        self._note("analytics", False)
        return reading

    @staticmethod
    def _uncommitted_why(offsets: GroupOffsets | None) -> str:
        if offsets is None or not offsets.uncommitted:
            return ""
        waiting = sum(offsets.uncommitted.values())
        return f"the group has never committed on partitions {sorted(offsets.uncommitted)} ({waiting} records in their logs)"

    def _note(self, name: str, missing: bool, why: str = "") -> None:
        """Say once when an input goes missing and once when it is back."""
        if missing:
            self.metrics.missing.labels(name).inc()
            if name not in self._missing:
                self._missing.add(name)
                log.warning("%s input missing: %s; the fleet will not shrink until it is back", name, why)
        elif name in self._missing:
            self._missing.discard(name)
            log.info("%s input back", name)

    def _record(self, d: Decision, starting: int) -> None:
        m = self.metrics
        m.desired.set(d.desired)
        m.recommended.set(d.recommended)
        m.ready.set(d.ready)
        m.starting.set(starting)
        m.lag.set(d.lag)
        m.arrival.set(d.arrival_rps)
        m.service.set(d.service_rps)
        m.cold_start.set(d.cold_start_s)
        m.stuck.set(len(d.stuck))
        m.decisions.labels(d.reason).inc()
        log.info(
            "%s: %d -> %d workers (needed %d; lag %d, arrivals %.1f/s, %.1f/s per worker %s, cold start %.1f s%s%s)",
            d.reason,
            d.current,
            d.desired,
            d.recommended,
            d.lag,
            d.arrival_rps,
            d.service_rps,
            d.service_source,
            d.cold_start_s,
            f", stuck partitions {list(d.stuck)}" if d.stuck else "",
            f", missing {', '.join(d.missing)}" if d.missing else "",
        )

    async def _publish(self, d: Decision) -> None:
        if self._producer is None:
            return
        doc = asdict(d)
        doc.pop("at_s")
        doc.update(
            v=1,
            at_ms=now_ms(),
            autoscaler=self.instance,
            group=self.group,
            mode=self.actuator.mode,
            stuck=list(d.stuck),
            missing=list(d.missing),
        )
        try:
            await asyncio.wait_for(
                self._producer.send_and_wait(self.kafka.topics.autoscale, encode(doc), key=self.group.encode()),
                self.config.autoscale_interval_s,
            )
        except (KafkaError, OSError) as exc:
            log.warning("decision not recorded on %s: %s", self.kafka.topics.autoscale, exc)


async def serve(scaler: Autoscaler, *, once: bool = False) -> Decision | None:
    """Run until SIGTERM or SIGINT (then stop the workers it started, gracefully)."""
    await scaler.start()
    if once:
        try:
            return await scaler.tick()
        finally:
            await scaler.close()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, scaler.stop)
    await scaler.run()
    return scaler.policy.last
