"""`sluice gateway` on the real stack: real broker, real workers, the real
model, called over HTTP by the official `openai` client, aiohttp (TEI's and
the server-sent-events form) and as operators would with curl."""

from __future__ import annotations

import asyncio
import time

import aiohttp
import numpy as np
import orjson
import pytest

from tests.conftest import WorkerProcess, read_topic

pytestmark = [pytest.mark.integration, pytest.mark.timeout(300)]

MODEL = "all-minilm-l6-v2"  # the tests' worker default (Env.worker_env)


@pytest.fixture
def keys(tmp_path):
    """Two tenants' keys: one as a digest, one in the clear."""
    from producers.gateway.keys import digest

    path = tmp_path / "keys.txt"
    path.write_text(f"# tenants\nacme sha256:{digest('key-acme')}\nglobex key-globex\n")
    return path


@pytest.fixture
def gateway_factory(env, keys):
    started: list[WorkerProcess] = []

    def make(name: str = "a", **settings: str) -> WorkerProcess:
        gw = WorkerProcess(
            env,
            "gateway",
            SLUICE_GATEWAY_API_KEYS_FILE=str(keys),
            SLUICE_GATEWAY_ID=f"{env.prefix}-{name}",
            SLUICE_GATEWAY_LAG_INTERVAL_S="0.2",
            **settings,
        )
        started.append(gw)
        return gw.start()

    yield make
    for gw in started:
        gw.stop()


def url(gw: WorkerProcess, path: str = "") -> str:
    return f"http://127.0.0.1:{gw.port}{path}"


def openai_client(gw: WorkerProcess, key: str = "key-acme", **kw):
    import openai

    return openai.AsyncOpenAI(base_url=url(gw, "/v1"), api_key=key, **kw)


class Answer:
    def __init__(self, status: int, headers, body: bytes) -> None:
        self.status_code, self.headers, self.content = status, headers, body

    @property
    def text(self) -> str:
        return self.content.decode()

    def json(self):
        return orjson.loads(self.content)


class Http:
    """Plain HTTP calls (aiohttp), each answer read whole."""

    def __init__(self, timeout: float = 60) -> None:
        self._session = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=timeout))

    async def __aenter__(self) -> Http:
        return self

    async def __aexit__(self, *exc) -> None:
        await self._session.close()

    async def post(self, address: str, json=None, *, content: bytes | None = None, headers=None) -> Answer:
        async with self._session.post(address, json=json, data=content, headers=headers) as r:
            return Answer(r.status, r.headers, await r.read())

    async def get(self, address: str) -> Answer:
        async with self._session.get(address) as r:
            return Answer(r.status, r.headers, await r.read())


async def docs(env, topic: str, expect: int, **kw) -> list[dict]:
    return [orjson.loads(r.value) for r in await read_topic(env.stack.bootstrap_servers, topic, expect=expect, **kw)]


def texts(env, n: int, what: str = "t") -> list[str]:
    from producers.corpus import text

    return [f"{text(i, seed=hash(what) % 1000)} ({env.prefix} {what} {i})" for i in range(n)]


async def test_the_openai_client_gets_the_embeddings_a_direct_kafka_request_gets(
    env, worker_factory, gateway_factory, client
):
    worker_factory()
    gw = gateway_factory()
    inputs = texts(env, 5, "oai")
    # the tenant is acme's: the key's, so the cache scope is acme's too
    direct = [r.output["embedding"] for r in await client.submit_many(inputs, tenant="acme", model=MODEL)]

    oai = openai_client(gw)
    floats = await oai.embeddings.create(input=inputs, model=MODEL, encoding_format="float")
    b64 = await oai.embeddings.create(input=inputs, model=MODEL)  # the SDK asks for base64 by default
    one = await oai.embeddings.create(input=inputs[2], model=MODEL)

    assert [d.index for d in floats.data] == list(range(5))
    for got in (floats, b64):
        assert got.model.startswith(MODEL + "@")
        for d, want in zip(got.data, direct, strict=True):
            assert np.array_equal(np.asarray(d.embedding, np.float32), np.asarray(want, np.float32))
    assert np.array_equal(np.asarray(one.data[0].embedding, np.float32), np.asarray(direct[2], np.float32))
    # and the float form is the worker's own numbers, digit for digit
    assert [d.embedding for d in floats.data] == direct

    # a fresh computation (cache bypassed) agrees: these are the model's embeddings, not an echo
    fresh = (await client.submit(inputs[0], tenant="acme", model=MODEL, cache="bypass")).output["embedding"]
    assert np.dot(fresh, floats.data[0].embedding) > 0.999

    # usage counts the tokens the model ran for the call: a new input costs its tokens
    new = await oai.embeddings.create(input=texts(env, 1, "usage")[0], model=MODEL)
    assert new.usage.prompt_tokens > 5

    async with Http() as http:
        metrics = (await http.get(url(gw, "/metrics"))).text
    assert 'sluice_gateway_requests_total{code="200",route="/v1/embeddings"} 4.0' in metrics
    assert "sluice_gateway_pending_inputs 0.0" in metrics


