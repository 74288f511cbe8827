"""The model in a process of its own, at a lower scheduling priority.

On a machine whose cores are full, a cache hit must not wait for a miss's
compute. A nice'd model *thread* could not promise that: it shares the
worker's GIL, and whenever it held the GIL (building a batch, pooling,
serialising) while the scheduler had put it aside for being nice, the event
loop waited for it too, so hits waited on the very work they were meant to
overtake. A process has its own GIL: at `nice`, the kernel hands the model
only the CPU that fetching, answering hits and publishing leave, and the
event loop never waits for it. It also takes a session of its own: under
Linux's autogroups a niceness counts only inside its session, and the
broker's and the clients' threads, which carry the same hits, are in
sessions of their own.

The hand-off is plain data both ways. In: per miss, its model, text, task
and labels. Out: per miss, its token count and its output already
serialised (the bytes that the result carries and the cache stores), so the
event loop does not spend its time encoding embeddings either; per model,
the call's timings for cost and metrics.
"""

from __future__ import annotations

import asyncio
import logging
import multiprocessing
import os
import threading
import time
from collections import defaultdict
from collections.abc import AsyncGenerator, Iterator
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from processors.runtime import RunStats
from processors.scheduling import group_problem, slice_problem
from schemas.errors import SluiceError
from schemas.records import encode, now_ms

log = logging.getLogger(__name__)


class ModelProcessError(SluiceError):
    code = "model_process"


@dataclass(slots=True, frozen=True)
class Job:
    """One miss to compute."""

    model: str
    text: str
    task: str = "embed"
    labels: tuple[str, ...] = ()


@dataclass(slots=True)
class Outcome:
    """One miss's answer: `out` (serialised output) or `error`."""

    tokens: int = 0
    truncated: bool = False
    out: bytes | None = None
    error: str | None = None


@dataclass(slots=True)
class ModelRun(RunStats):
    """What one model's share of a hand-off cost (all in the child): the
    runtime's own stats, and when it ran."""

    start_ms: int = 0
    end_ms: int = 0


@dataclass(slots=True)
class Computed:
    outcomes: list[Outcome]
    runs: dict[str, ModelRun] = field(default_factory=dict)


# -- the child ------------------------------------------------------------------
_RUNTIMES: dict[str, Any] = {}  # model name -> loaded ModelRuntime, in the child only


def _start_child(nice: int, parent_pid: int, check_every_s: float = 1.0) -> None:
    """Runs first in the child. Lowers its priority before ONNX Runtime makes
    its threads (they inherit it), and starts a watch on the parent: a
    worker killed outright (SIGKILL, the OOM killer) cannot stop its pool,
    and the child would wait on the hand-off pipe forever with the models in
    memory (found: four such orphans of ~450 MB each after a day of tests)."""
    # The worker's short time slice came along with the fork: the model's
    # compute is what the worker's threads should preempt, so it takes the
    # kernel's default back (before ONNX Runtime makes its threads).
    slice_problem(0)
    # A session of its own: its compute then weighs against the broker's and
    # the clients' sessions instead of inside the worker's, and a niceness
    # above 0 holds against every process on the machine, not only against
    # the worker's threads (processors/scheduling.py). Being out of the
    # worker's process group, a Ctrl-C at the terminal reaches the worker
    # only, which stops this process as it shuts down.
    problem = group_problem(nice)
    if problem:
        log.info("model process keeps its priority (%s)", problem)

    def watch() -> None:
        while os.getppid() == parent_pid:
            time.sleep(check_every_s)
        os._exit(1)  # the parent is gone: nobody will read an answer

    threading.Thread(target=watch, name="sluice-parent-watch", daemon=True).start()


def _load(folders: dict[str, Path], options: dict[str, Any]) -> tuple[int, dict[str, list[str]]]:
    from processors.runtime import ModelRuntime

    for name, folder in folders.items():
        _RUNTIMES[name] = ModelRuntime(folder, **options).load()
    return os.getpid(), {name: rt.providers for name, rt in _RUNTIMES.items()}


