"""The clients' reply channels on the real broker: a reply topic of a
client's own, a timed-out wait forgotten, a failed reader that fails the
waiting calls and starts again."""

from __future__ import annotations

import asyncio

import pytest

pytestmark = [pytest.mark.integration, pytest.mark.timeout(180)]


def topic_names(env) -> set[str]:
    from confluent_kafka.admin import AdminClient

    return set(AdminClient(env.kafka.rdkafka()).list_topics(timeout=10).topics)


async def test_a_client_with_a_reply_topic_of_its_own_gets_its_answers_there(env, worker_factory):
    from producers.client import SluiceClient

    worker_factory()
    mine = env.topics.replies("client-1")
    async with SluiceClient(env.kafka, reply_topic=mine, timeout_s=60) as c:
        assert mine in topic_names(env)
        results = await c.submit_many([f"own replies {env.prefix} {i}" for i in range(4)])
        assert [r.status for r in results] == ["ok"] * 4
    assert mine not in topic_names(env)  # made at start, removed at stop


async def test_a_timed_out_wait_is_forgotten(env):
    from producers.client import ResultTimeout, SluiceClient

    async with SluiceClient(env.kafka, timeout_s=60) as c:  # no worker: nothing answers
        with pytest.raises(ResultTimeout):
            await c.submit(f"never answered {env.prefix}", timeout_s=0.3)
        futs = [await c.send({"v": 1, "id": f"{env.prefix}-{i}", "input": "x"}) for i in range(3)]
        assert c.pending == 3
        for f in futs:
            f.cancel()
        await asyncio.sleep(0)
        assert c.pending == 0


async def test_a_failed_aiokafka_reader_fails_its_waiting_calls_and_starts_again(env, worker_factory):
    from producers.client import ClientError, SluiceClient

    async with SluiceClient(env.kafka, timeout_s=60) as c:
        waiting = await c.send({"v": 1, "id": f"{env.prefix}-lost", "input": "x"})  # no worker yet

        async def broken(*a, **kw):
            raise RuntimeError("the reader's fetch broke")

        c._consumer.getmany = broken  # the reader's next fetch fails (the broker stays as it is)
        with pytest.raises(ClientError, match="reader stopped"):
            await asyncio.wait_for(waiting, 10)  # failed at once, not at its timeout
        worker_factory()
        result = await c.submit(f"after the restart {env.prefix}", timeout_s=60)
        assert result.status == "ok" and c._restarts == 1


class BreaksOnce:
    """A librdkafka consumer whose next poll raises (its methods cannot be replaced)."""

    def __init__(self, inner) -> None:
        self._inner, self._broke = inner, False

    def poll(self, timeout):
        if not self._broke:
            self._broke = True
            raise RuntimeError("the reader's fetch broke")
        return self._inner.poll(timeout)

    def __getattr__(self, name):
        return getattr(self._inner, name)


async def test_a_failed_librdkafka_reader_fails_its_waiting_calls_and_starts_again(env, worker_factory):
    from producers.client import ClientError, make_request
    from producers.rdkafka_client import RdKafkaClient

    async with RdKafkaClient(env.kafka, reply_topic=env.topics.replies("rd-1")) as c:
        waiting = await c.send({"v": 1, "id": f"{env.prefix}-lost", "input": "x"})
        c._consumer = BreaksOnce(c._consumer)  # the reader's next poll fails; its replacement is whole
        with pytest.raises(ClientError, match="reader failed"):
            await asyncio.wait_for(waiting, 10)
        worker_factory()
        fut = await c.send(make_request(f"after the restart {env.prefix}"))
        doc = await asyncio.wait_for(fut, 60)
        assert doc["status"] == "ok" and c.restarts == 1 and c.reading
