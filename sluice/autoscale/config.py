"""The autoscaler's knobs: how often it looks, how fast it drains, how long it waits."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field, model_validator


class AutoscaleConfig(BaseModel):
    """How `sluice autoscale` sizes the worker fleet."""

    model_config = ConfigDict(frozen=True, extra="ignore")

    autoscale_interval_s: float = Field(
        10.0, gt=0, le=3600, description="Seconds between two decisions of `sluice autoscale`."
    )
    autoscale_target_drain_s: float = Field(
        60.0,
        gt=0,
        description="Seconds within which the autoscaler sizes the fleet to drain the current backlog (lag) on top of the arrivals.",
    )
    autoscale_target_utilization: float = Field(
        0.8,
        gt=0,
        le=1,
        description="Share of a worker's measured service rate the autoscaler plans to use (0-1]; lower leaves headroom for bursts.",
    )
    autoscale_lookback_s: float = Field(
        60.0,
        gt=0,
        description="Seconds of telemetry and broker offsets over which the arrival and service rates are measured.",
    )
    autoscale_scale_down_window_s: float = Field(
        300.0,
        ge=0,
        description="Seconds a lower worker count must be recommended throughout before the fleet shrinks to it.",
    )
    autoscale_scale_down_tolerance: float = Field(
        0.1,
        ge=0,
        le=1,
        description="Share by which the arrivals must fall below a smaller fleet's planned capacity before it is chosen (0.1: 10%), so a count on the threshold does not flap.",
    )
    autoscale_saturation_backlog_s: float = Field(
        0.5,
        gt=0,
        description="Seconds of arrivals waiting (lag / arrival rate) above which the fleet counts as saturated, and what it answers as its service rate.",
    )
    autoscale_idle_s: float = Field(
        900.0,
        gt=0,
        description="Seconds without arrivals and without lag before the fleet scales to zero (needs SLUICE_AUTOSCALE_MIN_WORKERS=0).",
    )
    autoscale_min_workers: int = Field(
        0, ge=0, description="Fewest workers the autoscaler keeps (0 allows scale to zero)."
    )
    autoscale_max_workers: int = Field(
        0,
        ge=0,
        description="Most workers the autoscaler asks for; 0 means the requests topic's partition count, which caps it anyway.",
    )
    autoscale_cold_start_s: float = Field(
        15.0,
        gt=0,
        description="Seconds from starting a worker to its first answer, assumed until the local actuator has measured one.",
    )
    autoscale_initial_service_rps: float = Field(
        100.0,
        gt=0,
        description="Requests per second one worker serves, assumed until telemetry has measured it.",
    )
    autoscale_stuck_ticks: int = Field(
        3,
        ge=2,
        description="Consecutive decisions in which a partition's lag grows while the others' does not before it is reported stuck.",
    )
    autoscale_port: int = Field(
        9310, ge=0, le=65535, description="Port of the autoscaler's /metrics, /healthz and /readyz (0: any free port)."
    )
    autoscale_host: str = Field("127.0.0.1", description="Address the autoscaler's HTTP endpoint listens on.")

    @model_validator(mode="after")
    def _consistent(self) -> AutoscaleConfig:
        if self.autoscale_max_workers and self.autoscale_min_workers > self.autoscale_max_workers:
            raise ValueError(
                f"SLUICE_AUTOSCALE_MIN_WORKERS={self.autoscale_min_workers} exceeds "
                f"SLUICE_AUTOSCALE_MAX_WORKERS={self.autoscale_max_workers}"
            )
        if self.autoscale_lookback_s < self.autoscale_interval_s:
            raise ValueError(
                f"SLUICE_AUTOSCALE_LOOKBACK_S={self.autoscale_lookback_s:g} is shorter than "
                f"SLUICE_AUTOSCALE_INTERVAL_S={self.autoscale_interval_s:g}: rates need at least one interval"
            )
        if self.autoscale_idle_s < self.autoscale_interval_s:
            raise ValueError(
                f"SLUICE_AUTOSCALE_IDLE_S={self.autoscale_idle_s:g} is shorter than "
                f"SLUICE_AUTOSCALE_INTERVAL_S={self.autoscale_interval_s:g}: idleness is seen once per interval"
            )
        return self
