"""Capacity simulation: the autoscaling policy against KEDA's lag rule and a
static fleet sized for the peak, on the same traffic traces (issue 15).

    .venv/bin/python -m bench.capacity_sim [--inputs bench/capacity_inputs.json] [--plot PATH] [--markdown]

Why a simulation: a day of traffic, a 10x spike or a night at zero cannot be
replayed against a real fleet in a session, and the question is a policy's,
not a worker's: how long requests wait and how many worker-hours it takes to
keep them under the SLO. The worker's side comes in as measured figures
(bench/capacity_inputs.json: service rate by cache hit rate, cold start,
rebalance pause, the model's own rate); the policy is the real one,
`sluice.autoscale.policy`, driven tick by tick as the live loop drives it.

The model
---------

Time runs in whole seconds; a trace is the number of requests that arrive in
each second, spread evenly over it.

- Service. A worker answers mu_eff requests/s at hit rate h, with
  1/mu_eff = (1 - h)/mu_miss + h/mu_hit (a hit and a miss each take a fixed
  share of the worker). mu_miss and mu_hit are fitted to the cache sweep's
  "max rate under the p99 SLO" points by least squares on relative error.
  With the sweep in RESULTS.md (2 cores per worker):

      hit rate   measured   fit (requests/s)
      0%           256      262
      50%          524      501
      80%         1074     1111
      95%         2859     2841      mu_miss = 262/s, mu_hit = 5,904/s

  (`fit_service`; the run prints the fit for the inputs it reads). Those
  points are rates at which p99 stayed under 500 ms, so mu_eff is a rate a
  worker sustains within the SLO, not its raw ceiling.
- Capacity. Partitions are assigned whole (round robin, eager: what the
  worker's consumer uses), so with w ready workers the busiest holds
  ceil(P/w) of the P partitions; with load spread evenly over partitions the
  group answers mu_eff x P / ceil(P/w) requests/s (12 partitions, 5 workers:
  4 x mu_eff). No ready worker: nothing is answered.
- Queue. One FIFO fluid queue (the partitions' backlogs together): each
  second it gains the arrivals and loses min(backlog + arrivals, capacity).
  A request's wait comes from the cumulative curves: arriving as the
  n-th request at time x, it is answered when cumulative service reaches n;
  its latency is that wait plus a base latency (inputs: 50 ms, between the
  measured hit and miss medians). Each second's arrivals are sampled at four
  points; a minute's p99 weights them by the arrivals.
- Lag, as a broker reports it: the backlog plus the records in flight
  (arrivals x base latency: produced, not yet committed), rounded to whole
  records and spread evenly over the partitions.
- Workers. A started worker is billed from its start and answers only after
  the cold start (inputs: 30 s, a pod on a node with the image; 2 s, a local
  process, for a second spike run). A stopped worker stops at once (its
  drain is graceful, its partitions' backlog stays in the queue). Any change
  of the ready set is a rebalance: the whole group answers nothing for
  `rebalance_pause_s` (inputs: 3 s; eager assignment stops every member).
- Events. A heap holds the autoscaler's ticks, workers becoming ready and
  workers stopping; events are handled at the start of the second they fall
  in (a fractional cold start is rounded up to the next second, a pause ends
  at its exact time), and the queue then moves one second.

The three autoscalers
---------------------

- policy: the live loop's tick (`sluice.autoscale.loop.Autoscaler.tick`),
  step for step, with the same objects from `sluice.autoscale.policy` and
  production-like settings (`POLICY_SETTINGS`: a decision every 10 s, drain
  within 60 s, 80% utilisation, 300 s scale-down window, zero after 900 s
  idle, min 0, max = partitions, 60 s look-back). Each tick (`PolicyScaler`):
  `ArrivalRate.add` gets the running total of requests produced (the topic's
  end offsets); `Saturation.add` gets (lag, that arrival rate, ready) and
  gives the saturated span, if any; telemetry is read over the span, else
  over the look-back: the requests the simulated fleet answered in it per
  second, and the model-time bound mu_model / (1 - h) (answered per second
  of model busy time: a hit takes none; no answers, no bound);
  `ServiceRate.estimate` gets the answers per worker (per ready worker in a
  span, else per `Saturation.mean_ready()`), the bound and whether it was
  saturated, only when a worker is ready; `Policy.decide` gets the lag and
  committed offsets per partition, the counts, the arrival rate, the
  estimate and its source, and the cold start once a worker has started
  (the local actuator measures it), else None (its 15 s prior). Its
  `desired` is applied at once: workers are started, or stopped (starting
  ones first, then the newest). mu_model (inputs: 1,582/s, the int8 model
  alone on 2 threads) is 6-7 times what a whole worker answers (mu_eff), so
  until the fleet first saturates the policy plans with an optimistic rate
  and learns the real one from the backlog that builds. `oracle=True` gives
  it mu_eff instead of the estimate ("policy, true rate"): the difference
  is what the estimator costs.
- keda: compose/k8s/scaledobject.yaml (`KedaSettings`; a unit test checks
  they agree). Every 15 s: active = lag > activationLagThreshold (0); at zero
  replicas and active, 1; not active for cooldownPeriod (300 s), zero;
  otherwise the HPA: ceil(total lag / lagThreshold (5000)) clamped to
  [1, partitions], no change within its 10% tolerance, up by at most
  max(100%, 4 pods) per 15 s (the default scale-up), down only to the
  highest recommendation of the last 300 s and by at most 2 pods per 60 s.
- static: ceil(peak / (mu_eff x 0.8)) workers, capped at the partitions,
  ready from the start; peak = the trace's busiest minute (mean rate).

When the autoscaler sees a joining worker as ready matters to the
estimator: by default from its join (the group's membership, what
`--recommend` and KEDA count), so the join's rebalance pause falls after
the count changed; `ready_after_pause=True` counts it once the pause is
over (as `--local` does: /readyz needs partitions assigned).

Each run first plays the trace's first `warmup_s` (inputs: 20 min) from an
empty fleet, so that autoscalers start from their own steady state; only
what follows is counted. The policy's estimator state (what it measured in
the warm-up) carries over.

Per trace and autoscaler: SLO minutes (minutes whose p99 latency is over the
SLO, or in which requests waited with no worker ready), worker-hours (billed
worker-seconds / 3600), the highest lag, p99 latency over the whole trace,
and scale events (decisions that changed the worker count). Every trace runs
at its own hit rate (80%: Zipf traffic as in the headline bench, where one
worker carries 1,000 requests/s) and again with misses only (0%: a fleet of
up to 6-12 workers, where partition rounding and scale-out speed show). A
second table changes one thing at a time (`WHAT_IF`).

What the model leaves out: the caches' warm-up on a new worker (its L1 is
empty, Redis warm: the measured join cost is under the SLO), hit rates that
move with the traffic (a spike of new inputs hits less), uneven load over
partitions (keys, stuck consumers), a worker's drain time and the broker's
own limits, pod scheduling beyond a fixed cold start (a new node takes
minutes), queueing below capacity (mu_eff already stands for "p99 under the
SLO"), and noise in telemetry: the model-time bound is the same figure at
every tick of a run, and answers are counted exactly.

`replay()` runs one autoscaler over any arrival series and returns the
per-second and per-minute series (and the policy's ticks), to compare the
model with a real run; `simulate()` takes any object with `name`,
`interval_s` and `decide(View)`.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import heapq
import itertools
import json
import math
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from sluice.autoscale.config import AutoscaleConfig
from sluice.autoscale.policy import ArrivalRate, Decision, Observation, Policy, Saturation, ServiceRate

ROOT = Path(__file__).resolve().parents[1]
INPUTS = ROOT / "bench" / "capacity_inputs.json"
PLOT = ROOT / "bench" / "plots" / "capacity_sim.png"
RESULTS = ROOT / "bench" / "RESULTS.md"
SECTION = "## Autoscaling: capacity simulation (issue 15)"
BEGIN, END = "<!-- capacity-sim: begin -->", "<!-- capacity-sim: end -->"

# as a production deployment would set them (SLUICE_AUTOSCALE_*)
POLICY_SETTINGS: dict[str, Any] = {
    "autoscale_interval_s": 10.0,
    "autoscale_target_drain_s": 60.0,
    "autoscale_target_utilization": 0.8,
    "autoscale_scale_down_window_s": 300.0,
    "autoscale_idle_s": 900.0,
    "autoscale_min_workers": 0,
    "autoscale_max_workers": 0,
    "autoscale_lookback_s": 60.0,
}
STATIC_UTILIZATION = 0.8  # the static fleet gets the policy's headroom
SAMPLES_PER_S = 4  # arrivals sampled per second for the latency quantiles


# -- the worker's side ----------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class ServiceFit:
    """Requests/s one worker answers within the SLO, as a function of the hit rate."""

    miss_rps: float
    hit_rps: float

    def rate_rps(self, hit_rate: float) -> float:
        return 1.0 / ((1.0 - hit_rate) / self.miss_rps + hit_rate / self.hit_rps)


def fit_service(points: Sequence[Sequence[float]]) -> ServiceFit:
    """mu_miss and mu_hit from (hit rate, max rate) points: least squares on the
    relative error, sum(((1-h)/mu_miss + h/mu_hit) x rate - 1)^2, which is linear
    in 1/mu_miss and 1/mu_hit."""
    h = np.array([p[0] for p in points], dtype=float)
    r = np.array([p[1] for p in points], dtype=float)
    (a, b), *_ = np.linalg.lstsq(np.column_stack([(1 - h) * r, h * r]), np.ones_like(r), rcond=None)
    if a <= 0 or b <= 0:
        raise ValueError(f"service points {points!r} give no positive miss and hit rates ({a!r}, {b!r})")
    return ServiceFit(miss_rps=1.0 / a, hit_rps=1.0 / b)


def capacity_rps(ready: int, partitions: int, service_rps: float) -> float:
    """Requests/s the group answers: the busiest of `ready` workers holds
    ceil(partitions / ready) partitions and sets the pace of all."""
    if ready <= 0:
        return 0.0
    return service_rps * partitions / math.ceil(partitions / min(ready, partitions))


def spread(total: int, partitions: int) -> dict[int, int]:
    """`total` records of lag spread as evenly as whole records allow."""
    each, rest = divmod(total, partitions)
    return {p: each + (1 if p < rest else 0) for p in range(partitions)}


# -- the autoscalers ----------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Telemetry:
    """What the analytics store answers for a window: the two figures of
    `sluice.autoscale.signals.ServiceReading` the live loop reads."""

    answered_rps: float  # the whole fleet's answers per second over the window
    model_bound_rps: float | None  # answered per second of model busy time; None: no model time in the window


@dataclass(frozen=True, slots=True)
class View:
    """What an autoscaler can read at a tick: the broker's offsets, the
    fleet's counts, and the telemetry of any window up to now."""

    at_s: float
    lag: int  # records: backlog plus in flight, all partitions
    produced: int  # requests produced so far: the requests topic's end offsets, summed
    partitions: int
    ready: int
    starting: int
    cold_start_s: float | None  # None until a worker has started once
    telemetry: Callable[[float], Telemetry]  # the last window_s seconds, as the autoscale_signal query answers


