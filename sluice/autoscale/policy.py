"""How many workers the load needs: small pure objects, fed one reading per tick.

The rule, in the units an operator reasons in:

    serving(w)       = what w workers serve on P evenly loaded partitions:
                       the busiest holds ceil(P / w) of them, so 5 workers
                       on 12 partitions serve like 4 (P / ceil(P / w) workers' worth)
    capacity now     = serving(ready) x service rate (requests/s of one worker)
    backlog at ready = lag + max(0, arrivals - capacity now) x cold start
                       (what piles up until a worker started now can answer)
    recommended      = the fewest workers w with
                       serving(w) x rate x target utilisation >= arrivals, and
                       serving(w) x rate >= arrivals + backlog at ready / target drain

so steady arrivals keep the utilisation headroom, and a backlog may use it
to drain; a lower count must also serve the arrivals with
`scale_down_tolerance` to spare (a count on the threshold flaps). The count is clamped to [min, min(max, partitions)]. A higher
count is taken at once; a lower one only once every recommendation of the
scale-down window agrees (the window's highest wins, as Kubernetes' HPA
stabilises). No arrivals and no lag for `idle` seconds takes the fleet to
its minimum (zero by default); the first lag or arrival wakes it.

Missing evidence never shrinks the fleet: with no broker answer the last
decision stands; with no analytics answer, or partitions whose group has
never committed (their lag is unknown), the fleet may grow but not shrink.
A partition whose lag grows tick after tick while the others' does not is a
stuck consumer: it is reported, and its lag is left out of the sizing,
because more workers would not unstick it.

`ArrivalRate` and `ServiceRate` turn raw readings (end offsets, answered
counts, model time) into the two rates. Time is passed in everywhere, so
the same objects run the live loop and the capacity simulation under bench/.
"""

from __future__ import annotations

import dataclasses
import math
from collections import deque
from collections.abc import Mapping
from dataclasses import dataclass, field

from sluice.autoscale.config import AutoscaleConfig


@dataclass(frozen=True, slots=True)
class Observation:
    """What the loop saw at one tick."""

    at_s: float
    lag: Mapping[int, int] | None  # partition -> records produced, not committed; None: no broker answer
    partitions: int
    ready: int  # workers answering
    starting: int = 0  # started, not answering yet
    arrival_rps: float | None = None  # requests produced per second over the look-back
    service_rps: float | None = None  # requests one worker answers per second (ServiceRate), None if unknown
    service_source: str = "measured"  # how service_rps was had (ServiceRate says)
    analytics_ok: bool = True  # False: the analytics store did not answer
    uncommitted: Mapping[int, int] = field(default_factory=dict)  # never-committed partition -> records in its log
    committed: Mapping[int, int] = field(default_factory=dict)  # partition -> committed offset, where known
    cold_start_s: float | None = None  # measured start-to-ready time, None if unmeasured


@dataclass(frozen=True, slots=True)
class Decision:
    at_s: float
    desired: int
    current: int  # ready + starting when decided
    ready: int
    recommended: int  # this tick's need, before stabilisation
    reason: str  # scale_up, wake, scale_down, to_zero, hold, stabilising, no_broker
    lag: int
    arrival_rps: float
    service_rps: float
    service_source: str  # measured (saturated), scaled/model_time (telemetry's model time), last, prior (the setting)
    cold_start_s: float
    partitions: int
    stuck: tuple[int, ...] = ()
    missing: tuple[str, ...] = ()  # evidence that was not there: broker, analytics, commits


def serving(workers: int, partitions: int) -> float:
    """Workers' worth of capacity `workers` give on `partitions` evenly loaded
    partitions: each partition has one consumer, so the busiest worker holds
    ceil(P / w) of them and the rest wait on it."""
    if workers <= 0:
        return 0.0
    if partitions <= 0:
        return float(workers)
    return partitions / math.ceil(partitions / workers)


def fleet_for(rate_rps: float, per_worker_rps: float, partitions: int, most: int) -> int:
    """The fewest workers (up to `most`) that serve `rate_rps` on these partitions."""
    if rate_rps <= 0:
        return 0
    for workers in range(1, most + 1):
        if serving(workers, partitions) * per_worker_rps >= rate_rps - 1e-9:
            return workers
    return max(most, 0)


class ArrivalRate:
    """Requests produced per second, from a running total (the requests topic's
    end offsets) read once per tick: the higher of the last interval's rate and
    the look-back's, so a step up counts at the next tick while a dip is
    smoothed over the look-back (and the scale-down window smooths it again)."""

    def __init__(self, lookback_s: float) -> None:
        self.lookback_s = lookback_s
        self._seen: deque[tuple[float, int]] = deque()

    def add(self, at_s: float, total: int) -> float | None:
        """Record a reading; the rate, or None until there are two."""
        self._seen.append((at_s, total))
        while len(self._seen) > 2 and self._seen[1][0] <= at_s - self.lookback_s:
            self._seen.popleft()
        if len(self._seen) < 2:
            return None
        rates = []
        for t0, n0 in (self._seen[0], self._seen[-2]):
            if at_s > t0:
                rates.append(max(0.0, (total - n0) / (at_s - t0)))
        return max(rates) if rates else None


