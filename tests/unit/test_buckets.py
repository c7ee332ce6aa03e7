from __future__ import annotations

import math

from hypothesis import given, settings
from hypothesis import strategies as st

from relay.store.memory import MemoryStore


class Clock:
    def __init__(self) -> None:
        self.t = 1000.0

    def __call__(self) -> float:
        return self.t


@settings(max_examples=200, deadline=None)
@given(
    capacity=st.integers(1, 20),
    window=st.floats(1, 120),
    gaps=st.lists(st.floats(0, 10), min_size=1, max_size=200),
)
def test_never_more_than_capacity_plus_refill(
    capacity: int, window: float, gaps: list[float]
) -> None:
    clock = Clock()
    store = MemoryStore(clock)
    allowed_at: list[float] = []
    for gap in gaps:
        clock.t += gap
        if store.take_now("k", capacity, window).allowed:
            allowed_at.append(clock.t)
    # In any interval of length L, at most capacity + L * rate tokens can be taken.
    rate = capacity / window
    for i, start in enumerate(allowed_at):
        for j in range(i, len(allowed_at)):
            span = allowed_at[j] - start
            assert j - i + 1 <= capacity + span * rate + 1e-6


@given(capacity=st.integers(1, 50), window=st.floats(1, 120))
def test_burst_then_retry_after(capacity: int, window: float) -> None:
    clock = Clock()
    store = MemoryStore(clock)
    for _ in range(capacity):
        assert store.take_now("k", capacity, window).allowed
    verdict = store.take_now("k", capacity, window)
    assert not verdict.allowed
    assert math.isclose(verdict.retry_after, window / capacity, rel_tol=1e-6)
    clock.t += verdict.retry_after + 1e-9
    assert store.take_now("k", capacity, window).allowed


def test_refill_is_continuous() -> None:
    clock = Clock()
    store = MemoryStore(clock)
    for _ in range(60):
        assert store.take_now("k", 60, 60).allowed
    assert not store.take_now("k", 60, 60).allowed
    clock.t += 1.0  # one token per second
    assert store.take_now("k", 60, 60).allowed
    assert not store.take_now("k", 60, 60).allowed


async def test_prune_forgets_idle_keys() -> None:
    clock = Clock()
    store = MemoryStore(clock)
    for i in range(1000):
        store.take_now(f"ip{i}", 10, 60)
        assert await store.first_seen(f"m{i}", 5)
    assert len(store) == 2000
    clock.t += 3
    assert store.prune() == 0
    assert not await store.first_seen("m1", 5)
    clock.t += 60
    assert store.prune() == 2000
    assert len(store) == 0
    assert await store.first_seen("m1", 5)


async def test_leases_cap_concurrency_and_come_back() -> None:
    store = MemoryStore()
    first = await store.acquire("token:abc", 2)
    second = await store.acquire("token:abc", 2)
    assert first is not None and second is not None
    assert await store.acquire("token:abc", 2) is None
    assert await store.acquire("token:other", 2) is not None  # keys are independent
    await store.release(first)
    await store.release(first)  # twice is harmless: still one slot free, not two
    third = await store.acquire("token:abc", 2)
    assert third is not None
    assert await store.acquire("token:abc", 2) is None
    await store.release(second)
    await store.release(third)
    assert store.leases("token:abc") == 0
    assert "token:abc" not in store._leases  # the last lease takes its key along


async def test_records_expire_and_are_pruned() -> None:
    clock = Clock()
    store = MemoryStore(clock)
    assert await store.get("task:CA1") is None
    await store.put("task:CA1", '{"task": "x"}', 60)
    await store.put("task:CA2", "second", 5)
    assert await store.get("task:CA1") == '{"task": "x"}'
    assert await store.get("task:CA2") == "second"
    await store.put("task:CA2", "rewritten", 5)  # the last put wins
    assert await store.get("task:CA2") == "rewritten"
    assert len(store) == 2
    clock.t += 5
    assert await store.get("task:CA2") is None  # expired, though not yet pruned
    assert store.prune() == 1
    assert len(store) == 1 and await store.get("task:CA1") == '{"task": "x"}'
    clock.t += 55
    assert store.prune() == 1 and len(store) == 0


async def test_a_flood_of_records_is_pruned_as_it_grows() -> None:
    clock = Clock()
    store = MemoryStore(clock)
    for i in range(20_000):
        await store.put(f"r{i}", "v", 1)
        clock.t += 0.001
    # Each record lives one second, i.e. 1000 puts: with the doubling prune the
    # table never holds much more than twice the live ones (or MIN_PRUNE_SIZE).
    assert len(store) <= 4096 + 1
