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

import asyncio
import base64
import concurrent.futures
import contextlib
import errno
import fcntl
import os
import shutil
import signal
import socket
import subprocess
import time
import uuid
from collections.abc import Callable, Coroutine, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, TypeVar

import redis
from pydantic import BaseModel, ConfigDict, Field, model_validator

from processors.scheduling import slice_problem
from sluice.admin import ensure_topics, wait_for_broker
from sluice.errors import StackError

_POM = Path(__file__).resolve().parents[1] / "compose" / "kafka" / "pom.xml"
_KAFKA_JAR_GLOB = "kafka_2.13-*.jar"
_STOP_GRACE_S = 20.0  # Kafka's controlled shutdown needs a few seconds; redis far less.
_KILL_GRACE_S = 5.0
_PROGRESS_EVERY_S = 5.0
_MAVEN_TIMEOUT_S = 900.0  # a cold ~/.m2 downloads ~60 MB (about 45 s measured)
_LOG_TAIL_LINES = 20

T = TypeVar("T")

# Every young-generation pause of the broker holds every request in flight.
# G1 as kafka-run-class.sh sets it (20 ms pause goal, old-generation marking
# started early) sized its young generation to the goal: ~20 ms pauses every
# ~3 s at 1,000 requests/s, about 0.8% of the time stopped, which alone puts
# a p99 of 25 ms out of reach. The parallel collector, without G1's
# remembered sets, paused 10-18 ms every 6-10 s (0.2% of the time); its
# price is a full collection (~0.2 s for 200 MB) when the old generation
# fills: the old generation grew ~4 MB a minute under that load, so about
# two hours apart (bench/RESULTS.md).
_GC_OPTIONS: dict[str, tuple[str, ...]] = {
    "parallel": ("-XX:+UseParallelGC",),
    "g1": ("-XX:+UseG1GC", "-XX:MaxGCPauseMillis=20", "-XX:InitiatingHeapOccupancyPercent=35",
           "-XX:+ExplicitGCInvokesConcurrent"),
}

# Popen objects of the processes this interpreter started, by pid. Holding them
# lets us reap our own children: a killed child stays a zombie until waited
# for, and os.kill(pid, 0) succeeds on zombies, so down() in the same process
# that ran up() (tests, fixtures) would otherwise wait its full grace period.
_CHILDREN: dict[int, subprocess.Popen[bytes]] = {}


def _setting(field: str) -> str:
    """The environment name of a StackConfig field, for error messages."""
    return f"SLUICE_{field.upper()}"


class StackConfig(BaseModel):
    """Where the local stack keeps its state and which ports it listens on."""

    model_config = ConfigDict(frozen=True, extra="ignore")

    state_dir: Path = Field(
        Path(".sluice"),
        description="Folder for the local stack's jars, data, logs and pid files.")
    kafka_port: int = Field(
        9092, ge=1, le=65535, description="Port of the local Kafka broker (PLAINTEXT, 127.0.0.1).")
    kafka_controller_port: int = Field(
        9093, ge=1, le=65535,
        description="Port of the local Kafka KRaft controller listener (127.0.0.1).")
    redis_port: int = Field(
        6379, ge=1, le=65535, description="Port of the local redis-server (127.0.0.1).")
    kafka_heap_mb: int = Field(
        1024, ge=128, le=65536, description="Java heap of the local Kafka broker, MiB (reserved at start, as Kafka's own scripts do).")
    kafka_gc: str = Field(
        "parallel", pattern="^(parallel|g1)$",
        description="Garbage collector of the local Kafka broker: parallel (young pauses of 10-18 ms every 6-10 s at 1,000 requests/s; a full collection of ~0.2 s when the old generation fills, about two hours apart at that load) or g1 (Kafka's own scripts' settings: pauses of ~20 ms every ~3 s).")
    kafka_jvm_options: str = Field(
        "", description="Extra JVM options of the local Kafka broker, space-separated (e.g. -XX:TieredStopAtLevel=1).")
    stack_sched_slice_us: int = Field(
        100, ge=0, le=100_000,
        description="CPU time slice (Linux 6.12+) asked for every thread of the local broker and redis-server, µs: short slices let their threads preempt compute (the model's) when they wake, instead of waiting out a default slice (1.4 ms on 2 cores, up to 3 ms on more); 0 leaves them as they are. `sluice up` sets it, also on a stack already running.")
    stack_start_timeout_s: float = Field(
        90.0, gt=0, le=3600,
        description="Seconds to wait for each service of the local stack to answer after start.")

    @model_validator(mode="after")
    def _ports_distinct(self) -> StackConfig:
        ports = {"kafka_port": self.kafka_port,
                 "kafka_controller_port": self.kafka_controller_port,
                 "redis_port": self.redis_port}
        seen: dict[int, str] = {}
        for field, port in ports.items():
            if port in seen:
                raise ValueError(f"{_setting(field)} and {_setting(seen[port])} "
                                 f"must differ (both are {port})")
            seen[port] = field
        return self


