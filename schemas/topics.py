"""Topic names and the Kafka connection every component shares."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field, field_validator

_TOPIC_CHARS = set("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789._-")


def check_topic_name(name: str) -> str:
    """Kafka's own rule: 1-249 characters of [a-zA-Z0-9._-]."""
    if not name or len(name) > 249 or set(name) - _TOPIC_CHARS or name in (".", ".."):
        raise ValueError(f"{name!r} is not a valid Kafka topic name ([a-zA-Z0-9._-], 1-249 chars)")
    return name


class KafkaConfig(BaseModel):
    """Where the broker is and how topics are named; shared by all parts."""

    model_config = ConfigDict(frozen=True, extra="ignore")

    bootstrap_servers: str = Field(
        "127.0.0.1:9092", description="Kafka bootstrap servers, as comma-separated host:port pairs."
    )
    topic_prefix: str = Field(
        "sluice",
        description="Prefix of every topic name (PREFIX.requests, PREFIX.results, PREFIX.telemetry, PREFIX.dlq, PREFIX.autoscale, and with admission PREFIX.ingress, PREFIX.control, PREFIX.admission-state).",
    )
    admission: bool = Field(
        False,
        description="Producers (the client, `sluice produce`, `sluice loadtest`) write to PREFIX.ingress keyed by tenant, for `sluice admission` to let through; off: straight to PREFIX.requests.",
    )

    @field_validator("topic_prefix")
    @classmethod
    def _prefix_is_a_topic_name(cls, v: str) -> str:
        return check_topic_name(v)

    @property
    def topics(self) -> Topics:
        return Topics(self.topic_prefix)


class Topics:
    """The topics of the contract, under one prefix."""

    __slots__ = (
        "prefix",
        "requests",
        "results",
        "telemetry",
        "dlq",
        "autoscale",
        "ingress",
        "control",
        "admission_state",
    )

    def __init__(self, prefix: str = "sluice") -> None:
        check_topic_name(prefix)
        self.prefix = prefix
        self.requests = f"{prefix}.requests"
        self.results = f"{prefix}.results"
        self.telemetry = f"{prefix}.telemetry"
        self.dlq = f"{prefix}.dlq"
        self.autoscale = f"{prefix}.autoscale"  # the autoscaler's decisions
        self.ingress = f"{prefix}.ingress"  # requests before admission, keyed by tenant
        self.control = f"{prefix}.control"  # tenants' limits, the kill switch (compacted)
        self.admission_state = f"{prefix}.admission-state"  # the admission stage's counters (compacted)

    def partitions(
        self, requests: int = 12, results: int = 12, telemetry: int = 3, dlq: int = 1, ingress: int = 6
    ) -> dict[str, int]:
        """Topic -> partition count, as `sluice up` creates them."""
        return {
            self.requests: requests,
            self.results: results,
            self.telemetry: telemetry,
            self.dlq: dlq,
            self.autoscale: 1,  # a few records a minute, kept in order
            self.ingress: ingress,
            self.control: 1,  # a handful of keys, read whole by every reader
            self.admission_state: ingress,  # partition p holds the counters of ingress partition p's tenants
        }

    def configs(self) -> dict[str, dict[str, str]]:
        """Topic -> its own configs: the state topics keep the latest record per key."""
        return {self.control: {"cleanup.policy": "compact"}, self.admission_state: {"cleanup.policy": "compact"}}
