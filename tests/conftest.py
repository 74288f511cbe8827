"""Shared fixtures.

The stack (Kafka + Redis, and a ClickHouse server where one is at hand)
comes from, in order:

1. endpoints in the environment: SLUICE_TEST_BOOTSTRAP_SERVERS (and
   SLUICE_TEST_REDIS_URL, SLUICE_TEST_CLICKHOUSE_URL), a user's own services;
2. testcontainers, when it is installed and a Docker engine answers (the
   design's choice): Kafka (KRaft), Redis and ClickHouse containers for the
   session; SLUICE_TEST_CONTAINERS=0 skips this step;
3. the local stack that `sluice up` runs, started here on its own ports and
   state folder so a developer's running stack is left alone (no ClickHouse
   server: the sink's tests use embedded chDB).

Docker is never required.
"""

from __future__ import annotations

import contextlib
import os
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from sluice import supervisor

ROOT = Path(__file__).resolve().parents[1]

# images for the container path: Kafka 3.9 (the newest line aiokafka speaks fully, as the local stack)
KAFKA_IMAGE = os.environ.get("SLUICE_TEST_KAFKA_IMAGE", "confluentinc/cp-kafka:7.9.1")
REDIS_IMAGE = os.environ.get("SLUICE_TEST_REDIS_IMAGE", "redis:7")
CLICKHOUSE_IMAGE = os.environ.get("SLUICE_TEST_CLICKHOUSE_IMAGE", "clickhouse/clickhouse-server:24.8")


@dataclass(frozen=True)
class StackEndpoints:
    bootstrap_servers: str
    redis_url: str
    clickhouse_url: str = ""  # a ClickHouse server's HTTP URL; empty: none (the tests use chDB)
    source: str = "local"  # "environment", "containers" or "local"
    local: object | None = None  # LocalStack when this session started it


free_port = supervisor.free_port


def docker_answers() -> bool:
    """testcontainers is installed and a Docker engine answers a ping (cheap:
    no socket and no DOCKER_HOST means no engine, without importing docker)."""
    if os.environ.get("SLUICE_TEST_CONTAINERS", "1") == "0":
        return False
    if not os.environ.get("DOCKER_HOST") and not Path("/var/run/docker.sock").exists():
        return False
    try:
        import docker
        import testcontainers  # noqa: F401
    except ImportError:
        return False
    try:
        client = docker.from_env(timeout=3)
        try:
            return bool(client.ping())
        finally:
            client.close()
    except Exception:
        return False


@contextlib.contextmanager
def containers() -> Iterator[StackEndpoints]:
    """Kafka, Redis and ClickHouse in containers for the session (removed at the end)."""
    from testcontainers.clickhouse import ClickHouseContainer
    from testcontainers.kafka import KafkaContainer
    from testcontainers.redis import RedisContainer

    with (
        KafkaContainer(KAFKA_IMAGE).with_kraft() as kafka,
        RedisContainer(REDIS_IMAGE) as redis,
        ClickHouseContainer(CLICKHOUSE_IMAGE, port=8123) as clickhouse,
    ):
        redis_url = f"redis://{redis.get_container_host_ip()}:{redis.get_exposed_port(6379)}/0"
        clickhouse_url = (
            f"http://{clickhouse.username}:{clickhouse.password}@"
            f"{clickhouse.get_container_host_ip()}:{clickhouse.get_exposed_port(8123)}/"
        )
        yield StackEndpoints(kafka.get_bootstrap_server(), redis_url, clickhouse_url, source="containers")


@pytest.fixture(scope="session")
def stack() -> Iterator[StackEndpoints]:
    given = os.environ.get("SLUICE_TEST_BOOTSTRAP_SERVERS")
    if given:
        yield StackEndpoints(
            given,
            os.environ.get("SLUICE_TEST_REDIS_URL", "redis://127.0.0.1:6379/0"),
            os.environ.get("SLUICE_TEST_CLICKHOUSE_URL", ""),
            source="environment",
        )
        return
    if docker_answers():
        with containers() as endpoints:
            yield endpoints
        return
    from sluice.stack import LocalStack, StackConfig

    cfg = StackConfig(
        state_dir=ROOT / ".sluice" / "test-stack",
        kafka_port=int(os.environ.get("SLUICE_TEST_KAFKA_PORT", 29092)),
        kafka_controller_port=int(os.environ.get("SLUICE_TEST_CONTROLLER_PORT", 29093)),
        redis_port=int(os.environ.get("SLUICE_TEST_REDIS_PORT", 26379)),
    )
    local = LocalStack(cfg)
    outcome = local.up()
    try:
        yield StackEndpoints(local.bootstrap_servers, local.redis_url, local=local)
    finally:
        if outcome == "started" and not os.environ.get("SLUICE_TEST_KEEP_STACK"):
            local.down()


def own_stack_config(tmp_path_factory: Any, name: str, ports: range, **settings: Any) -> Any:
    """The StackConfig of a stack of a test module's own (one it may kill,
    or a secure one): a fresh state folder with the jars resolved before,
    and three free ports in `ports`, away from the suite's stack."""
    from sluice.stack import StackConfig
    from sluice.stack.processes import _port_free

    state = tmp_path_factory.mktemp(name)
    reuse_kafka_jars(state)
    free = [p for p in ports if _port_free(p)][:3]
    if len(free) < 3:
        pytest.skip(f"fewer than 3 free ports in {ports.start}-{ports.stop - 1}")
    kafka_port, controller_port, redis_port = free
    return StackConfig(
        state_dir=state,
        kafka_port=kafka_port,
        kafka_controller_port=controller_port,
        redis_port=redis_port,
        kafka_heap_mb=512,
        **settings,
    )


