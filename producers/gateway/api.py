"""The HTTP shapes: request bodies as the APIs define them, results into
their responses, and every failure as an HTTP status with a body the
caller's SDK understands (OpenAI's `{"error": {...}}`, TEI's
`{"error", "error_type"}`).

Bodies are parsed with orjson and checked here by hand rather than by
pydantic models: each check says which field is wrong the way the API's own
server would, and an embedding call costs no model validation per float."""

from __future__ import annotations

import base64
import math
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np
import orjson

Style = Literal["openai", "tei"]


@dataclass
class ApiError(Exception):
    """A call that gets no results: its status, a stable code and a message."""

    status: int
    code: str
    message: str
    retry_after_s: float | None = None
    param: str | None = None

    def headers(self) -> dict[str, str]:
        if self.retry_after_s is None:
            return {}
        # Retry-After is whole seconds; OpenAI's SDKs also read retry-after-ms
        return {
            "Retry-After": str(max(1, math.ceil(self.retry_after_s))),
            "retry-after-ms": str(max(1, round(self.retry_after_s * 1000))),
        }

    def body(self, style: Style) -> bytes:
        if style == "tei":
            kind = {401: "Unauthorized", 413: "Validation", 429: "Overloaded"}.get(
                self.status, "Validation" if self.status < 500 else "Backend"
            )
            return orjson.dumps({"error": self.message, "error_type": kind, "code": self.code})
        kind = {
            400: "invalid_request_error",
            401: "authentication_error",
            404: "invalid_request_error",
            413: "invalid_request_error",
            429: "rate_limit_error",
        }.get(self.status, "server_error" if self.status >= 500 else "invalid_request_error")
        return orjson.dumps({"error": {"message": self.message, "type": kind, "param": self.param, "code": self.code}})


def invalid(message: str, param: str | None = None, code: str = "invalid_request") -> ApiError:
    return ApiError(400, code, message, param=param)


@dataclass
class Call:
    """One HTTP call, parsed: the inputs become one request each."""

    inputs: list[str]
    task: str = "embed"
    model: str | None = None
    labels: list[str] | None = None
    encoding_format: str = "float"
    stream: bool = False
    truncate: bool = True
    extra: dict[str, Any] = field(default_factory=dict)


def parse_json(raw: bytes) -> dict[str, Any]:
    try:
        doc = orjson.loads(raw)
    except orjson.JSONDecodeError as exc:
        raise invalid(f"the body is not JSON: {exc}") from None
    if not isinstance(doc, dict):
        raise invalid("the body must be a JSON object")
    return doc


def _inputs(doc: dict[str, Any], name: str, max_inputs: int) -> list[str]:
    value = doc.get(name)
    if isinstance(value, str):
        inputs = [value]
    elif isinstance(value, list) and value and all(isinstance(v, str) for v in value):
        inputs = value
    elif isinstance(value, list) and value and all(isinstance(v, int | list) for v in value):
        raise invalid(f"'{name}': token arrays are not supported; send the text", param=name)
    elif value is None:
        raise invalid(f"'{name}' is required: a string or a list of strings", param=name)
    else:
        raise invalid(f"'{name}' must be a string or a non-empty list of strings", param=name)
    if len(inputs) > max_inputs:
        raise ApiError(
            413,
            "too_many_inputs",
            f"{len(inputs)} inputs in one call; at most {max_inputs} (SLUICE_GATEWAY_MAX_INPUTS)",
            param=name,
        )
    return inputs


def _model(doc: dict[str, Any]) -> str | None:
    model = doc.get("model")
    if model is not None and (not isinstance(model, str) or not model):
        raise invalid("'model' must be a model name (see `sluice model list`)", param="model")
    return model


def _stream(doc: dict[str, Any]) -> bool:
    stream = doc.get("stream", False)
    if not isinstance(stream, bool):
        raise invalid("'stream' must be true or false", param="stream")
    return stream


def embeddings_call(doc: dict[str, Any], max_inputs: int) -> Call:
    """OpenAI's POST /v1/embeddings body (plus `stream`, this gateway's)."""
    if doc.get("dimensions") is not None:
        raise invalid(
            "'dimensions' is not supported: the model's embeddings have a fixed size, and cutting them "
            "short would change their meaning for this model; leave it out",
            param="dimensions",
            code="unsupported_parameter",
        )
    fmt = doc.get("encoding_format", "float")
    if fmt not in ("float", "base64"):
        raise invalid("'encoding_format' must be 'float' or 'base64'", param="encoding_format")
    return Call(_inputs(doc, "input", max_inputs), "embed", _model(doc), encoding_format=fmt, stream=_stream(doc))


