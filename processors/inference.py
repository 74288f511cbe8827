"""Stage 3, the model hand-off: every group queued while the model was busy
goes to the model process in one hand-off, computed in pieces of
`inference_max_items` misses (shortest first; the model process splits a
piece by a padded-token budget, one ONNX Runtime call per sub-batch). Each
piece is answered as soon as it is done, with the requests that waited on
its inputs; each computed request pays its share of the compute."""

from __future__ import annotations

import contextlib
import time
from collections import defaultdict
from collections.abc import AsyncGenerator, Callable
from typing import Protocol

from processors.answers import AnswerSender
from processors.cache import L1Cache
from processors.coalescing import Coalescer
from processors.handoff import Handoff
from processors.items import Group, Item
from processors.lookup import KILL_SWITCH
from processors.metrics import WorkerMetrics
from processors.model_process import Computed, Job, ModelRun
from processors.partition_state import PartitionState
from schemas.errors import RequestError
from schemas.records import now_ms


class Model(Protocol):
    """What this stage needs of the model (processors.model_process.ModelProcess)."""

    def compute_pieces(self, pieces: list[list[Job]]) -> AsyncGenerator[Computed, None]: ...


class ModelStage:
    def __init__(
        self,
        *,
        model: Model,
        group_max_items: int,
        inference_max_items: int,
        l1: L1Cache,
        coalescer: Coalescer,
        sender: AnswerSender,
        state: PartitionState,
        metrics: WorkerMetrics,
        prices: dict[str, float],
        stopped: Callable[[], str | None] = lambda: None,
    ) -> None:
        self.model = model
        self.stopped = stopped  # why inference is stopped (the kill switch), or None
        self.group_max_items = group_max_items
        self.inference_max_items = inference_max_items
        self.l1 = l1
        self.coalescer = coalescer
        self.sender = sender
        self.state = state
        self.metrics = metrics
        self.prices = prices

    async def run(self, model_queue: Handoff[Group], to_publish: Handoff[Group]) -> None:
        """Until lookup closes `model_queue`; then close `to_publish`."""

        def misses(g: Group) -> int:
            return sum(1 for it in g.items if it.cache == "miss")

        # groups queued while the model was busy go in one hand-off, until it
        # holds group_max_items misses
        while groups := await model_queue.take(self.group_max_items, misses, whole=False):
            await self.infer(groups)
            for g in groups:
                self.state.modelled(g.misses)
                to_publish.put(g)
            self.state.room_made()
        to_publish.close()

    async def infer(self, groups: list[Group]) -> None:
        now = now_ms()
        todo: list[Item] = []
        for g in groups:
            for it in g.items:
                self.coalescer.orphaned(it)
                if it.cache != "miss" or it.status != "ok":
                    continue
                if it.expire_if_due(now):
                    self.coalescer.release(it)
                    continue
                if (why := self.stopped()) is not None:  # switched off while it waited for the model
                    it.reject(KILL_SWITCH, why)
                    self.coalescer.release(it)
                    continue
                todo.append(it)
                g.computed.append(it)
        if todo:
            await self._compute(todo)
        for g in groups:
            for it in g.items:
                if it.leader is not None:  # computed by an identical request: costs nothing more
                    it.follow(it.leader)
                if it.sent is None:
                    it.done_ms = now_ms()

    async def _compute(self, todo: list[Item]) -> None:
        t0 = time.perf_counter()
        # A hand-off of hundreds takes the model seconds. Computed in pieces
        # of one ONNX Runtime call's rows, each piece is answered as soon as
        # it is done: its inputs move to L1 at once (later requests for them
        # are hits, not waiters), and its answers leave in small bursts
        # instead of one burst of the whole hand-off and everything that
        # waited on it, which the hits in flight then queue behind. Shortest
        # inputs first, as the model's own sub-batches: a piece of like
        # lengths pads little.
        todo.sort(key=lambda it: len(it.serve.request.input) if it.serve else 0)
        size = self.inference_max_items
        pieces = [todo[i : i + size] for i in range(0, len(todo), size)]
        jobs = [[_job(it) for it in piece] for piece in pieces]
        done, answering = iter(pieces), 0.0
        # closed on leaving the loop (the kill switch), which cancels the pieces not started
        async with contextlib.aclosing(self.model.compute_pieces(jobs)) as computing:
            async for computed in computing:
                piece = next(done)
                self._take_outcomes(piece, computed)
                t1 = time.perf_counter()
                await self._answer(piece)
                answering += time.perf_counter() - t1
                if (why := self.stopped()) is not None:
                    # the kill switch: the pieces not started are refused, not computed
                    for rest in done:
                        for it in rest:
                            it.reject(KILL_SWITCH, why)
                            self.coalescer.release(it)
                    break
        self.metrics.inference.observe(time.perf_counter() - t0 - answering)
        self.metrics.batch_items.observe(len(todo))
        self.l1.update_gauges()

    def _take_outcomes(self, piece: list[Item], computed: Computed) -> None:
        for it, o in zip(piece, computed.outcomes, strict=True):
            s = it.serve
            assert s is not None
            it.tokens, it.truncated = o.tokens, o.truncated
            run = computed.runs[s.model.name]
            it.inference_start_ms, it.inference_end_ms = run.start_ms, run.end_ms
            if o.error is not None or o.out is None:
                it.status = "error"
                it.error = RequestError(
                    o.error or "the model returned no output for this input",
                    code="model_error",
                    request_id=s.request.id,
                )
            else:
                it.out = o.out
                if s.request.cache != "bypass":
                    self.l1.put(s.key_hash, o.out)
            self.coalescer.release(it)
        self._assign_cost(piece, computed.runs)

    async def _answer(self, piece: list[Item]) -> None:
        """Send the answers of a computed piece now, with those of every
        request that waited on one of its inputs (wherever their batches
        are); their batches commit them later, in offset order."""
        sent = 0
        for lead in piece:
            for it in (lead, *(lead.followers or ())):
                if it.sent is not None or it.dropped:
                    continue
                if it is not lead:
                    it.follow(lead)
                it.done_ms = now_ms()
                if not self.sender.early:
                    continue  # sent in its round's transaction
                await self.sender.pace(sent)
                it.sent = await self.sender.send(it)
                sent += 1
            lead.followers = None  # each follower points at its leader: no cycle left for the GC

    def _assign_cost(self, todo: list[Item], runs: dict[str, ModelRun]) -> None:
        """Each computed request pays its share, by tokens, of its model's
        compute seconds at the instance price; identical requests it answers
        (coalesced) pay nothing."""
        by_model: dict[str, list[Item]] = defaultdict(list)
        for it in todo:
            assert it.serve is not None
            by_model[it.serve.model.name].append(it)
        for name, its in by_model.items():
            st = runs[name]
            if st.sub_batches:
                self.metrics.batch_tokens.observe(st.padded_tokens / st.sub_batches)
            total_cost = st.seconds * self.prices[name] / 3600.0
            total_tokens = sum(it.tokens for it in its) or 1
            self.metrics.compute_seconds.inc(st.seconds)
            self.metrics.cost.labels(name).inc(total_cost)
            for it in its:
                share = it.tokens / total_tokens
                it.cost_usd = total_cost * share
                it.compute_ms = st.seconds * 1000 * share


def _job(it: Item) -> Job:
    s = it.serve
    assert s is not None
    req = s.request
    return Job(s.model.name, req.input, req.task, tuple(req.labels or ()))
