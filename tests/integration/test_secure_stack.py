"""`sluice up --secure` on the real broker and redis-server: the broker
refuses who has no (or a wrong) credential, each principal gets exactly its
ACLs (a tenant cannot touch another tenant's topics), transactions work over
the SASL_SSL inter-broker listener, Redis refuses its default user, and no
password reaches a log.

One secure LocalStack for the module, in its own state folder on free ports
in 39100-39199, so it never meets the suite's plaintext stack.
"""

from __future__ import annotations

import asyncio
import os
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import redis
from confluent_kafka import Consumer, KafkaError, KafkaException, Producer, TopicPartition
from confluent_kafka.admin import AdminClient
from redis.backoff import NoBackoff
from redis.retry import Retry

from schemas.topics import KafkaConfig, Topics
from sluice import access
from sluice.errors import StackError
from sluice.stack import CLIENT_USER, REDIS_USER, SERVICE_USER, LocalStack
from tests.conftest import ROOT, own_stack_config

pytestmark = pytest.mark.integration

_PORTS = range(39150, 39200)
_REFUSED_WAIT_S = 2.0  # how long a refused client is given to (not) get metadata


@dataclass
class Secure:
    stack: LocalStack
    prefix: str
    log: list[str] = field(default_factory=list)
    tenant_passwords: dict[str, str] = field(default_factory=dict)

    @property
    def topics(self) -> Topics:
        return Topics(self.prefix)

    def as_user(self, user: str, password: str | None = None) -> KafkaConfig:
        pw = password if password is not None else self.password(user)
        return self.stack.kafka_user(user, pw, topic_prefix=self.prefix)

    def password(self, user: str) -> str:
        if user in self.tenant_passwords:
            return self.tenant_passwords[user]
        return self.stack.secrets.password(user)


@pytest.fixture(scope="module")
def secure(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Secure]:
    config = own_stack_config(tmp_path_factory, "secure-stack", _PORTS, stack_secure=True)
    prefix = f"s{uuid.uuid4().hex[:8]}"
    log: list[str] = []
    stack = LocalStack(config, log=log.append)
    topics = Topics(prefix)
    try:  # also when `up` fails half-way: stop what it started
        stack.up(
            topics.partitions(requests=2, results=2, telemetry=1, ingress=1),
            per_topic=topics.configs(),
            topic_prefix=prefix,
        )
        yield Secure(stack, prefix, log)
    finally:
        stack.down()


def _refused(conf: dict[str, Any]) -> list[KafkaError]:
    """Ask for metadata; return the errors the client reported. Fails the
    test if metadata came back (the broker served an unauthenticated client)."""
    errors: list[KafkaError] = []
    client = AdminClient({**conf, "error_cb": errors.append, "log_level": 0})
    with pytest.raises(KafkaException):
        client.list_topics(timeout=_REFUSED_WAIT_S)
    client.poll(0.5)  # serves error_cb
    return errors


def _produce(config: KafkaConfig, topic: str, value: bytes = b"x", **extra: Any) -> KafkaError | None:
    """Produce one record to partition 0 (the one `_read` reads); the delivery report's error (None: delivered)."""
    reports: list[KafkaError | None] = []
    producer = Producer(
        {
            **config.rdkafka(),
            "enable.idempotence": True,
            "message.timeout.ms": 10_000,
            "log_level": 0,
            **extra,
        }
    )
    producer.produce(topic, value, partition=0, on_delivery=lambda err, msg: reports.append(err))
    producer.flush(15)
    assert len(reports) == 1, f"no delivery report for {topic}"
    return reports[0]


