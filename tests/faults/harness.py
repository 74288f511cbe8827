"""The fault suite's harness: a stack of its own, workers under a restart
policy, open-loop load with known ids, and a read_committed count of what
came back.

Everything here is blocking code on threads (librdkafka clients, Popen):
the faults are process-level, and the tests read as a script of them.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import signal
import threading
import time
import uuid
from collections import Counter
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import orjson
from confluent_kafka import OFFSET_BEGINNING, Consumer, KafkaError, Producer, TopicPartition

from producers.client import make_request, request_key
from producers.corpus import text
from schemas.errors import SluiceError
from schemas.topics import Topics
from sinks.query_endpoint import remote_runner
from sluice import supervisor
from sluice.admin import ensure_topics
from sluice.stack import LocalStack

ROOT = Path(__file__).resolve().parents[2]
LOG_DIR = Path(os.environ.get("TMPDIR", "/tmp"))

REQUEST_PARTITIONS = 4
# The broker's floor (group.min.session.timeout.ms): a SIGKILLed worker's
# partitions move after this long.
SESSION_TIMEOUT_MS = 6000
# How long a dead worker's open transaction may block read_committed readers
# when no restart fences it first.
TRANSACTION_TIMEOUT_MS = 5000

_ASSIGNED = re.compile(r"assigned partitions \[([0-9, ]*)\]")
_DROPPED = re.compile(r"dropped (\d+) uncommitted records")

# one line per scenario, printed again in pytest's terminal summary
SUMMARY: list[str] = []


# --------------------------------------------------------------------- topics
@dataclass
class Scenario:
    """One test's slice of the fault stack: its own topics, groups and ids."""

    stack: LocalStack
    mode: str  # "exactly-once" | "at-least-once"
    tmp: Path
    prefix: str = field(default_factory=lambda: f"f{uuid.uuid4().hex[:10]}")

    @property
    def topics(self) -> Topics:
        return Topics(self.prefix)

    @property
    def bootstrap(self) -> str:
        return self.stack.bootstrap_servers

    @property
    def group(self) -> str:
        return f"{self.prefix}-workers"

    def create_topics(self) -> None:
        t = self.topics
        parts = t.partitions(requests=REQUEST_PARTITIONS, results=2, telemetry=2, dlq=1, ingress=1)
        asyncio.run(ensure_topics(self.bootstrap, parts, per_topic=t.configs()))

    def worker_env(self, worker_id: str, **extra: str) -> dict[str, str]:
        env = {
            "SLUICE_BOOTSTRAP_SERVERS": self.bootstrap,
            "SLUICE_REDIS_URL": self.stack.redis_url,
            "SLUICE_TOPIC_PREFIX": self.prefix,
            "SLUICE_GROUP_ID": self.group,
            "SLUICE_WORKER_ID": worker_id,
            "SLUICE_DELIVERY": self.mode,
            "SLUICE_TRANSACTION_TIMEOUT_MS": str(TRANSACTION_TIMEOUT_MS),
            "SLUICE_SESSION_TIMEOUT_MS": str(SESSION_TIMEOUT_MS),
            "SLUICE_ORT_INTRA_OP_THREADS": "1",
            "SLUICE_DEFAULT_MODEL": "all-minilm-l6-v2",
            "SLUICE_MODELS_DIR": json.dumps([str(self.tmp / "models")]),
        }
        env.update(extra)
        return env

    def sink_env(self, chdb_path: Path, **extra: str) -> dict[str, str]:
        return {
            "SLUICE_BOOTSTRAP_SERVERS": self.bootstrap,
            "SLUICE_TOPIC_PREFIX": self.prefix,
            "SLUICE_SINK_GROUP_ID": f"{self.prefix}-sink",
            "SLUICE_CHDB_PATH": str(chdb_path),
            **extra,
        }


