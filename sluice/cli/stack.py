"""`sluice up`, `down` and `status`: the local stack (Kafka KRaft, Redis)."""

from __future__ import annotations

import argparse

from sluice.settings import Settings


def cmd_up(s: Settings, args: argparse.Namespace) -> int:
    from sluice.stack import LocalStack

    stack = LocalStack(s.stack())
    outcome = stack.up(s.topic_partitions())
    print(f"stack {outcome}: kafka {stack.bootstrap_servers}, redis {stack.redis_url}, state {s.state_dir}")
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
