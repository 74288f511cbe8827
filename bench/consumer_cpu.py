"""CPU per record of the worker's consumer: aiokafka against librdkafka.

    .venv/bin/python -m bench.consumer_cpu [--rate 1000] [--seconds 15]

After the model moved to its own process and the producers to librdkafka,
aiokafka's consumer is the largest part of the worker's CPU at 1,000 hits/s
(py-spy). This measures what a librdkafka consumer would save before anyone
rewrites the worker's fetch stage: each client, in a process of its own,
reads the same open-loop stream of request-sized records from a 12-partition
topic, in a consumer group with manual commits, handing each fetched batch
to an asyncio loop as the worker does; its process CPU is read from /proc.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import subprocess
import sys
import threading
import time

import orjson

from bench.harness import cpu_seconds, create_topics, machine, new_prefix, stack
from producers.client import make_request
from producers.corpus import text
from schemas.topics import KafkaConfig

COMMIT_EVERY_S = 0.04  # the worker commits once per publish round: ~25 a second at 1,000 hits/s


async def consume_aiokafka(bootstrap: str, topic: str, n: int) -> None:
    from aiokafka import AIOKafkaConsumer

    c = AIOKafkaConsumer(
        topic,
        bootstrap_servers=bootstrap,
        group_id=f"{topic}-aiokafka",
        enable_auto_commit=False,
        auto_offset_reset="earliest",
        fetch_max_wait_ms=100,
    )
    await c.start()
    seen = 0
    next_commit = time.monotonic()
    try:
        while seen < n:
            batch = await c.getmany(timeout_ms=100, max_records=1000)
            for recs in batch.values():
                for r in recs:
                    orjson.loads(r.value)
                seen += len(recs)
            if batch and time.monotonic() >= next_commit:  # about as often as the worker commits
                next_commit = time.monotonic() + COMMIT_EVERY_S
                await c.commit()
        await c.commit()
    finally:
        await c.stop()


async def consume_librdkafka(bootstrap: str, topic: str, n: int) -> None:
    from confluent_kafka import Consumer

    loop = asyncio.get_running_loop()
    c = Consumer(
        {
            "bootstrap.servers": bootstrap,
            "group.id": f"{topic}-librdkafka",
            "enable.auto.commit": False,
            "auto.offset.reset": "earliest",
            "fetch.wait.max.ms": 100,
            "socket.nagle.disable": True,
        }
    )
    c.subscribe([topic])
    done = asyncio.Event()
    seen = [0]

    next_commit = [time.monotonic()]
    commit_due = threading.Event()

    def on_batch(msgs: list) -> None:
        for m in msgs:
            orjson.loads(m.value())
        seen[0] += len(msgs)
        if time.monotonic() >= next_commit[0]:
            next_commit[0] = time.monotonic() + COMMIT_EVERY_S
            commit_due.set()
        if seen[0] >= n:
            done.set()

    def reader() -> None:  # the worker would run this thread: poll, hand batches to the loop
        while not done.is_set():
            # Consumer calls from another thread wait while this one polls
            # (a commit from the event loop hung here): commits are asked
            # for by the loop and made on this thread.
            if commit_due.is_set():
                commit_due.clear()
                c.commit(asynchronous=True)
            first = c.poll(0.1)
            if first is None or first.error() is not None:
                continue
            msgs = [first, *c.consume(num_messages=1000, timeout=0)]
            loop.call_soon_threadsafe(on_batch, [m for m in msgs if m.error() is None])

    t = threading.Thread(target=reader, daemon=True)
    t.start()
    await done.wait()
    t.join()
    c.commit(asynchronous=False)
    c.close()


def produce(bootstrap: str, topic: str, rate: float, n: int) -> None:
    from confluent_kafka import Producer

    p = Producer({"bootstrap.servers": bootstrap, "linger.ms": 1, "partitioner": "murmur2_random"})
    t0 = time.monotonic()
    for i in range(n):
        delay = t0 + i / rate - time.monotonic()
        if delay > 0:
            time.sleep(delay)
        doc = make_request(text(i % 1000, 7), id=f"c{i}")
        p.produce(topic, orjson.dumps(doc), doc["id"].encode())
        p.poll(0)
    p.flush(30)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rate", type=float, default=1000)
    ap.add_argument("--seconds", type=float, default=15)
    ap.add_argument("--as", dest="role", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--bootstrap", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--topic", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    n = int(args.rate * args.seconds)
    if args.role:  # a child: one client, until it has read n records
        fn = consume_aiokafka if args.role == "aiokafka" else consume_librdkafka
        asyncio.run(fn(args.bootstrap, args.topic, n))
        return
    rows = []
    with stack() as (bootstrap, _):
        for role in ("aiokafka", "librdkafka"):
            prefix = new_prefix(f"consumer-{role}")
            create_topics(bootstrap, prefix)
            topic = KafkaConfig(bootstrap_servers=bootstrap, topic_prefix=prefix).topics.requests
            child = subprocess.Popen(
                [
                    sys.executable,
                    "-m",
                    "bench.consumer_cpu",
                    "--as",
                    role,
                    "--bootstrap",
                    bootstrap,
                    "--topic",
                    topic,
                    "--rate",
                    str(args.rate),
                    "--seconds",
                    str(args.seconds),
                ],
                cwd=os.getcwd(),
            )
            time.sleep(3)  # joined its group, reading
            before = used = cpu_seconds(child.pid)
            produce(bootstrap, topic, args.rate, n)
            while child.poll() is None:
                used = cpu_seconds(child.pid)
                time.sleep(0.2)
            child.wait(60)
            rows.append((role, (used - before) * 1000 / n))
            print(f"{role}: {rows[-1][1]:.3f} ms CPU per record", flush=True)
    print(
        f"\nMachine: {machine()}\n\n| consumer (one process, group, manual commits, JSON parse) | CPU ms per record at "
        f"{args.rate:g}/s |\n|---|---|"
    )
    for role, ms in rows:
        print(f"| {role} | {ms:.3f} |")


if __name__ == "__main__":
    main()