def _read(config: KafkaConfig, topic: str, **extra: Any) -> list[bytes] | KafkaError:
    """Read partition 0 of `topic` from the start by assignment (no group
    commits, as the clients read results): the records, or the first error
    the broker answered about the topic."""
    consumer = Consumer(
        {
            **config.rdkafka(),
            "group.id": f"sluice-test-{uuid.uuid4().hex[:6]}",
            "enable.auto.commit": False,
            "enable.partition.eof": True,
            "log_level": 0,
            **extra,
        }
    )
    try:
        # Without Describe the broker does not even admit the topic exists
        # (and librdkafka then never fetches, so poll() would say nothing).
        refused = consumer.list_topics(topic, timeout=10).topics[topic].error
        if refused is not None:
            return refused
        # With Describe and no Read, the fetch is refused.
        consumer.assign([TopicPartition(topic, 0, -2)])  # -2: the beginning
        values: list[bytes] = []
        for _ in range(100):
            msg = consumer.poll(0.5)
            if msg is None:
                continue
            err = msg.error()
            if err is None:
                values.append(msg.value())
            elif err.code() == KafkaError._PARTITION_EOF:
                return values
            elif err.code() == KafkaError.GROUP_AUTHORIZATION_FAILED:
                # librdkafka looks up the coordinator of any group.id it is
                # given, even for assign(); app principals have no group
                # rights, and reading goes on without one (as in
                # producers/rdkafka_client.py, which skips such errors).
                continue
            else:
                return err
        raise AssertionError(f"reading {topic}: neither records nor an error")
    finally:
        consumer.close()


# ----------------------------------------------------------------- refusals


def test_no_credentials_refused(secure: Secure) -> None:
    servers = secure.stack.bootstrap_servers
    _refused({"bootstrap.servers": servers, "security.protocol": "PLAINTEXT"})
    # TLS alone (the CA trusted, no SASL): the handshake works, the broker still refuses.
    _refused(
        {"bootstrap.servers": servers, "security.protocol": "SSL", "ssl.ca.location": str(secure.stack.secrets.ca_pem)}
    )
    # The KRaft controller listener wants a password too.
    _refused(
        {
            "bootstrap.servers": f"127.0.0.1:{secure.stack.config.kafka_controller_port}",
            "security.protocol": "PLAINTEXT",
        }
    )


def test_wrong_password_refused(secure: Secure) -> None:
    errors = _refused(secure.as_user(SERVICE_USER, "not-the-password").rdkafka())
    assert any(e.code() == KafkaError._AUTHENTICATION for e in errors), errors
    # An unknown user likewise.
    errors = _refused(secure.as_user("nobody", "whatever").rdkafka())
    assert any(e.code() == KafkaError._AUTHENTICATION for e in errors), errors


def test_plaintext_stack_on_a_secure_one_refused(secure: Secure) -> None:
    plain = LocalStack(secure.stack.config.model_copy(update={"stack_secure": False}), log=lambda line: None)
    with pytest.raises(StackError, match="SLUICE_STACK_SECURE"):
        plain.up()


# ------------------------------------------------------------- the service


def test_service_produces_consumes_and_commits_transactions(secure: Secure) -> None:
    sluice = secure.as_user(SERVICE_USER)
    topics = secure.topics
    assert _produce(sluice, topics.telemetry, b"plain") is None
    # A transaction's commit markers travel over the inter-broker SASL_SSL listener.
    producer = Producer({**sluice.rdkafka(), "transactional.id": f"sluice-test-{secure.prefix}", "log_level": 0})
    producer.init_transactions(30)
    producer.begin_transaction()
    producer.produce(topics.telemetry, b"in-a-transaction", partition=0)
    producer.commit_transaction(30)
    seen = _read(sluice, topics.telemetry, **{"isolation.level": "read_committed"})
    assert not isinstance(seen, KafkaError), seen
    assert b"in-a-transaction" in seen
    # A group under the service's prefix joins and commits.
    consumer = Consumer(
        {**sluice.rdkafka(), "group.id": "sluice-test-workers", "auto.offset.reset": "earliest", "log_level": 0}
    )
    try:
        consumer.subscribe([topics.telemetry])
        msg = None
        for _ in range(60):
            msg = consumer.poll(0.5)
            if msg is not None and msg.error() is None:
                break
        assert msg is not None and msg.error() is None, msg and msg.error()
        consumer.commit(msg, asynchronous=False)
    finally:
        consumer.close()


def test_client_principal_only_writes_requests_and_reads_results(secure: Secure) -> None:
    client = secure.as_user(CLIENT_USER)
    topics = secure.topics
    assert _produce(client, topics.requests) is None
    assert _produce(secure.as_user(SERVICE_USER), topics.results, b"result") is None
    assert _read(client, topics.results) == [b"result"]
    err = _produce(client, topics.results)
    assert err is not None and err.code() == KafkaError.TOPIC_AUTHORIZATION_FAILED, err
    err = _read(client, topics.requests)
    assert isinstance(err, KafkaError) and err.code() == KafkaError.TOPIC_AUTHORIZATION_FAILED, err


