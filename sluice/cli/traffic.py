"""`sluice produce`, `subscribe` and `loadtest`: requests in, results out, load."""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
from typing import Any

import orjson

from processors.scheduling import slice_problem
from schemas.errors import SluiceError
from sluice.settings import Settings


def print_json(doc: Any) -> None:
    sys.stdout.write(orjson.dumps(doc, option=orjson.OPT_SERIALIZE_NUMPY).decode() + "\n")
    sys.stdout.flush()


def _requests_from(args: argparse.Namespace) -> list[dict[str, Any]]:
    from producers.client import make_request

    labels = args.labels.split(",") if args.labels else None
    common = dict(task=args.task, model=args.model, tenant=args.tenant, labels=labels, cache=args.cache)
    if args.text:
        return [make_request(t, **common) for t in args.text]
    out = []
    for n, line in enumerate(sys.stdin, 1):
        line = line.strip()
        if not line:
            continue
        try:
            doc = json.loads(line)
        except json.JSONDecodeError as exc:
            raise SluiceError(f"stdin line {n}: not JSON ({exc})") from None
        if isinstance(doc, str):
            out.append(make_request(doc, **common))
        elif isinstance(doc, dict) and isinstance(doc.get("input"), str):
            req = make_request(doc["input"], **common)
            req.update(doc)
            out.append(req)
        else:
            raise SluiceError(f"stdin line {n}: expected a JSON string or an object with 'input'")
    return out


async def _produce(s: Settings, args: argparse.Namespace) -> int:
    from producers.client import SluiceClient

    reqs = _requests_from(args)
    async with SluiceClient(s.kafka(), timeout_s=args.timeout) as client:
        futs = [await client.send(r) for r in reqs]
        await client.flush()
        if not args.wait:
            for r in reqs:
                print_json({"id": r["id"], "produced": True})
            return 0
        failed = 0
        for fut in futs:
            try:
                doc = await asyncio.wait_for(fut, args.timeout)
            except TimeoutError:
                failed += 1
                continue
            doc.pop("_received_at_ms", None)
            if args.brief and isinstance(doc.get("output"), dict) and "embedding" in doc["output"]:
                emb = doc["output"]["embedding"]
                doc["output"] = {"embedding": emb[:4] + ["..."], "dimensions": len(emb)}
            print_json(doc)
        if failed:
            print(f"{failed} results did not arrive within {args.timeout} s", file=sys.stderr)
        return 1 if failed else 0


def cmd_produce(s: Settings, args: argparse.Namespace) -> int:
    return asyncio.run(_produce(s, args))


async def _subscribe(s: Settings, args: argparse.Namespace) -> int:
    from producers.client import SluiceClient

    async with SluiceClient(s.kafka(), results_topic=args.topic) as client:
        n = 0
        async for doc in client.results():
            doc.pop("_received_at_ms", None)
            print_json(doc)
            n += 1
            if args.count and n >= args.count:
                return 0
    return 0


def cmd_subscribe(s: Settings, args: argparse.Namespace) -> int:
    try:
        return asyncio.run(_subscribe(s, args))
    except KeyboardInterrupt:
        return 0


def workload_of(args: argparse.Namespace):
    from producers.corpus import Workload

    return Workload(args.distribution, args.distinct, args.exponent, args.seed, hot_fraction=args.hot_fraction)


def transport_of(s: Settings, args: argparse.Namespace) -> Any:
    """The client that offers the load (started by the caller with `async with`)."""
    if args.transport == "http":
        from producers.http_transport import HttpTransport

        key = None
        if args.api_key_file:
            try:
                with open(args.api_key_file) as f:
                    key = f.readline().strip()
            except OSError as exc:
                raise SluiceError(f"--api-key-file {args.api_key_file}: {exc.strerror}") from None
        return HttpTransport(args.url, api_key=key)
    from producers.loadgen import kafka_transport

    return kafka_transport(s.kafka(), args.transport)


async def _find_max(s: Settings, args: argparse.Namespace, labels: list[str] | None):
    from producers.loadgen import find_max_rate, run_load

    workload = workload_of(args)
    async with transport_of(s, args) as client:

        async def step(rate: float, n: int):
            return await run_load(
                None,
                rate=rate,
                duration_s=args.duration,
                workload=workload.step(n),
                task=args.task,
                labels=labels,
                cache=args.cache,
                client=client,
                progress=None,
                drain_timeout_s=max(30.0, 3 * args.duration),
            )

        return await find_max_rate(
            step,
            slo_ms=args.slo_ms,
            start_rate=args.rate,
            factor=args.step_factor,
            max_rate=args.max_rate,
            refine=args.refine,
            progress=None if args.json else print,
        )


def generator_slice(s: Settings) -> None:
    """The load generator measures latency on what is often the same
    machine as the worker: its threads preempt the model's compute as the
    worker's do (SLUICE_SCHED_SLICE_US)."""
    if s.sched_slice_us:
        problem = slice_problem(s.sched_slice_us)
        if problem:
            print(f"load generator keeps the default time slice ({problem})", file=sys.stderr)


def cmd_loadtest(s: Settings, args: argparse.Namespace) -> int:
    from producers.loadgen import run_load

    generator_slice(s)
    labels = args.labels.split(",") if args.labels else None
    if args.find_max:
        search = asyncio.run(_find_max(s, args, labels))
        if args.json:
            print_json({"slo_ms": search.slo_ms, "max_rate": search.max_rate, "steps": search.steps})
        else:
            print(search.table())
            print(f"highest rate with p99 < {search.slo_ms:g} ms: {search.max_rate:.0f} requests/s")
        return 0 if search.max_rate > 0 else 1

    async def run() -> Any:
        async with transport_of(s, args) as client:
            return await run_load(
                s.kafka(),
                rate=args.rate,
                duration_s=args.duration,
                workload=workload_of(args),
                task=args.task,
                labels=labels,
                cache=args.cache,
                progress=None if args.json else print,
                client=client,
            )

    report = asyncio.run(run())
    if args.json:
        print_json(report.as_dict())
    else:
        print(report.summary())
    return 0 if report.unanswered == 0 else 1
