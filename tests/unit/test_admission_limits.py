"""Rate limits and budgets on made-up clocks (no Kafka)."""

from __future__ import annotations

import calendar
import time

import pytest

from processors.admission.limits import (
    BUDGET_EXHAUSTED,
    RATE_LIMITED,
    GlobalLimits,
    TenantLimits,
    TenantState,
    admit,
)

T0 = calendar.timegm((2026, 12, 6, 12, 0, 0)) * 1000
TTL = 600_000


def go(state, limits, rid, at_ms, tokens=10, usd=0.0, **kw):
    return admit(
        state, limits, request_id=rid, tokens=tokens, estimate_usd=usd, at_ms=at_ms, reservation_ttl_ms=TTL, **kw
    )


def test_a_minutes_allowance_goes_at_once_then_one_every_interval():
    limits, s = TenantLimits(requests_per_minute=60), TenantState()
    assert all(go(s, limits, f"r{i}", T0).admitted for i in range(60))
    late = go(s, limits, "r60", T0)
    assert (late.admitted, late.code, late.retry_after_ms) == (False, RATE_LIMITED, 1000)
    assert not go(s, limits, "r60", T0 + 999).admitted
    assert go(s, limits, "r60", T0 + 1000).admitted  # one a second after the burst


def test_tokens_per_minute_count_tokens_and_a_request_bigger_than_the_minute_never_fits():
    limits, s = TenantLimits(tokens_per_minute=1000), TenantState()
    assert go(s, limits, "a", T0, tokens=600).admitted
    v = go(s, limits, "b", T0, tokens=600)
    assert v.code == RATE_LIMITED and v.retry_after_ms == 12_000  # 200 tokens over, at 1000/60 s per token
    huge = go(s, limits, "c", T0 + 10**7, tokens=1001)
    assert huge.code == RATE_LIMITED and huge.retry_after_ms is None


def test_a_refused_request_changes_nothing():
    limits, s = TenantLimits(requests_per_minute=600, tokens_per_minute=100), TenantState()
    assert go(s, limits, "a", T0, tokens=100).admitted
    before = s.to_doc()
    assert not go(s, limits, "b", T0, tokens=50).admitted  # over the tokens, within the requests
    assert s.to_doc() == before


def test_the_budget_counts_reservations_so_concurrent_requests_cannot_overspend():
    limits, s = TenantLimits(daily_usd=1.0), TenantState()
    assert all(go(s, limits, f"r{i}", T0, usd=0.3).admitted for i in range(3))
    refused = go(s, limits, "r3", T0, usd=0.3)  # 0.9 reserved: 1.2 would pass the budget
    assert refused.code == BUDGET_EXHAUSTED and refused.retry_after_ms == 1000  # reservations hold it
    assert s.settle("r0", 0.01, T0 + 500)  # a cache hit: most of its reservation comes back
    assert go(s, limits, "r3", T0 + 600, usd=0.3).admitted
    assert s.spent_day_usd == pytest.approx(0.01) and s.reserved_usd == pytest.approx(0.9)


def test_settled_spend_waits_for_the_next_day_and_the_day_starts_afresh():
    limits, s = TenantLimits(daily_usd=1.0, monthly_usd=5.0), TenantState()
    assert go(s, limits, "a", T0, usd=0.9).admitted
    s.settle("a", 0.95, T0 + 10)
    v = go(s, limits, "b", T0 + 20, usd=0.1)
    midnight = calendar.timegm((2026, 12, 7, 0, 0, 0)) * 1000
    assert v.code == BUDGET_EXHAUSTED and v.retry_after_ms == midnight - (T0 + 20)
    assert go(s, limits, "b", midnight, usd=0.1).admitted
    assert s.spent_day_usd == 0 and s.spent_month_usd == pytest.approx(0.95)


def test_the_held_sum_follows_thousands_of_reservations():
    limits, s = TenantLimits(daily_usd=1e9), TenantState()
    for i in range(5000):
        go(s, limits, f"r{i}", T0 + i, usd=0.001)
    for i in range(0, 5000, 2):
        s.settle(f"r{i}", 0.0005, T0 + 6000)
    assert s.reserved_usd == pytest.approx(sum(usd for usd, _ in s.reserved.values())) == pytest.approx(2.5)
    assert s.expire(T0 + TTL + 2500) == [f"r{i}" for i in range(1, 2501, 2)]  # those reserved at T0 + 0..2500
    assert s.reserved_usd == pytest.approx(1.25)


def test_a_settlement_counts_once_and_an_unsettled_reservation_expires():
    limits, s = TenantLimits(daily_usd=10.0), TenantState()
    go(s, limits, "a", T0, usd=1.0)
    go(s, limits, "b", T0, usd=1.0)
    assert s.settle("a", 0.5, T0 + 1) and not s.settle("a", 0.5, T0 + 2)  # a replayed record
    assert s.spent_day_usd == 0.5
    assert s.expire(T0 + TTL) == ["b"] and s.reserved == {}


def test_a_replayed_request_is_admitted_again_and_reserved_once():
    limits, s = TenantLimits(daily_usd=1.0, requests_per_minute=1), TenantState()
    assert go(s, limits, "a", T0, usd=0.6).admitted
    again = go(s, limits, "a", T0 + 5, usd=0.6)  # after a crash before the commit
    assert again.admitted and s.reserved_usd == pytest.approx(0.6)


def test_the_global_budget_counts_every_tenant():
    limits, s = TenantLimits(), TenantState()
    g = GlobalLimits(daily_usd=2.0)
    assert go(s, limits, "a", T0, usd=0.5, global_limits=g, global_spent=(1.4, 1.4)).admitted
    v = go(s, limits, "b", T0, usd=0.7, global_limits=g, global_spent=(1.9, 1.9))
    assert v.code == BUDGET_EXHAUSTED and "global daily" in v.message


def test_state_survives_its_document():
    limits, s = TenantLimits(requests_per_minute=10, daily_usd=3.0), TenantState()
    go(s, limits, "a", T0, usd=0.25)
    s.settle("a", 0.2, T0 + 1)
    go(s, limits, "b", T0 + 2, usd=0.25)
    back = TenantState.from_doc(s.to_doc())
    assert back == s and back.reserved_usd == pytest.approx(s.reserved_usd) == 0.25
    assert back.day == time.strftime("%Y-%m-%d", time.gmtime(T0 / 1000))


def test_a_limits_file_becomes_control_records_and_a_bad_one_is_one_line(tmp_path):
    from schemas.errors import ConfigError
    from sluice.cli.tenants import limits_from_file

    good = tmp_path / "limits.toml"
    good.write_text(
        "[default]\nrequests_per_minute = 60\n\n[global]\ndaily_usd = 50.0\n\n"
        "[tenants.acme]\nrequests_per_minute = 600\ntokens_per_minute = 200000\ndaily_usd = 5.0\n"
    )
    assert limits_from_file(good) == {
        "default": {"requests_per_minute": 60.0},
        "global": {"daily_usd": 50.0},
        "tenant:acme": {"requests_per_minute": 600.0, "tokens_per_minute": 200000.0, "daily_usd": 5.0},
    }
    for body, said in (
        ("[tenants.acme]\nrequests_per_minute = -1\n", "requests_per_minute"),
        ("[tenants.acme]\nrpm = 5\n", "rpm"),
        ("[tenant.acme]\nrequests_per_minute = 5\n", "unknown tables"),
        ("[default\n", "limits.toml"),
    ):
        good.write_text(body)
        with pytest.raises(ConfigError) as err:
            limits_from_file(good)
        assert said in str(err.value) and "\n" not in str(err.value), str(err.value)
