"""The capacity simulation's model (bench/capacity_sim.py): queue, capacity,
cold start and billing, latency from the cumulative curves, telemetry, KEDA's
rule, and the real policy driven through it as the live loop drives it.
Figures are worked out by hand from the model's definition, not copied from
a run."""

from __future__ import annotations

import json
import math
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import yaml

from bench.capacity_sim import (
    INPUTS,
    POLICY_SETTINGS,
    KedaRule,
    KedaSettings,
    ServiceFit,
    StaticFleet,
    Telemetry,
    View,
    capacity_rps,
    fit_service,
    model_bound,
    replay,
    simulate,
    spread,
    static_workers,
    telemetry_reading,
)
from schemas.topics import KafkaConfig
from sluice.autoscale import loop as live
from sluice.autoscale.config import AutoscaleConfig
from sluice.autoscale.signals import GroupOffsets, ServiceReading

ROOT = Path(__file__).resolve().parents[2]
MU_MISS, MODEL_RPS = 262.0, 1582.0  # a worker's rate with misses only; the model alone (the inputs')


def view(at_s: float, lag: int, replicas: int) -> View:
    return View(
        at_s=at_s,
        lag=lag,
        produced=lag,
        partitions=12,
        ready=replicas,
        starting=0,
        cold_start_s=None,
        telemetry=lambda window_s: Telemetry(0.0, None),
    )


def step(before: float = 150.0, after: float = 600.0, at_s: int = 600, seconds: int = 1200) -> np.ndarray:
    return np.concatenate([np.full(at_s, before), np.full(seconds - at_s, after)])


def test_capacity_is_set_by_the_busiest_worker() -> None:
    mu = 100.0
    assert capacity_rps(5, 12, mu) == pytest.approx(4 * mu)  # 3 partitions on the busiest
    assert capacity_rps(7, 12, mu) == pytest.approx(6 * mu)  # 2 on the busiest, as with 6
    assert capacity_rps(1, 12, mu) == pytest.approx(mu)
    assert capacity_rps(12, 12, mu) == pytest.approx(12 * mu)
    assert capacity_rps(20, 12, mu) == pytest.approx(12 * mu)  # a 13th worker gets no partition
    assert capacity_rps(0, 12, mu) == 0.0


def test_lag_spread_over_partitions_keeps_the_total() -> None:
    for total in (0, 1, 11, 12, 13, 50_001):
        parts = spread(total, 12)
        assert sum(parts.values()) == total and max(parts.values()) - min(parts.values()) <= 1


def test_service_fit_recovers_a_known_model_and_fits_the_measured_points() -> None:
    truth = ServiceFit(miss_rps=250.0, hit_rps=5000.0)
    fit = fit_service([(h, truth.rate_rps(h)) for h in (0.0, 0.5, 0.8, 0.95)])
    assert fit.miss_rps == pytest.approx(250.0) and fit.hit_rps == pytest.approx(5000.0)
    measured = json.loads(INPUTS.read_text())["service_points"]["hit_rate_max_rps"]
    fit = fit_service(measured)
    for h, rate in measured:
        assert fit.rate_rps(h) == pytest.approx(rate, rel=0.1)


def test_load_below_a_static_fleet_never_waits() -> None:
    arrivals = np.full(1800, 500.0)
    r = replay(arrivals, service_rps=MU_MISS, autoscaler="static")
    assert int(r.ready[0]) == 3  # ceil(500 / (262 x 0.8))
    assert r.slo_minutes == 0 and r.queue.max() == 0.0
    assert r.lag.max() <= math.ceil(500 * 0.05)  # only what is in flight
    assert r.worker_hours == pytest.approx(r.ready[0] * 0.5)


def test_load_above_capacity_grows_the_queue_by_the_difference() -> None:
    r = replay(np.full(120, 150.0), service_rps=100.0, autoscaler="static", workers=1)
    assert np.allclose(np.diff(r.queue), 50.0) and r.queue[0] == pytest.approx(50.0)
    assert r.slo_minutes == 2  # the backlog's wait passes 500 ms within the first seconds