class Scaler(Protocol):
    name: str
    interval_s: float

    def decide(self, view: View) -> int: ...


@dataclass(frozen=True, slots=True)
class Tick:
    """One tick of `PolicyScaler`: what it read and what it made of it."""

    view: View
    arrival_rps: float | None
    span_s: float | None  # the saturated span, None when not saturated
    window_s: float  # the telemetry window it asked for
    reading: Telemetry
    service_rps: float | None  # what it passed to the policy
    service_source: str
    decision: Decision


class PolicyScaler:
    """`sluice.autoscale.policy.Policy`, fed as `sluice.autoscale.loop.Autoscaler.tick`
    feeds it, with the same objects: ArrivalRate over the produced total,
    Saturation over (lag, arrivals, ready), telemetry over the saturated span
    or the look-back, ServiceRate's estimate. With `true_rps` that rate is
    passed instead of the estimate (source "oracle"), on the same ticks."""

    def __init__(self, config: AutoscaleConfig | None = None, *, true_rps: float | None = None) -> None:
        self.config = cfg = config or AutoscaleConfig(**POLICY_SETTINGS)
        self.policy = Policy(cfg)
        self.arrivals = ArrivalRate(cfg.autoscale_lookback_s)
        self.service = ServiceRate()
        self.saturation = Saturation(
            cfg.autoscale_lookback_s, cfg.autoscale_interval_s, cfg.autoscale_saturation_backlog_s
        )
        self.true_rps = true_rps
        self.name = "policy" if true_rps is None else "policy, true rate"
        self.interval_s = cfg.autoscale_interval_s
        self.ticks: list[Tick] = []

    def decide(self, view: View) -> int:
        arrivals = self.arrivals.add(view.at_s, view.produced)
        span = self.saturation.add(view.at_s, view.lag, arrivals or 0.0, view.ready)
        window = span or self.config.autoscale_lookback_s
        reading = view.telemetry(window)
        service, source = (None, "")
        if view.ready > 0:
            if self.true_rps is not None:
                service, source = self.true_rps, "oracle"
            else:
                # as the loop: per ready worker in a saturated span, else per worker of the look-back's mean
                workers = view.ready if span is not None else self.saturation.mean_ready()
                service, source = self.service.estimate(
                    answered_per_worker_rps=reading.answered_rps / max(workers, 1e-9),
                    model_bound_rps=reading.model_bound_rps,
                    saturated=span is not None,
                )
        end, lag = spread(view.produced, view.partitions), spread(view.lag, view.partitions)
        decision = self.policy.decide(
            Observation(
                at_s=view.at_s,
                lag=lag,
                partitions=view.partitions,
                ready=view.ready,
                starting=view.starting,
                arrival_rps=arrivals,
                service_rps=service,
                service_source=source,
                committed={p: end[p] - lag[p] for p in end},
                cold_start_s=view.cold_start_s,
            )
        )
        self.ticks.append(Tick(view, arrivals, span, window, reading, service, source, decision))
        return decision.desired


