"""The sink's settings: frozen, validated at start, units in their names.

Merged into the flat `sluice.settings.Settings` (env SLUICE_<NAME>); the sink
itself only sees this model, so `sinks/` never imports the control plane.
"""

from __future__ import annotations

from pathlib import Path

from pydantic import Field, field_validator

from schemas.topics import KafkaConfig


class SinkConfig(KafkaConfig):
    sink_group_id: str = Field(
        "sluice-sink", min_length=1, max_length=255,
        description="Consumer group of the ClickHouse sink (reads PREFIX.telemetry).")
    clickhouse_url: str = Field(
        "", max_length=2048,
        description="ClickHouse server URL, e.g. http://user:pass@host:8123/ ; empty means the "
                    "embedded chDB database in SLUICE_CHDB_PATH.")
    clickhouse_database: str = Field(
        "sluice", min_length=1, max_length=64, pattern=r"^[A-Za-z_][A-Za-z0-9_]*$",
        description="Database that holds the telemetry table and its rollups.")
    chdb_path: Path = Field(
        Path(".sluice/chdb"),
        description="Folder of the embedded chDB database (one process owns it at a time).")
    sink_batch_max_rows: int = Field(
        50_000, ge=1, le=10_000_000,
        description="Insert when this many telemetry records are buffered (all partitions).")
    sink_batch_max_s: float = Field(
        1.0, gt=0, le=3600,
        description="Insert at the latest this many seconds after the batch's first record.")
    telemetry_ttl_days: int = Field(
        30, ge=1, le=36_500,
        description="Days raw telemetry and the per-minute rollups are kept (table TTL).")
    sink_retry_max_s: float = Field(
        30.0, gt=0, le=3600,
        description="Longest wait between retries of a failed insert (exponential backoff).")
    sink_port: int = Field(
        9401, ge=0, le=65535,
        description="HTTP port of the sink: /metrics, /healthz, /readyz, POST /query; 0 = a free port.")
    sink_host: str = Field(
        "127.0.0.1", min_length=1,
        description="Address the sink's HTTP server listens on.")

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
