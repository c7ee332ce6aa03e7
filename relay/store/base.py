"""The shared-state interface: rate buckets, dedupe, concurrency leases and small
records, one shape for every backend."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import trio


@dataclass(frozen=True, slots=True)
class Verdict:
    """The answer of a bucket: allowed, or refused with the wait until a token is free."""

    allowed: bool
    retry_after: float = 0.0


ALLOWED = Verdict(True)


@dataclass(frozen=True, slots=True)
class Lease:
    """One of the concurrent slots under ``key``, held until :meth:`Store.release`.

    ``holder`` is unique per lease; ``shared`` says the slot lives in the shared
    backend (else in this process's memory, e.g. taken while Redis was down), so
    the release goes where the slot was taken.
    """

    key: str
    holder: str
    shared: bool = False


class Store(Protocol):
    """Rate buckets, dedupe, leases and small records. A call never fails and never
    blocks for long: a shared backend that cannot answer quickly is replaced by
    per-process state."""

    #: ``"memory"`` or ``"redis"``: what ``store.backend`` selected.
    backend: str

    async def take(self, key: str, capacity: int, window_seconds: float) -> Verdict:
        """Take one token from the bucket ``key`` holding ``capacity`` tokens.

        A bucket refills ``capacity`` tokens per ``window_seconds``, continuously.
        """
        ...

    async def first_seen(self, key: str, ttl_seconds: float) -> bool:
        """True the first time ``key`` is seen within ``ttl_seconds``; False for repeats."""
        ...

    async def put(self, key: str, value: str, ttl_seconds: float) -> None:
        """Keep ``value`` under ``key`` for ``ttl_seconds``.

        Meant for write-once records (e.g. an ``@call`` task by its CallSid):
        a shared backend also keeps a per-process copy, so a record written here
        is still found here if the backend goes away later.
        """
        ...

    async def get(self, key: str) -> str | None:
        """The value last :meth:`put` under ``key`` and not yet expired, else None."""
        ...

    async def acquire(self, key: str, limit: int) -> Lease | None:
        """Take one of ``limit`` concurrent slots under ``key``; None when all are held.

        Every lease must be given back with :meth:`release` (in a ``finally``).
        A shared backend also lets the leases of a process that died expire.
        """
        ...

    async def release(self, lease: Lease) -> None:
        """Give a slot back; releasing twice is harmless. Never raises, never blocks long."""
        ...

    def prune(self) -> int:
        """Forget idle keys; returns how many were dropped (a no-op where the backend expires)."""
        ...

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Keep the store working for the life of the server; never returns.

        Started with ``nursery.start`` in the server's root nursery, which
        cancels it on stop. ``started()`` comes once the store can answer
        (for a shared backend: connected, or known to be unreachable).
        """
        ...

    @property
    def degraded(self) -> bool:
        """True while a shared backend is unreachable and limits are per process."""
        ...
