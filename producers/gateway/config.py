"""The gateway's settings: frozen, validated at start, units in their names."""

from __future__ import annotations

from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field, model_validator

from producers.replies import default_owner


class GatewayConfig(BaseModel):
    model_config = ConfigDict(frozen=True, extra="ignore")

    gateway_host: str = Field("127.0.0.1", description="Address the gateway listens on (0.0.0.0 to serve other hosts).")
    gateway_port: int = Field(
        8080, ge=0, le=65535, description="Port of the gateway's HTTP API, /metrics, /healthz and /readyz."
    )
    gateway_id: str = Field(
        default_factory=default_owner,
        description="Name of this gateway instance; its reply topic is PREFIX.replies.ID (made at start, removed at a clean stop).",
    )
    gateway_api_keys_file: Path | None = Field(
        None,
        description="File of API keys, one `TENANT KEY` or `TENANT sha256:HEX` per line; a call's tenant is its key's.",
    )
    gateway_allow_anonymous: bool = Field(
        False,
        description="Serve calls without a known API key as tenant `default` (local trials only); off, such calls get 401.",
    )
    gateway_timeout_s: float = Field(
        30.0,
        gt=0,
        description="Longest a call waits for its results, in seconds; a client's shorter timeout (x-stainless-read-timeout or X-Timeout-Ms) wins and becomes the requests' deadline_ms.",
    )
    gateway_max_inputs: int = Field(
        2048, ge=1, description="Most inputs in one call; more get 413 (OpenAI's own cap is 2048)."
    )
    gateway_max_body_bytes: int = Field(
        8 << 20, ge=1024, description="Largest request body, in bytes; a larger one gets 413 before it is read whole."
    )
    gateway_max_in_flight: int = Field(
        10_000,
        ge=1,
        description="Inputs this gateway may have waiting for results; a call that would pass it gets 429 with Retry-After.",
    )
    gateway_backlog_limit: int = Field(
        20_000,
        ge=1,
        description="Records waiting for the workers (their group's lag on PREFIX.requests) at which new calls get 429 with Retry-After.",
    )
    gateway_backlog_resume: int = Field(
        10_000,
        ge=0,
        description="Lag, in records, under which a gateway that refused for backlog accepts again (below SLUICE_GATEWAY_BACKLOG_LIMIT, so it does not flap).",
    )
    gateway_lag_interval_s: float = Field(0.5, gt=0, description="Seconds between two readings of the workers' lag.")
    gateway_retry_after_s: float = Field(
        1.0,
        ge=0,
        description="Retry-After, in seconds, of a 429 or 503 when no better estimate is known (a backlog's is its excess over the measured drain rate).",
    )
    gateway_reply_partitions: int = Field(1, ge=1, description="Partitions of the gateway's reply topic.")
    gateway_reply_retention_ms: int = Field(
        3_600_000,
        ge=60_000,
        description="retention.ms of the reply topic: how long what a crashed gateway leaves behind stays.",
    )

    @model_validator(mode="after")
    def _resume_below_limit(self) -> GatewayConfig:
        if self.gateway_backlog_resume >= self.gateway_backlog_limit:
            raise ValueError(
                f"SLUICE_GATEWAY_BACKLOG_RESUME={self.gateway_backlog_resume} must be below "
                f"SLUICE_GATEWAY_BACKLOG_LIMIT={self.gateway_backlog_limit}, or the gateway would flap"
            )
        return self
