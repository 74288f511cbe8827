"""The autoscaling policy on observations made up tick by tick (no broker, no clock)."""

from __future__ import annotations

import math

import pytest

from schemas.errors import ConfigError
from sluice.autoscale.config import AutoscaleConfig
from sluice.autoscale.policy import ArrivalRate, Observation, Policy, Saturation, ServiceRate, serving
from sluice.settings import load_settings

P = 12


def config(**kw) -> AutoscaleConfig:
    base = {
        "autoscale_interval_s": 10,
        "autoscale_target_drain_s": 60,
        "autoscale_target_utilization": 0.8,
        "autoscale_scale_down_window_s": 300,
        "autoscale_idle_s": 900,
        "autoscale_cold_start_s": 30,
        "autoscale_initial_service_rps": 100,
    }
    return AutoscaleConfig(**{**base, **kw})


def obs(t: float, lag: int | dict | None = 0, ready: int = 1, **kw) -> Observation:
    if isinstance(lag, int):
        lag = {p: lag // P + (1 if p < lag % P else 0) for p in range(P)}
    return Observation(at_s=t, lag=lag, partitions=P, ready=ready, **kw)


def test_arrivals_alone_are_served_at_the_target_utilisation():
    policy = Policy(config())
    d = policy.decide(obs(0, 0, ready=3, arrival_rps=500, service_rps=250))
    assert d.desired == math.ceil(500 / (250 * 0.8)) == 3
    assert d.reason == "hold"


def test_a_backlog_is_sized_to_drain_within_the_target_counting_what_piles_up_during_cold_start():
    policy = Policy(config())
    d = policy.decide(obs(0, 5_000, ready=1, arrival_rps=400, service_rps=250))
    # 400/s arrive, one worker serves 250/s: 150/s more pile up for the 30 s cold start;
    # the backlog drains at full rate (the 0.8 headroom is for steady arrivals: 2 workers)
    draining = 400 + (5_000 + 150 * 30) / 60
    assert d.recommended == math.ceil(draining / 250) == 3
    assert (d.desired, d.reason) == (3, "scale_up")
    warm = Policy(config()).decide(obs(0, 5_000, ready=1, arrival_rps=400, service_rps=250, cold_start_s=2))
    assert warm.desired == math.ceil((400 + (5_000 + 150 * 2) / 60) / 250) == 2  # a fast start needs fewer


def test_steady_arrivals_keep_the_utilisation_headroom():
    d = Policy(config()).decide(obs(0, 0, ready=2, arrival_rps=420, service_rps=250))
    assert d.desired == 3  # 2 workers would run at 84%, above the 0.8 target


def test_counts_that_leave_a_worker_holding_more_partitions_are_skipped():
    # 4.5 workers' worth on 12 partitions: 5 workers serve like 4 (one holds 3), so 6
    d = Policy(config()).decide(obs(0, 0, ready=4, arrival_rps=4.5 * 200, service_rps=250))
    assert d.desired == 6
    assert serving(5, 12) == 4 and serving(6, 12) == 6 and serving(7, 12) == 6 and serving(3, 2) == 2


def test_up_at_once_down_only_after_the_window_agrees():
    policy = Policy(config(autoscale_scale_down_window_s=60))
    assert policy.decide(obs(0, 30_000, ready=1, arrival_rps=200, service_rps=250)).desired == 3
    seen = []
    for t in range(10, 130, 10):  # the backlog is gone: one worker would do
        seen.append((t, policy.decide(obs(t, 0, ready=3, arrival_rps=150, service_rps=250)).desired))
    first_down = next(t for t, d in seen if d < 3)
    assert first_down == 70  # the t=0 recommendation of 4 left the 60 s window
    assert seen[-1][1] == 1


def test_a_dip_inside_the_window_does_not_shrink_the_fleet():
    policy = Policy(config(autoscale_scale_down_window_s=60))
    policy.decide(obs(0, 0, ready=4, arrival_rps=700, service_rps=250))
    for t in (10, 20, 30):
        assert policy.decide(obs(t, 0, ready=4, arrival_rps=100, service_rps=250)).desired == 4
    assert policy.decide(obs(40, 0, ready=4, arrival_rps=700, service_rps=250)).reason == "hold"


def test_idle_goes_to_zero_after_the_idle_period_and_the_first_lag_wakes_it():
    policy = Policy(config(autoscale_idle_s=120, autoscale_scale_down_window_s=30))
    got = {t: policy.decide(obs(t, 0, ready=1, arrival_rps=0, service_rps=250)) for t in range(0, 130, 10)}
    assert all(got[t].desired == 1 for t in range(0, 120, 10))
    assert (got[120].desired, got[120].reason) == (0, "to_zero")
    assert policy.decide(obs(130, 0, ready=0, arrival_rps=0)).desired == 0
    wake = policy.decide(obs(140, {3: 1}, ready=0, arrival_rps=0.1))
    assert (wake.desired, wake.reason) == (1, "wake")


def test_min_workers_is_kept_when_idle():
    policy = Policy(config(autoscale_idle_s=20, autoscale_min_workers=2))
    for t in range(0, 100, 10):
        d = policy.decide(obs(t, 0, ready=2, arrival_rps=0))
    assert d.desired == 2


def test_the_fleet_never_exceeds_the_partitions_nor_the_max():
    assert Policy(config()).decide(obs(0, 10**7, ready=1, service_rps=100)).desired == P
    assert Policy(config(autoscale_max_workers=5)).decide(obs(0, 10**7, ready=1, service_rps=100)).desired == 5


def test_no_broker_answer_keeps_the_last_decision():
    policy = Policy(config(autoscale_idle_s=10))
    policy.decide(obs(0, 30_000, ready=1, arrival_rps=200, service_rps=250))
    for t in range(10, 200, 10):
        d = policy.decide(obs(t, None, ready=3))
        assert (d.desired, d.reason, d.missing) == (3, "no_broker", ("broker",))


def test_no_analytics_answer_never_shrinks_but_may_grow():
    policy = Policy(config(autoscale_idle_s=10, autoscale_scale_down_window_s=0))
    policy.decide(obs(0, 0, ready=3, arrival_rps=500, service_rps=250))
    for t in range(10, 100, 10):
        d = policy.decide(obs(t, 0, ready=3, arrival_rps=0, analytics_ok=False))
        assert d.desired == 3 and "analytics" in d.missing
    grown = policy.decide(obs(100, 60_000, ready=3, arrival_rps=500, analytics_ok=False))
    assert grown.desired > 3 and grown.service_source == "last"


def test_a_group_that_never_committed_gets_a_worker_for_waiting_records_and_never_shrinks():
    policy = Policy(config(autoscale_idle_s=10))
    empty = {p: 0 for p in range(1, P)}  # never committed, nothing in their logs: lag is known to be 0
    d = policy.decide(obs(0, {**empty, 0: 0}, ready=0))
    assert (d.desired, d.missing) == (0, ())
    d = policy.decide(obs(10, empty, ready=0, uncommitted={0: 5}))
    assert (d.desired, d.reason, d.missing) == (1, "wake", ("commits",))
    for t in range(20, 100, 10):
        assert policy.decide(obs(t, empty, ready=1, uncommitted={0: 5})).desired == 1


def test_a_stuck_partition_is_reported_and_not_answered_with_workers():
    policy = Policy(config(autoscale_stuck_ticks=3))
    for i, t in enumerate(range(0, 50, 10)):
        lag = {p: 10 for p in range(P)}
        lag[7] = 1000 * (i + 1)  # grows while its committed offset stands still
        moving = {**{p: 100 + 50 * i for p in range(P)}, 7: 100}
        d = policy.decide(obs(t, lag, ready=2, arrival_rps=100, service_rps=250, committed=moving))
    assert d.stuck == (7,)
    assert d.desired == 1  # 100/s needs one worker; partition 7's 5,000 records do not add any


def test_a_partition_that_moves_is_slow_not_stuck():
    policy = Policy(config(autoscale_stuck_ticks=3))
    for i, t in enumerate(range(0, 50, 10)):
        lag = {p: 10 for p in range(P)}
        lag[7] = 1000 * (i + 1)
        d = policy.decide(obs(t, lag, ready=2, service_rps=250, committed={p: 100 + 50 * i for p in range(P)}))
    assert d.stuck == ()
    assert d.recommended >= 1


def test_a_short_fleet_raises_every_lag_and_is_not_called_stuck():
    policy = Policy(config(autoscale_stuck_ticks=3))
    for i, t in enumerate(range(0, 50, 10)):
        d = policy.decide(obs(t, 1200 * (i + 1), ready=1, arrival_rps=400, service_rps=250))
    assert d.stuck == ()
    assert d.desired > 1


def test_arrivals_see_a_step_at_the_next_tick_and_smooth_a_dip():
    rate = ArrivalRate(lookback_s=60)
    assert rate.add(0, 0) is None
    total = 0
    for t in range(10, 70, 10):  # 100/s for a minute
        total += 1000
        assert rate.add(t, total) == pytest.approx(100)
    total += 10_000  # 1,000/s in the last interval: seen now, not a minute later
    assert rate.add(70, total) == pytest.approx(1000)
    total += 0  # nothing for an interval: the look-back still shows the minute's mean
    assert rate.add(80, total) == pytest.approx((total - 2000) / 60)


def test_service_rate_measured_when_saturated_then_scaled_from_model_time_as_hits_change():
    est = ServiceRate()
    # before any saturation: the model-time bound, optimistic
    assert est.estimate(answered_per_worker_rps=50, model_bound_rps=1200, saturated=False) == (1200, "model_time")
    # saturated: what a worker answered is its rate; 300 of a 1,200 bound
    assert est.estimate(answered_per_worker_rps=300, model_bound_rps=1200, saturated=True) == (300, "measured")
    # more hits raise the model-time bound (hits take no model time): the rate follows, scaled
    assert est.estimate(answered_per_worker_rps=100, model_bound_rps=4000, saturated=False) == (1000, "scaled")
    # what workers answered is a lower bound
    assert est.estimate(answered_per_worker_rps=1500, model_bound_rps=4000, saturated=False) == (1500, "answered")
    assert est.estimate(answered_per_worker_rps=None, model_bound_rps=None, saturated=False) == (None, "")


def test_with_every_request_a_hit_what_workers_answered_only_raises_the_estimate():
    est = ServiceRate()
    # no model time at all: an unsaturated fleet's answers are a lower bound
    assert est.estimate(answered_per_worker_rps=400, model_bound_rps=None, saturated=False) == (400, "answered")
    # fewer answered per worker (a bigger fleet, less load) must not lower it, or the
    # fleet would grow, each worker answer less, the estimate fall again, and so on
    assert est.estimate(answered_per_worker_rps=250, model_bound_rps=None, saturated=False) == (None, "")
    assert est.estimate(answered_per_worker_rps=900, model_bound_rps=None, saturated=False) == (900, "answered")
    assert est.estimate(answered_per_worker_rps=700, model_bound_rps=None, saturated=True) == (700, "measured")


def test_a_measured_rate_replaces_the_prior_and_is_kept_when_unmeasured():
    policy = Policy(config())
    assert policy.decide(obs(0, 0, arrival_rps=50)).service_source == "prior"
    assert policy.decide(obs(10, 0, arrival_rps=50, service_rps=400)).service_source == "measured"
    d = policy.decide(obs(20, 0, arrival_rps=50))
    assert (d.service_source, d.service_rps) == ("last", 400)


@pytest.mark.parametrize(
    ("env", "named"),
    [
        ({"SLUICE_AUTOSCALE_MIN_WORKERS": "5", "SLUICE_AUTOSCALE_MAX_WORKERS": "2"}, "SLUICE_AUTOSCALE_MIN_WORKERS"),
        ({"SLUICE_AUTOSCALE_INTERVAL_S": "30", "SLUICE_AUTOSCALE_LOOKBACK_S": "10"}, "SLUICE_AUTOSCALE_LOOKBACK_S"),
        ({"SLUICE_AUTOSCALE_IDLE_S": "1", "SLUICE_AUTOSCALE_INTERVAL_S": "10"}, "SLUICE_AUTOSCALE_IDLE_S"),
        ({"SLUICE_AUTOSCALE_TARGET_UTILIZATION": "1.5"}, "SLUICE_AUTOSCALE_TARGET_UTILIZATION"),
        ({"SLUICE_AUTOSCALE_INTERVAL_S": "0"}, "SLUICE_AUTOSCALE_INTERVAL_S"),
    ],
)
def test_a_bad_knob_fails_at_start_naming_it(monkeypatch, env, named):
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    with pytest.raises(ConfigError) as err:
        load_settings()
    assert named in str(err.value) and "\n" not in str(err.value)


def test_group_offsets_know_lag_where_committed_or_empty_and_flag_unread_logs():
    from sluice.autoscale.signals import GroupOffsets

    g = GroupOffsets(end={0: 100, 1: 50, 2: 7, 3: 0}, start={0: 0, 1: 0, 2: 7, 3: 0}, committed={0: 90}, members=1)
    assert g.lag == {0: 10, 2: 0, 3: 0}  # 2 and 3 never committed, but their logs are empty
    assert g.uncommitted == {1: 50}  # never committed, 50 records no one has read


def test_saturation_needs_two_ticks_of_backlog_with_the_same_workers_after_the_change():
    sat = Saturation(lookback_s=60, interval_s=10)
    assert sat.add(0, 5000, 100, 2) is None  # the first reading of a count: its pause lies just before
    assert sat.add(10, 4000, 100, 2) is None  # one tick is not a span
    assert sat.add(20, 3000, 100, 2) == 10
    assert sat.add(30, 3000, 100, 2) == 20
    assert sat.add(40, 3000, 100, 3) is None  # a worker joined: the span restarts after it
    assert sat.add(50, 2000, 100, 3) is None
    assert sat.add(60, 1000, 100, 3) == 10
    assert sat.add(70, 40, 100, 3) is None  # under half a second of arrivals waiting
    assert sat.mean_ready() == pytest.approx((2 * 3 + 3 * 4) / 7)  # the ticks of the last 60 s
