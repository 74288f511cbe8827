"""Settings: every knob of every part, from SLUICE_* environment variables.

One flat, frozen object so an operator sees every name in one place
(docs/settings.md, a table per component); each part receives only its own
slice (WorkerConfig, SinkConfig, StackConfig, KafkaConfig), so nothing
downstream imports the control plane. A bad value
fails at start with one line naming the setting.
"""

from __future__ import annotations

import json
from typing import Any

from pydantic import Field, SecretStr, ValidationError, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from processors.admission.config import AdmissionConfig
from processors.config import WorkerConfig
from producers.gateway.config import GatewayConfig
from schemas.errors import ConfigError
from schemas.records import Limits
from schemas.topics import KafkaConfig
from sinks.config import SinkConfig
from sluice.autoscale.config import AutoscaleConfig
from sluice.stack import StackConfig

ENV_PREFIX = "SLUICE_"


class Settings(BaseSettings, AdmissionConfig, SinkConfig, StackConfig, AutoscaleConfig, GatewayConfig):
    model_config = SettingsConfigDict(env_prefix=ENV_PREFIX, frozen=True, extra="ignore")

    request_partitions: int = Field(
        12,
        ge=1,
        description="Partitions of PREFIX.requests that `sluice up` and `sluice topics` create, which caps how many workers can share the load.",
    )
    results_partitions: int = Field(
        12, ge=1, description="Partitions of PREFIX.results that `sluice up` and `sluice topics` create."
    )
    ingress_partitions: int = Field(
        6,
        ge=1,
        description="Partitions of PREFIX.ingress (and PREFIX.admission-state) that `sluice up` and `sluice topics` create, which caps how many admission stages share the tenants.",
    )
    topic_replication_factor: int = Field(
        1,
        ge=1,
        description="Replicas of each topic that `sluice up` and `sluice topics` create (a count): 1 for the one-broker local stack, 3 on a production cluster so a topic outlives a broker.",
    )
    topic_min_insync_replicas: int = Field(
        1,
        ge=1,
        description="The created topics' min.insync.replicas (a count, at most the replication factor): a write acknowledged by all replicas fails unless this many are in sync; 2 with 3 replicas in production.",
    )

    @model_validator(mode="after")
    def _insync_fits_replicas(self) -> Settings:
        if self.topic_min_insync_replicas > self.topic_replication_factor:
            raise ValueError(
                f"SLUICE_TOPIC_MIN_INSYNC_REPLICAS={self.topic_min_insync_replicas} exceeds "
                f"SLUICE_TOPIC_REPLICATION_FACTOR={self.topic_replication_factor}: every write would be refused"
            )
        return self

    @model_validator(mode="before")
    @classmethod
    def _endpoints_follow_ports(cls, data: Any) -> Any:
        # the local stack's ports decide the endpoints unless these are given
        if isinstance(data, dict):
            if not data.get("bootstrap_servers"):
                data["bootstrap_servers"] = f"127.0.0.1:{data.get('kafka_port', 9092)}"
            if not data.get("chdb_path"):
                data["chdb_path"] = f"{data.get('state_dir', '.sluice')}/chdb"
            if data.get("redis_url") is None:
                data["redis_url"] = f"redis://127.0.0.1:{data.get('redis_port', 6379)}/0"
        return data

    def kafka(self) -> KafkaConfig:
        return KafkaConfig.model_validate(self.model_dump(include=set(KafkaConfig.model_fields)))

    def worker(self, **overrides: Any) -> WorkerConfig:
        fields = self.model_dump(include=set(WorkerConfig.model_fields))
        built = self.state_dir / "models"  # `sluice model build`; SLUICE_MODELS_DIR entries override by name
        if built.is_dir():
            fields["models_dir"] = (built, *fields["models_dir"])
        return WorkerConfig.model_validate({**fields, **overrides})

    def admission_stage(self) -> AdmissionConfig:
        fields = self.worker().model_dump()
        fields.update(self.model_dump(include=set(AdmissionConfig.model_fields) - set(WorkerConfig.model_fields)))
        return AdmissionConfig.model_validate(fields)

    def gateway(self, **overrides: Any) -> GatewayConfig:
        fields = self.model_dump(include=set(GatewayConfig.model_fields))
        return GatewayConfig.model_validate({**fields, **overrides})

    def sink(self) -> SinkConfig:
        return SinkConfig.model_validate(self.model_dump(include=set(SinkConfig.model_fields)))

    def autoscale(self) -> AutoscaleConfig:
        return AutoscaleConfig.model_validate(self.model_dump(include=set(AutoscaleConfig.model_fields)))

    def stack(self) -> StackConfig:
        return StackConfig.model_validate(self.model_dump(include=set(StackConfig.model_fields)))

    def topic_partitions(self) -> dict[str, int]:
        return self.topics.partitions(
            requests=self.request_partitions, results=self.results_partitions, ingress=self.ingress_partitions
        )

    def topic_replication(self) -> dict[str, Any]:
        """ensure_topics' replication and per-topic config keywords."""
        return {
            "replication_factor": self.topic_replication_factor,
            "min_insync_replicas": self.topic_min_insync_replicas,
            "per_topic": self.topics.configs(),
        }