# ---------------------------------------------------------------- tenants


@pytest.fixture(scope="module")
def tenants(secure: Secure) -> Secure:
    admin = secure.stack.kafka_admin
    assert isinstance(admin, KafkaConfig)
    for tenant in ("a", "b"):
        password = uuid.uuid4().hex
        access.create_user(admin, tenant, password)
        access.grant_tenant(admin, secure.prefix, tenant, requests_partitions=1, results_partitions=1)
        secure.tenant_passwords[tenant] = password
    # idempotent: granting again changes nothing and fails nothing
    access.grant_tenant(admin, secure.prefix, "a", requests_partitions=1, results_partitions=1)
    return secure


def test_tenant_cannot_write_another_tenants_requests(tenants: Secure) -> None:
    a = tenants.as_user("a")
    requests_a, _ = access.tenant_topics(tenants.prefix, "a")
    requests_b, _ = access.tenant_topics(tenants.prefix, "b")
    assert _produce(a, requests_a) is None
    err = _produce(a, requests_b)
    assert err is not None and err.code() == KafkaError.TOPIC_AUTHORIZATION_FAILED, err
    # nor the shared requests topic of single-tenant mode
    err = _produce(a, tenants.topics.requests)
    assert err is not None and err.code() == KafkaError.TOPIC_AUTHORIZATION_FAILED, err


def test_tenant_cannot_read_another_tenants_results(tenants: Secure) -> None:
    a = tenants.as_user("a")
    service = tenants.as_user(SERVICE_USER)
    _, results_a = access.tenant_topics(tenants.prefix, "a")
    _, results_b = access.tenant_topics(tenants.prefix, "b")
    assert _produce(service, results_a, b"for-a") is None
    assert _produce(service, results_b, b"for-b") is None
    assert _read(a, results_a) == [b"for-a"]
    err = _read(a, results_b)
    assert isinstance(err, KafkaError) and err.code() == KafkaError.TOPIC_AUTHORIZATION_FAILED, err


# ------------------------------------------------------------------ redis


def test_redis_refuses_default_user_and_accepts_sluice(secure: Secure) -> None:
    # No retries: redis-py retries a refused AUTH (a ConnectionError) with back-off.
    port, once = secure.stack.config.redis_port, Retry(NoBackoff(), 0)
    anonymous = redis.Redis(host="127.0.0.1", port=port, socket_timeout=5, retry=once)
    with pytest.raises(redis.exceptions.AuthenticationError):
        anonymous.ping()
    wrong = redis.Redis(
        host="127.0.0.1", port=port, username=REDIS_USER, password="wrong", socket_timeout=5, retry=once
    )
    with pytest.raises(redis.exceptions.AuthenticationError):
        wrong.ping()
    password = secure.stack.secrets.password("redis")
    client = redis.Redis(
        host="127.0.0.1", port=port, username=REDIS_USER, password=password, socket_timeout=5, retry=once
    )
    try:
        assert client.ping()
        client.set("k", "v", ex=10)
        assert client.mget(["k"]) == [b"v"]
        assert client.eval("return redis.call('GET', KEYS[1])", 1, "k") == b"v"
        with pytest.raises(redis.exceptions.NoPermissionError):
            client.flushall()
    finally:
        client.close()
        anonymous.close()
        wrong.close()


# ---------------------------------------------------------------- secrets


