"""Kafka users and ACLs for Sluice: who may read and write which topics.

A secure cluster (SASL + an authorizer with `allow.everyone.if.no.acl.found=false`)
refuses everything nobody was granted. These functions make the users and
grant the rights of the three kinds of principal Sluice knows:

- the service (`grant_service`): workers, the sink, the admission stage and
  the autoscaler, which read and write every topic under the prefix;
- a single-tenant client application (`grant_client`): writes requests,
  reads results, and makes, reads and deletes its own reply topics
  (PREFIX.replies.PRINCIPAL-*), nothing else;
- a tenant (`grant_tenant`), with tenant topics (SLUICE_TENANT_TOPICS): its
  own PREFIX.requests.TENANT and PREFIX.results.TENANT only, so the broker
  itself keeps tenants apart.

All of it goes through Kafka's admin API as a super user (`admin`, a
KafkaConfig with its credentials), and all of it is idempotent: a user is
upserted, an ACL that exists is created again as a no-op. Each call returns
once the broker shows what it made (users and ACLs are metadata records that
reach the broker's authorizer a moment after the controller commits them),
so a caller can use the rights at once.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from concurrent.futures import Future
from typing import Any, TypeVar, cast

from confluent_kafka import KafkaError, KafkaException
from confluent_kafka.admin import (
    AclBinding,
    AclBindingFilter,
    AclOperation,
    AclPermissionType,
    AdminClient,
    NewTopic,
    ResourcePatternType,
    ResourceType,
    ScramCredentialInfo,
    ScramMechanism,
    UserScramCredentialUpsertion,
)

from schemas.errors import SluiceError
from schemas.topics import KafkaConfig, Topics, check_topic_name

__all__ = [
    "AccessError",
    "client_acls",
    "create_user",
    "grant",
    "grant_client",
    "grant_service",
    "grant_tenant",
    "service_acls",
    "tenant_acls",
    "tenant_topics",
]

# Every group id and transactional id of Sluice's own processes starts so:
# sluice-workers, sluice-sink, sluice-admission (their defaults) and the
# workers' transactional ids.
SERVICE_ID_PREFIX = "sluice"
_SCRAM_ITERATIONS = 8192  # Kafka's maximum is 16384; 4096 is SCRAM's floor
_POLL_S = 0.1

T = TypeVar("T")


class AccessError(SluiceError):
    """Users or ACLs could not be made or checked on the cluster."""

    code = "access"
    retriable = True


_OP = AclOperation
_TOPIC, _GROUP, _TXN, _CLUSTER = (
    ResourceType.TOPIC,
    ResourceType.GROUP,
    ResourceType.TRANSACTIONAL_ID,
    ResourceType.BROKER,
)
_LITERAL, _PREFIXED = ResourcePatternType.LITERAL, ResourcePatternType.PREFIXED
_CLUSTER_NAME = "kafka-cluster"  # the one name the cluster resource has


def _user(name: str) -> str:
    if not name or name.startswith("User:"):
        raise ValueError(f"give a user name without 'User:', got {name!r}")
    return f"User:{name}"


def _allow(kind: ResourceType, name: str, pattern: ResourcePatternType, user: str, op: AclOperation) -> AclBinding:
    return AclBinding(kind, name, pattern, _user(user), "*", op, AclPermissionType.ALLOW)


def service_acls(prefix: str, principal: str = "sluice") -> list[AclBinding]:
    """What Sluice's own processes need.

    - ALL on topics PREFIXED `PREFIX.`: they read, write and create (reply_to
      topics a request names are auto-created under the prefix, which takes
      Create on the topic) and describe them (lag reads end offsets).
    - Read and Describe on groups PREFIXED `sluice`: joining and committing
      (Read), and the autoscaler's and sink's committed-offset and member
      look-ups (Describe).
    - Write and Describe on transactional ids PREFIXED `sluice` (exactly-once
      workers).
    - On the cluster: IdempotentWrite (every producer is idempotent),
      Describe (describe_cluster) and DescribeConfigs.
    """
    check_topic_name(prefix)
    return [
        _allow(_TOPIC, f"{prefix}.", _PREFIXED, principal, _OP.ALL),
        *(_allow(_GROUP, SERVICE_ID_PREFIX, _PREFIXED, principal, op) for op in (_OP.READ, _OP.DESCRIBE)),
        *(_allow(_TXN, SERVICE_ID_PREFIX, _PREFIXED, principal, op) for op in (_OP.WRITE, _OP.DESCRIBE)),
        *(
            _allow(_CLUSTER, _CLUSTER_NAME, _LITERAL, principal, op)
            for op in (_OP.IDEMPOTENT_WRITE, _OP.DESCRIBE, _OP.DESCRIBE_CONFIGS)
        ),
    ]


def client_acls(prefix: str, principal: str = "client") -> list[AclBinding]:
    """What a single-tenant application needs: write PREFIX.requests and
    PREFIX.ingress (with admission), read PREFIX.results, and its own reply
    topics (`SluiceClient(reply_topic=topics.replies(f"{principal}-app1"))`):
    Create, Read, Describe and Delete on topics PREFIXED
    PREFIX.replies.PRINCIPAL- (so one principal never reads another's). No
    group: the client reads results by partition assignment and commits nothing."""
    topics = Topics(prefix)
    own_replies = topics.replies(f"{principal}-")
    return [
        *(
            _allow(_TOPIC, own_replies, _PREFIXED, principal, op)
            for op in (_OP.CREATE, _OP.READ, _OP.DESCRIBE, _OP.DELETE)
        ),
        *(
            _allow(_TOPIC, topic, _LITERAL, principal, op)
            for topic in (topics.requests, topics.ingress)
            for op in (_OP.WRITE, _OP.DESCRIBE)
        ),
        *(_allow(_TOPIC, topics.results, _LITERAL, principal, op) for op in (_OP.READ, _OP.DESCRIBE)),
        _allow(_CLUSTER, _CLUSTER_NAME, _LITERAL, principal, _OP.IDEMPOTENT_WRITE),
    ]


def tenant_topics(prefix: str, tenant: str) -> tuple[str, str]:
    """The tenant's (requests, results) topics in tenant-topic mode."""
    topics = Topics(prefix)
    return check_topic_name(f"{topics.requests}.{tenant}"), check_topic_name(f"{topics.results}.{tenant}")


def tenant_acls(prefix: str, tenant: str, principal: str | None = None) -> list[AclBinding]:
    """What one tenant needs: write its requests topic, read its results topic
    (both LITERAL, so no other tenant's name can match)."""
    requests, results = tenant_topics(prefix, tenant)
    user = principal or tenant
    return [
        *(_allow(_TOPIC, requests, _LITERAL, user, op) for op in (_OP.WRITE, _OP.DESCRIBE)),
        *(_allow(_TOPIC, results, _LITERAL, user, op) for op in (_OP.READ, _OP.DESCRIBE)),
        _allow(_CLUSTER, _CLUSTER_NAME, _LITERAL, user, _OP.IDEMPOTENT_WRITE),
    ]


# ------------------------------------------------------------------ the cluster


def create_user(
    admin: KafkaConfig, name: str, password: str, *, mechanism: str = "SCRAM-SHA-512", timeout_s: float = 30.0
) -> None:
    """Make the SCRAM user `name` with `password`, or set its password if it exists."""
    _user(name)
    mechanisms = {"SCRAM-SHA-512": ScramMechanism.SCRAM_SHA_512, "SCRAM-SHA-256": ScramMechanism.SCRAM_SHA_256}
    if mechanism not in mechanisms:
        raise ValueError(f"mechanism must be one of {', '.join(mechanisms)}, got {mechanism!r}")
    if not password:
        raise ValueError(f"Kafka user {name!r}: the password is empty")
    deadline = time.monotonic() + timeout_s
    client = _admin_client(admin)
    upsert = UserScramCredentialUpsertion(
        name, ScramCredentialInfo(mechanisms[mechanism], _SCRAM_ITERATIONS), password.encode()
    )
    what = f"creating Kafka user {name!r}"
    futures = client.alter_user_scram_credentials([upsert], request_timeout=timeout_s)
    _result(futures[name], what, admin, deadline)

    def visible() -> bool:
        # Given a list of users it answers a future per user.
        futures = cast(
            dict[str, Future[Any]], client.describe_user_scram_credentials([name], request_timeout=_left(deadline))
        )
        try:
            described = _result(futures[name], what, admin, deadline)
        except _NotFound:  # the broker has not applied the new credential yet
            return False
        return any(info.mechanism == mechanisms[mechanism] for info in described.scram_credential_infos)

    _poll(visible, what, admin, deadline)


def grant(admin: KafkaConfig, bindings: list[AclBinding], *, timeout_s: float = 30.0) -> list[AclBinding]:
    """Create `bindings` (those that exist are no-ops) and wait until the broker lists them all."""
    if not bindings:
        return []
    deadline = time.monotonic() + timeout_s
    client = _admin_client(admin)
    for binding, future in client.create_acls(bindings, request_timeout=timeout_s).items():
        _result(future, f"granting {_show(binding)}", admin, deadline)
    wanted: dict[str, set[AclBinding]] = {}
    for binding in bindings:
        wanted.setdefault(binding.principal, set()).add(binding)
    for principal, own in wanted.items():
        what = f"granting ACLs to {principal}"
        # None matches any resource name and host (as documented; the stubs say str).
        anything = cast(str, None)
        pattern = AclBindingFilter(
            ResourceType.ANY,
            anything,
            ResourcePatternType.ANY,
            principal,
            anything,
            AclOperation.ANY,
            AclPermissionType.ANY,
        )

        def visible(own: set[AclBinding] = own, pattern: AclBindingFilter = pattern, what: str = what) -> bool:
            listed = _result(client.describe_acls(pattern, request_timeout=_left(deadline)), what, admin, deadline)
            return own <= set(listed)

        _poll(visible, what, admin, deadline)
    return bindings


def grant_service(
    admin: KafkaConfig, prefix: str, principal: str = "sluice", *, timeout_s: float = 30.0
) -> list[AclBinding]:
    """Grant Sluice's own processes their rights (`service_acls`)."""
    return grant(admin, service_acls(prefix, principal), timeout_s=timeout_s)


def grant_client(
    admin: KafkaConfig, prefix: str, principal: str = "client", *, timeout_s: float = 30.0
) -> list[AclBinding]:
    """Grant a single-tenant application its rights (`client_acls`)."""
    return grant(admin, client_acls(prefix, principal), timeout_s=timeout_s)


def grant_tenant(
    admin: KafkaConfig,
    prefix: str,
    tenant: str,
    principal: str | None = None,
    *,
    requests_partitions: int = 3,
    results_partitions: int = 3,
    replication_factor: int = 1,
    timeout_s: float = 30.0,
) -> list[AclBinding]:
    """Make the tenant's two topics if missing (existing ones are left as
    they are) and grant `principal` (default: the tenant's name) its rights
    (`tenant_acls`)."""
    requests, results = tenant_topics(prefix, tenant)
    bindings = tenant_acls(prefix, tenant, principal)
    _ensure_topics(
        admin,
        {requests: requests_partitions, results: results_partitions},
        replication_factor=replication_factor,
        timeout_s=timeout_s,
    )
    return grant(admin, bindings, timeout_s=timeout_s)


def _ensure_topics(
    admin: KafkaConfig, partitions: dict[str, int], *, replication_factor: int, timeout_s: float
) -> None:
    for name, count in partitions.items():
        if count < 1:
            raise ValueError(f"topic {name!r}: partition count must be >= 1, got {count}")
    deadline = time.monotonic() + timeout_s
    client = _admin_client(admin)
    new = [
        NewTopic(name, num_partitions=count, replication_factor=replication_factor)
        for name, count in partitions.items()
    ]
    for name, future in client.create_topics(new, request_timeout=timeout_s, operation_timeout=timeout_s).items():
        try:
            _result(future, f"creating topic {name!r}", admin, deadline)
        except _AlreadyExists:
            pass

    def visible() -> bool:
        return partitions.keys() <= client.list_topics(timeout=_left(deadline)).topics.keys()

    _poll(visible, f"creating topics {', '.join(partitions)}", admin, deadline)


class _AlreadyExists(AccessError):
    """The topic exists (fine when creating one if missing)."""


class _NotFound(AccessError):
    """The broker does not know the thing asked about (yet)."""


def _admin_client(admin: KafkaConfig) -> AdminClient:
    # Warnings and errors only: librdkafka's notices (a queue purged as a
    # short-lived client closes) say nothing an operator can act on.
    return AdminClient({**admin.rdkafka(), "client.id": "sluice-access", "log_level": 4})


def _left(deadline: float) -> float:
    return max(0.5, deadline - time.monotonic())


def _show(binding: AclBinding) -> str:
    return f"{binding.operation} on {binding.restype} {binding.name!r} ({binding.resource_pattern_type}) to {binding.principal}"


def _result(future: Future[T], what: str, admin: KafkaConfig, deadline: float) -> T:
    """A future's result, or AccessError naming `what` (the broker's reason, never a secret)."""
    try:
        return future.result(timeout=_left(deadline))
    except KafkaException as exc:
        err = exc.args[0]
        if isinstance(err, KafkaError):
            if err.code() == KafkaError.TOPIC_ALREADY_EXISTS:
                raise _AlreadyExists(what) from None
            if err.code() == KafkaError.RESOURCE_NOT_FOUND:
                raise _NotFound(what) from None
            reason = f"{err.name()}: {err.str()}"
        else:
            reason = str(err)
        raise AccessError(f"{what} on {admin.bootstrap_servers}: {reason}") from None
    except TimeoutError:
        raise AccessError(f"{what} on {admin.bootstrap_servers}: no answer in time") from None


def _poll(check: Callable[[], bool], what: str, admin: KafkaConfig, deadline: float) -> None:
    """Call `check()` until it holds; AccessError at the deadline."""
    while not check():
        if time.monotonic() >= deadline:
            raise AccessError(f"{what} on {admin.bootstrap_servers}: not visible on the broker in time")
        time.sleep(_POLL_S)