async def test_each_gateway_reads_only_its_own_replies(env, worker_factory, gateway_factory):
    worker_factory()
    a, b = gateway_factory("a"), gateway_factory("b")
    await openai_client(a).embeddings.create(input=texts(env, 3, "a"), model=MODEL)
    await openai_client(b).embeddings.create(input=texts(env, 2, "b"), model=MODEL)
    on_a = await docs(env, env.topics.replies(f"{env.prefix}-a"), 3)
    on_b = await docs(env, env.topics.replies(f"{env.prefix}-b"), 2)
    assert len(on_a) == 3 and len(on_b) == 2
    assert not {r["id"] for r in on_a} & {r["id"] for r in on_b}
    # nothing went to the shared results topic
    assert await docs(env, env.topics.results, 0, timeout_s=2) == []
    # a clean stop removes the instance's reply topic
    a.stop()
    from confluent_kafka.admin import AdminClient

    names = AdminClient(env.kafka.rdkafka()).list_topics(timeout=10).topics
    assert env.topics.replies(f"{env.prefix}-a") not in names
    assert env.topics.replies(f"{env.prefix}-b") in names


async def test_the_tei_route_answers_in_tei_shape(env, worker_factory, gateway_factory, client):
    worker_factory()
    gw = gateway_factory()
    inputs = texts(env, 3, "tei")
    direct = [r.output["embedding"] for r in await client.submit_many(inputs, tenant="globex", model=MODEL)]
    auth = {"Authorization": "Bearer key-globex"}
    async with Http(timeout=60) as http:
        many = await http.post(url(gw, "/embed"), json={"inputs": inputs, "model": MODEL}, headers=auth)
        single = await http.post(url(gw, "/embed"), json={"inputs": inputs[1], "model": MODEL}, headers=auth)
        raw = await http.post(url(gw, "/embed"), json={"inputs": inputs[0], "normalize": False}, headers=auth)
        empty = await http.post(url(gw, "/embed"), json={"inputs": []}, headers=auth)
    assert many.status_code == 200 and many.json() == direct
    assert single.status_code == 200 and single.json() == [direct[1]]
    assert raw.status_code == 422 and raw.json()["error_type"] == "Validation" and "normalize" in raw.json()["error"]
    assert empty.status_code == 422


async def test_classify_answers_labels_in_input_order(env, worker_factory, gateway_factory):
    worker_factory()
    gw = gateway_factory()
    body = {
        "input": [
            f"the striker scored twice in the final ({env.prefix})",
            f"the central bank raised rates ({env.prefix})",
        ],
        "labels": ["sports", "finance"],
    }
    async with Http(timeout=60) as http:
        r = await http.post(url(gw, "/v1/classify"), json=body, headers={"Authorization": "Bearer key-acme"})
        no_labels = await http.post(
            url(gw, "/v1/classify"), json={"input": "x"}, headers={"Authorization": "Bearer key-acme"}
        )
    assert r.status_code == 200
    assert [d["label"] for d in r.json()["data"]] == ["sports", "finance"]
    assert no_labels.status_code == 400 and no_labels.json()["error"]["param"] == "labels"


async def test_a_stream_sends_the_first_results_before_the_last(env, worker_factory, gateway_factory):
    # small batches, so 200 inputs take many model calls
    worker_factory(SLUICE_BATCH_MAX_ITEMS="8", SLUICE_BATCH_MAX_WAIT_MS="2")
    gw = gateway_factory()
    inputs = texts(env, 200, "sse")
    arrivals: list[tuple[float, dict]] = []
    t0 = time.monotonic()
    async with (
        aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=120)) as http,
        http.post(
            url(gw, "/v1/embeddings"),
            json={"input": inputs, "model": MODEL, "stream": True},
            headers={"Authorization": "Bearer key-acme"},
        ) as r,
    ):
        assert r.status == 200 and r.headers["content-type"].startswith("text/event-stream")
        async for raw in r.content:
            line = raw.decode().strip()
            if line.startswith("data: "):
                data = line.removeprefix("data: ")
                arrivals.append((time.monotonic() - t0, {} if data == "[DONE]" else orjson.loads(data)))
    items = [(t, e) for t, e in arrivals if e.get("object") == "embedding"]
    assert sorted(e["index"] for _, e in items) == list(range(200))
    assert arrivals[-1][1] == {} and arrivals[-2][1]["object"] == "usage"
    first, last = items[0][0], items[-1][0]
    # the first answers were in the caller's hands well before the last was computed
    early = [t for t, _ in items if t < last - 0.25]
    print(
        f"first event at {first * 1000:.0f} ms, last at {last * 1000:.0f} ms, {len(early)} events >250 ms before the last"
    )
    assert first < last - 0.25 and len(early) >= 8
    assert len(items[0][1]["embedding"]) == 384


