"""Kafka admin helpers: wait until a broker really answers, and create topics.

Both are used by `sluice up` (through `sluice.stack`) and may be used by any
component that wants its topics to exist before it starts.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator, Iterator
from typing import Any

from aiokafka.admin import AIOKafkaAdminClient, NewPartitions, NewTopic
from aiokafka.errors import (
    InvalidPartitionsError,
    KafkaError,
    TopicAlreadyExistsError,
    for_code,
)

from schemas.topics import KafkaConfig, check_topic_name
from sluice.errors import StackError

log = logging.getLogger(__name__)

_RETRY_PAUSE_S = 0.5


@contextlib.contextmanager
def quiet_logger(name: str | None, level: int = logging.CRITICAL) -> Iterator[None]:
    """Raise one logger's threshold for a while.

    A broker that is still starting refuses connections and aiokafka logs
    each refusal at ERROR, burying the progress lines of `sluice up`; ONNX
    Runtime's quantiser logs advice on the root logger during a model build.
    """
    logger = logging.getLogger(name)
    previous = logger.level
    logger.setLevel(level)
    try:
        yield
    finally:
        logger.setLevel(previous)


@contextlib.asynccontextmanager
async def _admin(kafka: str | KafkaConfig, timeout_s: float) -> AsyncIterator[AIOKafkaAdminClient]:
    client = AIOKafkaAdminClient(
        **KafkaConfig.of(kafka).aiokafka(),
        request_timeout_ms=max(1000, int(timeout_s * 1000)),
    )
    try:
        await client.start()
        yield client
    finally:
        await client.close()


async def _probe(kafka: str | KafkaConfig, timeout_s: float) -> None:
    """One attempt: raises unless the broker serves metadata with a live broker in it.

    A KRaft broker accepts TCP before it has caught up with the controller;
    only a metadata answer that lists a broker means requests will be served.
    """
    async with _admin(kafka, timeout_s) as client:
        cluster = await client.describe_cluster()
        if not cluster.get("brokers"):
            raise KafkaError("broker answered, but lists no brokers yet")


async def wait_for_broker(kafka: str | KafkaConfig, timeout_s: float) -> None:
    """Return once the broker answers a metadata request; StackError after `timeout_s`."""
    deadline = time.monotonic() + timeout_s
    last_error: BaseException | None = None
    with quiet_logger("aiokafka"):
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                break
            try:
                # aiokafka's own timeouts do not bound bootstrap retries, so bound
                # each attempt here to keep the overall deadline honest.
                await asyncio.wait_for(_probe(kafka, min(remaining, 5.0)), remaining)
                return
            except (KafkaError, OSError) as exc:  # TimeoutError is an OSError
                last_error = exc
            await asyncio.sleep(min(_RETRY_PAUSE_S, max(0.0, deadline - time.monotonic())))
    detail = f": {type(last_error).__name__}: {last_error}" if last_error else ""
    raise StackError(
        f"Kafka at {KafkaConfig.of(kafka).bootstrap_servers} did not answer within {timeout_s:g} s{detail}"
    )


def _partition_counts(described: list[dict[str, Any]]) -> dict[str, int]:
    return {t["topic"]: len(t["partitions"]) for t in described if t["error_code"] == 0}


def _replication_factors(described: list[dict[str, Any]]) -> dict[str, int]:
    """Topic -> its replica count (the most any partition has)."""
    return {
        t["topic"]: max((len(p["replicas"]) for p in t["partitions"]), default=0)
        for t in described
        if t["error_code"] == 0
    }


def check_replication(replication_factor: int, min_insync_replicas: int) -> None:
    """A write with acks=all needs min.insync.replicas live replicas, so more
    than the replication factor would refuse every write."""
    if replication_factor < 1:
        raise ValueError(f"replication factor must be >= 1, got {replication_factor}")
    if not 1 <= min_insync_replicas <= replication_factor:
        raise ValueError(
            f"min.insync.replicas={min_insync_replicas} must be between 1 and the replication "
            f"factor ({replication_factor}), else every acks=all write is refused"
        )


async def _wait_until_visible(client: AIOKafkaAdminClient, names: set[str], deadline: float) -> None:
    """Creation is committed by the controller before the broker's metadata shows it;
    wait so that a caller that describes or produces right away finds the topics."""
    while missing := names - set(await client.list_topics()):
        if time.monotonic() >= deadline:
            raise StackError(f"topics created but not visible in metadata yet: {', '.join(sorted(missing))}")
        await asyncio.sleep(0.1)


async def ensure_topics(
    kafka: str | KafkaConfig,
    partitions: dict[str, int],
    *,
    timeout_s: float = 30.0,
    configs: dict[str, str] | None = None,
    replication_factor: int = 1,
    min_insync_replicas: int = 1,
    per_topic: dict[str, dict[str, str]] | None = None,
) -> list[str]:
    """Create missing topics; return the names created. Idempotent: run it again
    and it creates nothing.

    New topics get their partition count, `replication_factor` replicas and
    `configs` plus min.insync.replicas (and `per_topic`'s for that topic). Existing topics are checked: one with
    fewer partitions than asked is grown to the count (Kafka can add partitions
    but never remove them; a keyed topic's keys then move, which costs cache
    locality for a while, not correctness, and the count is what caps how many
    workers share the load); more partitions are left alone. One whose
    replication factor differs is reported (a warning naming the topic):
    changing it takes a partition reassignment, an operator's decision."""
    for name, count in partitions.items():
        check_topic_name(name)
        if count < 1:
            raise ValueError(f"topic {name!r}: partition count must be >= 1, got {count}")
    check_replication(replication_factor, min_insync_replicas)
    if not partitions:
        return []
    topic_configs = {**(configs or {}), "min.insync.replicas": str(min_insync_replicas)}

    deadline = time.monotonic() + timeout_s
    timeout_ms = max(1000, int(timeout_s * 1000))
    try:
        # One bound for the whole exchange: aiokafka's request timeout covers
        # single requests, not bootstrap retries and the visibility wait.
        async with asyncio.timeout(timeout_s), _admin(kafka, timeout_s) as client:
            # list_topics asks for all topics; asking metadata for named topics
            # instead would let a broker with auto.create.topics.enable create
            # the missing ones itself, with the default partition count.
            existing = set(await client.list_topics()) & partitions.keys()
            missing = [name for name in partitions if name not in existing]

            created: list[str] = []
            if missing:
                response = await client.create_topics(
                    [
                        NewTopic(
                            name,
                            partitions[name],
                            replication_factor,
                            topic_configs={**topic_configs, **(per_topic or {}).get(name, {})},
                        )
                        for name in missing
                    ],
                    timeout_ms=timeout_ms,
                )
                for entry in response.topic_errors:
                    name, code = entry[0], entry[1]
                    if code == 0:
                        created.append(name)
                        continue
                    error = for_code(code)
                    if error is TopicAlreadyExistsError:
                        # Someone else created it between our list and create;
                        # check its partition count like any existing topic.
                        existing.add(name)
                        continue
                    message = entry[2] if len(entry) > 2 and entry[2] else error.__name__
                    raise StackError(
                        f"could not create topic {name!r} ({partitions[name]} partitions, "
                        f"replication factor {replication_factor}): {message}"
                    )
                await _wait_until_visible(client, set(created), deadline)

            if existing:
                described = await client.describe_topics(sorted(existing))
                for name, have in sorted(_replication_factors(described).items()):
                    if have != replication_factor:
                        log.warning(
                            "topic %s has replication factor %d, SLUICE_TOPIC_REPLICATION_FACTOR is %d: "
                            "left as it is (kafka-reassign-partitions changes it)",
                            name,
                            have,
                            replication_factor,
                        )
                counts = _partition_counts(described)
                grow = {
                    name: NewPartitions(partitions[name]) for name, have in counts.items() if have < partitions[name]
                }
                if grow:
                    for name in sorted(grow):
                        log.warning("topic %s: growing from %d to %d partitions", name, counts[name], partitions[name])
                    try:
                        await client.create_partitions(grow, timeout_ms=timeout_ms)
                    except InvalidPartitionsError:
                        # Raced with another grower; fine if the count is now enough.
                        counts = _partition_counts(await client.describe_topics(sorted(grow)))
                        short = [n for n in grow if counts.get(n, 0) < partitions[n]]
                        if short:
                            raise
            return created
    except StackError:
        raise
    except (KafkaError, OSError) as exc:  # TimeoutError is an OSError
        raise StackError(
            f"could not ensure topics on {KafkaConfig.of(kafka).bootstrap_servers}: {type(exc).__name__}: {exc}"
        ) from exc


async def delete_topics_with_prefix(kafka: str | KafkaConfig, prefix: str, *, timeout_s: float = 60.0) -> list[str]:
    """Delete every topic whose name starts with `prefix`; return their names.
    For throwaway topics (benchmarks): each partition costs the broker heap
    and file handles for as long as it exists, and they add up."""
    if not prefix:
        raise ValueError("refusing to delete every topic: give a non-empty prefix")
    try:
        async with asyncio.timeout(timeout_s), _admin(kafka, timeout_s) as client:
            names = sorted(t for t in await client.list_topics() if t.startswith(prefix))
            for i in range(0, len(names), 100):  # a bounded request each
                await client.delete_topics(names[i : i + 100], timeout_ms=int(timeout_s * 1000))
            return names
    except (KafkaError, OSError) as exc:
        raise StackError(
            f"could not delete topics {prefix}* on {KafkaConfig.of(kafka).bootstrap_servers}: {type(exc).__name__}: {exc}"
        ) from exc
