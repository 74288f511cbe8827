"""The load generator's transport over HTTP: each request one POST, to the
gateway's OpenAI route (`sluice loadtest --transport http`) or to a
request/response peer (bench/peer.py), on the same open-loop schedule and
clock as the Kafka clients.

An answer becomes a result-like doc for the load report: 200 is `ok` (with
the gateway's `x-sluice-cache` level), 429 `rejected`, 503 `expired`, any
other status `http N`, a dropped connection `error: ...`."""

from __future__ import annotations

import asyncio
from typing import Any, Literal

import orjson

from producers.client import ClientError
from schemas.records import now_ms

_STATUS = {200: "ok", 429: "rejected", 503: "expired"}


class HttpTransport:
    """`async with HttpTransport(url) as t: fut = await t.send(doc)`."""

    def __init__(
        self,
        url: str,
        *,
        api_key: str | None = None,
        body: Literal["openai", "peer"] = "openai",
        model: str | None = None,
        max_connections: int = 1000,
        timeout_s: float = 120.0,
    ) -> None:
        self.url = url
        self.body = body
        self.model = model
        self.max_connections = max_connections
        self.timeout_s = timeout_s
        self._headers = {"Content-Type": "application/json"}
        if api_key:
            self._headers["Authorization"] = f"Bearer {api_key}"
        self._session: Any = None
        self._tasks: set[asyncio.Task[dict[str, Any]]] = set()

    async def __aenter__(self) -> HttpTransport:
        import aiohttp

        self._session = aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(limit=self.max_connections),
            timeout=aiohttp.ClientTimeout(total=self.timeout_s),
        )
        return self

    async def __aexit__(self, *exc: object) -> None:
        for t in self._tasks:
            t.cancel()
        if self._session is not None:
            await self._session.close()

    def _payload(self, doc: dict[str, Any]) -> bytes:
        if self.body == "peer":
            return orjson.dumps({"id": doc["id"], "input": doc["input"]})
        body: dict[str, Any] = {"input": doc["input"], "encoding_format": "base64"}  # as the openai SDK asks
        if doc.get("task") == "classify":
            body["labels"] = doc.get("labels") or []
        if self.model or doc.get("model"):
            body["model"] = self.model or doc["model"]
        return orjson.dumps(body)

    async def _post(self, doc: dict[str, Any]) -> dict[str, Any]:
        if self._session is None:
            raise ClientError("HttpTransport: use it as `async with`")
        out: dict[str, Any] = {"id": doc["id"]}
        try:
            async with self._session.post(self.url, data=self._payload(doc), headers=self._headers) as r:
                await r.read()
                out["status"] = _STATUS.get(r.status, f"http {r.status}")
                if r.status == 200:
                    out["cache"] = r.headers.get("x-sluice-cache") or "none"
        except Exception as exc:  # a refused or dropped connection is a failed request
            out["status"] = f"error: {type(exc).__name__}"
        out["_received_at_ms"] = now_ms()
        return out

    async def send(self, doc: dict[str, Any]) -> asyncio.Future[dict[str, Any]]:
        task = asyncio.ensure_future(self._post(doc))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task

    async def flush(self) -> None:
        return None