@dataclass(frozen=True, slots=True)
class KedaSettings:
    """compose/k8s/scaledobject.yaml, and the HPA defaults it leaves in place."""

    polling_interval_s: float = 15.0
    lag_threshold: int = 5000
    activation_lag_threshold: int = 0
    cooldown_s: float = 300.0
    min_replicas: int = 0
    max_replicas: int = 12
    down_window_s: float = 300.0
    down_pods: int = 2
    down_period_s: float = 60.0
    # the HPA's default scale-up: the larger of +100% and +4 pods per 15 s
    up_percent: float = 100.0
    up_pods: int = 4
    tolerance: float = 0.1  # the HPA's: a usage ratio within 10% of 1 changes nothing


class KedaRule:
    """KEDA's Kafka scaler behind the HPA: replicas = ceil(total lag / lagThreshold)."""

    name = "keda"

    def __init__(self, settings: KedaSettings | None = None, partitions: int = 12) -> None:
        self.settings = s = settings or KedaSettings()
        self.interval_s = s.polling_interval_s
        self.hi = min(s.max_replicas, partitions)
        self._recommendations: deque[tuple[float, int]] = deque()
        self._removed: deque[tuple[float, int]] = deque()  # (at, pods removed) for the scale-down rate
        self._last_active_s: float | None = None

    def decide(self, view: View) -> int:
        s, at, current = self.settings, view.at_s, view.ready + view.starting
        active = view.lag > s.activation_lag_threshold
        if active or self._last_active_s is None:
            self._last_active_s = at
        if current == 0:  # KEDA itself takes 0 -> 1; the HPA takes over from there
            return 1 if active else 0
        if not active and s.min_replicas == 0 and at - self._last_active_s >= s.cooldown_s:
            self._recommendations.clear()
            return 0
        if abs(view.lag / (current * s.lag_threshold) - 1) <= s.tolerance:
            want = current
        else:
            want = math.ceil(view.lag / s.lag_threshold)
        want = max(max(1, s.min_replicas), min(self.hi, want))  # the HPA's minReplicas is 1 under KEDA

        self._recommendations.append((at, want))
        while self._recommendations[0][0] <= at - s.down_window_s:
            self._recommendations.popleft()
        while self._removed and self._removed[0][0] <= at - s.down_period_s:
            self._removed.popleft()
        if want < current:
            want = min(current, max(r for _, r in self._recommendations))
            budget = max(0, s.down_pods - sum(n for _, n in self._removed))
            want = max(want, current - budget)
            if want < current:
                self._removed.append((at, current - want))
        elif want > current:
            want = min(want, max(math.floor(current * (1 + s.up_percent / 100)), current + s.up_pods))
        return want


class StaticFleet:
    """A fixed count, ready from the start."""

    name = "static"
    interval_s = 3600.0

    def __init__(self, workers: int) -> None:
        self.workers = workers

    def decide(self, view: View) -> int:
        return self.workers


def static_workers(peak_rps: float, service_rps: float, partitions: int) -> int:
    """ceil(peak / (mu_eff x utilisation)), capped at the partitions: the plain
    sizing rule, blind to partition rounding as an operator's sum would be."""
    return max(1, min(partitions, math.ceil(peak_rps / (service_rps * STATIC_UTILIZATION) - 1e-9)))


# -- the simulation ------------------------------------------------------------------------


@dataclass
class Replay:
    """One autoscaler over one arrival series: per-second and per-minute series
    (from the end of the warm-up) and the summary figures."""

    autoscaler: str
    time_s: np.ndarray  # start of each second, from 0
    arrivals: np.ndarray  # requests arriving in that second
    ready: np.ndarray  # workers answering during it
    billed: np.ndarray  # workers started and not stopped (ready or starting)
    capacity_rps: np.ndarray  # what the ready workers could answer in it (0 while paused by a rebalance)
    queue: np.ndarray  # requests waiting at its end
    lag: np.ndarray  # queue + in flight, as the broker reports it
    minute_p99_s: np.ndarray  # p99 latency of the requests that arrived in each minute (NaN: none arrived)
    minute_no_worker: np.ndarray  # requests waited with no worker ready at some point of the minute
    p99_s: float  # over all requests of the run
    scale_events: int
    slo_s: float
    decisions: list[Decision] = field(default_factory=list)  # the policy's counted ones (at_s from the series' start)
    ticks: list[Tick] = field(default_factory=list)  # the policy's, warm-up included (at_s from the warm-up's start)
    count_from_s: int = 0  # seconds of warm-up before the series

    @property
    def slo_minutes(self) -> int:
        late = np.nan_to_num(self.minute_p99_s, nan=0.0) > self.slo_s
        return int(np.count_nonzero(late | self.minute_no_worker))

    @property
    def no_worker_minutes(self) -> int:
        return int(np.count_nonzero(self.minute_no_worker))

    @property
    def worker_hours(self) -> float:
        return float(self.billed.sum()) / 3600.0

    def summary(self) -> dict[str, Any]:
        return {
            "autoscaler": self.autoscaler,
            "slo_minutes": self.slo_minutes,
            "no_worker_minutes": self.no_worker_minutes,
            "worker_hours": round(self.worker_hours, 2),
            "max_lag": int(self.lag.max()) if len(self.lag) else 0,
            "p99_ms": round(self.p99_s * 1000.0, 1),
            "scale_events": self.scale_events,
            "minutes": len(self.minute_p99_s),
        }


