"""The local stack without Docker: one Kafka broker (KRaft) and one redis-server.

Both run as background processes in their own sessions, so they outlive the
`sluice up` that started them; everything they need or write lives under
`StackConfig.state_dir`:

    <state>/stack.lock                 serialises up/down between processes
    <state>/kafka/libs/                the broker's jars, resolved once by Maven
    <state>/kafka/server.properties    rewritten on each start (ports may change)
    <state>/kafka/data/                the KRaft log dirs, formatted once
    <state>/kafka/broker.log, .pid
    <state>/redis/redis.log, .pid
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import shutil
import signal
import subprocess
import time
from collections.abc import Callable, Iterator
from typing import Any, Literal

from processors.scheduling import slice_problem
from sluice.admin import ensure_topics
from sluice.errors import StackError
from sluice.stack.config import StackConfig, _setting
from sluice.stack.kafka_broker import KafkaBroker
from sluice.stack.processes import _CHILDREN, _pid_alive, _port_answers, _port_free, _rotate, _run_sync, _Service, _tail
from sluice.stack.redis_server import RedisServer

__all__ = ["LocalStack", "StackConfig"]

_STOP_GRACE_S = 20.0  # Kafka's controlled shutdown needs a few seconds; redis far less.
_KILL_GRACE_S = 5.0
_PROGRESS_EVERY_S = 5.0


class LocalStack(KafkaBroker, RedisServer):
    """Start, stop and inspect the local Kafka + Redis of `state_dir`."""

    def __init__(self, config: StackConfig, log: Callable[[str], None] = print) -> None:
        self.config = config
        self._log = log
        # Absolute, because the services run with their own working directory
        # and the paths end up in their config files.
        self._state = config.state_dir.absolute()
        kafka_dir = self._state / "kafka"
        redis_dir = self._state / "redis"
        self._kafka = _Service(
            name="kafka",
            dir=kafka_dir,
            pid_file=kafka_dir / "broker.pid",
            log_file=kafka_dir / "broker.log",
            marker="kafka.Kafka",
            ports=(
                (config.kafka_port, _setting("kafka_port")),
                (config.kafka_controller_port, _setting("kafka_controller_port")),
            ),
        )
        self._redis = _Service(
            name="redis",
            dir=redis_dir,
            pid_file=redis_dir / "redis.pid",
            log_file=redis_dir / "redis.log",
            marker="redis-server",
            ports=((config.redis_port, _setting("redis_port")),),
        )

    @property
    def bootstrap_servers(self) -> str:
        return f"127.0.0.1:{self.config.kafka_port}"

    @property
    def redis_url(self) -> str:
        return f"redis://127.0.0.1:{self.config.redis_port}/0"

    # ------------------------------------------------------------------ public

    def up(
        self,
        topics: dict[str, int] | None = None,
        *,
        replication_factor: int = 1,
        min_insync_replicas: int = 1,
        per_topic: dict[str, dict[str, str]] | None = None,
    ) -> Literal["started", "already running"]:
        """Start whatever is not running, wait until both answer, create `topics`
        (with that replication: the local broker is one node, so more than 1 fails).

        Topics are ensured also when both services were already running, since
        that starts nothing and a caller may bring new topics.
        """
        with self._lock():
            running = {svc.name: self._running_pid(svc) for svc in (self._kafka, self._redis)}
            to_start = [svc for svc in (self._kafka, self._redis) if running[svc.name] is None]
            result: Literal["started", "already running"] = "started" if to_start else "already running"
            if not to_start:
                self._log(f"kafka (pid {running['kafka']}) and redis (pid {running['redis']}) are already running")

            # Everything that can fail fast is checked before anything starts
            # (or Maven spends a minute), so a failure leaves nothing behind.
            for svc in to_start:
                self._clear_stale(svc)
                for port, setting in svc.ports:
                    if not _port_free(port):
                        raise StackError(f"port {port} ({setting}) is in use by another process")
            redis_bin = self._which("redis-server", "apt-get install redis-server") if self._redis in to_start else ""
            java_bin = self._which("java", "apt-get install openjdk-17-jre-headless") if self._kafka in to_start else ""

            started: list[tuple[_Service, int]] = []
            try:
                if self._redis in to_start:
                    started.append((self._redis, self._start_redis(redis_bin)))
                if self._kafka in to_start:
                    libs = self._ensure_jars()
                    server_properties = self._write_kafka_config()
                    self._format_storage(java_bin, libs, server_properties)
                    started.append((self._kafka, self._start_kafka(java_bin, libs, server_properties)))
                # Also when already running: it may still be starting up.
                self._wait_redis(running["redis"] or self._pid_of(started, self._redis))
                self._wait_kafka(
                    running["kafka"] or self._pid_of(started, self._kafka), announce=running["kafka"] is None
                )
                for svc in (self._redis, self._kafka):
                    self._shorten_slices(svc, running[svc.name] or self._pid_of(started, svc))
            except BaseException:
                # All or nothing: do not leave half a stack (or a hung broker
                # holding its ports) behind a failed `up`.
                for svc, pid in reversed(started):
                    self._log(f"{svc.name}: stopping pid {pid} (start failed)")
                    self._stop({svc: pid})
                raise

            if topics:
                created = _run_sync(
                    ensure_topics(
                        self.bootstrap_servers,
                        topics,
                        timeout_s=self.config.stack_start_timeout_s,
                        replication_factor=replication_factor,
                        min_insync_replicas=min_insync_replicas,
                        per_topic=per_topic,
                    )
                )
                self._log("kafka: created topics " + ", ".join(created) if created else "kafka: topics already exist")
            return result

    def _shorten_slices(self, svc: _Service, pid: int) -> None:
        # Once it answers: the JVM has made its threads by then, and any it
        # makes later inherit their maker's slice. A running stack gets it
        # too (a stack started by an older `sluice up`).
        slice_us = self.config.stack_sched_slice_us
        if slice_us:
            problem = slice_problem(slice_us, pid)
            if problem:
                self._log(f"{svc.name}: keeps the default time slice ({problem})")

    def down(self) -> None:
        """Stop both services (SIGTERM, then SIGKILL after a grace period)."""
        if not self._state.exists():
            self._log("nothing running (no state folder)")
            return
        with self._lock():
            targets: dict[_Service, int] = {}
            for svc in (self._kafka, self._redis):
                pid = self._running_pid(svc)
                if pid is None:
                    self._log(f"{svc.name}: not running")
                    svc.pid_file.unlink(missing_ok=True)
                else:
                    targets[svc] = pid
            self._stop(targets)

    def status(self) -> dict[str, dict[str, Any]]:
        """Per service: pid (None without a live process), running (the process
        exists), alive (running and its port answers), port, log."""
        report: dict[str, dict[str, Any]] = {}
        for svc in (self._kafka, self._redis):
            pid = self._running_pid(svc)
            port = svc.ports[0][0]
            report[svc.name] = {
                "pid": pid,
                "running": pid is not None,
                "alive": pid is not None and _port_answers(port),
                "port": port,
                "log": str(svc.log_file),
            }
        report["kafka"]["controller_port"] = self.config.kafka_controller_port
        return report

    # ----------------------------------------------------------- process state

    @contextlib.contextmanager
    def _lock(self) -> Iterator[None]:
        """Serialise up/down of one state folder across processes (two terminals,
        parallel test sessions); otherwise both could start a broker."""
        self._state.mkdir(parents=True, exist_ok=True)
        with open(self._state / "stack.lock", "a") as handle:
            fcntl.flock(handle, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(handle, fcntl.LOCK_UN)

    def broker_pid(self) -> int | None:
        """The running broker's pid (benchmarks count its CPU time)."""
        return self._running_pid(self._kafka)

    def redis_pid(self) -> int | None:
        return self._running_pid(self._redis)

    @staticmethod
    def _read_pid(svc: _Service) -> int | None:
        try:
            return int(svc.pid_file.read_text().strip())
        except (FileNotFoundError, ValueError):
            return None

    def _running_pid(self, svc: _Service) -> int | None:
        pid = self._read_pid(svc)
        return pid if pid is not None and _pid_alive(pid, svc.marker) else None

    def _clear_stale(self, svc: _Service) -> None:
        if svc.pid_file.exists():
            self._log(f"{svc.name}: removing stale pid file {svc.pid_file}")
            svc.pid_file.unlink(missing_ok=True)

    @staticmethod
    def _pid_of(started: list[tuple[_Service, int]], svc: _Service) -> int:
        return next(pid for s, pid in started if s is svc)

    @staticmethod
    def _which(program: str, hint: str) -> str:
        path = shutil.which(program)
        if path is None:
            raise StackError(f"{program} not found: {hint}")
        return path

    def _spawn(self, svc: _Service, argv: list[str]) -> int:
        svc.dir.mkdir(parents=True, exist_ok=True)
        _rotate(svc.log_file)
        with open(svc.log_file, "ab") as out:
            proc = subprocess.Popen(
                argv,
                cwd=svc.dir,
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                # Own session: Ctrl-C in the terminal that ran `sluice up` and
                # that terminal closing must not reach the services.
                start_new_session=True,
            )
        _CHILDREN[proc.pid] = proc
        svc.pid_file.write_text(f"{proc.pid}\n")
        return proc.pid

    def _stop(self, targets: dict[_Service, int]) -> None:
        """SIGTERM all targets at once (so their shutdowns overlap), then SIGKILL stragglers."""
        for pid in targets.values():
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGTERM)
        left = self._wait_gone(targets, _STOP_GRACE_S)
        for svc, pid in left.items():
            self._log(f"{svc.name}: pid {pid} did not stop within {_STOP_GRACE_S:g} s, killing it")
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        left = self._wait_gone(left, _KILL_GRACE_S)
        for svc, pid in targets.items():
            if svc in left:
                raise StackError(f"{svc.name}: pid {pid} survived SIGKILL")
            svc.pid_file.unlink(missing_ok=True)
            self._log(f"{svc.name}: stopped pid {pid}")

    @staticmethod
    def _wait_gone(targets: dict[_Service, int], timeout_s: float) -> dict[_Service, int]:
        deadline = time.monotonic() + timeout_s
        left = dict(targets)
        while left:
            left = {svc: pid for svc, pid in left.items() if _pid_alive(pid, svc.marker)}
            if not left or time.monotonic() >= deadline:
                break
            time.sleep(0.1)
        return left

    def _wait_until(self, svc: _Service, pid: int, ready: Callable[[float], bool], what: str) -> None:
        """Poll `ready(attempt_timeout_s)` until it holds; fail early if the process dies."""
        timeout_s = self.config.stack_start_timeout_s
        start = time.monotonic()
        next_progress = start + _PROGRESS_EVERY_S
        while True:
            if not _pid_alive(pid, svc.marker):
                raise StackError(
                    f"{svc.name} (pid {pid}) exited during start; last lines of {svc.log_file}:\n{_tail(svc.log_file)}"
                )
            remaining = start + timeout_s - time.monotonic()
            if remaining <= 0:
                raise StackError(
                    f"{svc.name} (pid {pid}) did not answer within {timeout_s:g} s "
                    f"({_setting('stack_start_timeout_s')}); last lines of "
                    f"{svc.log_file}:\n{_tail(svc.log_file)}"
                )
            if ready(min(remaining, 2.0)):
                return
            now = time.monotonic()
            if now >= next_progress:
                self._log(f"{svc.name}: waiting for {what} ({now - start:.0f} s)...")
                next_progress = now + _PROGRESS_EVERY_S
            time.sleep(0.2)