def classify_call(doc: dict[str, Any], max_inputs: int) -> Call:
    """POST /v1/classify: `input` as in embeddings, `labels` to choose from."""
    labels = doc.get("labels")
    if not isinstance(labels, list) or not labels or not all(isinstance(x, str) and x for x in labels):
        raise invalid("'labels' is required: a non-empty list of label strings", param="labels")
    return Call(_inputs(doc, "input", max_inputs), "classify", _model(doc), labels=labels, stream=_stream(doc))


def tei_call(doc: dict[str, Any], max_inputs: int) -> Call:
    """text-embeddings-inference's POST /embed body."""
    if doc.get("normalize", True) is not True:
        raise ApiError(
            422,
            "unsupported_parameter",
            "normalize=false is not supported: this gateway serves the model's normalized embeddings",
            param="normalize",
        )
    truncate = doc.get("truncate", False)
    if not isinstance(truncate, bool):
        raise ApiError(422, "invalid_request", "'truncate' must be true or false", param="truncate")
    try:
        inputs = _inputs(doc, "inputs", max_inputs)
    except ApiError as exc:
        if exc.status == 400:
            exc.status = 422  # TEI's status for a body it cannot use
        raise
    return Call(inputs, "embed", _model(doc), truncate=truncate)


# -- results --------------------------------------------------------------------
_CLIENT_ERRORS_404 = {"unknown_model"}
_SERVER_ERRORS = {"model_error", "internal", "reply_to_failed"}


def result_error(doc: dict[str, Any], index: int, default_retry_s: float) -> ApiError | None:
    """The HTTP failure a result stands for, or None when it is ok."""
    status = doc.get("status")
    if status == "ok":
        return None
    raw = doc.get("error")
    err: dict[str, Any] = raw if isinstance(raw, dict) else {}
    code = str(err.get("code") or status)
    message = f"input {index}: {err.get('message') or code}"
    if status == "rejected":
        ms = err.get("retry_after_ms")
        retry = ms / 1000 if isinstance(ms, int | float) else default_retry_s
        return ApiError(503 if code == "kill_switch" else 429, code, message, retry_after_s=retry)
    if status == "expired":
        return ApiError(503, "expired", message + " (its deadline passed before a worker reached it)", default_retry_s)
    if code in _CLIENT_ERRORS_404:
        return ApiError(404, "model_not_found", message, param="model")
    if code in _SERVER_ERRORS:
        return ApiError(500, code, message)
    return ApiError(400, code, message, param="input")


def encode_embedding(vector: list[float], fmt: str) -> list[float] | str:
    """OpenAI's base64 form: the float32 values, little-endian, base64."""
    if fmt == "base64":
        return base64.b64encode(np.asarray(vector, dtype="<f4").tobytes()).decode()
    return vector


def item(call: Call, index: int, doc: dict[str, Any]) -> dict[str, Any]:
    """One answered input as an element of the response's `data`."""
    output = doc.get("output") or {}
    if call.task == "classify":
        return {
            "object": "classification",
            "index": index,
            "label": output.get("label"),
            "scores": output.get("scores"),
        }
    return {
        "object": "embedding",
        "index": index,
        "embedding": encode_embedding(output.get("embedding", []), call.encoding_format),
    }


def usage(docs: list[dict[str, Any]]) -> dict[str, int]:
    tokens = sum(int(d.get("tokens") or 0) for d in docs)
    return {"prompt_tokens": tokens, "total_tokens": tokens}


def model_of(call: Call, docs: list[dict[str, Any]]) -> str:
    """The model that answered, as name@version (the one asked for, if none answered)."""
    for d in docs:
        if d.get("model"):
            return str(d["model"])
    return call.model or ""


def openai_body(call: Call, docs: list[dict[str, Any]]) -> bytes:
    return orjson.dumps(
        {
            "object": "list",
            "data": [item(call, i, d) for i, d in enumerate(docs)],
            "model": model_of(call, docs),
            "usage": usage(docs),
        }
    )


def tei_body(docs: list[dict[str, Any]]) -> bytes:
    return orjson.dumps([(d.get("output") or {}).get("embedding", []) for d in docs])


def sse(event: dict[str, Any] | str) -> bytes:
    data = event if isinstance(event, str) else orjson.dumps(event).decode()
    return f"data: {data}\n\n".encode()
