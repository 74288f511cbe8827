"""The contract: records, topic names, keys, ClickHouse DDL. Imports nothing of ours."""

from schemas.errors import ConfigError, ModelError, RequestError, SluiceError, error_label
from schemas.keys import cache_key, normalise, partition_key
from schemas.records import (
    SCHEMA_VERSION,
    Limits,
    Request,
    Result,
    Telemetry,
    dlq_record,
    encode,
    now_ms,
    parse_request,
    result_doc,
    telemetry_doc,
)
from schemas.topics import KafkaConfig, Topics

__all__ = [
    "SCHEMA_VERSION",
    "ConfigError",
    "KafkaConfig",
    "Limits",
    "ModelError",
    "Request",
    "RequestError",
    "Result",
    "SluiceError",
    "Telemetry",
    "Topics",
    "cache_key",
    "dlq_record",
    "encode",
    "error_label",
    "normalise",
    "now_ms",
    "parse_request",
    "partition_key",
    "result_doc",
    "telemetry_doc",
]