async def test_a_wrong_or_missing_key_gets_401(env, gateway_factory):
    import openai

    gw = gateway_factory()
    with pytest.raises(openai.AuthenticationError) as err:
        await openai_client(gw, key="key-nobody", max_retries=0).embeddings.create(input="hello", model=MODEL)
    assert err.value.status_code == 401 and err.value.code == "invalid_api_key"
    async with Http() as http:
        assert (await http.post(url(gw, "/embed"), json={"inputs": "x"})).status_code == 401
        digest_itself = {"Authorization": "Bearer sha256:" + "0" * 64}
        assert (await http.post(url(gw, "/embed"), json={"inputs": "x"}, headers=digest_itself)).status_code == 401
        metrics = (await http.get(url(gw, "/metrics"))).text
    assert 'sluice_gateway_rejections_total{reason="unauthorized"} 3.0' in metrics


async def test_a_full_backlog_gets_429_with_retry_after_and_clears_when_workers_drain_it(
    env, worker_factory, gateway_factory, client
):
    import openai

    gw = gateway_factory(SLUICE_GATEWAY_BACKLOG_LIMIT="100", SLUICE_GATEWAY_BACKLOG_RESUME="20")
    # no worker yet: 150 requests wait on PREFIX.requests
    for t in texts(env, 150, "backlog"):
        await client.send({"v": 1, "id": f"{env.prefix}-{t[-12:]}-{time.monotonic_ns()}", "input": t})
    await client.flush()
    await asyncio.sleep(1.0)  # a few lag readings
    async with Http(timeout=30) as http:
        r = await http.post(
            url(gw, "/v1/embeddings"), json={"input": "x"}, headers={"Authorization": "Bearer key-acme"}
        )
    assert r.status_code == 429
    assert int(r.headers["Retry-After"]) >= 1 and int(r.headers["retry-after-ms"]) >= 1
    assert r.json()["error"]["type"] == "rate_limit_error" and "waiting" in r.json()["error"]["message"]
    with pytest.raises(openai.RateLimitError):
        await openai_client(gw, max_retries=0).embeddings.create(input="x", model=MODEL)

    worker_factory()  # drains the backlog; the gateway accepts again
    oai = openai_client(gw, max_retries=0)
    deadline = time.monotonic() + 120
    while True:
        try:
            got = await oai.embeddings.create(input=texts(env, 1, "after")[0], model=MODEL)
            break
        except openai.RateLimitError:
            assert time.monotonic() < deadline, "still refused two minutes after a worker started"
            await asyncio.sleep(0.5)
    assert len(got.data[0].embedding) == 384


async def test_a_call_past_its_timeout_gets_503_and_its_deadline_reaches_the_worker(
    env, worker_factory, gateway_factory
):
    gw = gateway_factory()
    text = texts(env, 1, "deadline")[0]
    t0 = time.time()
    async with Http(timeout=30) as http:
        r = await http.post(
            url(gw, "/v1/embeddings"),
            json={"input": text},
            headers={"Authorization": "Bearer key-acme", "X-Timeout-Ms": "1500"},
        )
        waited = time.time() - t0
        metrics = (await http.get(url(gw, "/metrics"))).text
    # no worker: answered 503 within the caller's 1.5 s, not left hanging
    assert r.status_code == 503 and int(r.headers["Retry-After"]) >= 1 and waited < 1.5
    assert r.json()["error"]["code"] == "timeout"
    assert "sluice_gateway_pending_inputs 0.0" in metrics  # the timed-out input is forgotten
    [sent] = await docs(env, env.topics.requests, 1)
    assert sent["input"] == text and sent["tenant"] == "acme"
    assert t0 * 1000 + 1000 < sent["deadline_ms"] < t0 * 1000 + 1600
    # a worker that reaches it later answers `expired` instead of computing it
    worker_factory()
    [answer] = await docs(env, env.topics.replies(f"{env.prefix}-a"), 1)
    assert answer["status"] == "expired"


