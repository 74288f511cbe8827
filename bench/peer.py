"""The peer: what a user would build instead of Sluice. A FastAPI endpoint
(served by uvicorn) that runs the same ONNX model once per request, with no
Kafka, no batching and no cache, written the way the FastAPI tutorial
writes it (a plain `def` handler, which FastAPI runs in its thread pool).

    .venv/bin/python -m bench.peer --port 8099 [--model all-minilm-l6-v2-sq8]

`transport(url)` is the load generator's transport for it: the same open-loop
schedule and clock as the Kafka client, so both face the same load.
"""

from __future__ import annotations

import argparse
from typing import Any

from pydantic import BaseModel

from producers.http_transport import HttpTransport


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


def transport(url: str) -> HttpTransport:
    """The load generator's transport for the peer: the same open-loop schedule and clock."""
    return HttpTransport(url, body="peer")


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