def weighted_quantile(values: np.ndarray, weights: np.ndarray, q: float) -> float:
    """The smallest value below or at which `q` of the weight lies; NaN without weight."""
    keep = weights > 0
    if not keep.any():
        return math.nan
    values, weights = values[keep], weights[keep]
    order = np.argsort(values, kind="stable")
    cum = np.cumsum(weights[order])
    return float(values[order][np.searchsorted(cum, q * cum[-1] - 1e-9 * cum[-1])])


def latencies(arrivals: np.ndarray, served_cum: np.ndarray, base_latency_s: float) -> tuple[np.ndarray, np.ndarray]:
    """FIFO latency of each second's arrivals, sampled SAMPLES_PER_S times per
    second: (latency s, weight in requests), each of shape (seconds, samples).
    A request never answered by the end counts its wait until then."""
    seconds = len(arrivals)
    frac = (np.arange(SAMPLES_PER_S) + 0.5) / SAMPLES_PER_S
    arrived_cum = np.concatenate([[0.0], np.cumsum(arrivals)])
    nth = arrived_cum[:-1, None] + arrivals[:, None] * frac  # cumulative index of each sampled request
    at = np.arange(seconds)[:, None] + frac
    k = np.clip(np.searchsorted(served_cum, nth - 1e-9, side="left"), 1, seconds + 1)
    served = k <= seconds
    k = np.minimum(k, seconds)
    step = served_cum[k] - served_cum[k - 1]
    within = np.divide(nth - served_cum[k - 1], step, out=np.ones_like(nth), where=step > 0)
    done = np.where(served, k - 1 + np.clip(within, 0.0, 1.0), float(seconds))
    wait = np.maximum(done - at, 0.0)
    return wait + base_latency_s, np.broadcast_to(arrivals[:, None] / SAMPLES_PER_S, nth.shape)


_TICK, _READY, _STOP = 0, 1, 2


def telemetry_reading(served_cum: np.ndarray, t: int, window_s: float, model_bound_rps: float | None) -> Telemetry:
    """The telemetry of the `window_s` seconds before second `t` (whole seconds,
    as the query's since_s): the fleet's answers per second, and the model-time
    bound when anything was answered (no answers: no model time, no bound)."""
    since = max(1, round(window_s))
    answered = float(served_cum[t] - served_cum[max(0, t - since)])
    return Telemetry(answered_rps=answered / since, model_bound_rps=model_bound_rps if answered > 0 else None)