class Saturation:
    """Whether the fleet has been saturated, from one reading per tick: the
    seconds the same ready workers have had a backlog (lag above
    `backlog_s` of arrivals) at every tick, when that spans two ticks or
    more. A change of the fleet restarts it, and the tick that first sees
    the new count does not start a span: the rebalance pause of a join or a
    leave falls before it, and a pause is not the workers' rate."""

    def __init__(self, lookback_s: float, interval_s: float, backlog_s: float = 0.5) -> None:
        self.lookback_s = lookback_s
        self.interval_s = interval_s
        self.backlog_s = backlog_s
        self._seen: deque[tuple[float, int, float, int, bool]] = deque()  # (at, lag, arrivals, ready, changed)

    def add(self, at_s: float, lag: int, arrivals_rps: float, ready: int) -> float | None:
        changed = not self._seen or self._seen[-1][3] != ready
        self._seen.append((at_s, lag, arrivals_rps, ready, changed))
        while self._seen and self._seen[0][0] < at_s - self.lookback_s:
            self._seen.popleft()
        start = None
        for at, q, a, r, new_count in reversed(self._seen):
            if r != ready or r == 0 or q <= max(1.0, a * self.backlog_s):
                break
            if new_count:  # the pause of this change lies before it: start after it
                break
            start = at
        if start is None or at_s - start < self.interval_s * 0.99:
            return None
        return at_s - start

    def mean_ready(self) -> float:
        """Ready workers, averaged over the look-back's ticks."""
        return sum(t[3] for t in self._seen) / len(self._seen) if self._seen else 0.0


class ServiceRate:
    """What one worker serves per second, from telemetry.

    Measured directly when the fleet was saturated (a backlog through the
    span, the same workers throughout): answered per second per worker.
    Otherwise telemetry still shows the model-time bound, answered per
    second of model busy time, which rises with the hit rate but leaves out
    everything around the model; the last saturated measurement's ratio to
    that bound scales it (1 until a measurement exists: optimistic, so a
    short fleet builds the backlog that measures it, rather than an
    oversized one never learning). What workers answered is always a lower
    bound."""

    def __init__(self) -> None:
        self.ratio: float | None = None  # measured / model-time bound, at the last saturation
        self.rate: float | None = None  # the last estimate given

    def estimate(
        self, *, answered_per_worker_rps: float | None, model_bound_rps: float | None, saturated: bool
    ) -> tuple[float | None, str]:
        """(rate, how it was had); None when telemetry shows nothing new."""
        seen = answered_per_worker_rps if answered_per_worker_rps and answered_per_worker_rps > 0 else None
        bound = model_bound_rps if model_bound_rps and math.isfinite(model_bound_rps) and model_bound_rps > 0 else None
        if saturated and seen is not None:
            if bound is not None:
                self.ratio = min(1.0, seen / bound)
            return self._give(seen, "measured")
        if bound is not None:
            rate = bound * (self.ratio if self.ratio is not None else 1.0)
            if seen is not None and seen > rate:
                return self._give(seen, "answered")
            return self._give(rate, "scaled" if self.ratio is not None else "model_time")
        # no model time (every request a hit): what workers answered only ever
        # raises the estimate; lowering it to what an unsaturated fleet answered
        # would grow the fleet, lower the next reading, and so on
        if seen is not None and seen > (self.rate or 0.0):
            return self._give(seen, "answered")
        return None, ""

    def _give(self, rate: float, source: str) -> tuple[float, str]:
        self.rate = rate
        return rate, source


