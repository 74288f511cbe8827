"""What a tenant may spend, and what it has spent: pure objects, time passed in.

Rates are GCRA (the generic cell rate algorithm, a token bucket kept as
one timestamp): a tenant with a limit of R per minute may send R at once
and then one every 60/R s; a request that would go past that gets the
milliseconds until it would fit. Requests and tokens have a limit each.

Budgets are in USD per UTC day and month, charged per token computed at
the model's price (`price_per_million_tokens_usd` on its card; a cache hit
computes no token). A request reserves its charge when it is admitted (its
tokens, counted with the model's own tokenizer, so the estimate is exact
for embeddings and an upper bound for classification, whose labels are
often cached) and the reservation is replaced by the charge its telemetry
record shows. Admission checks spent + reserved + this request's charge
against each budget, so concurrent requests can never overspend. A
reservation never settled expires after its time to live and is released.
The compute cost in telemetry (`cost_usd`, the instance's time) is what
Sluice costs its operator; the charge is what a tenant is billed.
"""

from __future__ import annotations

import calendar
import math
import time
from dataclasses import dataclass, field
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

RATE_LIMITED = "rate_limited"
BUDGET_EXHAUSTED = "budget_exhausted"
OVERLOADED = "overloaded"
KILL_SWITCH = "kill_switch"


class TenantLimits(BaseModel):
    """One tenant's limits (None: no limit), as `sluice tenants set` writes them."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    requests_per_minute: float | None = Field(None, gt=0)
    tokens_per_minute: float | None = Field(None, gt=0)
    daily_usd: float | None = Field(None, ge=0)
    monthly_usd: float | None = Field(None, ge=0)


class GlobalLimits(BaseModel):
    """Budgets over all tenants together."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    daily_usd: float | None = Field(None, ge=0)
    monthly_usd: float | None = Field(None, ge=0)


NO_GLOBAL_LIMITS = GlobalLimits()


@dataclass(frozen=True, slots=True)
class Verdict:
    admitted: bool
    code: str = ""  # why not: rate_limited, budget_exhausted, overloaded, kill_switch
    message: str = ""
    retry_after_ms: int | None = None
    reserved_usd: float = 0.0


ADMITTED = Verdict(True)


def day_of(at_ms: int) -> str:
    return time.strftime("%Y-%m-%d", time.gmtime(at_ms / 1000))


def month_of(at_ms: int) -> str:
    return day_of(at_ms)[:7]


