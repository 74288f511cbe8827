"""The worker's settings: frozen, validated at start, units in their names."""

from __future__ import annotations

import os
import socket
from pathlib import Path

from pydantic import Field, model_validator

from schemas.records import Limits
from schemas.topics import KafkaConfig


def _default_worker_id() -> str:
    return f"{socket.gethostname()}-{os.getpid()}"


class WorkerConfig(KafkaConfig, Limits):
    group_id: str = Field("sluice-workers", description="Consumer group of the inference workers.")
    worker_id: str = Field(default_factory=_default_worker_id,
                           description="Name this worker puts in results and telemetry.")
    default_model: str = Field("all-minilm-l6-v2-sq8",
                               description="Model used when a request names none (all-minilm-l6-v2-sq8 is made by `sluice model build`).")
    models_dir: tuple[Path, ...] = Field(
        (), description="Extra folders of models (subfolders with card.json, model.onnx, tokenizer.json).")
    batch_max_items: int = Field(64, ge=1, le=100_000, description="Most records in one partition batch.")
    batch_max_tokens: int = Field(8192, ge=8, description="Token budget of one partition batch.")
    batch_max_wait_ms: float = Field(5.0, ge=0, le=60_000,
                                     description="Longest a partition batch waits for more records, from its first.")
    group_max_items: int = Field(512, ge=1,
                                 description="Most records handed to the model process at once (batches of several partitions).")
    max_pending_items: int = Field(4096, ge=1,
                                   description="Records read and not yet answered (waiting for a batch or the model); past this the worker stops fetching and the backlog waits in Kafka.")
    max_uncommitted_items: int = Field(50_000, ge=1,
                                       description="Records read and not yet committed (cache hits answered while older misses still run count here); bounds the worker's memory.")
    answer_l1_at_intake: bool = Field(True, description="Answer in-process cache hits as soon as they are read, before the partition batch window; they are still committed in offset order with their batch.")
    inference_token_budget: int = Field(2048, ge=8,
                                        description="Padded tokens (rows x longest) of one ONNX Runtime call.")
    inference_max_items: int = Field(64, ge=1, description="Most rows of one ONNX Runtime call, and of one piece of a model hand-off: a hand-off is computed piece by piece, and each piece's answers (with those of the requests that waited on its inputs) leave as soon as it is done.")
    ort_intra_op_threads: int = Field(0, ge=0, description="ONNX Runtime threads; 0 = one per core, less one for the event loop when there are few cores.")
    ort_provider: str = Field("auto", pattern="^(auto|cpu|cuda)$",
                              description="auto (CUDA when onnxruntime-gpu sees a GPU, else CPU), cpu or cuda.")
    model_nice: int = Field(0, ge=0, le=19, description="Scheduling niceness of the model process (Linux), which runs in a session of its own: under autogroups a niceness counts only within a session, so above 0 it yields to every process on the machine (the broker's and the clients' threads that carry hits too). When cores are short, hits then go first and misses take what is left: on 2 shared cores, cold Zipf runs at 1,000/s, 19 gave about the same hit p99 as 0 and 2-3x the miss latency (bench/RESULTS.md, session 12). 0 shares the cores equally.")
    sched_slice_us: int = Field(100, ge=0, le=100_000, description="CPU time slice (Linux 6.12+) asked for the worker's threads (not its model process), µs: when cores are short, its threads preempt the model's compute as they wake instead of waiting out a default slice (1.4 ms on 2 cores, up to 3 ms on more); their share of the CPU does not change. 0 keeps the kernel's default. `sluice loadtest` and `sluice demo` ask the same for their load generator.")
    ort_allow_spinning: bool = Field(False, description="Let ONNX Runtime threads spin between calls (faster on idle dedicated cores, slower when cores are shared).")
    publish_linger_ms: int = Field(2, ge=0, le=1000,
                                   description="How long the result producers wait to fill a batch: fewer, larger produce requests (0 takes ~3 ms off a hit's latency but, at thousands of results a second, a request per record costs the worker and the broker far more CPU).")
    publish_slice_gap_ms: float = Field(8.0, ge=0, le=1000, description="Pause after every 64 answers sent at once (a model piece's misses and the requests that waited on them, or a publish round), ms: hundreds of answers reach the broker and the clients spread out instead of in one burst that the hits in flight wait behind (2-core machine, cold Zipf at 1,000/s: see bench/RESULTS.md, session 12). A burst of 1,000 takes 15 pauses; 0 sends a burst at once.")
    publish_max_items: int = Field(50_000, ge=1,
                                   description="Most results one publish round carries (groups ready together share one wait for acks and one commit); 1 publishes and commits record by record.")
    publish_compression: str = Field("none", pattern="^(none|gzip|snappy|lz4|zstd)$",
                                     description="Compression of results and telemetry (done by librdkafka).")
    fetch_max_records: int = Field(1000, ge=1, description="Most records fetched ahead of the worker (held between the consumer thread and the event loop); past it the consumer pauses fetching.")
    fetch_timeout_ms: int = Field(100, ge=1, description="Longest the fetch stage waits for records when no batch is due.")
    fetch_max_wait_ms: int = Field(5, ge=0, le=10_000,
                                   description="Longest the broker holds a fetch for SLUICE_FETCH_MIN_BYTES to gather: a request waits up to this long more, and the broker answers one fetch per this long instead of one per record or two (at 1,000 requests/s, 5 cut the CPU per request by a fifth: bench/RESULTS.md).")
    fetch_min_bytes: int = Field(65536, ge=1, description="Bytes the broker gathers before it answers a fetch (or SLUICE_FETCH_MAX_WAIT_MS passes); 1 answers at once.")
    session_timeout_ms: int = Field(10_000, ge=1000, description="Kafka consumer group session timeout.")
    drain_timeout_s: float = Field(30.0, gt=0,
                                   description="On stop or revoke, how long to wait for batches in flight.")
    price_per_compute_hour_usd: float | None = Field(
        None, ge=0, description="Instance price used for cost_usd; default: the model card's.")
    redis_url: str = Field("redis://127.0.0.1:6379/0",
                           description="Redis for the shared L2 cache; empty turns L2 off.")
    redis_timeout_ms: float = Field(50.0, gt=0, le=10_000,
                                    description="Budget of one Redis call (an MGET, or one write-back script call of up to 128 keys); past it the batch goes on without L2.")
    redis_backoff_max_s: float = Field(5.0, gt=0,
                                       description="Longest pause before retrying Redis after a failure (doubles from 0.1 s).")
    l1_max_bytes: int = Field(128 << 20, ge=0, description="Memory bound of the in-process L1 cache (value bytes); 0 turns L1 off.")
    l1_ttl_s: float = Field(3600.0, gt=0, description="Lifetime of an L1 entry.")
    l2_ttl_s: int = Field(86400, ge=1, description="Lifetime of a Redis (L2) entry.")
    shared_cache_models: tuple[str, ...] = Field(
        (), description="Models whose cache is shared by all tenants (JSON list); others are per tenant.")
    metrics_host: str = Field("127.0.0.1", description="Address of the /metrics, /healthz, /readyz server.")
    metrics_port: int = Field(9400, ge=0, le=65535,
                              description="Port of the metrics server; 0 picks a free port.")

    @model_validator(mode="after")
    def _budgets_agree(self) -> "WorkerConfig":
        if self.inference_token_budget > self.batch_max_tokens:
            raise ValueError(
                f"inference_token_budget ({self.inference_token_budget}) must not exceed "
                f"batch_max_tokens ({self.batch_max_tokens})")
        return self