def test_a_starting_worker_is_billed_but_serves_nothing_and_its_join_pauses_the_group() -> None:
    r = simulate(
        np.full(60, 100.0),
        StaticFleet(1),
        service_rps=1000.0,
        cold_start_s=10.0,
        rebalance_pause_s=3.0,
        base_latency_s=0.0,
    )
    assert (r.billed == 1).all()
    assert (r.ready[:10] == 0).all() and (r.ready[10:] == 1).all()
    assert (r.capacity_rps[:13] == 0).all() and r.capacity_rps[13] == pytest.approx(1000.0)
    assert r.queue[12] == pytest.approx(1300.0)  # 13 s of arrivals, nothing served
    assert r.worker_hours == pytest.approx(60 / 3600)
    assert r.minute_no_worker[0] and r.slo_minutes == 1


def test_latency_follows_fifo_from_the_cumulative_curves() -> None:
    # 100/s arrive from 0 s, the worker answers 1,000/s from 10 s (no pause):
    # the request arriving at x is the 100x-th, answered at 10 + 100x/1000 s,
    # so it waits 10 - 0.9x s; the worst 1% of the minute's 6,000 arrived in
    # its first 0.6 s: p99 about 10 - 0.9 x 0.6 = 9.46 s.
    r = simulate(
        np.full(60, 100.0),
        StaticFleet(1),
        service_rps=1000.0,
        cold_start_s=10.0,
        rebalance_pause_s=0.0,
        base_latency_s=0.0,
    )
    assert r.minute_p99_s[0] == pytest.approx(9.46, abs=0.25)
    assert r.p99_s == pytest.approx(r.minute_p99_s[0])


def test_keda_asks_for_lag_over_threshold_capped_at_the_partitions() -> None:
    # from 6 replicas the scale-up limit (max(2x, +4) = 12) does not bind
    assert KedaRule().decide(view(0, 35_001, 6)) == 8
    assert KedaRule().decide(view(0, 1_000_000, 6)) == 12
    assert KedaRule().decide(view(0, 100_000, 1)) == 5  # 1 -> at most 1 + 4
    assert KedaRule().decide(view(0, 20_500, 4)) == 4  # within the HPA's 10% of 4 x 5000
    assert KedaRule().decide(view(0, 1, 0)) == 1  # activation: any lag wakes it
    assert KedaRule().decide(view(0, 0, 0)) == 0


def test_keda_scales_down_after_the_window_two_pods_a_minute_and_to_zero_after_cooldown() -> None:
    rule = KedaRule()
    replicas = rule.decide(view(0, 50_000, 10))
    assert replicas == 10
    got = {}
    for t in range(15, 375, 15):  # the lag now asks for 1 replica; each decision is applied
        got[t] = replicas = rule.decide(view(t, 5_000, replicas))
    assert all(got[t] == 10 for t in range(15, 300, 15))  # the window still holds the 10 asked at 0
    assert got[300] == 8 and all(got[t] == 8 for t in (315, 330, 345))  # 2 pods, then wait out the minute
    assert got[360] == 6
    idle = KedaRule()
    assert idle.decide(view(0, 10, 1)) == 1
    assert [idle.decide(view(t, 0, 1)) for t in (15, 285, 300)] == [1, 1, 0]


