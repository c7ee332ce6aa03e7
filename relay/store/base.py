"""The shared-state interface: rate buckets and dedupe, one shape for every backend."""

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


class Store(Protocol):
    """Rate buckets and dedupe. A call never fails and never blocks for long: a
    shared backend that cannot answer quickly is replaced by per-process state."""

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
