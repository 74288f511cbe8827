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
    <state>/{kafka,redis}/mode         "plaintext" or "secure": how the running process was started

With SLUICE_STACK_SECURE (`sluice up --secure`) the broker has one SASL_SSL
listener and ACLs, redis-server an ACL user, and these are added:

    <state>/secrets/                   passwords, key stores and ca.pem (sluice.stack.security)
    <state>/kafka/data-secure/         the secure broker's own KRaft log dirs
    <state>/redis/users.acl            redis-server's users
    <state>/secure.env, client.env     settings to `source` for the service and client principals

See docs/security.md.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import shlex
import shutil
import signal
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, Literal

from pydantic import SecretStr

from processors.scheduling import slice_problem
from schemas.topics import KafkaConfig
from sluice.admin import ensure_topics
from sluice.errors import StackError
from sluice.stack.config import StackConfig, _setting
from sluice.stack.kafka_broker import ADMIN_USER, SCRAM_MECHANISM, KafkaBroker
from sluice.stack.processes import _CHILDREN, _pid_alive, _port_answers, _port_free, _rotate, _run_sync, _Service, _tail
from sluice.stack.redis_server import REDIS_PASSWORD, REDIS_USER, RedisServer
from sluice.stack.security import StackSecrets, write_private

__all__ = ["CLIENT_USER", "REDIS_USER", "SERVICE_USER", "LocalStack", "StackConfig"]

_STOP_GRACE_S = 20.0  # Kafka's controlled shutdown needs a few seconds; redis far less.
_KILL_GRACE_S = 5.0
_PROGRESS_EVERY_S = 5.0

# The Kafka users `sluice up --secure` makes: Sluice's own processes, and a
# single-tenant client application.
SERVICE_USER = "sluice"
CLIENT_USER = "client"