def test_keda_settings_are_the_scaled_objects() -> None:
    spec = yaml.safe_load((ROOT / "compose" / "k8s" / "scaledobject.yaml").read_text())["spec"]
    [trigger] = spec["triggers"]
    down = spec["advanced"]["horizontalPodAutoscalerConfig"]["behavior"]["scaleDown"]
    [down_policy] = down["policies"]
    s = KedaSettings()
    assert (s.polling_interval_s, s.cooldown_s) == (spec["pollingInterval"], spec["cooldownPeriod"])
    assert (s.min_replicas, s.max_replicas) == (spec["minReplicaCount"], spec["maxReplicaCount"])
    assert s.lag_threshold == int(trigger["metadata"]["lagThreshold"])
    assert s.activation_lag_threshold == int(trigger["metadata"]["activationLagThreshold"])
    assert s.down_window_s == down["stabilizationWindowSeconds"]
    assert (down_policy["type"], s.down_pods, s.down_period_s) == (
        "Pods",
        down_policy["value"],
        down_policy["periodSeconds"],
    )


def test_telemetry_counts_what_the_fleet_answered_over_whole_seconds() -> None:
    served_cum = np.concatenate([[0.0], np.cumsum(np.full(100, 50.0))])  # 50 answered each second
    assert telemetry_reading(served_cum, 100, 10.0, 1582.0) == Telemetry(50.0, 1582.0)
    assert telemetry_reading(served_cum, 100, 9.6, 1582.0).answered_rps == pytest.approx(50.0)  # 10 s, as since_s
    assert telemetry_reading(served_cum, 5, 60.0, 1582.0).answered_rps == pytest.approx(
        250 / 60
    )  # the run began 5 s ago
    assert telemetry_reading(np.zeros(101), 100, 60.0, 1582.0) == Telemetry(0.0, None)  # no answers: no model time
    assert model_bound({"model_rps": {"value": 1582}}, 0.8) == pytest.approx(7910.0)  # hits take no model time


async def test_the_sim_feeds_the_policy_what_the_live_loop_would(monkeypatch: pytest.MonkeyPatch) -> None:
    """Every tick's readings, given to `sluice.autoscale.loop.Autoscaler.tick`
    through a fake broker, analytics store and actuator, make the same decision
    and ask telemetry for the same window: the sim wires the shared objects as
    the loop does."""
    r = replay(step(), service_rps=MU_MISS, model_bound_rps=MODEL_RPS, autoscaler="policy", cold_start_s=2.0)
    # every way the rate is had: before telemetry, the bound, a span, the bound scaled, answers above it
    assert {"prior", "model_time", "measured", "scaled", "answered"} <= {k.decision.service_source for k in r.ticks}
    now = SimpleNamespace(tick=r.ticks[0])
    asked: list[float] = []

    class Broker:
        async def read(self) -> GroupOffsets:
            v = now.tick.view
            end, lag = spread(v.produced, v.partitions), spread(v.lag, v.partitions)
            committed = {p: end[p] - lag[p] for p in end}
            return GroupOffsets(end=end, start=dict.fromkeys(end, 0), committed=committed, members=v.ready)

    class Analytics:
        async def read(self, window_s: float) -> ServiceReading:
            asked.append(window_s)
            got = now.tick.reading
            return ServiceReading(got.answered_rps, now.tick.view.ready, 0.0, got.model_bound_rps)

    class Actuator:
        mode = "sim"

        def counts(self, members: int) -> tuple[int, int]:
            return now.tick.view.ready, now.tick.view.starting

        def cold_start_s(self) -> float | None:
            return now.tick.view.cold_start_s

        async def scale(self, desired: int) -> None:
            return None

        async def close(self) -> None:
            return None

    monkeypatch.setattr(live, "time", SimpleNamespace(monotonic=lambda: now.tick.view.at_s))
    scaler = live.Autoscaler(
        AutoscaleConfig(**POLICY_SETTINGS),
        KafkaConfig(),
        "workers",
        Actuator(),
        Analytics(),  # type: ignore[arg-type]
        instance="sim",
    )
    scaler.broker = Broker()  # type: ignore[assignment]
    for k in r.ticks:
        now.tick = k
        assert await scaler.tick() == k.decision, f"tick at {k.view.at_s} s"
    assert asked == [k.window_s for k in r.ticks]


