"""Where the local stack keeps its state and which ports it listens on."""

from __future__ import annotations

from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field, model_validator


def _setting(field: str) -> str:
    """The environment name of a StackConfig field, for error messages."""
    return f"SLUICE_{field.upper()}"


class StackConfig(BaseModel):
    """Where the local stack keeps its state and which ports it listens on."""

    model_config = ConfigDict(frozen=True, extra="ignore")

    state_dir: Path = Field(Path(".sluice"), description="Folder for the local stack's jars, data, logs and pid files.")
    kafka_port: int = Field(
        9092,
        ge=1,
        le=65535,
        description="Port of the local Kafka broker's client listener on 127.0.0.1 (PLAINTEXT; SASL_SSL with SLUICE_STACK_SECURE).",
    )
    kafka_controller_port: int = Field(
        9093, ge=1, le=65535, description="Port of the local Kafka broker's KRaft controller listener on 127.0.0.1."
    )
    redis_port: int = Field(6379, ge=1, le=65535, description="Port of the local redis-server on 127.0.0.1.")
    kafka_heap_mb: int = Field(
        1024,
        ge=128,
        le=65536,
        description="Java heap of the local Kafka broker, in MiB, reserved at start as Kafka's own scripts do.",
    )
    kafka_gc: str = Field(
        "parallel",
        pattern="^(parallel|g1)$",
        description="Garbage collector of the local Kafka broker: parallel (short young pauses, rare full collections) or g1 (Kafka's own scripts' choice, with more frequent pauses).",
    )
    kafka_jvm_options: str = Field(
        "", description="Extra JVM options of the local Kafka broker, space-separated (e.g. -XX:TieredStopAtLevel=1)."
    )
    stack_sched_slice_us: int = Field(
        100,
        ge=0,
        le=100_000,
        description="CPU time slice (Linux 6.12+) that `sluice up` asks for every thread of the local broker and redis-server, in µs, so they preempt the model's compute as they wake; 0 leaves them as they are.",
    )
    stack_secure: bool = Field(
        False,
        description="`sluice up` starts Kafka with only a SASL_SSL listener (SCRAM users, ACLs) and Redis with an ACL user and password, secrets under STATE_DIR/secrets/ (`sluice up --secure` sets it).",
    )
    stack_start_timeout_s: float = Field(
        90.0, gt=0, le=3600, description="Seconds to wait for each service of the local stack to answer after start."
    )

    @model_validator(mode="after")
    def _ports_distinct(self) -> StackConfig:
        ports = {
            "kafka_port": self.kafka_port,
            "kafka_controller_port": self.kafka_controller_port,
            "redis_port": self.redis_port,
        }
        seen: dict[int, str] = {}
        for field, port in ports.items():
            if port in seen:
                raise ValueError(f"{_setting(field)} and {_setting(seen[port])} must differ (both are {port})")
            seen[port] = field
        return self