def simulate(
    arrivals_per_s: Sequence[float] | np.ndarray,
    scaler: Scaler,
    *,
    service_rps: float,
    model_bound_rps: float | None = None,
    partitions: int = 12,
    cold_start_s: float = 30.0,
    rebalance_pause_s: float = 3.0,
    base_latency_s: float = 0.05,
    slo_s: float = 0.5,
    initial_ready: int = 0,
    count_from_s: int = 0,
    ready_after_pause: bool = False,
) -> Replay:
    """Run `scaler` over the series; count only from `count_from_s` on.
    service_rps: what a worker answers (the world's truth); model_bound_rps:
    what telemetry reports as answered per second of model time.
    ready_after_pause: the autoscaler counts a joining worker as ready only
    once its join's rebalance pause is over (LocalWorkers' /readyz: partitions
    assigned), not from the join (the group's membership: --recommend, KEDA)."""
    arrivals = np.asarray(arrivals_per_s, dtype=float)
    seconds = len(arrivals)
    arrived_cum = np.concatenate([[0.0], np.cumsum(arrivals)])
    served_cum = np.zeros(seconds + 1)
    ready_s = np.zeros(seconds, dtype=int)
    billed_s = np.zeros(seconds, dtype=int)
    capacity_s = np.zeros(seconds)
    queue_s = np.zeros(seconds)
    lag_s = np.zeros(seconds, dtype=np.int64)
    no_worker_s = np.zeros(seconds, dtype=bool)

    # worker id -> when it became ready (None: starting); ids grow, so the newest is the highest
    workers: dict[int, float | None] = {}
    ids = itertools.count()
    order = itertools.count()
    events: list[tuple[float, int, int, int]] = []  # (at, order, kind, worker id)
    for _ in range(initial_ready):
        workers[next(ids)] = -math.inf
    heapq.heappush(events, (0.0, next(order), _TICK, -1))
    paused_until = -math.inf
    started_once = initial_ready > 0
    queue, lag, scale_events = 0.0, 0, 0
    # what the actuator measures: start to ready, as the autoscaler counts ready
    seen_cold_start_s = cold_start_s + (rebalance_pause_s if ready_after_pause else 0.0)

    for t in range(seconds):
        while events and events[0][0] <= t:
            at, _, kind, wid = heapq.heappop(events)
            if kind == _TICK:
                current = len(workers)
                ready = sum(1 for r in workers.values() if r is not None)
                if ready_after_pause:
                    ready = sum(1 for r in workers.values() if r is not None and r + rebalance_pause_s <= at)
                desired = scaler.decide(
                    View(
                        at_s=at,
                        lag=lag,
                        produced=int(arrived_cum[t] + 0.5),
                        partitions=partitions,
                        ready=ready,
                        starting=current - ready,
                        cold_start_s=seen_cold_start_s if started_once else None,
                        telemetry=functools.partial(telemetry_reading, served_cum, t, model_bound_rps=model_bound_rps),
                    )
                )
                if desired != current and t >= count_from_s:
                    scale_events += 1
                if desired > current:
                    for _ in range(desired - current):
                        wid = next(ids)
                        workers[wid] = None
                        heapq.heappush(events, (at + cold_start_s, next(order), _READY, wid))
                    started_once = True
                elif desired < current:
                    # those still starting go first (they serve nothing yet), then the newest
                    victims = sorted(workers, key=lambda w: (workers[w] is not None, -w))[: current - desired]
                    for wid in victims:
                        heapq.heappush(events, (at, next(order), _STOP, wid))
                heapq.heappush(events, (at + scaler.interval_s, next(order), _TICK, -1))
            elif kind == _READY:
                if wid in workers and workers[wid] is None:
                    workers[wid] = at
                    paused_until = max(paused_until, at + rebalance_pause_s)
            elif workers.pop(wid, None) is not None:  # a ready worker left: its partitions move
                paused_until = max(paused_until, at + rebalance_pause_s)

        ready = sum(1 for r in workers.values() if r is not None)
        open_share = min(1.0, max(0.0, t + 1 - max(float(t), paused_until)))
        capacity = capacity_rps(ready, partitions, service_rps) * open_share
        waiting = queue + arrivals[t]
        served = min(waiting, capacity)
        queue = waiting - served
        if queue < 1e-9:
            queue = 0.0
        served_cum[t + 1] = served_cum[t] + served
        lag = int(queue + arrivals[t] * base_latency_s + 0.5)
        ready_s[t], billed_s[t], capacity_s[t], queue_s[t], lag_s[t] = ready, len(workers), capacity, queue, lag
        no_worker_s[t] = queue > 0 and ready == 0

    ticks: list[Tick] = list(getattr(scaler, "ticks", []))
    latency, weight = latencies(arrivals, served_cum, base_latency_s)
    c = count_from_s
    latency, weight = latency[c:], weight[c:]
    minutes = math.ceil((seconds - c) / 60)
    minute_p99 = np.array(
        [
            weighted_quantile(latency[m * 60 : m * 60 + 60].ravel(), weight[m * 60 : m * 60 + 60].ravel(), 0.99)
            for m in range(minutes)
        ]
    )
    no_worker = no_worker_s[c:]
    minute_no_worker = np.array([no_worker[m * 60 : m * 60 + 60].any() for m in range(minutes)], dtype=bool)
    return Replay(
        autoscaler=scaler.name,
        time_s=np.arange(seconds - c, dtype=float),
        arrivals=arrivals[c:],
        ready=ready_s[c:],
        billed=billed_s[c:],
        capacity_rps=capacity_s[c:],
        queue=queue_s[c:],
        lag=lag_s[c:],
        minute_p99_s=minute_p99,
        minute_no_worker=minute_no_worker,
        p99_s=weighted_quantile(latency.ravel(), weight.ravel(), 0.99),
        scale_events=scale_events,
        slo_s=slo_s,
        decisions=[dataclasses.replace(k.decision, at_s=k.decision.at_s - c) for k in ticks if k.view.at_s >= c],
        ticks=ticks,
        count_from_s=c,
    )


def replay(
    arrivals_per_s: Sequence[float] | np.ndarray,
    *,
    service_rps: float,
    model_bound_rps: float | None = None,
    autoscaler: str = "policy",
    oracle: bool = False,
    ready_after_pause: bool = False,
    cold_start_s: float = 30.0,
    partitions: int = 12,
    rebalance_pause_s: float = 3.0,
    base_latency_s: float = 0.05,
    slo_s: float = 0.5,
    warmup_s: int = 0,
    config: AutoscaleConfig | None = None,
    keda: KedaSettings | None = None,
    workers: int | None = None,
) -> Replay:
    """Replay an arrival series (requests per second, one value a second)
    through the model under one autoscaler, and return what happened.

    autoscaler: "policy" (`Policy(config)`, by default `POLICY_SETTINGS`,
    driven as the live loop drives it), "keda" (`keda`, by default the
    ScaledObject's), or "static" (`workers` ready from the start; by default
    sized for the series' busiest minute).
    service_rps: one worker's rate (mu_eff) at the traffic's hit rate.
    model_bound_rps: the telemetry's model-time bound at that hit rate
    (mu_model / (1 - h)); None: telemetry shows no model time.
    oracle: the policy is given service_rps instead of ServiceRate's estimate.
    ready_after_pause: see `simulate`.
    warmup_s: the series' first `warmup_s` seconds are played once before it
    from an empty fleet, and not counted.

    The result's arrays start at the series' first second: time_s, arrivals,
    ready, billed (workers paid for), capacity_rps, queue, lag; per minute:
    minute_p99_s (latency, base latency included) and minute_no_worker; and
    slo_minutes, worker_hours, p99_s, scale_events, summary().
    """
    series = np.asarray(arrivals_per_s, dtype=float)
    if warmup_s:
        series = np.concatenate([series[:warmup_s], series])
    scaler: Scaler
    initial = 0
    if autoscaler == "policy":
        scaler = PolicyScaler(config, true_rps=service_rps if oracle else None)
    elif autoscaler == "keda":
        scaler = KedaRule(keda, partitions)
    elif autoscaler == "static":
        if workers is None:
            workers = static_workers(peak_minute_rps(series), service_rps, partitions)
        scaler = StaticFleet(workers)
        initial = workers
    else:
        raise ValueError(f"autoscaler={autoscaler!r}: expected policy, keda or static")
    return simulate(
        series,
        scaler,
        service_rps=service_rps,
        model_bound_rps=model_bound_rps,
        partitions=partitions,
        cold_start_s=cold_start_s,
        rebalance_pause_s=rebalance_pause_s,
        base_latency_s=base_latency_s,
        slo_s=slo_s,
        initial_ready=initial,
        ready_after_pause=ready_after_pause,
        count_from_s=len(series) - len(np.asarray(arrivals_per_s)),
    )


def peak_minute_rps(arrivals: np.ndarray) -> float:
    whole = len(arrivals) // 60 * 60
    if whole == 0:
        return float(arrivals.mean()) if len(arrivals) else 0.0
    return float(arrivals[:whole].reshape(-1, 60).mean(axis=1).max())


