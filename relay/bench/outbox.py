"""Writes to a raw socket that never block the writer, for the soak's generator processes.

Why: a generator process serves all its streams from one ticker. If the ticker
awaited a socket whose buffer is full, every other stream of the process would
stall with it, and a relay slow on one connection could then find itself in a
wait cycle that real peers (each its own machine with its own buffers) never
create. With an outbox per socket, what the kernel does not take at once waits
here, in order, and the socket's own flusher task sends it as the socket drains;
``peak`` tells how far behind the relay fell in reading that socket.
"""

from __future__ import annotations

import trio

from relay.bench import wire


class Outbox:
    __slots__ = ("closed", "conn", "peak", "pending", "wake")

    def __init__(self, conn: wire.Conn) -> None:
        self.conn = conn
        self.pending = bytearray()
        self.wake = trio.Event()
        self.closed = False
        self.peak = 0  # the most bytes ever waiting here

    def write(self, data: bytes) -> None:
        """Queue ``data`` after anything still waiting, sending what the kernel takes now.

        Raises :class:`wire.Closed` once the socket has failed."""
        if self.closed:
            raise wire.Closed("socket failed earlier")
        if not self.pending:
            try:
                sent = self.conn.sock.send(data)
            except BlockingIOError:
                sent = 0
            except OSError as exc:
                self.closed = True
                raise wire.Closed(str(exc)) from None
            if sent == len(data):
                return
            data = data[sent:]
        self.pending += data
        self.peak = max(self.peak, len(self.pending))
        self.wake.set()

    async def flusher(self) -> None:
        """Send what waits as the socket drains; returns when the socket fails."""
        while not self.closed:
            if not self.pending:
                self.wake = trio.Event()
                await self.wake.wait()
                continue
            await trio.lowlevel.wait_writable(self.conn.sock)
            try:
                sent = self.conn.sock.send(self.pending)
            except BlockingIOError:
                continue
            except OSError:
                self.closed = True
                return
            del self.pending[:sent]