@dataclass(frozen=True)
class _Service:
    name: str
    dir: Path
    pid_file: Path
    log_file: Path
    # Substring of the process's command line; tells our process from an
    # unrelated one that got the same pid after ours died.
    marker: str
    # (port, setting) pairs the service binds.
    ports: tuple[tuple[int, str], ...]


def _run_sync(coro: Coroutine[Any, Any, T]) -> T:
    """Run a coroutine from sync code, also when called inside a running event loop."""
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return asyncio.run(coro)
    # asyncio.run refuses to nest; a private thread gets its own loop.
    with concurrent.futures.ThreadPoolExecutor(max_workers=1) as pool:
        return pool.submit(asyncio.run, coro).result()


def _pid_alive(pid: int, marker: str) -> bool:
    """True when `pid` is a live (non-zombie) process whose command line has `marker`."""
    child = _CHILDREN.get(pid)
    if child is not None:
        # Our own child: poll() is exact (its pid cannot be reused before we
        # reap it), and going on to /proc could see it die in between and
        # leave it unreaped.
        if child.poll() is None:
            return True
        del _CHILDREN[pid]
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return False  # another user's process: the pid was reused, ours is gone
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(
            errors="replace")
    except FileNotFoundError:
        return False  # exited between the kill and the read
    except OSError:
        return True  # no /proc (not Linux): os.kill is all we can go by
    # The state follows the parenthesised command name, which may hold spaces.
    state = stat.rsplit(")", 1)[-1].split()[0]
    return state != "Z" and marker in cmdline


def _port_answers(port: int, timeout_s: float = 0.5) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=timeout_s):
            return True
    except OSError:
        return False