# --------------------------------------------------------------------- keeper
class Keeper:
    """A restart policy for one `sluice worker` (or `sluice sink`) process,
    as Kubernetes' restartPolicy: Always would be: whenever the process
    exits, start it again with the same settings (the same SLUICE_WORKER_ID,
    so an exactly-once worker's transactional id is the same and its
    init_transactions fences its predecessor). An exactly-once worker whose
    transaction cannot commit exits on purpose and relies on exactly this.

    `kill()` SIGKILLs the running process and holds the restart until
    `release()`, so a test can read the group's offsets as the dead process
    left them."""

    def __init__(self, name: str, settings: dict[str, str], command: str = "worker") -> None:
        self.name = name
        self.settings = settings
        self.command = command
        self.incarnations: list[supervisor.WorkerProcess] = []
        self.exit_codes: list[int] = []
        self._held = threading.Event()
        self._stopping = threading.Event()
        self._ready = threading.Event()
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None
        self.failure: str = ""

    @property
    def current(self) -> supervisor.WorkerProcess:
        return self.incarnations[-1]

    @property
    def restarts(self) -> int:
        return len(self.incarnations) - 1

    def start(self) -> Keeper:
        self._thread = threading.Thread(target=self._keep, name=f"keeper-{self.name}", daemon=True)
        self._thread.start()
        return self

    def wait_ready(self, timeout_s: float = 120.0) -> None:
        if not self._ready.wait(timeout_s):
            raise AssertionError(f"{self.name} not ready after {timeout_s:.0f} s ({self.failure})\n{self.log_tail()}")

    def _spawn(self) -> supervisor.WorkerProcess:
        log = LOG_DIR / f"sluice-fault-{self.name}-{len(self.incarnations)}-{uuid.uuid4().hex[:6]}.log"
        proc = supervisor.WorkerProcess(self.settings, log_path=log, cwd=ROOT, inherit_env=True, command=self.command)
        with self._lock:
            self.incarnations.append(proc)
        return proc

    def _keep(self) -> None:
        backoff_s = 0.5
        while not self._stopping.is_set():
            proc = self._spawn()
            try:
                proc.start(ready_timeout_s=120.0)
                self._ready.set()
                backoff_s = 0.5
            except SluiceError as exc:  # exited before ready (say, the broker is down): start again
                self.failure = str(exc)
                if proc.proc is not None and proc.proc.returncode is not None:
                    self.exit_codes.append(proc.proc.returncode)
                proc.stop(5)
                self._stopping.wait(backoff_s)
                backoff_s = min(backoff_s * 2, 4.0)
                continue
            assert proc.proc is not None
            while not self._stopping.is_set() and (self._held.is_set() or proc.proc.poll() is None):
                time.sleep(0.05)
            if self._stopping.is_set():
                return
            self.exit_codes.append(proc.proc.returncode)
            proc.stop(5)  # closes its log

    def kill(self) -> int:
        """SIGKILL the running process, hold the restart, return its pid."""
        self._held.set()
        proc = self.current
        assert proc.proc is not None
        proc.proc.send_signal(signal.SIGKILL)
        proc.proc.wait(30)
        return proc.proc.pid

    def release(self) -> None:
        self._held.clear()

    def stop(self) -> None:
        """SIGTERM the running process (it drains and commits), and restart no more."""
        self._stopping.set()
        if self._thread is not None:
            self._thread.join(150)
        for proc in self.incarnations:
            proc.stop(30)

    def logs(self) -> list[str]:
        return [p.log_path.read_text(errors="replace") for p in self.incarnations if p.log_path and p.log_path.exists()]

    def log_tail(self, chars: int = 4000) -> str:
        return "\n".join(f"--- {self.name} incarnation {i}\n{log[-chars:]}" for i, log in enumerate(self.logs()))

    def assignment(self) -> set[int]:
        """The running (or just killed) incarnation's partitions, from its last assignment line."""
        p = self.current.log_path
        found = _ASSIGNED.findall(p.read_text(errors="replace")) if p and p.exists() else []
        return {int(x) for x in found[-1].split(",") if x.strip()} if found else set()

    def dropped(self) -> int:
        """Records every incarnation dropped at a revoke (L1 hits among them
        may have been answered already: the next owner answers them again)."""
        return sum(int(n) for log in self.logs() for n in _DROPPED.findall(log))


def start_all(keepers: Iterable[Keeper], timeout_s: float = 150.0) -> None:
    """Start together (the model loads overlap), then wait for each."""
    ks = list(keepers)
    for k in ks:
        k.start()
    for k in ks:
        k.wait_ready(timeout_s)


# ----------------------------------------------------------------------- load
@dataclass
class Sent:
    partition: int = -1
    offset: int = -1


