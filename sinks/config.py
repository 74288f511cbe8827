"""The sink's settings: frozen, validated at start, units in their names.

Merged into the flat `sluice.settings.Settings` (env SLUICE_<NAME>); the sink
itself only sees this model, so `sinks/` never imports the control plane.
"""

from __future__ import annotations

import ipaddress
from pathlib import Path

from pydantic import Field, SecretStr, field_validator, model_validator

from schemas.topics import KafkaConfig
from sinks.query_guard import QueryBudget


class SinkConfig(KafkaConfig):
    sink_group_id: str = Field(
        "sluice-sink",
        min_length=1,
        max_length=255,
        description="Consumer group of the ClickHouse sink, which reads PREFIX.telemetry.",
    )
    clickhouse_url: str = Field(
        "",
        max_length=2048,
        description="ClickHouse server URL, e.g. http://user:pass@host:8123/; empty uses the embedded chDB database in SLUICE_CHDB_PATH.",
    )
    clickhouse_database: str = Field(
        "sluice",
        min_length=1,
        max_length=64,
        pattern=r"^[A-Za-z_][A-Za-z0-9_]*$",
        description="ClickHouse database that holds the telemetry table and its rollups.",
    )
    chdb_path: Path = Field(
        Path(".sluice/chdb"), description="Folder of the embedded chDB database, which one process owns at a time."
    )
    sink_batch_max_rows: int = Field(
        50_000,
        ge=1,
        le=10_000_000,
        description="Telemetry rows buffered (all partitions) at which the sink inserts them into ClickHouse.",
    )
    sink_batch_max_s: float = Field(
        1.0,
        gt=0,
        le=3600,
        description="Seconds after a batch's first record at which the sink inserts it at the latest.",
    )
    telemetry_ttl_days: int = Field(
        30, ge=1, le=36_500, description="Days raw telemetry and the per-minute rollups are kept (table TTL)."
    )
    sink_retry_max_s: float = Field(
        30.0,
        gt=0,
        le=3600,
        description="Longest wait between retries of a failed insert, in seconds (exponential backoff; nothing is committed meanwhile).",
    )
    sink_port: int = Field(
        9401,
        ge=0,
        le=65535,
        description="HTTP port of the sink's /metrics, /healthz, /readyz and POST /query; 0 picks a free port.",
    )
    sink_host: str = Field(
        "127.0.0.1",
        min_length=1,
        description="Address the sink's HTTP server listens on; any but a loopback address needs SLUICE_SINK_QUERY_TOKEN.",
    )
    sink_query_token: SecretStr = Field(
        SecretStr(""),
        description="Bearer token that POST /query requires when set; it must be set when SLUICE_SINK_HOST is not a loopback address.",
    )
    sink_query_timeout_s: float = Field(
        10.0, gt=0, le=3600, description="Seconds one user query may run before ClickHouse stops it."
    )
    sink_query_max_rows_to_read: int = Field(
        500_000_000, ge=1, description="Rows one user query may read; past it the query fails."
    )
    sink_query_max_bytes_to_read: int = Field(
        8 << 30, ge=1, description="Bytes one user query may read; past it the query fails."
    )
    sink_query_max_memory_bytes: int = Field(
        1 << 30, ge=1 << 20, description="Memory one user query may use, in bytes; past it the query fails."
    )
    sink_query_max_result_rows: int = Field(
        100_000, ge=1, description="Rows one user query may return; past it the query fails."
    )
    sink_query_max_threads: int = Field(
        1, ge=1, le=256, description="Threads one user query may use, so a scan leaves cores to the inserts."
    )
    sink_query_concurrency: int = Field(
        2, ge=1, le=64, description="User queries the sink runs at once; one more is answered 429 with Retry-After."
    )

    @model_validator(mode="after")
    def _remote_query_needs_a_token(self) -> SinkConfig:
        if not _is_loopback(self.sink_host) and not self.sink_query_token.get_secret_value():
            raise ValueError(
                f"SLUICE_SINK_HOST={self.sink_host!r} is not a loopback address: "
                "set SLUICE_SINK_QUERY_TOKEN so POST /query asks for it"
            )
        return self

    def query_budget(self) -> QueryBudget:
        return QueryBudget(
            max_execution_s=self.sink_query_timeout_s,
            max_rows_to_read=self.sink_query_max_rows_to_read,
            max_bytes_to_read=self.sink_query_max_bytes_to_read,
            max_memory_bytes=self.sink_query_max_memory_bytes,
            max_result_rows=self.sink_query_max_result_rows,
            max_threads=self.sink_query_max_threads,
        )

    @field_validator("clickhouse_url")
    @classmethod
    def _url_is_http(cls, v: str) -> str:
        v = v.strip()
        if v and not v.startswith(("http://", "https://", "clickhouse://", "clickhouses://")):
            raise ValueError("must be empty (embedded chDB) or a URL such as http://user:pass@host:8123/")
        return v

    @property
    def embedded(self) -> bool:
        return not self.clickhouse_url


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False