def test_before_any_backlog_the_policy_plans_with_the_model_time_bound_then_learns_the_rate() -> None:
    # misses only: the model alone does 1,582/s, a worker 262/s. Joins are
    # counted once their pause is over, so the measurement is exact.
    r = replay(step(), service_rps=MU_MISS, model_bound_rps=MODEL_RPS, autoscaler="policy", ready_after_pause=True)
    before = [k for k in r.ticks if 360 <= k.view.at_s < 600]  # the wake's extra worker has gone
    assert {k.service_source for k in before} == {"model_time"} and {k.decision.desired for k in before} == {1}
    measured = [k for k in r.ticks if k.service_source == "measured"]
    assert measured and all(k.view.at_s > 600 for k in measured)  # learned from the step's backlog
    assert all(k.service_rps == pytest.approx(MU_MISS, rel=1e-3) for k in measured)
    last = r.ticks[-1]
    assert last.service_source == "scaled" and last.service_rps == pytest.approx(MU_MISS, rel=1e-3)
    oracle = replay(step(), service_rps=MU_MISS, model_bound_rps=MODEL_RPS, autoscaler="policy", oracle=True)
    assert {k.service_source for k in oracle.ticks if k.view.ready} == {"oracle"}
    # the step's backlog took it to 4; 3 would plan 3 x 262 x 0.8 = 629/s, within the 10%
    # scale-down tolerance of the 600/s that arrive, so 4 stay (a count on the threshold flaps)
    assert last.decision.desired == oracle.ticks[-1].decision.desired == 4


def test_a_join_does_not_put_its_pause_into_the_measured_span() -> None:
    """A worker counted ready from its join (group membership: KEDA,
    --recommend) has its 3 s rebalance pause after the tick that first sees
    it. That tick never starts a saturated span, so the rate measured is the
    true one, as when ready is counted once the pause is over."""
    arrivals = np.full(1800, 500.0)
    for after_pause in (False, True):
        r = replay(
            arrivals, service_rps=MU_MISS, model_bound_rps=MODEL_RPS, autoscaler="policy", ready_after_pause=after_pause
        )
        measured = [k for k in r.ticks if k.service_source == "measured"]
        assert measured, after_pause
        assert all(k.service_rps == pytest.approx(MU_MISS, rel=1e-3) for k in measured), after_pause
        assert r.ready[-1] == 3  # fleet_for(500, 262 x 0.8) on 12 partitions


def test_the_policy_wakes_on_the_first_request_and_sleeps_after_its_idle_time() -> None:
    arrivals = np.zeros(2400)
    arrivals[:600] = 50.0
    r = replay(arrivals, service_rps=MU_MISS, model_bound_rps=MODEL_RPS, autoscaler="policy", cold_start_s=30.0)
    assert r.minute_no_worker[0]  # the first requests wait for a worker's cold start
    assert next(d for d in r.decisions if d.desired != d.current).reason == "wake"
    # the wake's two minutes, and the one in which the wake's second worker leaves (a 3 s pause)
    assert (r.billed[60:600] >= 1).all() and r.slo_minutes <= 3
    stopped = int(np.flatnonzero(r.billed)[-1]) + 1
    # idle once the 60 s look-back holds no arrivals, then 900 s, seen at a 10 s tick
    assert 600 + 900 <= stopped <= 600 + 60 + 900 + 10
    assert r.decisions[-1].desired == 0


def test_the_policy_settles_under_constant_load() -> None:
    arrivals = np.full(3600, 500.0)
    for oracle in (False, True):
        r = replay(
            arrivals, service_rps=MU_MISS, model_bound_rps=MODEL_RPS, autoscaler="policy", warmup_s=1200, oracle=oracle
        )
        assert r.slo_minutes == 0 and r.scale_events == 0
        assert capacity_rps(int(r.ready[0]), 12, MU_MISS) >= 500.0
    # with the true rate: the plain sizing, ceil(500 / (262 x 0.8)) = 3
    assert int(r.ready[0]) == static_workers(500.0, MU_MISS, 12)
