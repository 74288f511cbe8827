"""The peer: what a user would build instead of Sluice. A FastAPI endpoint
(served by uvicorn) that runs the same ONNX model once per request, with no
Kafka, no batching and no cache, written the way the FastAPI tutorial
writes it (a plain `def` handler, which FastAPI runs in its thread pool).

    .venv/bin/python -m bench.peer --port 8099 [--model all-minilm-l6-v2-sq8]

`HttpTransport` is the load generator's transport for it: the same open-loop
schedule and clock as the Kafka client, so both face the same load.
"""

from __future__ import annotations

import argparse
import asyncio
from typing import Any

from pydantic import BaseModel

from producers.loadgen import Transport
from schemas.records import now_ms


class EmbedRequest(BaseModel):
    id: str
    input: str


def make_app(model: str, threads: int):
    from fastapi import FastAPI

    from processors.runtime import ModelRuntime, discover_models
    from sluice.settings import load_settings

    folders = discover_models(load_settings().worker().models_dir)
    runtime = ModelRuntime(folders[model], intra_op_threads=threads, provider="cpu").load()
    app = FastAPI()

    @app.post("/embed")
    def embed(req: EmbedRequest) -> dict[str, Any]:
        vector = runtime.embed([req.input])[0]
        return {"id": req.id, "status": "ok", "embedding": vector.tolist()}

    @app.get("/healthz")
    def healthz() -> dict[str, str]:
        return {"status": "ok"}

    return app


class HttpTransport(Transport):
    """POST each request to the peer; a future of its answer, stamped on arrival."""

    def __init__(self, url: str, max_connections: int = 1000) -> None:
        self.url = url
        self.max_connections = max_connections
        self._session = None
        self._tasks: set[asyncio.Task] = set()

    async def __aenter__(self) -> HttpTransport:
        import aiohttp

        self._session = aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(limit=self.max_connections), timeout=aiohttp.ClientTimeout(total=120)
        )
        return self

    async def __aexit__(self, *exc: object) -> None:
        for t in self._tasks:
            t.cancel()
        if self._session is not None:
            await self._session.close()

    async def _post(self, doc: dict[str, Any]) -> dict[str, Any]:
        assert self._session is not None
        try:
            async with self._session.post(self.url, json={"id": doc["id"], "input": doc["input"]}) as r:
                body = await r.json() if r.status == 200 else {"status": f"http {r.status}"}
        except Exception as exc:  # a refused or dropped connection is a failed request
            body = {"status": f"error: {type(exc).__name__}"}
        return {**body, "id": doc["id"], "_received_at_ms": now_ms()}

    async def send(self, doc: dict[str, Any]) -> asyncio.Future[dict[str, Any]]:
        task = asyncio.ensure_future(self._post(doc))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task

    async def flush(self) -> None:
        return None


def main() -> None:
    import uvicorn

    ap = argparse.ArgumentParser()
    ap.add_argument("--port", type=int, default=8099)
    ap.add_argument("--model", default="all-minilm-l6-v2-sq8")
    ap.add_argument("--threads", type=int, default=0, help="ONNX Runtime intra-op threads (0: as the worker)")
    args = ap.parse_args()
    uvicorn.run(
        make_app(args.model, args.threads), host="127.0.0.1", port=args.port, log_level="warning", access_log=False
    )


if __name__ == "__main__":
    main()