def _port_free(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        # SO_REUSEADDR so that a TIME_WAIT left by our last run does not count
        # as "in use"; the services set it too and would bind fine.
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind(("127.0.0.1", port))
        except OSError as exc:
            if exc.errno == errno.EADDRINUSE:
                return False
            raise
    return True


def _tail(path: Path, lines: int = _LOG_TAIL_LINES) -> str:
    try:
        text = path.read_text(errors="replace")
    except FileNotFoundError:
        return f"({path} does not exist)"
    return "\n".join(text.splitlines()[-lines:]) or f"({path} is empty)"


def _rotate(log_file: Path) -> None:
    """Keep the previous run's log as .1, so a failure's tail shows only this run."""
    if log_file.exists():
        log_file.replace(log_file.with_name(log_file.name + ".1"))


class LocalStack:
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
            name="kafka", dir=kafka_dir, pid_file=kafka_dir / "broker.pid",
            log_file=kafka_dir / "broker.log", marker="kafka.Kafka",
            ports=((config.kafka_port, _setting("kafka_port")),
                   (config.kafka_controller_port, _setting("kafka_controller_port"))))
        self._redis = _Service(
            name="redis", dir=redis_dir, pid_file=redis_dir / "redis.pid",
            log_file=redis_dir / "redis.log", marker="redis-server",
            ports=((config.redis_port, _setting("redis_port")),))

    @property
    def bootstrap_servers(self) -> str:
        return f"127.0.0.1:{self.config.kafka_port}"

    @property
    def redis_url(self) -> str:
        return f"redis://127.0.0.1:{self.config.redis_port}/0"

    # ------------------------------------------------------------------ public

    def up(self, topics: dict[str, int] | None = None) -> Literal["started", "already running"]:
        """Start whatever is not running, wait until both answer, create `topics`.

        Topics are ensured also when both services were already running, since
        that starts nothing and a caller may bring new topics.
        """
        with self._lock():
            running = {svc.name: self._running_pid(svc) for svc in (self._kafka, self._redis)}
            to_start = [svc for svc in (self._kafka, self._redis) if running[svc.name] is None]
            result: Literal["started", "already running"] = (
                "started" if to_start else "already running")
            if not to_start:
                self._log(f"kafka (pid {running['kafka']}) and redis (pid {running['redis']}) "
                          "are already running")

            # Everything that can fail fast is checked before anything starts
            # (or Maven spends a minute), so a failure leaves nothing behind.
            for svc in to_start:
                self._clear_stale(svc)
                for port, setting in svc.ports:
                    if not _port_free(port):
                        raise StackError(
                            f"port {port} ({setting}) is in use by another process")
            redis_bin = (self._which("redis-server", "apt-get install redis-server")
                         if self._redis in to_start else "")
            java_bin = (self._which("java", "apt-get install openjdk-17-jre-headless")
                        if self._kafka in to_start else "")

            started: list[tuple[_Service, int]] = []
            try:
                if self._redis in to_start:
                    started.append((self._redis, self._start_redis(redis_bin)))
                if self._kafka in to_start:
                    libs = self._ensure_jars()
                    server_properties = self._write_kafka_config()
                    self._format_storage(java_bin, libs, server_properties)
                    started.append((self._kafka, self._start_kafka(java_bin, libs,
                                                                   server_properties)))
                # Also when already running: it may still be starting up.
                self._wait_redis(running["redis"] or self._pid_of(started, self._redis))
                self._wait_kafka(running["kafka"] or self._pid_of(started, self._kafka),
                                 announce=running["kafka"] is None)
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
                created = _run_sync(ensure_topics(
                    self.bootstrap_servers, topics,
                    timeout_s=self.config.stack_start_timeout_s))
                self._log("kafka: created topics " + ", ".join(created) if created
                          else "kafka: topics already exist")
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
                argv, cwd=svc.dir, stdin=subprocess.DEVNULL, stdout=out,
                stderr=subprocess.STDOUT,
                # Own session: Ctrl-C in the terminal that ran `sluice up` and
                # that terminal closing must not reach the services.
                start_new_session=True)
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

    def _wait_until(self, svc: _Service, pid: int, ready: Callable[[float], bool],
                    what: str) -> None:
        """Poll `ready(attempt_timeout_s)` until it holds; fail early if the process dies."""
        timeout_s = self.config.stack_start_timeout_s
        start = time.monotonic()
        next_progress = start + _PROGRESS_EVERY_S
        while True:
            if not _pid_alive(pid, svc.marker):
                raise StackError(f"{svc.name} (pid {pid}) exited during start; last lines of "
                                 f"{svc.log_file}:\n{_tail(svc.log_file)}")
            remaining = start + timeout_s - time.monotonic()
            if remaining <= 0:
                raise StackError(
                    f"{svc.name} (pid {pid}) did not answer within {timeout_s:g} s "
                    f"({_setting('stack_start_timeout_s')}); last lines of "
                    f"{svc.log_file}:\n{_tail(svc.log_file)}")
            if ready(min(remaining, 2.0)):
                return
            now = time.monotonic()
            if now >= next_progress:
                self._log(f"{svc.name}: waiting for {what} ({now - start:.0f} s)...")
                next_progress = now + _PROGRESS_EVERY_S
            time.sleep(0.2)

    # ------------------------------------------------------------------ redis

    def _start_redis(self, redis_bin: str) -> int:
        svc = self._redis
        pid = self._spawn(svc, [
            redis_bin,
            "--port", str(self.config.redis_port),
            "--bind", "127.0.0.1",
            "--dir", str(svc.dir),
            # A cache and a result store for a dev stack: no persistence.
            "--save", "",
            "--appendonly", "no",
            "--daemonize", "no",
            "--pidfile", str(svc.pid_file),
            "--logfile", str(svc.log_file),
        ])
        self._log(f"redis: started pid {pid} on 127.0.0.1:{self.config.redis_port}")
        return pid

    def _wait_redis(self, pid: int) -> None:
        def ping(timeout_s: float) -> bool:
            client = redis.Redis(host="127.0.0.1", port=self.config.redis_port,
                                 socket_connect_timeout=timeout_s, socket_timeout=timeout_s)
            try:
                return bool(client.ping())
            except (redis.exceptions.RedisError, OSError):
                return False
            finally:
                client.close()

        self._wait_until(self._redis, pid, ping, "PING")

    # ------------------------------------------------------------------ kafka

    def _ensure_jars(self) -> Path:
        kafka_dir = self._kafka.dir
        libs = kafka_dir / "libs"
        if any(libs.glob(_KAFKA_JAR_GLOB)):
            return libs
        mvn = self._which("mvn", "apt-get install maven")
        if not _POM.is_file():
            raise StackError(f"Kafka pom not found at {_POM}")
        # Resolve into a side folder and rename when complete, so an interrupted
        # run never leaves a libs folder that looks resolved but is not.
        partial = kafka_dir / "libs.partial"
        shutil.rmtree(partial, ignore_errors=True)
        partial.parent.mkdir(parents=True, exist_ok=True)
        self._log("kafka: resolving Kafka jars with Maven (first time only)...")
        start = time.monotonic()
        try:
            done = subprocess.run(
                [mvn, "-q", "-B", "-f", str(_POM), "dependency:copy-dependencies",
                 "-DincludeScope=runtime", f"-DoutputDirectory={partial}"],
                stdin=subprocess.DEVNULL, capture_output=True, text=True,
                timeout=_MAVEN_TIMEOUT_S)
        except subprocess.TimeoutExpired as exc:
            raise StackError(f"Maven did not resolve the Kafka jars within "
                             f"{_MAVEN_TIMEOUT_S:g} s") from exc
        if done.returncode != 0 or not any(partial.glob(_KAFKA_JAR_GLOB)):
            output = "\n".join((done.stdout + done.stderr).splitlines()[-_LOG_TAIL_LINES:])
            raise StackError(f"Maven could not resolve the Kafka jars "
                             f"(exit {done.returncode}):\n{output}")
        shutil.rmtree(libs, ignore_errors=True)
        partial.rename(libs)
        self._log(f"kafka: jars resolved in {time.monotonic() - start:.0f} s")
        return libs

    def _write_kafka_config(self) -> Path:
        """Write server.properties and log4j.properties; returns server.properties.

        Rewritten on every start so that changed ports take effect.
        """
        kafka_dir = self._kafka.dir
        port, cport = self.config.kafka_port, self.config.kafka_controller_port
        settings = {
            # One node that is both the KRaft controller and the broker.
            "process.roles": "broker,controller",
            "node.id": "1",
            "controller.quorum.bootstrap.servers": f"127.0.0.1:{cport}",
            "listeners": f"PLAINTEXT://127.0.0.1:{port},CONTROLLER://127.0.0.1:{cport}",
            "advertised.listeners": f"PLAINTEXT://127.0.0.1:{port}",
            "controller.listener.names": "CONTROLLER",
            "listener.security.protocol.map": "PLAINTEXT:PLAINTEXT,CONTROLLER:PLAINTEXT",
            "log.dirs": str(kafka_dir / "data"),
            # Internal topics must fit on a single broker.
            "offsets.topic.replication.factor": "1",
            "transaction.state.log.replication.factor": "1",
            "transaction.state.log.min.isr": "1",
            "num.partitions": "1",
            # Consumers join at once instead of waiting 3 s for more members.
            "group.initial.rebalance.delay.ms": "0",
            # Callers name their own reply_to topics; the broker creates them.
            "auto.create.topics.enable": "true",
            # A dev stack: keep a day, in segments small enough to be deleted.
            "log.retention.hours": "24",
            "log.segment.bytes": str(64 * 1024 * 1024),
            # A new segment's two index files are sparse and memory-mapped;
            # the first write into each faults, and the kernel reads ahead
            # around the fault: up to read_ahead_kb (8 MB here) of zeroed
            # pages, in the request handler thread, while produce requests
            # wait. 36 new partitions took ~150 ms of CPU that way (perf),
            # every hit sent then was 40-80 ms late. 1 MB still indexes a
            # 64 MB segment (16,384 entries at one per 4 KiB: 128 KB of
            # offsets, 192 KB of times); a full index only rolls early.
            "log.index.size.max.bytes": str(1024 * 1024),
            # Fewer threads and internal partitions: a laptop, not a cluster.
            "num.network.threads": "2",
            "num.io.threads": "4",
            "offsets.topic.num.partitions": "10",
        }
        server_properties = kafka_dir / "server.properties"
        server_properties.write_text(
            "# Written by sluice.stack on every start; edits are overwritten.\n"
            + "".join(f"{key}={value}\n" for key, value in settings.items()))
        (kafka_dir / "log4j.properties").write_text(
            "log4j.rootLogger=WARN, stdout\n"
            "log4j.appender.stdout=org.apache.log4j.ConsoleAppender\n"
            "log4j.appender.stdout.layout=org.apache.log4j.PatternLayout\n"
            "log4j.appender.stdout.layout.ConversionPattern=[%d] %p %m (%c)%n\n")
        return server_properties

    def _format_storage(self, java_bin: str, libs: Path, server_properties: Path) -> None:
        data = self._kafka.dir / "data"
        if (data / "meta.properties").exists():
            return
        cluster_id = base64.urlsafe_b64encode(uuid.uuid4().bytes).rstrip(b"=").decode()
        self._log(f"kafka: formatting storage in {data} (cluster id {cluster_id})")
        done = subprocess.run(
            [java_bin, "-cp", f"{libs}/*", "kafka.tools.StorageTool", "format",
             "--cluster-id", cluster_id, "--standalone", "--config", str(server_properties)],
            cwd=self._kafka.dir, stdin=subprocess.DEVNULL, capture_output=True, text=True,
            timeout=120)
        if done.returncode != 0:
            output = "\n".join((done.stdout + done.stderr).splitlines()[-_LOG_TAIL_LINES:])
            raise StackError(f"formatting Kafka storage failed (exit {done.returncode}):\n{output}")

    def _start_kafka(self, java_bin: str, libs: Path, server_properties: Path) -> int:
        pid = self._spawn(self._kafka, [
            java_bin,
            f"-Xmx{self.config.kafka_heap_mb}m", f"-Xms{self.config.kafka_heap_mb}m",
            *_GC_OPTIONS[self.config.kafka_gc],
            # Die rather than limp along; the log tail then says why.
            "-XX:+ExitOnOutOfMemoryError",
            *self.config.kafka_jvm_options.split(),
            f"-Dlog4j.configuration=file:{self._kafka.dir / 'log4j.properties'}",
            "-cp", f"{libs}/*",
            "kafka.Kafka", str(server_properties),
        ])
        self._log(f"kafka: started pid {pid} on {self.bootstrap_servers}")
        return pid

    def _wait_kafka(self, pid: int, *, announce: bool) -> None:
        def answers(timeout_s: float) -> bool:
            try:
                _run_sync(wait_for_broker(self.bootstrap_servers, timeout_s))
            except StackError:
                return False
            return True

        start = time.monotonic()
        self._wait_until(self._kafka, pid, answers, "the broker to answer")
        if announce:
            self._log(f"kafka: answering on {self.bootstrap_servers} "
                      f"(after {time.monotonic() - start:.1f} s)")
