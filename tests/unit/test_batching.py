import pytest

from processors.batching import Batcher, BatchPolicy, PartitionBatch


def test_policy_rejects_bad_limits_naming_them():
    with pytest.raises(ValueError, match="batch_max_items=0"):
        BatchPolicy(max_items=0)
    with pytest.raises(ValueError, match="batch_max_wait_ms=-1"):
        BatchPolicy(max_wait_ms=-1)


def test_batch_is_ready_when_full_by_items():
    b = Batcher[str](BatchPolicy(max_items=3, max_tokens=1000, max_wait_ms=1000))
    for off in range(2):
        b.add(0, f"r{off}", tokens=5, offset=off, now=0.0)
    assert b.take_ready(now=0.0) == []
    b.add(0, "r2", tokens=5, offset=2, now=0.0)
    [batch] = b.take_ready(now=0.0)
    assert batch.items == ["r0", "r1", "r2"] and (batch.first_offset, batch.last_offset) == (0, 2)
    assert b.pending() == 0


def test_batch_is_ready_when_token_budget_reached():
    b = Batcher[str](BatchPolicy(max_items=100, max_tokens=20, max_wait_ms=1000))
    b.add(0, "a", tokens=10, offset=0, now=0.0)
    b.add(0, "b", tokens=10, offset=1, now=0.0)
    [batch] = b.take_ready(now=0.0)
    assert batch.tokens == 20 and len(batch) == 2


def test_record_that_would_overflow_closes_the_batch_and_waits_for_the_next():
    b = Batcher[str](BatchPolicy(max_items=100, max_tokens=20, max_wait_ms=1000))
    b.add(0, "a", tokens=15, offset=0, now=0.0)
    b.add(0, "b", tokens=10, offset=1, now=0.0)  # 25 > 20: a's batch closes
    [first] = b.take_ready(now=0.0)
    assert first.items == ["a"]
    assert b.pending() == 1 and b.take_ready(now=0.5) == []


def test_oversized_record_forms_a_batch_alone_instead_of_stalling():
    b = Batcher[str](BatchPolicy(max_items=100, max_tokens=20, max_wait_ms=1000))
    b.add(0, "huge", tokens=500, offset=0, now=0.0)
    [batch] = b.take_ready(now=0.0)
    assert batch.items == ["huge"]


def test_deadline_starts_at_first_record_not_last():
    b = Batcher[str](BatchPolicy(max_items=100, max_tokens=1000, max_wait_ms=10))
    b.add(0, "a", tokens=1, offset=0, now=1.000)
    b.add(0, "b", tokens=1, offset=1, now=1.009)
    assert b.next_due() == pytest.approx(1.010)
    assert b.take_ready(now=1.0095) == []
    [batch] = b.take_ready(now=1.010)
    assert batch.items == ["a", "b"]


def test_partitions_are_batched_apart_and_returned_oldest_first():
    b = Batcher[str](BatchPolicy(max_items=100, max_tokens=1000, max_wait_ms=10))
    b.add(1, "p1", tokens=1, offset=7, now=0.002)
    b.add(0, "p0", tokens=1, offset=3, now=0.001)
    ready = b.take_ready(now=1.0)
    assert [x.partition for x in ready] == [0, 1]
    assert [x.items for x in ready] == [["p0"], ["p1"]]


def test_zero_wait_sends_each_fetch_at_once():
    b = Batcher[str](BatchPolicy(max_items=100, max_tokens=1000, max_wait_ms=0))
    b.add(0, "a", tokens=1, offset=0, now=5.0)
    assert len(b.take_ready(now=5.0)) == 1


def test_drop_forgets_revoked_partitions_only():
    b = Batcher[str](BatchPolicy(max_items=2, max_tokens=1000, max_wait_ms=10))
    for off in range(3):
        b.add(0, f"a{off}", tokens=1, offset=off, now=0.0)  # one closed batch + one open
    b.add(1, "b0", tokens=1, offset=0, now=0.0)
    assert b.drop({0}) == 3
    assert [x.partition for x in b.take_ready(now=1.0)] == [1]
    assert b.next_due() is None


def test_partition_batch_tracks_offsets_and_tokens():
    pb = PartitionBatch[str](partition=4)
    pb.append("x", tokens=3, offset=10, now=2.0)
    pb.append("y", tokens=4, offset=11, now=2.5)
    assert (pb.first_offset, pb.last_offset, pb.tokens, pb.first_at) == (10, 11, 7, 2.0)