def _compute(jobs: list[Job]) -> Computed:
    """One embed call per model over all its jobs, then classify heads. A
    model failure fails only the inputs it fails on, never the process."""
    outcomes = [Outcome() for _ in jobs]
    by_model: dict[str, list[int]] = defaultdict(list)
    for i, job in enumerate(jobs):
        by_model[job.model].append(i)
    runs: dict[str, ModelRun] = {}
    for name, idx in by_model.items():
        model = _RUNTIMES[name]
        run = runs[name] = ModelRun(start_ms=now_ms())
        try:
            _run_model(model, jobs, outcomes, idx, run)
        except Exception as exc:  # ONNX Runtime raises untyped errors
            log.warning("model %s failed on %d items (%s): computing them one by one", name, len(idx), exc)
            # One bad input (a poison) must not fail its batch-mates: alone,
            # each either succeeds or fails by itself. Rare, so one call
            # each rather than a bisection.
            for i in idx:
                try:
                    _run_model(model, jobs, outcomes, [i], run)
                except Exception as one:
                    log.error("model %s failed on one input: %s", name, one)
                    outcomes[i].out, outcomes[i].error = None, f"model {name} failed on this input: {one}"
        run.end_ms = now_ms()
    return Computed(outcomes, runs)


def _run_model(model: Any, jobs: list[Job], outcomes: list[Outcome], idx: list[int], run: ModelRun) -> None:
    encoded = model.encode([jobs[i].text for i in idx])
    vectors = model.embed_encoded(encoded, run)
    done = []
    for i, enc, vec in zip(idx, encoded, vectors):
        job = jobs[i]
        if job.task == "classify":
            labels = list(job.labels)
            output = model.classify(vec, labels, model.label_embeddings(labels, run))
        else:
            output = {"embedding": vec}
        done.append((i, enc, encode(output)))
    for i, enc, out in done:  # all or none of them, so a retry starts clean
        o = outcomes[i]
        o.tokens, o.truncated, o.out = enc.tokens, enc.truncated, out


# -- the parent -----------------------------------------------------------------
@contextmanager
def _death_reported() -> Iterator[None]:
    try:
        yield
    except BrokenProcessPool as exc:
        # killed (out of memory?) or crashed: no answer will come from it
        raise ModelProcessError(f"the model process died: {exc}") from None


class ModelProcess:
    """`await mp.load(folders, options)`, then `await mp.compute(jobs)`."""

    def __init__(self, nice: int = 0) -> None:
        # spawn, not fork: the worker has threads (librdkafka's, the
        # executor's) by then, and a forked copy of a lock held by one of
        # them never opens
        self.pid: int | None = None  # known once loaded
        self._pool = ProcessPoolExecutor(
            max_workers=1,
            mp_context=multiprocessing.get_context("spawn"),
            initializer=_start_child,
            initargs=(nice, os.getpid()),
        )

    async def _call(self, fn: Any, *args: Any) -> Any:
        with _death_reported():
            return await asyncio.get_running_loop().run_in_executor(self._pool, fn, *args)

    async def load(self, folders: dict[str, Path], options: dict[str, Any]) -> dict[str, list[str]]:
        """Load every model in the child; return each one's providers."""
        self.pid, providers = await self._call(_load, folders, options)
        return providers

    async def compute(self, jobs: list[Job]) -> Computed:
        return await self._call(_compute, jobs)

    async def compute_pieces(self, pieces: list[list[Job]]) -> AsyncGenerator[Computed, None]:
        """Each piece's answers as soon as the child has computed it, in
        order. Every piece is queued at once, so the child goes from one to
        the next without waiting for the event loop to take the answers."""
        loop = asyncio.get_running_loop()
        futures: list[asyncio.Future[Computed]] = []
        try:
            with _death_reported():
                # a pool that already knows its child is dead refuses the
                # queueing itself, not only the waiting
                futures.extend(loop.run_in_executor(self._pool, _compute, piece) for piece in pieces)
                for fut in futures:
                    yield await fut
        finally:
            for fut in futures:  # left behind by a failure: none is waited for, none is reported
                if fut.cancel():
                    continue
                fut.add_done_callback(lambda f: f.cancelled() or f.exception())

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)
