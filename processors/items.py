"""What flows between the worker's stages: one Item per record, Groups of them.

An Item is made at intake and carries its outcome to the checkpoint. What a
stage may rely on is typed: `serve` is set only when the request can be
served (parsed, its model known, its task supported), and then holds the
request, the model's card and the cache key, none of them optional.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field

from processors.batching import PartitionBatch
from processors.runtime import ModelCard
from schemas.errors import RequestError
from schemas.records import Request


@dataclass(frozen=True, slots=True)
class Servable:
    """A request the worker can answer: its model exists and does its task."""

    request: Request
    model: ModelCard
    key_hash: str  # the cache key (tenant scope, model, task, params, input)
    est_tokens: int  # for the batch budget, before tokenising


@dataclass(slots=True, eq=False)
class Item:
    """One record on its way through the worker, and its outcome."""

    partition: int
    offset: int
    key: bytes | None
    raw: bytes | None
    sent_ms: int
    received_ms: int
    request: Request | None = None  # parsed; may still be refused (unknown model)
    error: RequestError | None = None
    serve: Servable | None = None
    tokens: int = 0  # after tokenising (misses only)
    truncated: bool = False  # the input ran past the model's max tokens
    # outcome
    status: str = "ok"
    cache: str = "none"
    leader: Item | None = None
    followers: list[Item] | None = None  # requests waiting on this one's computation
    dropped: bool = False  # left uncommitted for the partition's next owner
    cost_usd: float = 0.0
    compute_ms: float = 0.0  # its share (by tokens) of the model's busy time
    started_ms: int = 0
    cache_ms: float = 0.0
    inference_start_ms: int = 0
    inference_end_ms: int = 0
    batch_size: int = 0
    done_ms: int = 0
    out: bytes | None = None  # the serialised output: what the cache stores
    sent: asyncio.Future | None = None  # ack of the result, once sent
    topic: str | None = None  # where the result went

    @property
    def model(self) -> ModelCard | None:
        return self.serve.model if self.serve is not None else None

    @property
    def request_id(self) -> str | None:
        if self.request is not None:
            return self.request.id
        return self.error.request_id if self.error is not None else None

    def follow(self, lead: Item) -> None:
        """Take the outcome of the identical request that computed for this one."""
        self.status, self.out, self.error = lead.status, lead.out, lead.error
        self.inference_start_ms, self.inference_end_ms = lead.inference_start_ms, lead.inference_end_ms

    def reject(self, code: str, message: str) -> None:
        """Answered as `rejected` with `code`, without the model (the kill switch)."""
        self.status = "rejected"
        self.error = RequestError(message, code=code, request_id=self.request_id)

    def expire_if_due(self, now_ms: int) -> bool:
        """Mark the item expired if its deadline has passed; say whether it did."""
        req = self.request
        if req is None or req.deadline_ms is None or req.deadline_ms > now_ms:
            return False
        self.status = "expired"
        self.error = RequestError(
            f"deadline {req.deadline_ms} passed before inference (now {now_ms})",
            code="deadline_exceeded",
            request_id=req.id,
        )
        return True


@dataclass(slots=True)
class Group:
    """Batches of several partitions handed to the model together."""

    batches: list[PartitionBatch[Item]]
    items: list[Item] = field(default_factory=list)
    computed: list[Item] = field(default_factory=list)  # items the model ran (cache write-back)
    misses: int = 0  # items waiting for the model

    def __post_init__(self) -> None:
        self.items = [it for b in self.batches for it in b.items]
        for it in self.items:
            it.batch_size = len(self.items)

    @classmethod
    def merged(cls, groups: list[Group]) -> Group:
        """Several groups as one, for publishing; items keep their batch sizes."""
        if len(groups) == 1:
            return groups[0]
        g = cls.__new__(cls)
        g.batches = [b for x in groups for b in x.batches]
        g.items = [it for x in groups for it in x.items]
        g.computed = [it for x in groups for it in x.computed]
        g.misses = sum(x.misses for x in groups)
        return g

    def count_misses(self) -> int:
        self.misses = sum(1 for it in self.items if it.cache == "miss")
        return self.misses

    def offsets(self) -> dict[int, int]:
        """Partition -> next offset to commit."""
        out: dict[int, int] = {}
        for b in self.batches:
            out[b.partition] = max(out.get(b.partition, 0), b.last_offset + 1)
        return out