class OpenLoop:
    """Requests at a fixed rate whatever the service does (open loop), on a
    thread, from a plain idempotent producer (acks=all): each id and, from
    its delivery report, its partition and offset are known."""

    def __init__(self, sc: Scenario, *, rate: float, duration_s: float, seed: int = 11) -> None:
        self.sc = sc
        self.rate = rate
        self.duration_s = duration_s
        self.seed = seed
        self.sent: dict[str, Sent] = {}
        self.errors: list[str] = []
        self.started_at = 0.0
        self._lock = threading.Lock()
        self._thread = threading.Thread(target=self._run, name="open-loop", daemon=True)
        self.producer = new_producer(sc.bootstrap)

    def doc(self, i: int) -> dict[str, Any]:
        # a third are repeats of 40 texts (cache hits, in-batch coalescing), the rest new
        n = (i // 3) % 40 if i % 3 == 0 else 1000 + i
        doc = make_request(f"{self.sc.prefix} {text(n, seed=self.seed)}", id=f"{self.sc.prefix}-{i:06d}")
        doc["sent_at_ms"] = int(time.time() * 1000)
        return doc

    def start(self) -> OpenLoop:
        self.started_at = time.monotonic()
        self._thread.start()
        return self

    def elapsed(self) -> float:
        return time.monotonic() - self.started_at

    def produce(self, doc: dict[str, Any], *, partition: int | None = None) -> None:
        with self._lock:
            self.sent[doc["id"]] = Sent()
        key = request_key(doc)
        self.producer.produce(
            self.sc.topics.requests,
            orjson.dumps(doc),
            key,
            partition=-1 if partition is None else partition,  # -1: the partitioner's choice, by key
            on_delivery=self._delivered(doc["id"]),
        )
        self.producer.poll(0)

    def _delivered(self, rid: str) -> Callable[[Any, Any], None]:
        def report(err: Any, msg: Any) -> None:
            if err is not None:
                self.errors.append(f"{rid}: {err}")
            else:
                self.sent[rid] = Sent(msg.partition(), msg.offset())

        return report

    def _run(self) -> None:
        total = int(self.rate * self.duration_s)
        for i in range(total):
            due = self.started_at + i / self.rate
            wait = due - time.monotonic()
            if wait > 0:
                time.sleep(wait)
            self.produce(self.doc(i))

    def join(self, flush_timeout_s: float = 120.0) -> None:
        self._thread.join()
        left = self.producer.flush(flush_timeout_s)
        assert left == 0 and not self.errors, f"{left} requests unsent, errors: {self.errors[:5]}"
        assert all(s.offset >= 0 for s in self.sent.values()), "a request without a delivery report"

    def wait_until(self, elapsed_s: float) -> None:
        time.sleep(max(0.0, self.started_at + elapsed_s - time.monotonic()))


def new_producer(bootstrap: str) -> Producer:
    return Producer(
        {
            "bootstrap.servers": bootstrap,
            "acks": "all",
            "enable.idempotence": True,
            "linger.ms": 5,
            # the Java client's partitioner, as the workers' and the client's
            "partitioner": "murmur2_random",
            # across a broker restart the records wait and are retried
            "message.timeout.ms": 300_000,
            "log_level": 0,
        }
    )


# ------------------------------------------------------------------- offsets
def _consumer(bootstrap: str, group: str, **extra: Any) -> Consumer:
    return Consumer(
        {
            "bootstrap.servers": bootstrap,
            "group.id": group,
            "enable.auto.commit": False,
            "isolation.level": "read_committed",
            "log_level": 0,
            **extra,
        }
    )


def group_offsets(sc: Scenario, partitions: Iterable[int]) -> dict[int, tuple[int, int]]:
    """partition -> (the worker group's committed offset, the log end offset)
    of the requests topic. A committed offset of -1001 (none yet) reads as the
    log start: the group reads from the earliest."""
    parts = sorted(partitions)
    c = _consumer(sc.bootstrap, sc.group)
    try:
        tps = [TopicPartition(sc.topics.requests, p) for p in parts]
        committed = {tp.partition: tp.offset for tp in c.committed(tps, timeout=30)}
        out = {}
        for p in parts:
            low, high = c.get_watermark_offsets(TopicPartition(sc.topics.requests, p), timeout=30)
            out[p] = (committed[p] if committed[p] >= 0 else low, high)
        return out
    finally:
        c.close()


def all_committed(sc: Scenario) -> bool:
    return all(c >= e for c, e in group_offsets(sc, range(REQUEST_PARTITIONS)).values())


def in_window(sent: dict[str, Sent], window: dict[int, tuple[int, int]]) -> set[str]:
    """Ids whose request lies in [committed, end) of its partition."""
    return {
        rid
        for rid, s in sent.items()
        if s.partition in window and window[s.partition][0] <= s.offset < window[s.partition][1]
    }


_FAILED_COMMIT = re.compile(r"commit of \{([^}]*)\} failed")


def failed_commits(keepers: Iterable[Keeper]) -> dict[int, int]:
    """Partition -> the highest offset a worker answered up to and could
    not commit (its logged "commit of {p: offset} failed": the session
    expired, the partition's next owner answers those records again)."""
    out: dict[int, int] = {}
    for k in keepers:
        for log in k.logs():
            for m in _FAILED_COMMIT.finditer(log):
                for pair in m.group(1).split(","):
                    if pair.strip():
                        p, off = (int(x) for x in pair.split(":"))
                        out[p] = max(out.get(p, 0), off)
    return out


def widened(window: dict[int, tuple[int, int]], failed: dict[int, int]) -> dict[int, tuple[int, int]]:
    """The in-flight window grown to what failed commits left answered and uncommitted."""
    return {p: (lo, max(hi, failed.get(p, 0))) for p, (lo, hi) in window.items()}


# ------------------------------------------------------------------- results
@dataclass
class Tally:
    sent: int
    answered: int
    lost: int
    duplicated: int
    counts: Counter[str]
    results: dict[str, list[dict[str, Any]]]

    def line(self, fault: str, mode: str, bound: str) -> str:
        return (
            f"fault={fault} mode={mode} sent={self.sent} answered={self.answered} "
            f"lost={self.lost} duplicated={self.duplicated} ({bound})"
        )

    @property
    def duplicate_ids(self) -> set[str]:
        return {rid for rid, n in self.counts.items() if n > 1}


def read_results(sc: Scenario, sent: Iterable[str], *, timeout_s: float = 150.0) -> Tally:
    """Wait until every sent id has a result a read_committed reader sees
    and the worker group has committed every request (so nothing can be
    replayed any more); then read the results topic once more, from the
    beginning to its end, and count."""
    ids = set(sent)
    deadline = time.monotonic() + timeout_s
    seen = _read_committed(sc, until=lambda got: ids <= got.keys() and all_committed(sc), deadline=deadline)
    if not (ids <= seen.keys()):
        raise AssertionError(f"{len(ids - seen.keys())} of {len(ids)} requests unanswered after {timeout_s:.0f} s")
    results = _read_committed(sc, until=None, deadline=time.monotonic() + 60)
    counts = Counter({rid: len(docs) for rid, docs in results.items() if rid in ids})
    answered = len(counts)
    return Tally(
        sent=len(ids),
        answered=answered,
        lost=len(ids) - answered,
        duplicated=sum(counts.values()) - answered,
        counts=counts,
        results=results,
    )


def _read_committed(
    sc: Scenario, *, until: Callable[[dict[str, list[dict[str, Any]]]], bool] | None, deadline: float
) -> dict[str, list[dict[str, Any]]]:
    """The results topic from the beginning, read_committed: until `until`
    holds (checked twice a second), or, with None, until every partition
    reported its end."""
    c = _consumer(sc.bootstrap, f"{sc.prefix}-reader-{uuid.uuid4().hex[:6]}", **{"enable.partition.eof": True})
    results: dict[str, list[dict[str, Any]]] = {}
    try:
        parts = sorted(c.list_topics(sc.topics.results, timeout=30).topics[sc.topics.results].partitions)
        c.assign([TopicPartition(sc.topics.results, p, OFFSET_BEGINNING) for p in parts])
        at_end: set[int] = set()
        next_check = 0.0
        while time.monotonic() < deadline:
            msg = c.poll(0.2)
            if msg is not None:
                err = msg.error()
                if err is None:
                    doc = orjson.loads(msg.value() or b"{}")
                    results.setdefault(doc["id"], []).append(doc)
                elif err.code() == KafkaError._PARTITION_EOF:
                    at_end.add(msg.partition() or 0)
                else:
                    raise AssertionError(f"results reader: {err}")
            if until is None:
                if at_end >= set(parts):
                    return results
            elif time.monotonic() >= next_check:
                next_check = time.monotonic() + 0.5
                if until(results):
                    return results
        if until is None:
            raise AssertionError(f"results topic: no end reached on partitions {set(parts) - at_end}")
        return results
    finally:
        c.close()


# ----------------------------------------------------------------------- sink
def sink_query(port: int, sql: str) -> list[list[Any]]:
    return remote_runner("127.0.0.1", port, timeout_s=10)(sql)[1]


def sink_counts(port: int) -> tuple[int, int]:
    """(rows, distinct ids) of the sink's telemetry table; (-1, -1) while it does not answer."""
    try:
        rows = sink_query(port, "SELECT count(), uniqExact(id) FROM sluice.telemetry")
    except OSError:
        return -1, -1
    return int(rows[0][0]), int(rows[0][1])


# ---------------------------------------------------------------------- misc
def kill_pid(pid: int) -> None:
    os.kill(pid, signal.SIGKILL)
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return
        # a child of this process (the stack spawned it here): reap it
        try:
            if os.waitpid(pid, os.WNOHANG)[0] == pid:
                return
        except ChildProcessError:
            pass
        time.sleep(0.05)
    raise AssertionError(f"pid {pid} survived SIGKILL")
