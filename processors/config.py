"""The worker's settings: frozen, validated at start, units in their names."""

from __future__ import annotations

import os
import socket
from pathlib import Path
from typing import Any

from pydantic import Field, SecretStr, model_validator

from schemas.records import Limits
from schemas.topics import KafkaConfig, secret_from_file


def _default_worker_id() -> str:
    return f"{socket.gethostname()}-{os.getpid()}"


class WorkerConfig(KafkaConfig, Limits):
    group_id: str = Field(
        "sluice-workers",
        description="Kafka consumer group of the inference workers; the workers in one group split the requests topic's partitions.",
    )
    worker_id: str = Field(
        default_factory=_default_worker_id,
        description="Name this worker writes into its results and telemetry (default: hostname-pid).",
    )
    default_model: str = Field(
        "all-minilm-l6-v2-sq8",
        description="Name of the model that serves a request naming none (`sluice model build` makes all-minilm-l6-v2-sq8).",
    )
    models_dir: tuple[Path, ...] = Field(
        (),
        description="Extra model folders, as a JSON list of paths, each holding one subfolder per model with card.json, model.onnx and tokenizer.json.",
    )
    batch_max_items: int = Field(
        64,
        ge=1,
        le=100_000,
        description="Most records in one partition batch; a batch this full goes to the cache lookup at once.",
    )
    batch_max_tokens: int = Field(
        8192,
        ge=8,
        description="Token budget of one partition batch, in estimated tokens (4 characters each); a record that would overflow it starts the next batch.",
    )
    batch_max_wait_ms: float = Field(
        5.0,
        ge=0,
        le=60_000,
        description="Longest a partition batch waits for more records, in ms from its first record; lower cuts latency, higher fills batches.",
    )
    group_max_items: int = Field(
        512,
        ge=1,
        description="Most records handed to the model process at once, gathered from the ready batches of several partitions.",
    )
    max_pending_items: int = Field(
        4096,
        ge=1,
        description="Records read and not yet answered past which the worker stops fetching, so the backlog waits in Kafka.",
    )
    max_uncommitted_items: int = Field(
        50_000,
        ge=1,
        description="Records read and not yet committed (early cache hits count until older misses finish) past which the worker stops fetching; it bounds the worker's memory.",
    )
    answer_l1_at_intake: bool = Field(
        True,
        description="When true, in-process (L1) cache hits are answered as soon as they are read, before the batch window, and still committed in offset order with their batch.",
    )
    inference_token_budget: int = Field(
        2048,
        ge=8,
        description="Padded tokens (rows x longest input) of one ONNX Runtime call, at most SLUICE_BATCH_MAX_TOKENS; misses are sorted by length and cut into calls of this size.",
    )
    inference_max_items: int = Field(
        64,
        ge=1,
        description="Most rows of one ONNX Runtime call and of one piece of a model hand-off; each piece's answers leave as soon as it is done.",
    )
    ort_intra_op_threads: int = Field(
        0,
        ge=0,
        description="ONNX Runtime threads of the model process; 0 means one per core, less one for the event loop when there are few cores.",
    )
    ort_provider: str = Field(
        "auto",
        pattern="^(auto|cpu|cuda)$",
        description="ONNX Runtime execution provider: auto (CUDA when onnxruntime-gpu sees a GPU, else CPU), cpu or cuda.",
    )
    model_nice: int = Field(
        0,
        ge=0,
        le=19,
        description="Scheduling niceness (0-19, Linux) of the model process, which runs in a session of its own: 0 shares the cores equally, higher makes the model yield to every other process, so hits go first and misses wait longer when cores are short.",
    )
    sched_slice_us: int = Field(
        100,
        ge=0,
        le=100_000,
        description="CPU time slice (Linux 6.12+) asked for the worker's threads, not its model process, in µs, so they preempt the model's compute as they wake when cores are short; 0 keeps the kernel's default.",
    )
    ort_allow_spinning: bool = Field(
        False,
        description="When true, ONNX Runtime threads spin between calls, which is faster on idle dedicated cores and slower on shared ones.",
    )
    publish_linger_ms: int = Field(
        2,
        ge=0,
        le=1000,
        description="How long the result producers wait to fill a batch, in ms; higher sends fewer, larger produce requests (less CPU), 0 sends at once (lower latency).",
    )
    publish_slice_gap_ms: float = Field(
        8.0,
        ge=0,
        le=1000,
        description="Pause after every 64 answers sent together, in ms, so a burst of hundreds of answers reaches the broker and the clients spread out instead of delaying the hits in flight; 0 sends a burst at once.",
    )
    publish_max_items: int = Field(
        50_000,
        ge=1,
        description="Most results one publish round carries (rounds ready together share one wait for acks and one commit); 1 publishes and commits record by record.",
    )
    transactional_id: str = Field(
        "",
        description="Transactional id of this worker under exactly-once; empty: GROUP-WORKER_ID. Keep it (and SLUICE_WORKER_ID) stable across restarts so a restarted worker fences its predecessor at once.",
    )
    transaction_timeout_ms: int = Field(
        10_000,
        ge=1000,
        le=900_000,
        description="Under exactly-once, how long the broker keeps a transaction its worker left open (a crash) before aborting it, in ms; read_committed readers of its partitions wait that long at most.",
    )
    publish_compression: str = Field(
        "none",
        pattern="^(none|gzip|snappy|lz4|zstd)$",
        description="Compression codec of results and telemetry, applied by librdkafka: none, gzip, snappy, lz4 or zstd.",
    )
    fetch_max_records: int = Field(
        1000,
        ge=1,
        description="Most records fetched ahead of the worker (held between the consumer thread and the event loop); past it the consumer pauses its partitions.",
    )
    fetch_timeout_ms: int = Field(
        100, ge=1, description="Longest the fetch stage waits for records when no batch is due, in ms."
    )
    fetch_max_wait_ms: int = Field(
        5,
        ge=0,
        le=10_000,
        description="Longest the broker holds a fetch for SLUICE_FETCH_MIN_BYTES to gather, in ms; higher adds up to that much latency and saves broker and worker CPU, 0 answers at once.",
    )
    fetch_min_bytes: int = Field(
        65536,
        ge=1,
        description="Bytes the broker gathers before it answers a fetch (or SLUICE_FETCH_MAX_WAIT_MS passes); 1 answers at once.",
    )
    session_timeout_ms: int = Field(
        10_000,
        ge=1000,
        description="Kafka consumer group session timeout, in ms; a worker silent this long loses its partitions to the others.",
    )
    drain_timeout_s: float = Field(
        30.0,
        gt=0,
        description="Seconds to wait, on stop or revoke, for the batches already with the model or the publisher to finish and commit.",
    )
    price_per_compute_hour_usd: float | None = Field(
        None,
        ge=0,
        description="Instance price in USD per compute-hour that each result's cost_usd is computed from; unset uses the model card's price.",
    )
    redis_url: str = Field(
        "redis://127.0.0.1:6379/0", description="Redis URL of the shared L2 cache; empty turns L2 off."
    )
    redis_username: str = Field(
        "", description="Redis ACL user of the L2 cache; empty uses the URL's or the default user."
    )
    redis_password: SecretStr = Field(
        SecretStr(""), description="Redis password of that user; prefer SLUICE_REDIS_PASSWORD_FILE. Never printed."
    )
    redis_password_file: Path | None = Field(
        None, description="File whose first line is the Redis password (read at start; wins over the variable)."
    )
    redis_ssl_cafile: Path | None = Field(
        None, description="PEM file of the CA that signed Redis's certificate, for a rediss:// URL (TLS)."
    )
    redis_timeout_ms: float = Field(
        50.0,
        gt=0,
        le=10_000,
        description="Budget of one Redis call (an MGET, or one write-back of up to 128 keys), in ms; past it the batch goes on without L2.",
    )
    redis_backoff_max_s: float = Field(
        5.0,
        gt=0,
        description="Longest pause before retrying Redis after a failure, in seconds (the pause doubles from 0.1 s, with L2 off meanwhile).",
    )
    l1_max_bytes: int = Field(
        128 << 20,
        ge=0,
        description="Memory bound of each worker's in-process L1 cache, in bytes of stored values; 0 turns L1 off.",
    )
    l1_ttl_s: float = Field(
        3600.0, gt=0, description="Lifetime of an L1 entry, in seconds; an older entry counts as a miss."
    )
    l2_ttl_s: int = Field(86400, ge=1, description="Lifetime of a Redis (L2) entry, in seconds.")
    shared_cache_models: tuple[str, ...] = Field(
        (),
        description="Models whose cache all tenants share, as a JSON list of names; every other model's cache is per tenant.",
    )
    metrics_host: str = Field(
        "127.0.0.1", description="Address the worker's /metrics, /healthz and /readyz server listens on."
    )
    metrics_port: int = Field(
        9400, ge=0, le=65535, description="Port of the worker's metrics server; 0 picks a free port."
    )

    @model_validator(mode="after")
    def _redis_password_from_file(self) -> WorkerConfig:
        if self.redis_password_file is not None:
            secret = secret_from_file(self.redis_password_file, "SLUICE_REDIS_PASSWORD_FILE")
            object.__setattr__(self, "redis_password", secret)
        if self.redis_ssl_cafile is not None and not self.redis_ssl_cafile.is_file():
            raise ValueError(f"SLUICE_REDIS_SSL_CAFILE: no such file {self.redis_ssl_cafile}")
        if "@" in self.redis_url.split("//", 1)[-1].split("/", 1)[0]:
            raise ValueError(
                "SLUICE_REDIS_URL holds credentials: give them as SLUICE_REDIS_USERNAME and SLUICE_REDIS_PASSWORD_FILE, "
                "so they stay out of logs and process listings"
            )
        return self

    def redis_options(self) -> dict[str, Any]:
        """redis-py connection keywords for the credentials and TLS settings."""
        options: dict[str, Any] = {}
        if self.redis_username:
            options["username"] = self.redis_username
        if self.redis_password.get_secret_value():
            options["password"] = self.redis_password.get_secret_value()
        if self.redis_ssl_cafile is not None:
            options["ssl_ca_certs"] = str(self.redis_ssl_cafile)
        return options

    @model_validator(mode="after")
    def _budgets_agree(self) -> WorkerConfig:
        if self.inference_token_budget > self.batch_max_tokens:
            raise ValueError(
                f"inference_token_budget ({self.inference_token_budget}) must not exceed "
                f"batch_max_tokens ({self.batch_max_tokens})"
            )
        return self
