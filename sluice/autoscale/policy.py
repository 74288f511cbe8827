"""How many workers the load needs: a small pure object, fed one observation per tick.

The rule, in the units an operator reasons in:

    capacity now     = ready workers x measured service rate (requests/s each)
    backlog at ready = lag + max(0, arrivals - capacity now) x cold start
                       (what piles up until a worker started now can answer)
    needed rate      = arrivals + backlog at ready / target drain time
    recommended      = ceil(needed rate / (service rate x target utilisation))

clamped to [min, min(max, partitions)]. A higher count is taken at once; a
lower one only once every recommendation of the scale-down window agrees
(the window's highest wins, as Kubernetes' HPA stabilises). No arrivals and
no lag for `idle` seconds takes the fleet to its minimum (zero by default);
the first lag or arrival wakes it.

Missing evidence never shrinks the fleet: with no broker answer the last
decision stands; with no analytics answer, or partitions whose group has
never committed (their lag is unknown), the fleet may grow but not shrink.
A partition whose lag grows tick after tick while the others' does not is a
stuck consumer: it is reported, and its lag is left out of the sizing,
because more workers would not unstick it.

Time is passed in (`Observation.at_s`), so the same object runs the live
loop and the capacity simulation under bench/.
"""

from __future__ import annotations

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
    service_rps: float | None = None  # requests one worker answers per second (measured), None if unmeasured
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
    service_source: str  # measured, last (an earlier measurement), prior (the setting)
    cold_start_s: float
    partitions: int
    stuck: tuple[int, ...] = ()
    missing: tuple[str, ...] = ()  # evidence that was not there: broker, analytics, commits


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
            self._service, source = obs.service_rps, "measured"
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
        shortfall = max(0.0, arrivals - obs.ready * mu)
        needed = arrivals + (lag + shortfall * cold) / cfg.autoscale_target_drain_s
        recommended = math.ceil(needed / (mu * cfg.autoscale_target_utilization) - 1e-9) if needed > 0 else 0

        busy = lag > 0 or arrivals > 0 or bool(stuck) or any(obs.uncommitted.values())
        if busy:
            self._idle_since = None
        elif self._idle_since is None:
            self._idle_since = obs.at_s
        idle = self._idle_since is not None and obs.at_s - self._idle_since >= cfg.autoscale_idle_s

        hi = min(cfg.autoscale_max_workers or obs.partitions, obs.partitions)
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
        last = self.last
        self.last = Decision(
            at_s=obs.at_s,
            desired=desired,
            current=current,
            ready=obs.ready,
            recommended=desired,
            reason="no_broker",
            lag=last.lag if last else 0,
            arrival_rps=arrivals,
            service_rps=mu,
            service_source=source,
            cold_start_s=cold,
            partitions=obs.partitions,
            stuck=last.stuck if last else (),
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