class Policy:
    def __init__(self, config: AutoscaleConfig) -> None:
        self.config = config
        self._window: deque[tuple[float, int]] = deque()  # (at, recommended) within the scale-down window
        self._lags: deque[tuple[Mapping[int, int], Mapping[int, int]]] = deque(maxlen=config.autoscale_stuck_ticks + 1)
        self._idle_since: float | None = None
        self._service: float | None = None
        self.last: Decision | None = None

    @property
    def service_rps(self) -> float:
        """The per-worker service rate it plans with: the last measured one, else the prior."""
        return self._service or self.config.autoscale_initial_service_rps

    def decide(self, obs: Observation) -> Decision:
        cfg = self.config
        current = obs.ready + obs.starting
        cold = obs.cold_start_s if obs.cold_start_s is not None else cfg.autoscale_cold_start_s
        if obs.service_rps is not None and obs.service_rps > 0:
            self._service, source = obs.service_rps, obs.service_source
        elif self._service is not None:
            source = "last"
        else:
            source = "prior"
        mu = self._service or cfg.autoscale_initial_service_rps
        arrivals = max(0.0, obs.arrival_rps or 0.0)

        if obs.lag is None:  # nothing to go on: the last decision stands
            desired = self.last.desired if self.last else current
            return self._keep(obs, desired, current, mu, source, cold, arrivals)

        stuck = self._stuck(obs.lag, obs.committed, obs.ready)
        lag = sum(v for p, v in obs.lag.items() if p not in stuck)
        hi = min(cfg.autoscale_max_workers or obs.partitions, obs.partitions)
        shortfall = max(0.0, arrivals - serving(obs.ready, obs.partitions) * mu)
        draining = arrivals + (lag + shortfall * cold) / cfg.autoscale_target_drain_s
        recommended = max(
            fleet_for(arrivals, mu * cfg.autoscale_target_utilization, obs.partitions, hi),
            fleet_for(draining, mu, obs.partitions, hi),
        )
        if recommended < current:
            # fewer only if they would still serve the arrivals with a margin: a count
            # that sits on the threshold is undone by the next tick's noise, and each
            # change is a rebalance pause
            margin = 1 + cfg.autoscale_scale_down_tolerance
            recommended = min(
                current,
                max(
                    recommended, fleet_for(arrivals * margin, mu * cfg.autoscale_target_utilization, obs.partitions, hi)
                ),
            )

        busy = lag > 0 or arrivals > 0 or bool(stuck) or any(obs.uncommitted.values())
        if busy:
            self._idle_since = None
        elif self._idle_since is None:
            self._idle_since = obs.at_s
        idle = self._idle_since is not None and obs.at_s - self._idle_since >= cfg.autoscale_idle_s

        lo = min(cfg.autoscale_min_workers, hi)
        if current > 0 and not idle:
            lo = max(lo, min(1, hi))  # one stays until the idle period has passed
        if current == 0 and (lag > 0 or arrivals > 0):
            lo = max(lo, min(1, hi))  # wake on the first lag
        missing = []
        last = self.last.desired if self.last else 0
        if not obs.analytics_ok:
            missing.append("analytics")
            lo = max(lo, min(last, hi))
        if obs.uncommitted:
            missing.append("commits")
            lo = max(lo, min(last, hi))
            if any(obs.uncommitted.values()):  # records wait and no one has ever read them
                lo = max(lo, min(1, hi))
        recommended = max(lo, min(hi, recommended))

        self._window.append((obs.at_s, recommended))
        while self._window and self._window[0][0] < obs.at_s - cfg.autoscale_scale_down_window_s:
            self._window.popleft()
        if recommended >= current:
            desired = recommended
        elif idle:
            desired = recommended  # idleness was its own, longer, stabilisation
        else:
            desired = min(current, max(r for _, r in self._window))

        if desired > current:
            reason = "wake" if current == 0 else "scale_up"
        elif desired < current:
            reason = "to_zero" if desired == 0 else "scale_down"
        else:
            reason = "stabilising" if recommended < current else "hold"
        self.last = Decision(
            at_s=obs.at_s,
            desired=desired,
            current=current,
            ready=obs.ready,
            recommended=recommended,
            reason=reason,
            lag=sum(obs.lag.values()),
            arrival_rps=arrivals,
            service_rps=mu,
            service_source=source,
            cold_start_s=cold,
            partitions=obs.partitions,
            stuck=stuck,
            missing=tuple(missing),
        )
        return self.last

    def _keep(
        self, obs: Observation, desired: int, current: int, mu: float, source: str, cold: float, arrivals: float
    ) -> Decision:
        """The last decision again, on this tick's counts (the broker said nothing new)."""
        base = self.last or Decision(
            obs.at_s, desired, current, obs.ready, desired, "", 0, arrivals, mu, source, cold, obs.partitions
        )
        self.last = dataclasses.replace(
            base,
            at_s=obs.at_s,
            desired=desired,
            current=current,
            ready=obs.ready,
            recommended=desired,
            reason="no_broker",
            arrival_rps=arrivals,
            service_rps=mu,
            service_source=source,
            cold_start_s=cold,
            missing=("broker",),
        )
        return self.last

    def _stuck(self, lag: Mapping[int, int], committed: Mapping[int, int], ready: int) -> tuple[int, ...]:
        """Partitions whose lag rose at each of the last ticks while their committed
        offset stood still (where it is known) and the others' lag did not rise:
        a consumer that stopped, not a fleet that is short (that raises every lag)."""
        self._lags.append((dict(lag), dict(committed)))
        if ready == 0 or len(self._lags) < (self._lags.maxlen or 0):
            return ()
        (first, first_committed), (final, _) = self._lags[0], self._lags[-1]
        out = []
        for p in final:
            series = [seen.get(p) for seen, _ in self._lags]
            if any(v is None for v in series) or not all(b > a for a, b in zip(series, series[1:])):  # type: ignore[operator]
                continue
            offsets = {c.get(p) for _, c in self._lags}
            if p in first_committed and len(offsets) > 1:  # it moved: slow, not stuck
                continue
            others_then = sum(v for q, v in first.items() if q != p)
            others_now = sum(v for q, v in final.items() if q != p)
            if others_now <= others_then:
                out.append(p)
        return tuple(sorted(out))