# -- the traces ----------------------------------------------------------------------------


def spike_trace(seed: int = 1) -> np.ndarray:
    """1 h: 100 requests/s, ten times that from minute 20 to minute 30, then back."""
    rate = np.full(3600, 100.0)
    rate[1200:1800] = 1000.0
    return np.random.default_rng(seed).poisson(rate).astype(float)


def diurnal_trace(seed: int = 2) -> np.ndarray:
    """24 h from midnight: ~50 requests/s at 03:00, ~1,000 at 15:00, a smooth
    curve with a few percent of minute-to-minute noise."""
    rng = np.random.default_rng(seed)
    hours = np.arange(86400) / 3600.0
    shape = ((1 + np.cos(2 * np.pi * (hours - 15.0) / 24.0)) / 2) ** 1.5
    noise = np.repeat(rng.lognormal(0.0, 0.05, 1440), 60)
    return rng.poisson((50.0 + 950.0 * shape) * noise).astype(float)


def quiet_night_trace(seed: int = 3) -> np.ndarray:
    """10 h: 8 h of night, stretches of a few requests a minute (3/min, a few
    minutes each) between silences of 5-60 min; then a morning ramp to ~600
    requests/s over 30 min, and 1.5 h at that."""
    rng = np.random.default_rng(seed)
    night = np.zeros(8 * 3600)
    t = 0
    while t < len(night):
        t += int(rng.uniform(300, 3600))  # silence
        active = int(rng.uniform(60, 600))
        night[t : t + active] = 3 / 60
        t += active
    ramp = np.linspace(3 / 60, 600.0, 1800)
    day = np.full(int(1.5 * 3600), 600.0)
    return rng.poisson(np.concatenate([night, ramp, day])).astype(float)


TRACES: dict[str, Callable[[int], np.ndarray]] = {
    "spike": spike_trace,
    "diurnal": diurnal_trace,
    "quiet_night": quiet_night_trace,
}
AUTOSCALERS = ("policy", "keda", "static")


# -- the runs ------------------------------------------------------------------------------


@dataclass
class Case:
    label: str
    trace: str
    hit_rate: float
    service_rps: float
    model_bound_rps: float | None
    cold_start_s: float
    runs: dict[str, Replay]  # by autoscaler; the policy with ServiceRate's estimate
    oracle: Replay  # the policy given the true rate instead


