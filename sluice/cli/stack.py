"""`sluice up`, `down` and `status`: the local stack (Kafka KRaft, Redis); `sluice topics`: the topics on any cluster."""

from __future__ import annotations

import argparse

from sluice.settings import Settings


def add_up_flags(p: argparse.ArgumentParser) -> None:
    """`sluice up`'s flags."""
    p.add_argument(
        "--secure",
        action="store_true",
        help="Kafka with only a SASL_SSL listener, SCRAM users and ACLs; Redis with an ACL user "
        "(SLUICE_STACK_SECURE=1 does the same); prints the env file to source",
    )


def cmd_up(s: Settings, args: argparse.Namespace) -> int:
    from sluice.stack import CLIENT_USER, REDIS_USER, SERVICE_USER, LocalStack

    config = s.stack()
    if getattr(args, "secure", False):
        config = config.model_copy(update={"stack_secure": True})
    stack = LocalStack(config)
    outcome = stack.up(s.topic_partitions(), **s.topic_replication(), topic_prefix=s.topic_prefix)
    if not config.stack_secure:
        print(f"stack {outcome}: kafka {stack.bootstrap_servers}, redis {stack.redis_url}, state {s.state_dir}")
        return 0
    print(
        f"secure stack {outcome}: kafka SASL_SSL {stack.bootstrap_servers}, redis {stack.redis_url} "
        f"(user {REDIS_USER}), state {s.state_dir}\n"
        f"workers, sink, admission, autoscaler: source {stack.env_file(SERVICE_USER)}\n"
        f"client applications:                  source {stack.env_file(CLIENT_USER)}"
    )
    return 0


def cmd_down(s: Settings, args: argparse.Namespace) -> int:
    from sluice.stack import LocalStack

    LocalStack(s.stack()).down()
    print("stack stopped")
    return 0


def cmd_status(s: Settings, args: argparse.Namespace) -> int:
    from sluice.stack import LocalStack

    status = LocalStack(s.stack()).status()
    for name, st in status.items():
        print(
            f"{name:6} {'running' if st.get('alive') else 'stopped':8} "
            + " ".join(f"{k}={v}" for k, v in st.items() if k != "alive")
        )
    return 0 if all(st.get("alive") for st in status.values()) else 3


def cmd_topics(s: Settings, args: argparse.Namespace) -> int:
    """The topics on SLUICE_BOOTSTRAP_SERVERS, any cluster: created with the
    configured partitions and replication; run again, it creates nothing."""
    import asyncio

    from sluice.admin import ensure_topics

    wanted = s.topic_partitions()
    created = asyncio.run(
        ensure_topics(
            s.kafka(),
            wanted,
            **s.topic_replication(),
        )
    )
    for name, count in wanted.items():
        print(f"{name:32} {count:3} partitions  {'created' if name in created else 'exists'}")
    return 0
