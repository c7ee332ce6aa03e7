"""One sweeper per Trio run watches every WebSocket for silence and stalls.

Why not a timeout around each read: a cancel scope per ``recv`` cost ~5-10 µs,
as much as parsing the frame. Instead each connection bumps a counter when it
reads, and this system task looks at all of them a few times per
``stall_seconds``: a connection silent for ``stall_seconds`` while a task is
waiting to read it gets a ping; one still silent ``stall_seconds`` later, or
one whose queued output has found no room in the kernel for ``stall_seconds``
(``Transport.writable``), is aborted (``WebSocket.stalled``), which wakes
whatever task waits on its socket.
"""

from __future__ import annotations

import logging
from typing import Protocol

import trio

from relay.ws import run_services

log = logging.getLogger(__name__)


class WatchedTransport(Protocol):
    """The progress a watched connection's transport shows the sweeper."""

    @property
    def closed(self) -> bool: ...

    @property
    def out(self) -> bytearray: ...  # bytes the kernel has not taken yet

    @property
    def writable(self) -> int: ...  # waits for room in the kernel that ended


class Watched(Protocol):
    """What the sweeper needs of a connection (in the relay a
    ``relay.ws.connection.WebSocket``). A protocol, so that liveness, which the
    connection builds on, imports nothing of it."""

    @property
    def transport(self) -> WatchedTransport: ...

    @property
    def stall_seconds(self) -> float | None: ...

    @property
    def rx_count(self) -> int: ...

    @property
    def reading(self) -> bool: ...

    def ping_nowait(self) -> None: ...

    def stalled(self) -> None: ...


_SWEEPER: trio.lowlevel.RunVar[Sweeper] = trio.lowlevel.RunVar("relay_ws_sweeper")


class _Watch:
    __slots__ = ("pinged_at", "quiet_since", "rx", "stuck_since", "writable")

    def __init__(self, now: float) -> None:
        self.rx = -1
        self.quiet_since = now
        self.pinged_at: float | None = None
        self.writable = -1
        self.stuck_since = now


class Sweeper:
    def __init__(self) -> None:
        self.watched: dict[Watched, _Watch] = {}
        self.interval = 1.0
        self._wake = trio.Event()

    def add(self, ws: Watched, stall: float) -> None:
        self.watched[ws] = _Watch(trio.current_time())
        if stall / 4 < self.interval:
            self.interval = max(stall / 4, 0.02)
            self._wake.set()

    async def run(self) -> None:
        while True:
            with trio.move_on_after(self.interval):
                await self._wake.wait()
            self._wake = trio.Event()
            self.sweep(trio.current_time())

    def sweep(self, now: float) -> None:
        for ws, w in list(self.watched.items()):
            if ws.transport.closed:
                del self.watched[ws]
                continue
            try:
                self._check(ws, w, now)
            except Exception:  # one broken socket must never stop the sweeper
                log.exception("liveness check failed")
                ws.stalled()
                del self.watched[ws]

    @staticmethod
    def _check(ws: Watched, w: _Watch, now: float) -> None:
        stall = ws.stall_seconds
        assert stall is not None
        if ws.rx_count != w.rx or not ws.reading:
            w.rx, w.quiet_since, w.pinged_at = ws.rx_count, now, None
        elif w.pinged_at is not None:
            if now - w.pinged_at >= stall:
                ws.stalled()
                return
        elif now - w.quiet_since >= stall:
            w.pinged_at = now
            ws.ping_nowait()
        t = ws.transport
        if not t.out or t.writable != w.writable:
            w.writable, w.stuck_since = t.writable, now
        elif now - w.stuck_since >= stall:
            ws.stalled()


def sweeper() -> Sweeper:
    """This run's sweeper, started on first use."""
    return run_services.service(_SWEEPER, Sweeper, "relay.ws.liveness")


def watch(ws: Watched, stall: float) -> None:
    """Watch ``ws`` until its transport closes."""
    sweeper().add(ws, stall)