def test_env_files_name_files_and_no_password_leaks(secure: Secure) -> None:
    state = secure.stack.config.state_dir
    secrets_dir = secure.stack.secrets.dir
    env = _parse_env(state / "secure.env")
    assert env["SLUICE_KAFKA_SECURITY_PROTOCOL"] == "SASL_SSL"
    assert env["SLUICE_KAFKA_SASL_USERNAME"] == SERVICE_USER
    assert env["SLUICE_REDIS_USERNAME"] == REDIS_USER
    assert Path(env["SLUICE_KAFKA_SASL_PASSWORD_FILE"]) == secrets_dir / "sluice.password"
    assert Path(env["SLUICE_REDIS_PASSWORD_FILE"]) == secrets_dir / "redis.password"
    assert Path(env["SLUICE_KAFKA_SSL_CAFILE"]) == secrets_dir / "ca.pem"
    # The env file's settings connect (KafkaConfig reads the password file).
    service = KafkaConfig(
        bootstrap_servers=env["SLUICE_BOOTSTRAP_SERVERS"],
        kafka_security_protocol="SASL_SSL",
        kafka_sasl_username=env["SLUICE_KAFKA_SASL_USERNAME"],
        kafka_sasl_password_file=Path(env["SLUICE_KAFKA_SASL_PASSWORD_FILE"]),
        kafka_ssl_cafile=Path(env["SLUICE_KAFKA_SSL_CAFILE"]),
    )
    assert secure.topics.requests in AdminClient(service.rdkafka()).list_topics(timeout=10).topics
    assert _parse_env(state / "client.env")["SLUICE_KAFKA_SASL_USERNAME"] == CLIENT_USER

    private = [
        secrets_dir / "sluice.password",
        state / "secure.env",
        state / "client.env",
        state / "kafka" / "server.properties",
        state / "redis" / "users.acl",
    ]
    for path in private:
        assert path.stat().st_mode & 0o077 == 0, f"{path} is readable by others"
    assert secrets_dir.stat().st_mode & 0o077 == 0

    passwords = [p.read_text().strip() for p in secrets_dir.glob("*.password")]
    assert len(passwords) >= 8 and all(len(p) >= 32 for p in passwords)
    shown = {
        "the stack's log lines": "\n".join(secure.log),
        "broker.log": (state / "kafka" / "broker.log").read_text(errors="replace"),
        "redis.log": (state / "redis" / "redis.log").read_text(errors="replace"),
        "secure.env": (state / "secure.env").read_text(),
        "client.env": (state / "client.env").read_text(),
    }
    for name, text in shown.items():
        for password in passwords:
            assert password not in text, f"a password appears in {name}"
    # The running processes' command lines carry none either.
    for pid in (secure.stack.broker_pid(), secure.stack.redis_pid()):
        assert pid is not None
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace")
        for password in passwords:
            assert password not in cmdline


