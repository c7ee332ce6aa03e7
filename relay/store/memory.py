"""Per-process token buckets, dedupe, leases and records, pruned so idle and expired
keys do not accumulate."""

from __future__ import annotations

import itertools
import time
from collections.abc import Callable

import trio

from relay.store.base import ALLOWED, Lease, Verdict

MIN_PRUNE_SIZE = 4096
# How often run() forgets idle keys when no flood of new keys has done it already.
PRUNE_INTERVAL = 10.0


class Bucket:
    """A token bucket: ``capacity`` tokens, refilled at ``capacity / window`` per second."""

    __slots__ = ("capacity", "rate", "stamp", "tokens")

    def __init__(self, capacity: int, window_seconds: float, now: float) -> None:
        self.capacity = float(capacity)
        self.rate = capacity / window_seconds
        self.tokens = float(capacity)
        self.stamp = now

    def take(self, now: float) -> Verdict:
        self.tokens = min(self.capacity, self.tokens + (now - self.stamp) * self.rate)
        self.stamp = now
        if self.tokens >= 1.0:
            self.tokens -= 1.0
            return ALLOWED
        return Verdict(False, (1.0 - self.tokens) / self.rate)

    def idle_full(self, now: float) -> bool:
        """A bucket that would be full again is indistinguishable from a fresh one."""
        return self.tokens + (now - self.stamp) * self.rate >= self.capacity


class MemoryStore:
    """The single-process store. ``clock`` is injectable so tests can drive time."""

    backend = "memory"

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self._clock = clock
        self._buckets: dict[str, Bucket] = {}
        self._seen: dict[str, float] = {}
        # key -> (expiry, value) of the records put here.
        self._values: dict[str, tuple[float, str]] = {}
        # key -> holders of its live leases; a key goes when its last lease does.
        self._leases: dict[str, set[str]] = {}
        self._holders = itertools.count(1)
        # Besides the server's periodic prune, prune whenever the tables double:
        # a flood of distinct keys then costs amortised O(1) per take and the
        # tables never hold much more than twice the keys that are really live.
        self._prune_above = MIN_PRUNE_SIZE

    async def take(self, key: str, capacity: int, window_seconds: float) -> Verdict:
        return self.take_now(key, capacity, window_seconds)

    def take_now(self, key: str, capacity: int, window_seconds: float) -> Verdict:
        now = self._clock()
        bucket = self._buckets.get(key)
        if bucket is None:
            if len(self) >= self._prune_above:
                self.prune()
            bucket = self._buckets[key] = Bucket(capacity, window_seconds, now)
        return bucket.take(now)

    async def first_seen(self, key: str, ttl_seconds: float) -> bool:
        now = self._clock()
        expires = self._seen.get(key)
        if expires is not None and expires > now:
            return False
        if expires is None and len(self) >= self._prune_above:
            self.prune()
        self._seen[key] = now + ttl_seconds
        return True

    async def put(self, key: str, value: str, ttl_seconds: float) -> None:
        self.put_now(key, value, ttl_seconds)

    def put_now(self, key: str, value: str, ttl_seconds: float) -> None:
        if key not in self._values and len(self) >= self._prune_above:
            self.prune()
        self._values[key] = (self._clock() + ttl_seconds, value)

    async def get(self, key: str) -> str | None:
        return self.get_now(key)

    def get_now(self, key: str) -> str | None:
        found = self._values.get(key)
        if found is None or found[0] <= self._clock():
            return None
        return found[1]

    async def acquire(self, key: str, limit: int) -> Lease | None:
        return self.acquire_now(key, limit)

    def acquire_now(self, key: str, limit: int) -> Lease | None:
        holders = self._leases.get(key)
        if holders is None:
            holders = set()
        if len(holders) >= limit:
            return None
        self._leases[key] = holders
        lease = Lease(key, str(next(self._holders)))
        holders.add(lease.holder)
        return lease

    async def release(self, lease: Lease) -> None:
        self.release_now(lease)

    def release_now(self, lease: Lease) -> None:
        holders = self._leases.get(lease.key)
        if holders is not None:
            holders.discard(lease.holder)
            if not holders:
                del self._leases[lease.key]

    def leases(self, key: str) -> int:
        """How many leases under ``key`` are held (for tests and metrics)."""
        return len(self._leases.get(key, ()))

    def remembers(self, key: str) -> bool:
        """True while ``key`` is inside the dedupe window of an earlier :meth:`first_seen`."""
        expires = self._seen.get(key)
        return expires is not None and expires > self._clock()

    def prune(self) -> int:
        now = self._clock()
        idle = [k for k, b in self._buckets.items() if b.idle_full(now)]
        for k in idle:
            del self._buckets[k]
        expired = [k for k, t in self._seen.items() if t <= now]
        for k in expired:
            del self._seen[k]
        stale = [k for k, (t, _) in self._values.items() if t <= now]
        for k in stale:
            del self._values[k]
        self._prune_above = max(MIN_PRUNE_SIZE, 2 * len(self))
        return len(idle) + len(expired) + len(stale)

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Prune every :data:`PRUNE_INTERVAL` seconds, so keys that went idle during a
        quiet spell (no new keys, hence no size-triggered prune) are forgotten too."""
        task_status.started()
        while True:
            await trio.sleep(PRUNE_INTERVAL)
            self.prune()

    def __len__(self) -> int:
        return len(self._buckets) + len(self._seen) + len(self._values)

    @property
    def degraded(self) -> bool:
        return False
