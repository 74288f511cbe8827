"""The HTTP side of a long-running process: /metrics (Prometheus), /healthz
(its main loop is alive) and /readyz (it can do its work), plus whatever
routes the process adds (the sink's POST /query)."""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable, Iterable

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest

log = logging.getLogger(__name__)

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
Route = tuple[str, str, Handler]  # (method, path, handler)


class HealthServer:
    """/metrics, /healthz (the loop's heartbeat is younger than
    `stale_after_s`) and /readyz (`ready()` says so, and why) on one port,
    with `routes` added; port 0 takes a free one (`port` after start)."""

    def __init__(
        self,
        registry: CollectorRegistry,
        host: str,
        port: int,
        *,
        ready: Callable[[], tuple[bool, str]],
        heartbeat_age_s: Callable[[], float],
        stale_after_s: float = 30.0,
        routes: Iterable[Route] = (),
        client_max_size: int = 1 << 20,
        banner: str = "metrics on http://{host}:{port}/metrics",
    ) -> None:
        self._registry = registry
        self._host, self._port = host, port
        self._ready = ready
        self._heartbeat_age_s = heartbeat_age_s
        self._stale_after_s = stale_after_s
        self._routes = list(routes)
        self._client_max_size = client_max_size
        self._banner = banner
        self._runner: web.AppRunner | None = None
        self.port: int | None = None

    async def start(self) -> None:
        app = web.Application(client_max_size=self._client_max_size)
        app.router.add_get("/metrics", self._serve_metrics)
        app.router.add_get("/healthz", self._healthz)
        app.router.add_get("/readyz", self._readyz)
        for method, path, handler in self._routes:
            app.router.add_route(method, path, handler)
        self._runner = web.AppRunner(app, access_log=None)
        await self._runner.setup()
        site = web.TCPSite(self._runner, self._host, self._port)
        await site.start()
        self.port = self._runner.addresses[0][1]
        log.info(self._banner.format(host=self._host, port=self.port))

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()

    async def _serve_metrics(self, _: web.Request) -> web.Response:
        body = generate_latest(self._registry)
        return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE_LATEST})

    async def _healthz(self, _: web.Request) -> web.Response:
        age = self._heartbeat_age_s()
        if age > self._stale_after_s:
            return web.Response(status=503, text=f"fetch loop silent for {age:.0f} s\n")
        return web.Response(text="ok\n")

    async def _readyz(self, _: web.Request) -> web.Response:
        ok, why = self._ready()
        return web.Response(status=200 if ok else 503, text=why + "\n")