def say(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def common_args(inputs: dict[str, Any]) -> dict[str, Any]:
    return {
        "partitions": inputs["partitions"],
        "rebalance_pause_s": inputs["rebalance_pause_s"],
        "base_latency_s": inputs["base_latency_ms"] / 1000.0,
        "slo_s": inputs["slo_ms"] / 1000.0,
        "warmup_s": inputs["warmup_s"],
        "cold_start_s": inputs["cold_start_s"],
    }


def model_bound(inputs: dict[str, Any], hit_rate: float) -> float | None:
    """The telemetry's model-time bound at this hit rate: answered per second
    of model busy time, mu_model / (1 - h) (a hit takes no model time)."""
    return inputs["model_rps"]["value"] / (1.0 - hit_rate) if hit_rate < 1.0 else None


def hit_rates(inputs: dict[str, Any], trace: str) -> list[float]:
    """The trace's own hit rate, then the misses-only one (where the inputs ask for it)."""
    rates = [inputs["traces"][trace]["hit_rate"]]
    if inputs.get("misses_only_hit_rate") is not None and inputs["misses_only_hit_rate"] not in rates:
        rates.append(inputs["misses_only_hit_rate"])
    return rates


def run_all(inputs: dict[str, Any], series: dict[str, np.ndarray], fit: ServiceFit) -> list[Case]:
    """Every trace under the three autoscalers at its hit rate, then at the
    misses-only hit rate; the spike also with a local process's cold start."""
    plan: list[tuple[str, str, float, float]] = []  # label, trace, hit rate, cold start
    cold, local = inputs["cold_start_s"], inputs["cold_start_local_s"]
    for i in (0, 1):
        for name in inputs["traces"]:
            for h in hit_rates(inputs, name)[i : i + 1]:
                label = name if i == 0 else f"{name}, {h:.0%} hits"
                plan.append((label, name, h, cold))
                if name == "spike":
                    plan.append((f"{label}, local cold start", name, h, local))

    cases = []
    for label, trace, h, cold in plan:
        began = time.perf_counter()
        mu, bound = fit.rate_rps(h), model_bound(inputs, h)
        args = {**common_args(inputs), "cold_start_s": cold, "service_rps": mu, "model_bound_rps": bound}
        runs = {a: replay(series[trace], autoscaler=a, **args) for a in AUTOSCALERS}
        oracle = replay(series[trace], autoscaler="policy", oracle=True, **args)
        cases.append(Case(label, trace, h, mu, bound, cold, runs, oracle))
        brief = "; ".join(
            f"{a} {r.slo_minutes} SLO min, {r.worker_hours:.1f} worker-h"
            for a, r in (*runs.items(), ("oracle", oracle))
        )
        say(f"{label} (mu {mu:.0f}/s, cold start {cold:g} s): {brief} ({time.perf_counter() - began:.1f} s)")
    return cases


# What moves the comparison: one change at a time against the table's runs
# (replay's keyword arguments; "config": the policy's settings).
WHAT_IF: dict[str, dict[str, Any]] = {
    "ready counted after the join's pause": {"ready_after_pause": True},
    "no rebalance pause": {"rebalance_pause_s": 0.0},
    "scale-down window 900 s": {"config": {"autoscale_scale_down_window_s": 900.0}},
    "idle 300 s (KEDA's cooldown)": {"config": {"autoscale_idle_s": 300.0}},
    "look-back 10 s": {"config": {"autoscale_lookback_s": 10.0}},
}


# The same traces under each rule's own main knob, so the two can be compared
# at equal cost: KEDA's lagThreshold, the policy's target utilisation.
FRONTIER_TRACES = ("spike", "diurnal")
FRONTIER_LAG_THRESHOLDS = (5000, 2500, 1000, 500)
FRONTIER_UTILISATIONS = (0.8, 0.9, 1.0)


def frontier(inputs: dict[str, Any], series: dict[str, np.ndarray], fit: ServiceFit) -> str:
    """SLO minutes / worker-hours of KEDA's rule over lagThreshold and of the
    policy over its target utilisation, at each hit rate the traces run at."""
    head = (
        "| trace | "
        + " | ".join(f"KEDA, lagThreshold {t}" for t in FRONTIER_LAG_THRESHOLDS)
        + " | "
        + " | ".join(f"policy, utilisation {u:g}" for u in FRONTIER_UTILISATIONS)
        + " |\n|"
        + "---|" * (1 + len(FRONTIER_LAG_THRESHOLDS) + len(FRONTIER_UTILISATIONS))
    )
    rows = []
    for trace in FRONTIER_TRACES:
        for h in hit_rates(inputs, trace):
            args = {**common_args(inputs), "service_rps": fit.rate_rps(h), "model_bound_rps": model_bound(inputs, h)}
            cells = [
                cell(replay(series[trace], autoscaler="keda", keda=KedaSettings(lag_threshold=t), **args))
                for t in FRONTIER_LAG_THRESHOLDS
            ]
            for u in FRONTIER_UTILISATIONS:
                config = AutoscaleConfig(**{**POLICY_SETTINGS, "autoscale_target_utilization": u})
                cells.append(cell(replay(series[trace], autoscaler="policy", config=config, **args)))
            rows.append(f"| {trace}, {h:.0%} hits | " + " | ".join(cells) + " |")
            say(f"frontier, {trace} {h:.0%} hits: {' | '.join(cells)}")
    return head + "\n" + "\n".join(rows)


def cell(r: Replay) -> str:
    return f"{r.slo_minutes} / {r.worker_hours:.1f}"


def what_if(inputs: dict[str, Any], series: dict[str, np.ndarray], cases: list[Case]) -> str:
    """The policy's SLO minutes / worker-hours with one input or setting
    changed (KEDA's beside it where the change is the model's, not the policy's)."""
    head = "| trace | policy as run | " + " | ".join(f"policy, {v}" for v in WHAT_IF)
    head += " | KEDA as run | KEDA, no rebalance pause |\n|" + "---|" * (len(WHAT_IF) + 4)
    rows = []
    for case in cases:
        if case.cold_start_s != inputs["cold_start_s"]:
            continue
        began = time.perf_counter()
        args = {**common_args(inputs), "service_rps": case.service_rps, "model_bound_rps": case.model_bound_rps}
        cells = [cell(case.runs["policy"])]
        for change in WHAT_IF.values():
            kw = {**args, **{k: v for k, v in change.items() if k != "config"}}
            config = AutoscaleConfig(**{**POLICY_SETTINGS, **change.get("config", {})})
            cells.append(cell(replay(series[case.trace], autoscaler="policy", config=config, **kw)))
        cells.append(cell(case.runs["keda"]))
        cells.append(cell(replay(series[case.trace], autoscaler="keda", **{**args, "rebalance_pause_s": 0.0})))
        rows.append(f"| {case.label} | " + " | ".join(cells) + " |")
        say(f"what if, {case.label}: {' | '.join(cells)} ({time.perf_counter() - began:.1f} s)")
    return head + "\n" + "\n".join(rows)


def planned_rate(r: Replay) -> str:
    """The per-worker rate the policy planned with at the end, and how it had it."""
    last = r.ticks[-1].decision if r.ticks else None
    return f"{last.service_rps:.0f}/s {last.service_source}" if last else "-"


def table(cases: list[Case]) -> str:
    """One row per trace: SLO minutes / worker-hours under each autoscaler,
    the policy with ServiceRate's estimate and with the true rate."""
    head = (
        "| trace | hit rate: true mu, model-time bound | cold start | policy | policy, true rate | KEDA | static "
        "| rate the policy planned with at the end | scale events: policy, true rate, KEDA |\n"
        "|---|---|---|---|---|---|---|---|---|"
    )
    rows = []
    for case in cases:
        r, o, k = case.runs["policy"], case.oracle, case.runs["keda"]
        bound = f"{case.model_bound_rps:,.0f}/s" if case.model_bound_rps else "none"
        rows.append(
            f"| {case.label} ({len(r.minute_p99_s)} min) | {case.hit_rate:.0%}: {case.service_rps:.0f}/s, {bound} "
            f"| {case.cold_start_s:g} s | {cell(r)} | {cell(o)} | {cell(k)} | {cell(case.runs['static'])} "
            f"| {planned_rate(r)} | {r.scale_events}, {o.scale_events}, {k.scale_events} |"
        )
    return head + "\n" + "\n".join(rows)


def detail_table(cases: list[Case]) -> str:
    """Every run's summary: SLO minutes, worker-hours, max lag, p99, scale events."""
    head = (
        "| trace | autoscaler | SLO minutes (no worker) | worker-hours "
        "| max lag, records | p99 over the trace | scale events |\n|---|---|---|---|---|---|---|"
    )
    rows = []
    for case in cases:
        for a, r in (*case.runs.items(), ("policy, true rate", case.oracle)):
            s = r.summary()
            p99 = f"{s['p99_ms']:.0f} ms" if s["p99_ms"] < 10_000 else f"{s['p99_ms'] / 1000:.0f} s"
            rows.append(
                f"| {case.label} | {a} | {s['slo_minutes']} ({s['no_worker_minutes']}) | {s['worker_hours']:.2f} "
                f"| {s['max_lag']:,} | {p99} | {s['scale_events']} |"
            )
    return head + "\n" + "\n".join(rows)


def plot(cases: list[Case], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    colors = {"policy": "tab:blue", "keda": "tab:orange", "static": "tab:green"}
    # drawn in this order, the policy on top
    style = {"static": {"alpha": 0.9}, "keda": {"alpha": 0.7}, "policy": {"alpha": 0.9}}
    fig, axes = plt.subplots(len(cases), 3, figsize=(16, 3.1 * len(cases)), squeeze=False)
    for row, case in zip(axes, cases):
        first = next(iter(case.runs.values()))
        minutes = len(first.minute_p99_s)
        hours = minutes > 180
        scale, unit = (60.0, "h") if hours else (1.0, "min")
        x = np.arange(minutes) / scale

        def per_minute(values: np.ndarray, how: str = "mean", n: int = minutes) -> np.ndarray:
            shaped = np.pad(values.astype(float), (0, n * 60 - len(values)), mode="edge").reshape(n, 60)
            return shaped.max(axis=1) if how == "max" else shaped.mean(axis=1)

        ax = row[0]
        ax.fill_between(x, per_minute(first.arrivals), color="0.8", step="post", label="arrivals")
        for a, kw in style.items():
            r = case.runs[a]
            ax.step(x, per_minute(r.capacity_rps), where="post", color=colors[a], lw=1, label=f"{a} capacity", **kw)
        ax.set_ylabel("requests/s (minute mean)")
        ax.set_title(
            f"{case.label}: hit rate {case.hit_rate:.0%}, mu {case.service_rps:.0f}/s; policy with its estimate",
            fontsize=9,
        )
        ax = row[1]
        for a, kw in style.items():
            r = case.runs[a]
            label = f"{a}: {r.worker_hours:.1f} worker-h"
            ax.step(x, per_minute(r.billed, "max"), where="post", color=colors[a], lw=1, label=label, **kw)
        o = case.oracle
        label = f"policy, true rate: {o.worker_hours:.1f} worker-h"
        ax.step(x, per_minute(o.billed, "max"), where="post", color="tab:purple", lw=1, ls="--", label=label)
        ax.set_ylabel("workers billed (minute max)")
        ax.set_title("workers", fontsize=9)
        ax = row[2]
        for a, kw in style.items():
            r = case.runs[a]
            label = f"{a}: {r.slo_minutes} SLO min" + (
                f" (true rate: {case.oracle.slo_minutes})" if a == "policy" else ""
            )
            ax.plot(x, r.minute_p99_s * 1000, ls="none", marker=".", ms=3, color=colors[a], label=label, **kw)
        ax.axhline(first.slo_s * 1000, color="grey", ls="--", lw=0.8)
        ax.set_yscale("log")
        ax.set_ylabel("p99 latency, ms")
        ax.set_title("p99 latency of each minute's requests (dashed: SLO)", fontsize=9)
        for ax in row:
            ax.set_xlabel(f"time, {unit}")
            ax.legend(fontsize=7, loc="upper left")
            ax.grid(alpha=0.3)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=90)
    plt.close(fig)


def markdown(
    inputs: dict[str, Any], fit: ServiceFit, cases: list[Case], variants: str, plot_path: Path, front: str = ""
) -> str:
    points = ", ".join(f"{h:.0%} hits {r:.0f}/s" for h, r in inputs["service_points"]["hit_rate_max_rps"])
    try:
        where = plot_path.resolve().relative_to(RESULTS.parent)
    except ValueError:
        where = plot_path
    return (
        f"`make capacity-sim` (`.venv/bin/python -m bench.capacity_sim --markdown`), {time.strftime('%Y-%m-%d')}. "
        f"Inputs (`bench/capacity_inputs.json`): one worker's max rate under the SLO {points} "
        f"(fit: mu_miss {fit.miss_rps:.0f}/s, mu_hit {fit.hit_rps:,.0f}/s); the model alone "
        f"{inputs['model_rps']['value']:,}/s per model-second (telemetry's bound: that / (1 - hit rate)); "
        f"{inputs['partitions']} partitions; cold start {inputs['cold_start_s']:g} s "
        f"({inputs['cold_start_local_s']:g} s in the local runs); rebalance pause {inputs['rebalance_pause_s']:g} s; "
        f"base latency {inputs['base_latency_ms']:g} ms; SLO p99 < {inputs['slo_ms']:g} ms per minute; the first "
        f"{inputs['warmup_s'] // 60} min of each trace played once before it, not counted. Cells: SLO minutes "
        "(minutes whose p99 is over the SLO or in which requests waited with no worker ready) / worker-hours "
        "(billed from a worker's start). policy: the live loop's tick, ServiceRate's estimate; policy, true rate: "
        "the same with the true per-worker rate given instead.\n\n"
        f"{table(cases)}\n\n"
        "What moves it: SLO minutes / worker-hours, one change at a time.\n\n"
        f"{variants}\n\n"
        "At equal cost: each rule over its own main knob (SLO minutes / worker-hours).\n\n"
        f"{front}\n\n![capacity simulation]({where})"
    )


def write_results(block: str) -> None:
    old = RESULTS.read_text()
    body = f"{BEGIN}\n{block}\n{END}"
    if BEGIN in old and END in old:
        new = old[: old.index(BEGIN)] + body + old[old.index(END) + len(END) :]
    else:
        new = old.rstrip() + f"\n\n{SECTION}\n\n{body}\n"
    RESULTS.write_text(new)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--inputs", type=Path, default=INPUTS, help="measured inputs (JSON)")
    ap.add_argument("--plot", type=Path, default=PLOT, help="where the figure goes")
    ap.add_argument("--markdown", action="store_true", help="write the tables into bench/RESULTS.md")
    args = ap.parse_args()
    began = time.perf_counter()
    inputs = json.loads(args.inputs.read_text())
    fit = fit_service(inputs["service_points"]["hit_rate_max_rps"])
    say(
        f"service fit: mu_miss {fit.miss_rps:.0f}/s, mu_hit {fit.hit_rps:.0f}/s ("
        + ", ".join(
            f"{h:.0%} hits: measured {r:g}, fit {fit.rate_rps(h):.0f}"
            for h, r in inputs["service_points"]["hit_rate_max_rps"]
        )
        + ")"
    )
    series = {name: TRACES[name](spec.get("seed", 0)) for name, spec in inputs["traces"].items()}
    cases = run_all(inputs, series, fit)
    variants = what_if(inputs, series, cases)
    front = frontier(inputs, series, fit)
    print(detail_table(cases))
    print()
    print(table(cases))
    print()
    print(variants)
    print()
    print(front)
    plot([c for c in cases if c.cold_start_s == inputs["cold_start_s"]], args.plot)
    say(f"plot: {args.plot}")
    if args.markdown:
        write_results(markdown(inputs, fit, cases, variants, args.plot, front))
        say(f"tables: {RESULTS}")
    say(f"done in {time.perf_counter() - began:.1f} s")


if __name__ == "__main__":
    main()
