"""What the autoscaler reads: the group's lag from the broker, answers from the analytics store.

Arrivals are counted at the broker (the requests topic's end offsets, see
policy.ArrivalRate), not from telemetry: telemetry only sees what workers have
answered, and with the fleet at zero it sees nothing at all, which is
exactly when the first arrivals must wake it.
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass

from schemas.service.lag import BrokerSignals, GroupOffsets
from sinks.analytics import Runner, run

__all__ = ["AnalyticsSignals", "BrokerSignals", "GroupOffsets", "ServiceReading"]

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class ServiceReading:
    answered_rps: float  # all workers together, over the window asked for
    workers: int  # workers that answered anything in it
    hit_rate: float
    model_bound_rps: float | None  # answered per second of model busy time (None: no model time, all hits)


class AnalyticsSignals:
    """The `autoscale_signal` named query, through the running sink or a ClickHouse server."""

    def __init__(self, runner: Runner, database: str) -> None:
        self._runner = runner
        self.database = database

    async def read(self, window_s: float) -> ServiceReading:
        """The last `window_s` seconds of telemetry; raises SluiceError or OSError
        when the store does not answer."""
        cols, rows = await asyncio.to_thread(
            run, "autoscale_signal", self._runner, db=self.database, since_s=max(1, round(window_s))
        )
        got = [dict(zip(cols, r, strict=True)) for r in rows]
        answered = sum(int(g["answered"]) for g in got)
        hits = sum(float(g["hit_rate"]) * int(g["answered"]) for g in got)
        compute_s = sum(float(g["compute_s"]) for g in got)
        return ServiceReading(
            answered_rps=sum(float(g["answered_rps"]) for g in got),
            workers=len(got),
            hit_rate=hits / answered if answered else 0.0,
            model_bound_rps=answered / compute_s if compute_s > 0 else None,
        )
