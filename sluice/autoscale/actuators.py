"""What a decision acts on: local worker processes, or nothing (recommend only).

`LocalWorkers` starts `sluice worker` processes through the supervisor and
stops them with SIGTERM, so a worker that goes drains its batches and
commits before its partitions move. A started worker counts as ready only
once its /readyz answers; the seconds that took are the measured cold start
the policy plans with. `Recommend` changes nothing: the fleet is whatever
the group's membership says (KEDA's, an operator's, compose's).
"""

from __future__ import annotations

import asyncio
import logging
import statistics
from collections import deque
from pathlib import Path
from typing import Protocol

from schemas.errors import SluiceError
from sluice.supervisor import WorkerProcess

log = logging.getLogger(__name__)


class Actuator(Protocol):
    mode: str

    def counts(self, members: int) -> tuple[int, int]:
        """(ready, starting) workers; `members` is the group's size at the broker."""
        ...

    def cold_start_s(self) -> float | None: ...

    async def scale(self, desired: int) -> None: ...

    async def close(self) -> None: ...


class Recommend:
    """Decide and record; the fleet is the group's membership."""

    mode = "recommend"

    def counts(self, members: int) -> tuple[int, int]:
        return members, 0

    def cold_start_s(self) -> float | None:
        return None

    async def scale(self, desired: int) -> None:
        return None

    async def close(self) -> None:
        return None


class LocalWorkers:
    """`sluice worker` processes on this machine, started and stopped to the decided count."""

    mode = "local"

    def __init__(
        self,
        settings: dict[str, str],
        log_dir: Path,
        *,
        ready_timeout_s: float = 120.0,
        stop_timeout_s: float = 60.0,
    ) -> None:
        self._settings = {**settings, "SLUICE_METRICS_PORT": "0"}  # each its own free port
        self._log_dir = log_dir
        self._ready_timeout_s = ready_timeout_s
        self._stop_timeout_s = stop_timeout_s
        self._ready: list[WorkerProcess] = []
        self._starting: dict[WorkerProcess, asyncio.Task[float]] = {}
        self._stopping: set[asyncio.Task[None]] = set()
        self._cold: deque[float] = deque(maxlen=5)
        self._serial = 0

    def counts(self, members: int) -> tuple[int, int]:
        self._reap()
        return len(self._ready), len(self._starting)

    def cold_start_s(self) -> float | None:
        return statistics.median(self._cold) if self._cold else None

    @property
    def workers(self) -> list[WorkerProcess]:
        return list(self._ready)

    async def scale(self, desired: int) -> None:
        self._reap()
        have = len(self._ready) + len(self._starting)
        for _ in range(desired - have):
            self._start_one()
        for _ in range(have - desired):
            self._stop_one()

    def _start_one(self) -> None:
        self._serial += 1
        self._log_dir.mkdir(parents=True, exist_ok=True)
        proc = WorkerProcess(self._settings, log_path=self._log_dir / f"worker-{self._serial}.log")
        task = asyncio.create_task(asyncio.to_thread(proc.start, self._ready_timeout_s), name=f"start {proc.log_path}")
        self._starting[proc] = task
        task.add_done_callback(lambda t, p=proc: self._started(p, t))  # type: ignore[misc]
        log.info("starting a worker (log %s)", proc.log_path)

    def _started(self, proc: WorkerProcess, task: asyncio.Task[float]) -> None:
        if self._starting.pop(proc, None) is None:
            return  # stopped while starting: its stop task owns it
        if task.cancelled() or task.exception() is not None:
            log.error("a worker failed to start: %s (see %s)", task.exception(), proc.log_path)
            return
        seconds = task.result()
        self._cold.append(seconds)
        self._ready.append(proc)
        log.info("worker pid %d ready in %.2f s", proc.proc.pid if proc.proc else -1, seconds)

    def _stop_one(self) -> None:
        # a worker still starting goes first: it serves nothing yet
        if self._starting:
            proc, start = self._starting.popitem()
            task = asyncio.create_task(self._stop_starting(proc, start))
        else:
            proc = self._ready.pop()
            task = asyncio.create_task(asyncio.to_thread(self._stop, proc))
        self._stopping.add(task)
        task.add_done_callback(self._stopping.discard)

    async def _stop_starting(self, proc: WorkerProcess, start: asyncio.Task[float]) -> None:
        # not spawned yet: a stop now would miss it (a tiny window; the spawn is not ours to signal)
        while proc.proc is None and not start.done():  # noqa: ASYNC110
            await asyncio.sleep(0.05)
        await asyncio.to_thread(self._stop, proc)
        try:
            await start  # ends once the process has exited
        except SluiceError:
            pass

    def _stop(self, proc: WorkerProcess) -> None:
        code = proc.stop(self._stop_timeout_s)
        log.info("worker stopped (exit %s, log %s)", code, proc.log_path)

    def _reap(self) -> None:
        """Forget workers that died on their own; the next decision replaces them."""
        for proc in [p for p in self._ready if p.proc is None or p.proc.poll() is not None]:
            self._ready.remove(proc)
            log.error(
                "worker pid %s exited with %s (see %s)",
                proc.proc.pid if proc.proc else "?",
                proc.proc.returncode if proc.proc else "?",
                proc.log_path,
            )
            proc.stop()

    async def close(self) -> None:
        """Stop every worker this actuator started (SIGTERM: they drain and commit)."""
        await self.scale(0)
        if self._stopping:
            await asyncio.gather(*self._stopping, return_exceptions=True)