def _next_day_ms(at_ms: int) -> int:
    return (at_ms // 86_400_000 + 1) * 86_400_000


def _next_month_ms(at_ms: int) -> int:
    t = time.gmtime(at_ms / 1000)
    year, month = (t.tm_year + 1, 1) if t.tm_mon == 12 else (t.tm_year, t.tm_mon + 1)
    return calendar.timegm((year, month, 1, 0, 0, 0)) * 1000


# a budget held by reservations (not by settled spend) may free up as they settle
SETTLE_RETRY_MS = 1000


@dataclass(slots=True)
class TenantState:
    """A tenant's counters; what the state topic stores under its name."""

    request_tat_ms: float = 0.0  # GCRA: theoretical arrival time of the next request
    token_tat_ms: float = 0.0
    day: str = ""
    spent_day_usd: float = 0.0
    month: str = ""
    spent_month_usd: float = 0.0
    reserved: dict[str, tuple[float, int]] = field(default_factory=dict)  # request id -> (usd, expires at ms)
    # derived from `reserved`, kept as it changes (a tenant may hold thousands of reservations)
    reserved_usd: float = field(default=0.0, compare=False)  # their sum
    next_expiry_ms: int = field(default=0, compare=False)  # none expires before this (0: look)

    def hold(self, request_id: str, usd: float, until_ms: int) -> None:
        self.reserved[request_id] = (usd, until_ms)
        self.reserved_usd += usd
        self.next_expiry_ms = min(self.next_expiry_ms, until_ms) if self.next_expiry_ms else until_ms

    def release(self, request_id: str) -> float | None:
        held = self.reserved.pop(request_id, None)
        if held is None:
            return None
        self.reserved_usd = max(0.0, self.reserved_usd - held[0]) if self.reserved else 0.0
        return held[0]

    def roll(self, at_ms: int) -> None:
        """A new UTC day or month starts its count at zero."""
        day, month = day_of(at_ms), month_of(at_ms)
        if day != self.day:
            self.day, self.spent_day_usd = day, 0.0
        if month != self.month:
            self.month, self.spent_month_usd = month, 0.0

    def expire(self, at_ms: int) -> list[str]:
        """Release reservations past their time to live; their ids."""
        if not self.reserved or (self.next_expiry_ms and at_ms < self.next_expiry_ms):
            return []
        gone = [rid for rid, (_, until) in self.reserved.items() if until <= at_ms]
        for rid in gone:
            self.release(rid)
        self.next_expiry_ms = min((until for _, until in self.reserved.values()), default=0)
        return gone

    def settle(self, request_id: str, cost_usd: float, at_ms: int) -> bool:
        """The measured cost of a reserved request replaces its reservation;
        False when the id holds none (settled already, expired, or never
        admitted here), which makes a replayed telemetry record harmless."""
        if self.release(request_id) is None:
            return False
        self.roll(at_ms)
        self.spent_day_usd += cost_usd
        self.spent_month_usd += cost_usd
        return True

    def to_doc(self) -> dict[str, Any]:
        return {
            "request_tat_ms": self.request_tat_ms,
            "token_tat_ms": self.token_tat_ms,
            "day": self.day,
            "spent_day_usd": self.spent_day_usd,
            "month": self.month,
            "spent_month_usd": self.spent_month_usd,
            "reserved": {rid: [usd, until] for rid, (usd, until) in self.reserved.items()},
        }

    @classmethod
    def from_doc(cls, doc: dict[str, Any]) -> TenantState:
        st = cls._from(doc)
        st.reserved_usd = sum(usd for usd, _ in st.reserved.values())
        st.next_expiry_ms = min((until for _, until in st.reserved.values()), default=0)
        return st

    @classmethod
    def _from(cls, doc: dict[str, Any]) -> TenantState:
        return cls(
            request_tat_ms=float(doc.get("request_tat_ms", 0.0)),
            token_tat_ms=float(doc.get("token_tat_ms", 0.0)),
            day=str(doc.get("day", "")),
            spent_day_usd=float(doc.get("spent_day_usd", 0.0)),
            month=str(doc.get("month", "")),
            spent_month_usd=float(doc.get("spent_month_usd", 0.0)),
            reserved={rid: (float(v[0]), int(v[1])) for rid, v in dict(doc.get("reserved", {})).items()},
        )


def _gcra(tat_ms: float, at_ms: int, per_minute: float, amount: float) -> tuple[float, int | None]:
    """(new TAT, None) if `amount` fits a limit of `per_minute` now, else (old TAT, ms to wait).
    A full minute's allowance may go at once; after that one unit every 60/limit s."""
    interval_ms = 60_000.0 / per_minute
    new_tat = max(tat_ms, at_ms) + interval_ms * amount
    over = new_tat - at_ms - 60_000.0
    if over <= 0:
        return new_tat, None
    return tat_ms, max(1, math.ceil(over))


def admit(
    state: TenantState,
    limits: TenantLimits,
    *,
    request_id: str,
    tokens: int,
    estimate_usd: float,
    at_ms: int,
    reservation_ttl_ms: int,
    global_limits: GlobalLimits | None = None,
    global_spent: tuple[float, float] | None = None,  # (today, this month) over all tenants, reserved included
) -> Verdict:
    """Rates first, then budgets; the state changes only when the request is admitted."""
    state.roll(at_ms)
    state.expire(at_ms)
    if request_id in state.reserved:  # a replay of one already admitted: admitted again, counted once
        return Verdict(True, reserved_usd=state.reserved[request_id][0])
    request_tat, token_tat = state.request_tat_ms, state.token_tat_ms
    if limits.requests_per_minute is not None:
        request_tat, wait = _gcra(request_tat, at_ms, limits.requests_per_minute, 1)
        if wait is not None:
            return Verdict(False, RATE_LIMITED, f"over {limits.requests_per_minute:g} requests per minute", wait)
    if limits.tokens_per_minute is not None:
        if tokens > limits.tokens_per_minute:
            return Verdict(
                False,
                RATE_LIMITED,
                f"{tokens} tokens is more than the whole {limits.tokens_per_minute:g} tokens per minute",
            )
        token_tat, wait = _gcra(token_tat, at_ms, limits.tokens_per_minute, tokens)
        if wait is not None:
            return Verdict(False, RATE_LIMITED, f"over {limits.tokens_per_minute:g} tokens per minute", wait)
    held = state.reserved_usd
    for name, budget, settled, spent, later_ms in (
        ("daily", limits.daily_usd, state.spent_day_usd, state.spent_day_usd + held, _next_day_ms(at_ms)),
        ("monthly", limits.monthly_usd, state.spent_month_usd, state.spent_month_usd + held, _next_month_ms(at_ms)),
        ("global daily", global_limits.daily_usd if global_limits else None, None, (global_spent or (0, 0))[0], None),
        (
            "global monthly",
            global_limits.monthly_usd if global_limits else None,
            None,
            (global_spent or (0, 0))[1],
            None,
        ),
    ):
        if budget is None or spent + estimate_usd <= budget:
            continue
        if settled is not None and later_ms is not None and settled + estimate_usd > budget:
            retry = later_ms - at_ms  # spent for good: the next day (month) starts afresh
        else:
            retry = SETTLE_RETRY_MS  # reservations hold it: settling usually frees some within a second
        return Verdict(
            False,
            BUDGET_EXHAUSTED,
            f"{name} budget of {budget:g} USD: {spent:.6g} spent or reserved, this request needs {estimate_usd:.3g}",
            retry,
        )
    state.request_tat_ms, state.token_tat_ms = request_tat, token_tat
    state.hold(request_id, estimate_usd, at_ms + reservation_ttl_ms)
    return Verdict(True, reserved_usd=estimate_usd)
