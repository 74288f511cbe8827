"""The exactly-once publisher's guard against a librdkafka transaction call
that never returns (librdkafka#5456, seen after a broker restart)."""

from __future__ import annotations

import threading
import time

import pytest

import processors.publisher as publisher
from processors.publisher import Publisher, TransactionStuck


class _HangingProducer:
    """Stands in for librdkafka's handle: send_offsets_to_transaction ignores
    its timeout and blocks, as the fault suite saw it do."""

    def __init__(self) -> None:
        self.release = threading.Event()
        self.calls: list[tuple[str, float]] = []

    def send_offsets_to_transaction(self, offsets, metadata, timeout: float) -> None:
        self.calls.append(("send_offsets_to_transaction", timeout))
        self.release.wait()  # a daemon thread: the test's end does not wait for it

    def commit_transaction(self, timeout: float) -> None:
        self.calls.append(("commit_transaction", timeout))


async def test_a_transaction_call_that_outlives_its_timeout_is_reported_stuck(monkeypatch):
    monkeypatch.setattr(publisher, "_STUCK_GRACE_S", 0.2)
    pub = Publisher("127.0.0.1:1", client_id="t", linger_ms=0, transactional_id="sluice-t", transaction_timeout_ms=1000)
    hanging = pub._producer = _HangingProducer()
    t0 = time.monotonic()
    with pytest.raises(TransactionStuck, match="send_offsets_to_transaction did not return"):
        await pub.commit([], object())
    took = time.monotonic() - t0
    hanging.release.set()
    # it gave the call its own timeout (the transaction timeout) first, and
    # did not wait for it for ever
    assert 1.0 <= took < 10.0
    assert [name for name, _ in hanging.calls] == ["send_offsets_to_transaction"]
    assert 0.9 <= hanging.calls[0][1] <= 1.0


async def test_a_transaction_call_that_returns_is_not_stuck(monkeypatch):
    monkeypatch.setattr(publisher, "_STUCK_GRACE_S", 0.2)
    pub = Publisher("127.0.0.1:1", client_id="t", linger_ms=0, transactional_id="sluice-t", transaction_timeout_ms=1000)
    quick = pub._producer = _HangingProducer()
    quick.release.set()
    await pub.commit([], object())
    assert [name for name, _ in quick.calls] == ["send_offsets_to_transaction", "commit_transaction"]
