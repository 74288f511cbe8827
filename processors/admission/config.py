"""The admission stage's settings: frozen, validated at start, units in their names."""

from __future__ import annotations

from pydantic import Field, model_validator

from processors.config import WorkerConfig


class AdmissionConfig(WorkerConfig):
    """`sluice admission`: the workers' settings it shares (topics, their group,
    the models to count tokens with, the request limits), and its own."""

    admission_group_id: str = Field(
        "sluice-admission",
        description="Kafka consumer group of the admission stages; they split PREFIX.ingress's partitions, hence the tenants.",
    )
    admission_port: int = Field(
        9320,
        ge=0,
        le=65535,
        description="Port of the admission stage's /metrics, /healthz and /readyz (0: any free port).",
    )
    admission_host: str = Field("127.0.0.1", description="Address the admission stage's HTTP endpoint listens on.")
    admission_batch_max_records: int = Field(
        500,
        ge=1,
        description="Most ingress records the admission stage decides in one round before it publishes and commits.",
    )
    admission_overload_lag: int = Field(
        20_000,
        ge=1,
        description="Records waiting for the workers (their group's lag on PREFIX.requests) at which new requests are rejected as overloaded.",
    )
    admission_overload_resume_lag: int = Field(
        10_000,
        ge=0,
        description="Lag, in records, under which an overloaded stage admits again (below SLUICE_ADMISSION_OVERLOAD_LAG, so it does not flap).",
    )
    admission_lag_interval_s: float = Field(
        0.5, gt=0, description="Seconds between two readings of the workers' lag for overload protection."
    )
    admission_overload_retry_after_ms: int = Field(
        2000, ge=0, description="Retry-after, in ms, that an overloaded rejection carries."
    )
    admission_reservation_ttl_s: float = Field(
        600.0,
        gt=0,
        description="Seconds a budget reservation waits for its request's telemetry (the measured cost) before it is released.",
    )
    admission_usd_per_million_tokens: float | None = Field(
        None,
        ge=0,
        description="Price in USD per million tokens computed that budgets charge; unset uses each model card's (0.02 for the built-in models).",
    )

    @model_validator(mode="after")
    def _resume_below_overload(self) -> AdmissionConfig:
        if self.admission_overload_resume_lag >= self.admission_overload_lag:
            raise ValueError(
                f"SLUICE_ADMISSION_OVERLOAD_RESUME_LAG={self.admission_overload_resume_lag} must be below "
                f"SLUICE_ADMISSION_OVERLOAD_LAG={self.admission_overload_lag}, or overload would flap"
            )
        return self