# The settings doc's groups, by the class that declares each field (a class's
# own annotations): a heading, the file that holds the fields, the class.
_GROUPS: tuple[tuple[str, str, type], ...] = (
    ("Kafka and topics", "schemas/topics.py", KafkaConfig),
    ("Topics that `sluice up` and `sluice topics` create", "sluice/settings.py", Settings),
    ("Worker", "processors/config.py", WorkerConfig),
    ("Worker: request limits", "schemas/records.py", Limits),
    ("Admission (rate limits, budgets, overload)", "processors/admission/config.py", AdmissionConfig),
    ("Sink (ClickHouse)", "sinks/config.py", SinkConfig),
    ("Local stack", "sluice/stack/config.py", StackConfig),
    ("Autoscaler", "sluice/autoscale/config.py", AutoscaleConfig),
    ("HTTP gateway", "producers/gateway/config.py", GatewayConfig),
)
SETTINGS_DOC = "docs/settings.md"


def _shown_default(f: Any) -> str:
    """The default as the table's cell: code, or "(unset)" for an empty or None default."""
    if f.default_factory is not None:
        return "`hostname-pid`"
    value = f.default
    if isinstance(value, SecretStr):
        value = value.get_secret_value()
    if isinstance(value, tuple):
        return f"`{json.dumps(list(value))}`"
    if value is None or value == "":
        return "(unset)"
    return f"`{value}`"


def settings_table() -> str:
    """Every setting, a table per component, made from the code so the doc and the code agree."""
    seen: set[str] = set()
    parts = []
    for title, source, cls in _GROUPS:
        own = [n for n in cls.__dict__.get("__annotations__", {}) if n in Settings.model_fields]
        seen.update(own)
        rows = [f"### {title}", "", f"Declared in `{source}`.", "", "| setting | default | meaning |", "|---|---|---|"]
        for name in own:
            f = Settings.model_fields[name]
            rows.append(f"| `{ENV_PREFIX}{name.upper()}` | {_shown_default(f)} | {f.description or ''} |")
        parts.append("\n".join(rows))
    missing = [n for n in Settings.model_fields if n not in seen]
    if missing:  # a field declared on a class the groups do not name
        raise RuntimeError(f"settings_table: no group for {', '.join(missing)}")
    return "\n\n".join(parts)


def update_settings_doc(path: str = SETTINGS_DOC) -> None:
    """Rewrite the tables between the settings doc's markers."""
    with open(path) as f:
        text = f.read()
    head, rest = text.split("<!-- settings:begin -->", 1)
    _, tail = rest.split("<!-- settings:end -->", 1)
    with open(path, "w") as f:
        f.write(f"{head}<!-- settings:begin -->\n{settings_table()}\n<!-- settings:end -->{tail}")


def describe_error(exc: ValidationError) -> str:
    """The first problem as one line: SLUICE_NAME=value: what is wrong."""
    err = exc.errors()[0]
    name = str(err["loc"][0]) if err["loc"] else ""
    value = err.get("input")
    msg = err["msg"].removeprefix("Value error, ")
    if not name:  # a check across settings: its message names them
        return msg
    shown = "" if isinstance(value, dict) or value is None else f"={value!r}"
    return f"{ENV_PREFIX}{name.upper()}{shown}: {msg}"


def load_settings(**overrides: Any) -> Settings:
    try:
        return Settings(**overrides)
    except ValidationError as exc:
        raise ConfigError(describe_error(exc)) from None
