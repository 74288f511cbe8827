"""Reply channels: the topic a client reads its results from, and the calls
waiting on them.

A client on the shared results topic reads every client's answers and keeps
its own: N clients, N times the traffic each. A reply topic of its own
(PREFIX.replies.OWNER, named in each request's `reply_to`) carries only its
answers. It is made when the client starts and, being one instance's, removed
when it stops; `retention.ms` bounds what a crashed instance leaves behind.
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket
from typing import Any

from schemas.errors import SluiceError
from schemas.topics import KafkaConfig, check_topic_name

log = logging.getLogger(__name__)


def default_owner() -> str:
    """A reply topic's owner when none is named: this host and process."""
    host = "".join(c if c.isalnum() or c in "-_" else "-" for c in socket.gethostname())
    return check_topic_name(f"{host or 'host'}-{os.getpid()}")


class Waiting:
    """Calls waiting for results, by request id.

    A wait that ends without its result (timed out, cancelled: `asyncio.wait_for`
    cancels the future) is forgotten at once, so a client that outlives many
    timeouts does not keep a future per lost request."""

    def __init__(self) -> None:
        self._by_id: dict[str, asyncio.Future[dict[str, Any]]] = {}

    def __len__(self) -> int:
        return len(self._by_id)

    def add(self, request_id: str) -> asyncio.Future[dict[str, Any]]:
        fut: asyncio.Future[dict[str, Any]] = asyncio.get_running_loop().create_future()
        self._by_id[request_id] = fut

        def forget(f: asyncio.Future[dict[str, Any]]) -> None:
            if f.cancelled() and self._by_id.get(request_id) is f:
                del self._by_id[request_id]

        fut.add_done_callback(forget)
        return fut

    def get_or_add(self, request_id: str) -> asyncio.Future[dict[str, Any]]:
        fut = self._by_id.get(request_id)
        return fut if fut is not None else self.add(request_id)

    def forget(self, request_id: str) -> None:
        self._by_id.pop(request_id, None)

    def resolve(self, doc: dict[str, Any]) -> bool:
        """Hand a result to its waiting call; False if nobody waits for it."""
        fut = self._by_id.pop(doc.get("id"), None)  # type: ignore[arg-type]
        if fut is None or fut.done():
            return False
        fut.set_result(doc)
        return True

    def fail_all(self, exc: BaseException) -> None:
        """No result can arrive any more: every waiting call fails now, not at its timeout."""
        waiting, self._by_id = self._by_id, {}
        for fut in waiting.values():
            if not fut.done():
                fut.set_exception(exc)


def _admin(kafka: KafkaConfig) -> Any:
    from confluent_kafka.admin import AdminClient

    return AdminClient(kafka.rdkafka())


def ensure_reply_topic(
    kafka: KafkaConfig, topic: str, *, partitions: int = 1, retention_ms: int = 3_600_000, timeout_s: float = 30.0
) -> bool:
    """Create the reply topic if it is missing; True if this call made it.
    Blocking (librdkafka's admin API): call it from a thread."""
    from confluent_kafka import KafkaError, KafkaException
    from confluent_kafka.admin import NewTopic

    admin = _admin(kafka)
    new = NewTopic(topic, num_partitions=partitions, config={"retention.ms": str(retention_ms)})
    try:
        admin.create_topics([new], operation_timeout=timeout_s, request_timeout=timeout_s)[topic].result(timeout_s)
    except KafkaException as exc:
        if exc.args[0].code() == KafkaError.TOPIC_ALREADY_EXISTS:
            return False
        raise SluiceError(f"cannot create reply topic {topic!r}: {exc.args[0].str()}", code="reply_topic") from None
    return True


def delete_reply_topic(kafka: KafkaConfig, topic: str, *, timeout_s: float = 10.0) -> None:
    """Remove an instance's reply topic at its clean stop (a failure is logged, not raised)."""
    admin = _admin(kafka)  # held: the futures fail if their client is collected first
    try:
        admin.delete_topics([topic], operation_timeout=timeout_s)[topic].result(timeout_s)
    except Exception as exc:
        log.warning("reply topic %s not deleted (its retention will empty it): %s", topic, exc)