class LocalStack(KafkaBroker, RedisServer):
    """Start, stop and inspect the local Kafka + Redis of `state_dir`."""

    def __init__(self, config: StackConfig, log: Callable[[str], None] = print) -> None:
        self.config = config
        self._log = log
        # Absolute, because the services run with their own working directory
        # and the paths end up in their config files.
        self._state = config.state_dir.absolute()
        self._secrets = StackSecrets(self._state)
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

    @property
    def mode(self) -> str:
        return "secure" if self.config.stack_secure else "plaintext"

    @property
    def kafka_admin(self) -> str | KafkaConfig:
        """How the stack's own admin calls reach the broker: the bootstrap
        servers (plaintext), or the `admin` super user over SASL_SSL (secure)."""
        if not self.config.stack_secure:
            return self.bootstrap_servers
        return self.kafka_user(ADMIN_USER, self._admin_password())

    def kafka_user(self, user: str, password: str, **settings: object) -> KafkaConfig:
        """A connection to the secure broker as `user` (tests make other principals' this way)."""
        return KafkaConfig.model_validate(
            {
                "bootstrap_servers": self.bootstrap_servers,
                "kafka_security_protocol": "SASL_SSL",
                "kafka_sasl_mechanism": SCRAM_MECHANISM,
                "kafka_sasl_username": user,
                "kafka_sasl_password": SecretStr(password),
                "kafka_ssl_cafile": self._secrets.ca_pem,
                **settings,
            }
        )

    @property
    def secrets(self) -> StackSecrets:
        return self._secrets

    def env_file(self, principal: str) -> Path:
        """The file of settings to `source` for `principal` (SERVICE_USER or CLIENT_USER)."""
        return self._state / ("secure.env" if principal == SERVICE_USER else f"{principal}.env")

    # ------------------------------------------------------------------ public

    def up(
        self,
        topics: dict[str, int] | None = None,
        *,
        replication_factor: int = 1,
        min_insync_replicas: int = 1,
        per_topic: dict[str, dict[str, str]] | None = None,
        topic_prefix: str = "sluice",
    ) -> Literal["started", "already running"]:
        """Start whatever is not running, wait until both answer, create `topics`
        (with that replication: the local broker is one node, so more than 1 fails).

        Topics are ensured also when both services were already running, since
        that starts nothing and a caller may bring new topics. In secure mode
        the users and ACLs of `topic_prefix` are ensured likewise
        (`_provision_access`), and topics are made as the admin user.
        """
        with self._lock():
            running = {svc.name: self._running_pid(svc) for svc in (self._kafka, self._redis)}
            for svc in (self._kafka, self._redis):
                pid = running[svc.name]
                if pid is not None and self._mode_of(svc) != self.mode:
                    raise StackError(
                        f"{svc.name} (pid {pid}) runs {self._mode_of(svc)} but {_setting('stack_secure')} "
                        f"asks for {self.mode}: stop the stack first (`sluice down`)"
                    )
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
            if self.config.stack_secure and self._kafka in to_start and not self._secrets.pki_ready():
                keytool = self._which("keytool", "it comes with the JDK: apt-get install openjdk-17-jdk-headless")
                self._secrets.ensure_pki(keytool, self._log)

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
                        self.kafka_admin,
                        topics,
                        timeout_s=self.config.stack_start_timeout_s,
                        replication_factor=replication_factor,
                        min_insync_replicas=min_insync_replicas,
                        per_topic=per_topic,
                    )
                )
                self._log("kafka: created topics " + ", ".join(created) if created else "kafka: topics already exist")
            if self.config.stack_secure:
                self._provision_access(topic_prefix)
            return result

    def _provision_access(self, prefix: str) -> None:
        """The secure stack's principals: Kafka users `sluice` (the service)
        and `client` (a single-tenant app) with their ACLs on `prefix`, and
        the env files that hand their settings to workers and clients.

        Idempotent; passwords are made once and kept in their files.
        """
        from sluice import access  # confluent-kafka: only the secure stack needs it here

        admin = self.kafka_admin
        assert isinstance(admin, KafkaConfig)
        timeout_s = self.config.stack_start_timeout_s
        for user, grant in ((SERVICE_USER, access.grant_service), (CLIENT_USER, access.grant_client)):
            access.create_user(admin, user, self._secrets.password(user), timeout_s=timeout_s)
            grant(admin, prefix, user, timeout_s=timeout_s)
        self._write_env_file(SERVICE_USER, redis=True)
        self._write_env_file(CLIENT_USER, redis=False)
        self._log(
            f"kafka: users {SERVICE_USER} and {CLIENT_USER} granted on {prefix}.*; "
            f"workers: source {self.env_file(SERVICE_USER)}, clients: source {self.env_file(CLIENT_USER)}"
        )

    def _write_env_file(self, user: str, *, redis: bool) -> None:
        """Export lines naming the password files, never a password."""
        settings = {
            "SLUICE_BOOTSTRAP_SERVERS": self.bootstrap_servers,
            "SLUICE_KAFKA_SECURITY_PROTOCOL": "SASL_SSL",
            "SLUICE_KAFKA_SASL_MECHANISM": SCRAM_MECHANISM,
            "SLUICE_KAFKA_SASL_USERNAME": user,
            "SLUICE_KAFKA_SASL_PASSWORD_FILE": str(self._secrets.password_file(user)),
            "SLUICE_KAFKA_SSL_CAFILE": str(self._secrets.ca_pem),
        }
        if redis:
            settings |= {
                "SLUICE_REDIS_URL": self.redis_url,
                "SLUICE_REDIS_USERNAME": REDIS_USER,
                "SLUICE_REDIS_PASSWORD_FILE": str(self._secrets.password_file(REDIS_PASSWORD)),
            }
        write_private(
            self.env_file(user),
            f"# Written by `sluice up --secure`: the Kafka user {user!r}. Load it with: source FILE\n"
            + "".join(f"export {key}={shlex.quote(value)}\n" for key, value in settings.items()),
        )

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
                "mode": self._mode_of(svc) if pid is not None else None,
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

    @staticmethod
    def _mode_of(svc: _Service) -> str:
        """How the running `svc` was started; a stack started before the mode
        file existed was plaintext."""
        try:
            return (svc.dir / "mode").read_text().strip() or "plaintext"
        except FileNotFoundError:
            return "plaintext"

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
        (svc.dir / "mode").write_text(f"{self.mode}\n")
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