def test_sluice_tenants_grant_makes_a_tenant_that_writes_only_its_topic(tenants: Secure, tmp_path: Path) -> None:
    """The operator's command, run as the admin: user, topics and ACLs."""
    import subprocess

    env = {k: v for k, v in os.environ.items() if not k.startswith("SLUICE_")}
    env |= _parse_env(tenants.stack.env_file(SERVICE_USER))
    env |= {
        "SLUICE_KAFKA_SASL_USERNAME": "admin",
        "SLUICE_KAFKA_SASL_PASSWORD_FILE": str(tenants.stack.secrets.password_file("admin")),
        "SLUICE_TOPIC_PREFIX": tenants.prefix,
    }
    pw_file = tmp_path / "c.password"
    done = subprocess.run(
        [str(ROOT / ".venv" / "bin" / "sluice"), "tenants", "grant", "c", "--password-file", str(pw_file)],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr
    password = pw_file.read_text().strip()
    assert oct(pw_file.stat().st_mode & 0o777) == "0o600"
    assert password not in done.stdout + done.stderr
    c = tenants.as_user("c", password)
    assert _produce(c, tenants.topics.tenant_requests("c")) is None
    refused = _produce(c, tenants.topics.tenant_requests("a"))
    assert refused is not None and refused.code() == KafkaError.TOPIC_AUTHORIZATION_FAILED


# ------------------------------------------------ a worker and clients on it


async def test_a_worker_serves_each_tenant_on_its_own_topics_over_sasl_ssl(tenants: Secure, tmp_path: Path) -> None:
    """The whole path on the secure stack: an exactly-once worker as
    `sluice`, tenant-topic mode, each tenant's client as its own principal.
    A request that claims another tenant is served as its topic's tenant
    (and counted); no password reaches the worker's log."""
    import orjson
    from aiokafka.errors import KafkaConnectionError

    from producers.client import ClientError, SluiceClient, make_request
    from sluice.supervisor import WorkerProcess
    from tests.conftest import read_topic_as

    env = _service_env(
        tenants,
        SLUICE_GROUP_ID=f"sluice-workers-{tenants.prefix}",
        SLUICE_TENANT_TOPICS="true",
        SLUICE_DELIVERY="exactly-once",
    )
    worker = WorkerProcess(env, log_path=tmp_path / "worker.log", cwd=ROOT, inherit_env=False)
    worker.start(90)
    sink_env = {
        **env,
        "SLUICE_SINK_GROUP_ID": f"sluice-sink-{tenants.prefix}",
        "SLUICE_CHDB_PATH": str(tmp_path / "chdb"),
    }
    sink = WorkerProcess(sink_env, log_path=tmp_path / "sink.log", cwd=ROOT, inherit_env=False, command="sink")
    sink.start(90)
    try:
        a = tenants.as_user("a").model_copy(update={"tenant_topics": True, "tenant": "a"})
        async with SluiceClient(a, timeout_s=60) as client:
            ok = await client.submit("a request of tenant a")
            assert ok.status == "ok" and ok.output is not None
            # claims tenant b on a's topic: a's request all the same
            doc = make_request("who am i", tenant="b")
            fut = client.expect(doc["id"])
            await client.send_raw(orjson.dumps(doc))
            claimed = await asyncio.wait_for(fut, 60)
            assert claimed["status"] == "ok"
        telemetry = await read_topic_as(
            tenants.as_user(SERVICE_USER), tenants.topics.telemetry, expect=2, isolation_level="read_committed"
        )
        # (other tests of the module wrote a bare b"x" here)
        by_id = {d["id"]: d for d in (orjson.loads(r.value) for r in telemetry if r.value.startswith(b"{"))}
        assert by_id[doc["id"]]["tenant"] == "a" and by_id[ok.id]["tenant"] == "a"
        assert worker.scrape()['sluice_tenant_overrides_total{field="tenant"}'] == 1.0
        # the sink, as `sluice` too, stored both, under tenant a
        stored: list = []
        for _ in range(60):
            stored = _sink_rows(
                sink.port,
                f"SELECT count() FROM sluice.telemetry WHERE tenant = 'a' AND id IN ('{ok.id}', '{doc['id']}')",
            )
            if stored and stored[0][0] == 2:
                break
            await asyncio.sleep(1)
        assert stored == [[2]]

        # a's principal reading b's results: the broker refuses, the client says so
        with pytest.raises(ClientError, match="ACLs do not let a read it"):
            async with SluiceClient(a, results_topic=tenants.topics.tenant_results("b"), timeout_s=10):
                pass
        # no credentials: refused
        bare = KafkaConfig(
            bootstrap_servers=tenants.stack.bootstrap_servers, topic_prefix=tenants.prefix, tenant_topics=True
        )
        with pytest.raises(KafkaConnectionError):
            async with asyncio.timeout(20), SluiceClient(bare, timeout_s=10):
                pass
    finally:
        worker.stop()
        sink.stop()
    log = (tmp_path / "worker.log").read_text()
    assert "worker" in log and "assigned partitions" in log
    sink_log = (tmp_path / "sink.log").read_text()
    assert "sink started" in sink_log
    secrets = [tenants.password(u) for u in (SERVICE_USER, "a", "b")]
    secrets.append(tenants.stack.secrets.password("redis"))
    leaked = [s for s in secrets if s in log or s in sink_log]
    assert not leaked, "a password is in the worker's or the sink's log"


async def test_a_gateway_serves_http_callers_as_sluice_over_sasl_ssl(secure: Secure, tmp_path: Path) -> None:
    """The gateway on the secure stack, as `sluice`: it makes its reply
    topic under the ACLs, serves the openai client, and deletes the topic at
    its stop; its log holds no password."""
    import openai

    from producers.gateway.keys import digest
    from sluice.supervisor import WorkerProcess

    env = _service_env(secure, SLUICE_GROUP_ID=f"sluice-workers-gw-{secure.prefix}")
    keys = tmp_path / "keys.txt"
    keys.write_text(f"acme sha256:{digest('key-acme')}\n")
    worker = WorkerProcess(env, log_path=tmp_path / "worker.log", cwd=ROOT, inherit_env=False)
    worker.start(90)
    gw_env = {**env, "SLUICE_GATEWAY_API_KEYS_FILE": str(keys), "SLUICE_GATEWAY_ID": "secure-gw"}
    gateway = WorkerProcess(gw_env, log_path=tmp_path / "gateway.log", cwd=ROOT, inherit_env=False, command="gateway")
    reply_topic = secure.topics.replies("secure-gw")
    admin = AdminClient(secure.as_user(SERVICE_USER).rdkafka())
    try:
        gateway.start(60)
        assert reply_topic in admin.list_topics(timeout=10).topics
        oai = openai.AsyncOpenAI(base_url=f"http://127.0.0.1:{gateway.port}/v1", api_key="key-acme", max_retries=0)
        got = await oai.embeddings.create(input=["over sasl_ssl", "and http"], model="all-minilm-l6-v2")
        assert [len(d.embedding) for d in got.data] == [384, 384]
        with pytest.raises(openai.AuthenticationError):
            await openai.AsyncOpenAI(
                base_url=f"http://127.0.0.1:{gateway.port}/v1", api_key="nope", max_retries=0
            ).embeddings.create(input="x", model="all-minilm-l6-v2")

        # an application as `client` has reply topics of its own too, named after its principal
        from producers.client import SluiceClient
        from schemas.errors import SluiceError

        as_client = secure.as_user(CLIENT_USER)
        mine = secure.topics.replies(f"{CLIENT_USER}-app1")
        async with SluiceClient(as_client, reply_topic=mine, timeout_s=60) as client:
            assert (await client.submit("answered on my own topic")).status == "ok"
        assert mine not in admin.list_topics(timeout=10).topics
        with pytest.raises(SluiceError, match="cannot create reply topic"):
            async with SluiceClient(as_client, reply_topic=secure.topics.replies("someone-else"), timeout_s=10):
                pass
    finally:
        gateway.stop()
        worker.stop()
    assert reply_topic not in admin.list_topics(timeout=10).topics
    log = (tmp_path / "gateway.log").read_text()
    assert "answers on" in log
    assert secure.password(SERVICE_USER) not in log and "key-acme" not in log


def _sink_rows(port: int, sql: str) -> list:
    from sinks.query_endpoint import remote_runner

    return remote_runner("127.0.0.1", port, timeout_s=10)(sql)[1]


def _service_env(secure: Secure, **settings: str) -> dict[str, str]:
    """A Sluice process's environment as `sluice` (secure.env) on the module's topics, plus `settings`."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("SLUICE_")}
    env |= _parse_env(secure.stack.env_file(SERVICE_USER))
    env |= {
        "SLUICE_TOPIC_PREFIX": secure.prefix,
        "SLUICE_ORT_INTRA_OP_THREADS": "1",
        "SLUICE_DEFAULT_MODEL": "all-minilm-l6-v2",
    }
    return env | settings


def _parse_env(path: Path) -> dict[str, str]:
    import shlex

    env: dict[str, str] = {}
    for line in path.read_text().splitlines():
        if line.startswith("export "):
            key, _, value = line.removeprefix("export ").partition("=")
            env[key] = shlex.split(value)[0]
    assert env, f"no export lines in {path}"
    return env


def test_restart_reuses_secrets(secure: Secure) -> None:
    """Last (it restarts the stack): `up` on a running stack and a real
    restart keep every secret, and the users and ACLs still hold."""
    before = {p.name: p.read_bytes() for p in secure.stack.secrets.dir.iterdir()}
    assert secure.stack.up(topic_prefix=secure.prefix) == "already running"
    secure.stack.down()
    assert secure.stack.up(topic_prefix=secure.prefix) == "started"
    after = {p.name: p.read_bytes() for p in secure.stack.secrets.dir.iterdir()}
    assert before == after
    assert _produce(secure.as_user(CLIENT_USER), secure.topics.requests) is None
    err = _produce(secure.as_user(CLIENT_USER), secure.topics.results)
    assert err is not None and err.code() == KafkaError.TOPIC_AUTHORIZATION_FAILED, err
