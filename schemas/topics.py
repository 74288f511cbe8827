"""Topic names and the Kafka connection every component shares."""

from __future__ import annotations

import re
import ssl
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, SecretStr, field_validator, model_validator

_TOPIC_CHARS = set("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789._-")


def check_topic_name(name: str) -> str:
    """Kafka's own rule: 1-249 characters of [a-zA-Z0-9._-]."""
    if not name or len(name) > 249 or set(name) - _TOPIC_CHARS or name in (".", ".."):
        raise ValueError(f"{name!r} is not a valid Kafka topic name ([a-zA-Z0-9._-], 1-249 chars)")
    return name


def secret_from_file(path: Path, setting: str) -> SecretStr:
    """A secret's file's first line (a mounted Kubernetes secret, a file of
    `sluice up --secure`), so the secret never sits in an environment."""
    try:
        lines = path.read_text().splitlines()
    except OSError as exc:
        raise ValueError(f"{setting}: cannot read it ({exc.strerror})") from None
    return SecretStr(lines[0] if lines else "")


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

    kafka_security_protocol: Literal["PLAINTEXT", "SSL", "SASL_PLAINTEXT", "SASL_SSL"] = Field(
        "PLAINTEXT",
        description="How every Kafka client of Sluice talks to the broker: PLAINTEXT, SSL, SASL_PLAINTEXT or SASL_SSL (`sluice up --secure` makes a SASL_SSL broker).",
    )
    kafka_sasl_mechanism: Literal["SCRAM-SHA-512", "SCRAM-SHA-256", "PLAIN"] = Field(
        "SCRAM-SHA-512", description="SASL mechanism of the Kafka clients when the protocol is SASL_*."
    )
    kafka_sasl_username: str = Field("", description="SASL user (the Kafka principal User:NAME) of the Kafka clients.")
    kafka_sasl_password: SecretStr = Field(
        SecretStr(""),
        description="SASL password of the Kafka clients; prefer SLUICE_KAFKA_SASL_PASSWORD_FILE. Never printed.",
    )
    kafka_sasl_password_file: Path | None = Field(
        None, description="File whose first line is the SASL password (read at start; wins over the variable)."
    )
    kafka_ssl_cafile: Path | None = Field(
        None, description="PEM file of the CA that signed the broker's certificate; unset trusts the system's CAs."
    )
    kafka_ssl_check_hostname: bool = Field(
        True, description="Check that the broker's certificate names the host connected to (off only for tests)."
    )
    delivery: Literal["at-least-once", "exactly-once"] = Field(
        "at-least-once",
        description="Delivery mode of the workers: at-least-once (a crash may repeat a result) or exactly-once (results, telemetry and offsets in one Kafka transaction per round; clients read read_committed).",
    )
    tenant: str = Field(
        "default",
        description="Tenant the client, `sluice produce`, `subscribe` and `loadtest` speak for; with SLUICE_TENANT_TOPICS they write PREFIX.requests.TENANT and read PREFIX.results.TENANT.",
    )
    tenant_topics: bool = Field(
        False,
        description="Each tenant writes PREFIX.requests.TENANT and reads PREFIX.results.TENANT, so broker ACLs can hold tenants apart; workers take the tenant from the topic.",
    )

    @field_validator("topic_prefix")
    @classmethod
    def _prefix_is_a_topic_name(cls, v: str) -> str:
        return check_topic_name(v)

    @field_validator("tenant")
    @classmethod
    def _tenant_names_a_topic(cls, v: str) -> str:
        check_topic_name(v)
        return v

    @model_validator(mode="after")
    def _credentials_complete(self) -> KafkaConfig:
        if self.kafka_sasl_password_file is not None:
            secret = secret_from_file(self.kafka_sasl_password_file, "SLUICE_KAFKA_SASL_PASSWORD_FILE")
            object.__setattr__(self, "kafka_sasl_password", secret)
        sasl = self.kafka_security_protocol.startswith("SASL")
        if sasl and not (self.kafka_sasl_username and self.kafka_sasl_password.get_secret_value()):
            raise ValueError(
                f"SLUICE_KAFKA_SECURITY_PROTOCOL={self.kafka_security_protocol} needs SLUICE_KAFKA_SASL_USERNAME "
                "and a password (SLUICE_KAFKA_SASL_PASSWORD_FILE or SLUICE_KAFKA_SASL_PASSWORD)"
            )
        if self.kafka_ssl_cafile is not None and not self.kafka_ssl_cafile.is_file():
            raise ValueError(f"SLUICE_KAFKA_SSL_CAFILE: no such file {self.kafka_ssl_cafile}")
        return self

    @classmethod
    def of(cls, kafka: str | KafkaConfig) -> KafkaConfig:
        """A connection from bootstrap servers alone (plaintext) or a config as it is."""
        return kafka if isinstance(kafka, KafkaConfig) else cls(bootstrap_servers=kafka)

    @property
    def exactly_once(self) -> bool:
        return self.delivery == "exactly-once"

    def rdkafka(self) -> dict[str, Any]:
        """librdkafka (confluent-kafka) options that reach the broker: servers and security."""
        conf: dict[str, Any] = {
            "bootstrap.servers": self.bootstrap_servers,
            "security.protocol": self.kafka_security_protocol,
        }
        if self.kafka_security_protocol.startswith("SASL"):
            conf["sasl.mechanism"] = self.kafka_sasl_mechanism
            conf["sasl.username"] = self.kafka_sasl_username
            conf["sasl.password"] = self.kafka_sasl_password.get_secret_value()
        if self.kafka_security_protocol in ("SSL", "SASL_SSL"):
            if self.kafka_ssl_cafile is not None:
                conf["ssl.ca.location"] = str(self.kafka_ssl_cafile)
            conf["ssl.endpoint.identification.algorithm"] = "https" if self.kafka_ssl_check_hostname else "none"
        return conf

    def aiokafka(self) -> dict[str, Any]:
        """aiokafka keyword arguments that reach the broker: servers and security."""
        kw: dict[str, Any] = {
            "bootstrap_servers": self.bootstrap_servers,
            "security_protocol": self.kafka_security_protocol,
        }
        if self.kafka_security_protocol.startswith("SASL"):
            kw["sasl_mechanism"] = self.kafka_sasl_mechanism
            kw["sasl_plain_username"] = self.kafka_sasl_username
            kw["sasl_plain_password"] = self.kafka_sasl_password.get_secret_value()
        if self.kafka_security_protocol in ("SSL", "SASL_SSL"):
            context = ssl.create_default_context(
                cafile=str(self.kafka_ssl_cafile) if self.kafka_ssl_cafile is not None else None
            )
            context.check_hostname = self.kafka_ssl_check_hostname
            kw["ssl_context"] = context
        return kw

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

    # Tenant-topic mode: a topic pair per tenant, so that broker ACLs can
    # let each tenant's principal write and read only its own.
    def tenant_requests(self, tenant: str) -> str:
        return check_topic_name(f"{self.requests}.{tenant}")

    def tenant_results(self, tenant: str) -> str:
        return check_topic_name(f"{self.results}.{tenant}")

    @property
    def tenant_requests_pattern(self) -> str:
        """librdkafka's subscription regex for every tenant's requests topic."""
        return "^" + re.escape(self.requests + ".") + ".+$"

    def replies(self, owner: str) -> str:
        """A reply topic of one gateway instance or client: it reads only its own results."""
        return check_topic_name(f"{self.prefix}.replies.{owner}")

    def tenant_of(self, requests_topic: str) -> str | None:
        """The tenant whose requests topic this is, or None."""
        head = self.requests + "."
        return requests_topic[len(head) :] or None if requests_topic.startswith(head) else None

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