async def test_bad_calls_get_clear_errors(env, gateway_factory):
    gw = gateway_factory(
        SLUICE_GATEWAY_MAX_INPUTS="4", SLUICE_GATEWAY_MAX_IN_FLIGHT="3", SLUICE_GATEWAY_MAX_BODY_BYTES="4096"
    )
    auth = {"Authorization": "Bearer key-acme"}
    async with Http(timeout=30) as http:
        dims = await http.post(url(gw, "/v1/embeddings"), json={"input": "x", "dimensions": 64}, headers=auth)
        tokens = await http.post(url(gw, "/v1/embeddings"), json={"input": [[1, 2, 3]]}, headers=auth)
        many = await http.post(url(gw, "/v1/embeddings"), json={"input": ["x"] * 5}, headers=auth)
        not_json = await http.post(url(gw, "/v1/embeddings"), content=b"{", headers=auth)
        fmt = await http.post(url(gw, "/v1/embeddings"), json={"input": "x", "encoding_format": "int8"}, headers=auth)
        busy = await http.post(url(gw, "/v1/embeddings"), json={"input": ["a", "b", "c", "d"]}, headers=auth)
        huge = await http.post(url(gw, "/v1/embeddings"), json={"input": "x" * 5000}, headers=auth)
    assert dims.status_code == 400 and dims.json()["error"]["param"] == "dimensions"
    assert tokens.status_code == 400 and "token arrays" in tokens.json()["error"]["message"]
    assert many.status_code == 413 and "SLUICE_GATEWAY_MAX_INPUTS" in many.json()["error"]["message"]
    assert not_json.status_code == 400
    assert fmt.status_code == 400 and fmt.json()["error"]["param"] == "encoding_format"
    # four inputs would pass the three this instance may have waiting: refused at once, nothing sent
    assert busy.status_code == 429 and "SLUICE_GATEWAY_MAX_IN_FLIGHT" in busy.json()["error"]["message"]
    assert int(busy.headers["Retry-After"]) >= 1
    assert huge.status_code == 413 and "SLUICE_GATEWAY_MAX_BODY_BYTES" in huge.json()["error"]["message"]


def test_the_gateway_refuses_to_start_without_keys(env):
    import subprocess
    import sys

    r = subprocess.run(
        [sys.executable, "-m", "sluice", "gateway"],
        env=env.worker_env(),
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert r.returncode == 2 and "SLUICE_GATEWAY_API_KEYS_FILE" in r.stderr


async def test_an_input_admission_refuses_gets_429_with_its_retry_after(env, worker_factory, gateway_factory):
    import openai

    from processors.admission.control import write_control

    await write_control(env.stack.bootstrap_servers, env.topics.control, {"tenant:acme": {"requests_per_minute": 3}})
    worker_factory()
    stage = WorkerProcess(
        env, "admission", SLUICE_ADMISSION_GROUP_ID=f"{env.prefix}-admission", SLUICE_ADMISSION_LAG_INTERVAL_S="0.2"
    ).start()
    try:
        gw = gateway_factory(SLUICE_ADMISSION="true")
        oai = openai_client(gw, max_retries=0)
        first = await oai.embeddings.create(input=texts(env, 3, "admitted"), model=MODEL)  # the minute's allowance
        assert len(first.data) == 3
        async with Http() as http:
            r = await http.post(
                url(gw, "/v1/embeddings"),
                {"input": texts(env, 2, "refused")},
                headers={"Authorization": "Bearer key-acme"},
            )
        assert r.status_code == 429 and r.json()["error"]["code"] == "rate_limited"
        assert 1 <= int(r.headers["Retry-After"]) <= 60
        # globex has no limit of its own: the same moment, served
        other = await openai_client(gw, key="key-globex", max_retries=0).embeddings.create(
            input=texts(env, 2, "globex"), model=MODEL
        )
        assert len(other.data) == 2
        with pytest.raises(openai.RateLimitError):
            await oai.embeddings.create(input="one more", model=MODEL)
    finally:
        stage.stop()


def test_sluice_loadtest_offers_load_over_http(env, worker_factory, gateway_factory, tmp_path):
    import subprocess
    import sys

    worker_factory()
    gw = gateway_factory()
    key = tmp_path / "acme.key"
    key.write_text("key-acme\n")
    r = subprocess.run(
        [sys.executable, "-m", "sluice", "loadtest", "--transport", "http", "--url", url(gw, "/v1/embeddings")]
        + ["--api-key-file", str(key), "--rate", "50", "--duration", "2", "--seed", "5", "--json"],
        env=env.worker_env(),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert r.returncode == 0, r.stderr
    report = orjson.loads(r.stdout.strip().splitlines()[-1])
    assert report["sent"] == report["answered"] == 100 and report["statuses"] == {"ok": 100}
    assert sum(report["cache"].values()) == 100 and report["cost_known"] is False
    metrics = asyncio.run(get_metrics(gw))
    assert 'sluice_gateway_requests_total{code="200",route="/v1/embeddings"} 100.0' in metrics


async def get_metrics(gw) -> str:
    async with Http() as http:
        return (await http.get(url(gw, "/metrics"))).text
