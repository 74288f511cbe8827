"""The shared /metrics /healthz /readyz server (schemas/service/http.py), on loopback."""

import aiohttp
from aiohttp import web
from prometheus_client import CollectorRegistry, Counter

from processors.metrics import HealthServer as WorkerHealthServer
from processors.metrics import WorkerMetrics
from schemas.service.http import HealthServer


async def test_endpoints_answer_as_the_process_says_with_extra_routes():
    registry = CollectorRegistry()
    Counter("sluice_test_total", "A counter.", registry=registry).inc(3)
    state = {"ready": (False, "no partitions assigned"), "age": 0.0}

    async def echo(request: web.Request) -> web.Response:
        return web.Response(status=201, text=await request.text())

    server = HealthServer(
        registry,
        "127.0.0.1",
        0,
        ready=lambda: state["ready"],
        heartbeat_age_s=lambda: state["age"],
        stale_after_s=10.0,
        routes=[("POST", "/echo", echo)],
    )
    await server.start()
    base = f"http://127.0.0.1:{server.port}"
    try:
        async with aiohttp.ClientSession() as http:

            async def get(path):
                async with http.get(base + path) as r:
                    return r.status, await r.text(), r.headers.get("Content-Type", "")

            status, body, ctype = await get("/metrics")
            assert status == 200 and "sluice_test_total 3.0" in body and ctype.startswith("text/plain")
            assert (await get("/healthz"))[:2] == (200, "ok\n")
            assert (await get("/readyz"))[:2] == (503, "no partitions assigned\n")
            state.update(ready=(True, "ready: 3 partitions"), age=42.0)
            assert (await get("/readyz"))[:2] == (200, "ready: 3 partitions\n")
            assert (await get("/healthz"))[:2] == (503, "fetch loop silent for 42 s\n")
            async with http.post(base + "/echo", data=b"hi") as r:
                assert (r.status, await r.text()) == (201, "hi")
    finally:
        await server.stop()


async def test_the_workers_server_is_the_shared_one_over_its_metrics():
    metrics = WorkerMetrics()
    server = WorkerHealthServer(metrics, "127.0.0.1", 0, ready=lambda: (True, "ready"), heartbeat_age_s=lambda: 0.0)
    assert isinstance(server, HealthServer)
    await server.start()
    try:
        async with aiohttp.ClientSession() as http, http.get(f"http://127.0.0.1:{server.port}/metrics") as r:
            assert r.status == 200 and "sluice_requests_total" in await r.text()
    finally:
        await server.stop()