def reuse_kafka_jars(state: Path) -> None:
    """Give a stack of its own (a test's state folder) the Kafka jars a local
    stack resolved before, if any: saves a Maven run."""
    for resolved in (ROOT / ".sluice" / "test-stack" / "kafka" / "libs", ROOT / ".sluice" / "kafka" / "libs"):
        if any(resolved.glob("kafka_2.13-*.jar")):
            (state / "kafka").mkdir(exist_ok=True)
            (state / "kafka" / "libs").symlink_to(resolved)
            return


@dataclass
class Env:
    """One test's slice of the stack: its own topic prefix and group."""

    stack: StackEndpoints
    prefix: str
    partitions: int

    @property
    def kafka(self):
        from schemas.topics import KafkaConfig

        return KafkaConfig(bootstrap_servers=self.stack.bootstrap_servers, topic_prefix=self.prefix)

    @property
    def topics(self):
        return self.kafka.topics

    def worker_env(self, **extra: str) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith("SLUICE_")}
        env.update(
            SLUICE_BOOTSTRAP_SERVERS=self.stack.bootstrap_servers,
            SLUICE_REDIS_URL=self.stack.redis_url,
            SLUICE_TOPIC_PREFIX=self.prefix,
            SLUICE_GROUP_ID=f"{self.prefix}-workers",
            SLUICE_ORT_INTRA_OP_THREADS="1",
            # the PyPI model, always installed; its file is the tests' reference
            SLUICE_DEFAULT_MODEL="all-minilm-l6-v2",
        )
        env.update(extra)
        return env


@pytest.fixture
async def env(stack: StackEndpoints) -> Env:
    from sluice.admin import ensure_topics

    e = Env(stack, f"t{uuid.uuid4().hex[:10]}", partitions=6)
    await ensure_topics(
        stack.bootstrap_servers,
        e.topics.partitions(requests=e.partitions, results=3, telemetry=2, ingress=3),
        per_topic=e.topics.configs(),
    )
    return e


class WorkerProcess(supervisor.WorkerProcess):
    """`sluice worker` (or another `sluice COMMAND ARGS`) as a real subprocess,
    as operators run it, on the test's topics."""

    def __init__(self, env: Env, command: str = "worker", args: tuple[str, ...] = (), **settings: str) -> None:
        log = Path(os.environ.get("TMPDIR", "/tmp")) / f"sluice-{command}-{env.prefix}-{uuid.uuid4().hex[:6]}.log"
        super().__init__(
            env.worker_env(**settings), log_path=log, cwd=ROOT, inherit_env=False, command=command, args=args
        )

    def start(self, ready_timeout_s: float = 90.0) -> WorkerProcess:  # type: ignore[override]
        try:
            super().start(ready_timeout_s)
        except Exception as exc:
            raise AssertionError(f"{exc}\n{self.log()}") from None
        return self

    def log(self) -> str:
        p = self.log_path
        return p.read_text(errors="replace")[-5000:] if p is not None and p.exists() else ""


@pytest.fixture
def worker_factory(env: Env) -> Iterator[Callable[..., WorkerProcess]]:
    started: list[WorkerProcess] = []

    def make(**settings: str) -> WorkerProcess:
        w = WorkerProcess(env, **settings)
        started.append(w)
        return w.start()

    yield make
    for w in started:
        w.stop()


@pytest.fixture
async def client(env: Env):
    from producers.client import SluiceClient

    async with SluiceClient(env.kafka, timeout_s=120) as c:
        yield c


AUTOGROUPS = os.path.exists("/proc/self/autogroup")  # the kernel has them


def autogroup(pid: int | str = "self") -> tuple[str, int] | None:
    """A process's autogroup and its niceness; None in the root group, whose
    file reads empty (a process whose ancestors never started a session, as
    a CI runner's may be), or on a kernel without autogroups."""
    try:
        name, _, nice = Path(f"/proc/{pid}/autogroup").read_text().split()
    except (FileNotFoundError, ValueError):
        return None
    return name, int(nice)


async def read_topic_as(kafka: Any, topic: str, **options: Any) -> list:
    """read_topic with a connection's security settings (a KafkaConfig)."""
    return await read_topic(kafka, topic, **options)


async def read_topic(
    bootstrap: Any,
    topic: str,
    *,
    expect: int | None = None,
    timeout_s: float = 30.0,
    idle_s: float = 2.0,
    isolation_level: str = "read_uncommitted",
) -> list:
    """Every record of a topic from the beginning (until `expect` records or
    `idle_s` without new ones)."""
    from aiokafka import AIOKafkaConsumer, TopicPartition

    from schemas.topics import KafkaConfig

    consumer = AIOKafkaConsumer(
        **KafkaConfig.of(bootstrap).aiokafka(),
        enable_auto_commit=False,
        group_id=None,
        auto_offset_reset="earliest",
        isolation_level=isolation_level,
    )
    await consumer.start()
    try:
        parts = consumer.partitions_for_topic(topic) or set()
        if not parts:
            await consumer._client.force_metadata_update()
            parts = consumer.partitions_for_topic(topic) or set()
        tps = [TopicPartition(topic, p) for p in parts]
        consumer.assign(tps)
        await consumer.seek_to_beginning(*tps)
        out: list = []
        deadline = time.monotonic() + timeout_s
        last_new = time.monotonic()
        while time.monotonic() < deadline:
            batch = await consumer.getmany(timeout_ms=200)
            for recs in batch.values():
                out.extend(recs)
                last_new = time.monotonic()
            if expect is not None and len(out) >= expect and time.monotonic() - last_new > 0.5:
                break
            if expect is None and time.monotonic() - last_new > idle_s:
                break
        return out
    finally:
        await consumer.stop()
