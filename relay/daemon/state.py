"""The daemon's shared state, created once in :func:`relay.daemon.server.run` and passed down.

Holds the settings, the store, the metrics, the drain signals, the registry
of live sessions and background jobs, and the per-process session caps.
Nothing here starts tasks of its own; the server owns every nursery.
"""

from __future__ import annotations

import itertools
import logging
import os
from collections.abc import Awaitable, Callable, Iterator
from contextlib import contextmanager

import trio

from relay.admission.guards import OriginPolicy
from relay.config import Settings
from relay.ops.metrics import Metrics, Tally
from relay.ops.refusal_log import RefusalLog
from relay.store.base import Store

log = logging.getLogger("relay")


class Seats:
    """The per-process session caps (docs/contract.md §5): ``max_sessions`` for all
    sessions, ``sessions_per_ip`` for client sessions by IP key.

    A seat is taken when an upgrade passes its check and given back when its
    session ends (or a later check refuses it), not when the session starts:
    upstreams take a while to connect, and a burst of handshakes counted only
    once connected would overshoot every cap.
    """

    __slots__ = ("max_sessions", "per_ip", "taken", "taken_by_ip")

    def __init__(self, max_sessions: int, per_ip: int) -> None:
        self.max_sessions = max_sessions
        self.per_ip = per_ip
        self.taken = 0
        self.taken_by_ip: dict[str, int] = {}

    def take(self) -> bool:
        if self.taken >= self.max_sessions:
            return False
        self.taken += 1
        return True

    def give_back(self) -> None:
        self.taken -= 1

    def take_ip(self, key: str) -> bool:
        held = self.taken_by_ip.get(key, 0)
        if held >= self.per_ip:
            return False
        self.taken_by_ip[key] = held + 1
        return True

    def give_back_ip(self, key: str) -> None:
        held = self.taken_by_ip.pop(key, 0) - 1
        if held > 0:
            self.taken_by_ip[key] = held  # a key goes with its last session


class DaemonState:
    def __init__(self, settings: Settings, store: Store) -> None:
        self.settings = settings
        self.store = store
        self.metrics = Metrics()
        self.origins = OriginPolicy(settings.auth)
        self.refusal_log = RefusalLog()
        self.seats = Seats(settings.limits.max_sessions, settings.limits.sessions_per_ip)
        # Set on the first SIGTERM/SIGINT: readiness turns 503, upgrades are refused.
        self.draining = trio.Event()
        # Set drain_seconds later (or at once on a second signal): sessions close 1001.
        self.drain_expired = trio.Event()
        self.active: dict[str, int] = {"client": 0, "twilio": 0}
        # RELAY_FAST_PATH=0 (a diagnostic, read once at start): sessions relay every
        # message through their pumps, never from the reactor (docs/architecture.md).
        self.fast_path = os.environ.get("RELAY_FAST_PATH", "1") != "0"
        self.jobs_in_flight = 0
        self._idle = trio.Event()
        self._idle.set()
        self._ids = itertools.count(1)
        self._jobs: trio.Nursery | None = None
        self.max_jobs = 256
        self.on_change: Callable[[], None] | None = None
        # Async cleanups (HTTP client pools) the server runs once it has stopped serving.
        self.closers: list[Callable[[], Awaitable[None]]] = []

    # -- sessions -------------------------------------------------------------
    def new_session_id(self, kind: str) -> str:
        return f"{kind[0]}{next(self._ids)}"

    @contextmanager
    def session(self, kind: str, tally: Tally) -> Iterator[None]:
        """Count a live session for metrics, sd_notify STATUS and the drain, and its
        relayed messages (``tally``) in ``relay_messages_total``."""
        self.active[kind] += 1
        self.metrics.sessions_active.labels(kind=kind).inc()
        self.metrics.track(tally)
        self._busy()
        try:
            yield
        finally:
            self.active[kind] -= 1
            self.metrics.sessions_active.labels(kind=kind).dec()
            self.metrics.retire(tally)
            self._maybe_idle()

    # -- background jobs ------------------------------------------------------
    def attach_jobs(self, nursery: trio.Nursery | None) -> None:
        self._jobs = nursery

    def spawn_job(self, name: str, job: Callable[[], Awaitable[None]]) -> bool:
        """Run ``job`` in the background nursery; False when the bound is reached.

        The bound keeps a flood from growing the task set without limit. The job
        is wrapped so that a failure is logged and counted, never propagated
        (one bad job must not take down the server's nursery).
        """
        if self._jobs is None or self.jobs_in_flight >= self.max_jobs:
            return False
        self.jobs_in_flight += 1
        self._busy()

        async def wrapped() -> None:
            try:
                await job()
            except Exception:
                self.metrics.jobs_failed_total.labels(stage=name).inc()
                log.exception("background job %s failed", name)
            finally:
                self.jobs_in_flight -= 1
                self._maybe_idle()

        self._jobs.start_soon(wrapped, name=name)
        return True

    # -- drain ----------------------------------------------------------------
    @property
    def busy(self) -> bool:
        return bool(self.active["client"] or self.active["twilio"] or self.jobs_in_flight)

    async def wait_idle(self) -> None:
        """Return once no session and no job is left."""
        while self.busy:
            await self._idle.wait()

    def _busy(self) -> None:
        if self._idle.is_set():
            self._idle = trio.Event()
        if self.on_change is not None:
            self.on_change()

    def _maybe_idle(self) -> None:
        if not self.busy:
            self._idle.set()
        if self.on_change is not None:
            self.on_change()
