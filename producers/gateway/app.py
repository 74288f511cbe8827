"""The gateway: each HTTP call becomes one request per input on the
requests topic (or PREFIX.ingress under admission), and is answered from the
instance's own reply topic.

Order of a call: the API key gives the tenant (401 without one); the backlog
and the instance's in-flight inputs are checked (429 with Retry-After); the
requests go out with `deadline_ms` from the caller's timeout, so a worker
drops what nobody waits for any more; the results are awaited for that long
(503 with Retry-After past it, never a hung connection), then shaped into the
API's response. A streamed call sends each result as a server-sent event as
it arrives."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import Response, StreamingResponse
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from producers.client import make_request
from producers.gateway import api
from producers.gateway.api import ApiError, Call, Style
from producers.gateway.config import GatewayConfig
from producers.gateway.keys import ApiKeys
from producers.gateway.metrics import GatewayMetrics
from producers.rdkafka_client import RdKafkaClient
from schemas.records import now_ms
from schemas.service.lag import BrokerSignals, Overload
from schemas.service.tasks import supervise
from schemas.topics import KafkaConfig

log = logging.getLogger(__name__)

_STREAM_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}


class Gateway:
    """What the routes share: the Kafka client, the keys, the backlog watch, the metrics."""

    def __init__(
        self,
        config: GatewayConfig,
        kafka: KafkaConfig,
        *,
        workers_group: str,
        keys: ApiKeys | None,
        metrics: GatewayMetrics | None = None,
    ) -> None:
        self.config = config
        self.kafka = kafka
        self.keys = keys
        self.metrics = metrics or GatewayMetrics()
        self.reply_topic = kafka.topics.replies(config.gateway_id)
        self.client = RdKafkaClient(
            kafka,
            reply_topic=self.reply_topic,
            reply_partitions=config.gateway_reply_partitions,
            reply_retention_ms=config.gateway_reply_retention_ms,
        )
        self.overload = Overload(
            BrokerSignals(kafka, kafka.topics.requests, workers_group),
            limit=config.gateway_backlog_limit,
            resume=config.gateway_backlog_resume,
            interval_s=config.gateway_lag_interval_s,
            what="new calls",
        )
        self._watch: asyncio.Task[None] | None = None
        self.metrics.pending.set_function(lambda: self.client.pending)
        self.metrics.reader_restarts.set_function(lambda: self.client.restarts)

    async def start(self) -> None:
        await self.client.start()  # the reply topic made and its reader positioned before any call
        await self.overload.signals.start()

        def gauges() -> None:
            self.metrics.backlog.set(self.overload.lag or 0)
            self.metrics.overloaded.set(int(self.overload.overloaded))

        self._watch = supervise(self.overload.watch(on_reading=gauges), name="gateway-backlog")
        log.info("gateway %s: answers on %s", self.config.gateway_id, self.reply_topic)

    async def stop(self) -> None:
        if self._watch is not None:
            self._watch.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._watch
        await self.overload.signals.close()
        await self.client.stop()

    # -- the steps of a call ---------------------------------------------------------
    def tenant(self, request: Request) -> str:
        tenant = self.keys.tenant_of(request.headers.get("authorization")) if self.keys else None
        if tenant is not None:
            return tenant
        if self.config.gateway_allow_anonymous:
            return "default"
        self.metrics.rejections.labels("unauthorized").inc()
        raise ApiError(401, "invalid_api_key", "a valid API key is required: Authorization: Bearer KEY")

    def timeout_s(self, request: Request) -> float:
        """How long this call may wait: the gateway's limit, or the caller's own
        timeout when shorter (answered a little before it, so the caller gets a
        503 and not a dropped connection)."""
        limit = self.config.gateway_timeout_s
        for name, scale in (("x-timeout-ms", 0.001), ("x-stainless-read-timeout", 1.0)):
            raw = request.headers.get(name)
            if raw:
                try:
                    theirs = float(raw) * scale
                except ValueError:
                    raise api.invalid(f"header {name}: a number, got {raw!r}") from None
                if theirs > 0:
                    limit = min(limit, theirs * 0.95)
        return limit

    def admit(self, n: int) -> None:
        cfg = self.config
        if not self.client.reading:
            self.metrics.rejections.labels("unavailable").inc()
            raise ApiError(
                503,
                "unavailable",
                "the gateway's reply reader is being started again",
                retry_after_s=cfg.gateway_retry_after_s,
            )
        if self.overload.overloaded:
            self.metrics.rejections.labels("backlog").inc()
            raise ApiError(
                429,
                "overloaded",
                f"the workers have {self.overload.lag} requests waiting (SLUICE_GATEWAY_BACKLOG_LIMIT="
                f"{cfg.gateway_backlog_limit}); retry later",
                retry_after_s=self.overload.retry_after_s(cfg.gateway_retry_after_s),
            )
        if self.client.pending + n > cfg.gateway_max_in_flight:
            self.metrics.rejections.labels("in_flight").inc()
            raise ApiError(
                429,
                "overloaded",
                f"this gateway has {self.client.pending} inputs waiting for results "
                f"(SLUICE_GATEWAY_MAX_IN_FLIGHT={cfg.gateway_max_in_flight}); retry later",
                retry_after_s=cfg.gateway_retry_after_s,
            )

    async def send(self, call: Call, tenant: str, timeout_s: float) -> list[asyncio.Future[dict[str, Any]]]:
        deadline = now_ms() + int(timeout_s * 1000)
        futs: list[asyncio.Future[dict[str, Any]]] = []
        try:
            for text in call.inputs:
                doc = make_request(
                    text, task=call.task, model=call.model, tenant=tenant, labels=call.labels, deadline_ms=deadline
                )
                futs.append(await self.client.send(doc))
        except Exception as exc:  # librdkafka's queue full twice, the reader gone: nothing waits half a call
            for fut in futs:
                fut.cancel()
            self.metrics.rejections.labels("unavailable").inc()
            raise ApiError(
                503,
                "unavailable",
                f"the call's requests could not be sent: {exc}",
                retry_after_s=self.config.gateway_retry_after_s,
            ) from None
        return futs

    def timed_out(self, missing: int, timeout_s: float) -> ApiError:
        self.metrics.rejections.labels("timeout").inc()
        return ApiError(
            503,
            "timeout",
            f"{missing} results did not arrive within {timeout_s:.3g} s; the service is busy, retry later",
            retry_after_s=self.overload.retry_after_s(self.config.gateway_retry_after_s),
        )

    async def results(self, call: Call, tenant: str, timeout_s: float) -> list[dict[str, Any]]:
        """Every input's result in input order, or the call's failure."""
        futs = await self.send(call, tenant, timeout_s)
        done, pending = await asyncio.wait(futs, timeout=timeout_s)
        for fut in pending:
            fut.cancel()  # forgotten by the client: a late answer is dropped
        if pending:
            raise self.timed_out(len(pending), timeout_s)
        docs = []
        for i, fut in enumerate(futs):
            exc = fut.exception()
            if exc is not None:
                raise ApiError(503, "unavailable", f"input {i}: {exc}", retry_after_s=self.config.gateway_retry_after_s)
            doc = fut.result()
            failure = api.result_error(doc, i, self.config.gateway_retry_after_s)
            if failure is not None:
                self.metrics.rejections.labels(failure.code).inc()
                raise failure
            docs.append(doc)
        return docs

    async def stream(self, call: Call, tenant: str, timeout_s: float) -> AsyncIterator[bytes]:
        """Server-sent events: one per input as its result arrives, then
        `usage`, then `[DONE]`. An input that fails gets an error event; the
        others go on."""
        try:
            futs = await self.send(call, tenant, timeout_s)
        except ApiError as refused:  # the stream has begun: its failure is an event
            yield api.sse({"index": -1, "error": {"code": refused.code, "message": refused.message}})
            yield api.sse("[DONE]")
            return
        index = {fut: i for i, fut in enumerate(futs)}
        answered: list[dict[str, Any]] = []
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout_s
        pending = set(futs)
        try:
            while pending and (left := deadline - loop.time()) > 0:
                done, pending = await asyncio.wait(pending, timeout=left, return_when=asyncio.FIRST_COMPLETED)
                for fut in sorted(done, key=index.__getitem__):
                    i = index[fut]
                    exc = fut.exception()
                    if exc is not None:  # the reader failed under this call
                        yield api.sse({"index": i, "error": {"code": "unavailable", "message": str(exc)}})
                        continue
                    doc = fut.result()
                    failure = api.result_error(doc, i, self.config.gateway_retry_after_s)
                    if failure is None:
                        answered.append(doc)
                        yield api.sse(api.item(call, i, doc))
                    else:
                        self.metrics.rejections.labels(failure.code).inc()
                        yield api.sse({"index": i, "error": {"code": failure.code, "message": failure.message}})
            if pending:
                self.metrics.rejections.labels("timeout").inc()
            for fut in sorted(pending, key=index.__getitem__):
                fut.cancel()
                message = f"no result within {timeout_s:.3g} s"
                yield api.sse({"index": index[fut], "error": {"code": "timeout", "message": message}})
            yield api.sse({"object": "usage", "model": api.model_of(call, answered), "usage": api.usage(answered)})
            yield api.sse("[DONE]")
        finally:  # a caller that went away leaves nothing waiting
            for fut in futs:
                if not fut.done():
                    fut.cancel()


async def read_body(request: Request, limit: int) -> bytes:
    """The body, refused with 413 as soon as it passes `limit` bytes (its
    declared length first), so an oversized call is never held whole."""
    declared = request.headers.get("content-length", "")
    too_large = ApiError(413, "body_too_large", f"the body passes {limit} bytes (SLUICE_GATEWAY_MAX_BODY_BYTES)")
    if declared.isdigit() and int(declared) > limit:
        raise too_large
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise too_large
        chunks.append(chunk)
    return b"".join(chunks)


def make_app(gateway: Gateway) -> FastAPI:
    """The ASGI app; its lifespan starts and stops the gateway's Kafka side."""

    @contextlib.asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        await gateway.start()
        try:
            yield
        finally:
            await gateway.stop()

    app = FastAPI(title="Sluice gateway", lifespan=lifespan, docs_url="/docs", redoc_url=None)
    m = gateway.metrics
    cfg = gateway.config

    async def serve(request: Request, route: str, style: Style, parse: Any) -> Response:
        started = time.perf_counter()
        m.in_flight.inc()
        code = 500
        streamed = False
        try:
            try:
                tenant = gateway.tenant(request)
                call: Call = parse(
                    api.parse_json(await read_body(request, cfg.gateway_max_body_bytes)), cfg.gateway_max_inputs
                )
            except ApiError as exc:
                if exc.status != 401:
                    m.rejections.labels("too_large" if exc.status == 413 else "invalid").inc()
                raise
            m.inputs.labels(route).observe(len(call.inputs))
            gateway.admit(len(call.inputs))
            timeout_s = gateway.timeout_s(request)
            if call.stream:
                events = gateway.stream(call, tenant, timeout_s)
                streamed = True

                async def body() -> AsyncIterator[bytes]:
                    try:
                        async for chunk in events:
                            yield chunk
                    finally:
                        m.latency.labels(route).observe(time.perf_counter() - started)
                        m.in_flight.dec()

                code = 200
                return StreamingResponse(body(), media_type="text/event-stream", headers=_STREAM_HEADERS)
            docs = await gateway.results(call, tenant, timeout_s)
            if style == "tei":
                if not call.truncate and any(d.get("truncated") for d in docs):
                    first = next(i for i, d in enumerate(docs) if d.get("truncated"))
                    raise ApiError(
                        413,
                        "input_too_long",
                        f"input {first} is longer than the model's max tokens; send truncate=true",
                    )
                content = api.tei_body(docs)
            else:
                content = api.openai_body(call, docs)
            code = 200
            # the cache level of each input, in order: what the load generator counts
            headers = {"x-sluice-cache": ",".join(str(d.get("cache", "")) for d in docs)}
            return Response(content, media_type="application/json", headers=headers)
        except ApiError as exc:
            code = exc.status
            return Response(
                exc.body(style), status_code=exc.status, media_type="application/json", headers=exc.headers()
            )
        finally:
            m.calls.labels(route, str(code)).inc()
            if not streamed:
                m.latency.labels(route).observe(time.perf_counter() - started)
                m.in_flight.dec()

    @app.post("/v1/embeddings")
    async def embeddings(request: Request) -> Response:
        """OpenAI's embeddings API (input, model, encoding_format; `stream: true` for server-sent events)."""
        return await serve(request, "/v1/embeddings", "openai", api.embeddings_call)

    @app.post("/v1/classify")
    async def classify(request: Request) -> Response:
        """Zero-shot labels: {"input": ..., "labels": [...]}; `stream: true` for server-sent events."""
        return await serve(request, "/v1/classify", "openai", api.classify_call)

    @app.post("/embed")
    async def embed(request: Request) -> Response:
        """text-embeddings-inference's /embed: {"inputs": ...} -> [[...], ...]."""
        return await serve(request, "/embed", "tei", api.tei_call)

    @app.get("/metrics")
    async def metrics() -> Response:
        return Response(generate_latest(m.registry), media_type=CONTENT_TYPE_LATEST)

    @app.get("/healthz")
    async def healthz() -> Response:
        return Response("ok\n", media_type="text/plain")

    @app.get("/readyz")
    async def readyz() -> Response:
        if gateway.client.reading:
            return Response(f"answers on {gateway.reply_topic}\n", media_type="text/plain")
        return Response("the reply topic's reader is being started again\n", status_code=503, media_type="text/plain")

    return app
