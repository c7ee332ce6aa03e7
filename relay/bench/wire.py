"""Just enough RFC 6455 for the load side of ``relay bench``, on raw non-blocking sockets.

Why not trio-websocket here: the load generator and the fake upstream share one
core while the relay gets the other, and they handle several messages for every
one the relay handles. wsproto costs tens of microseconds per message; this
costs a few, so the generator stays out of the figures. It is not a general
WebSocket: no extensions, no fragmentation on send, and client frames are
masked with the all-zero key (valid per RFC 6455 §5.3, and free to apply).
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import os
import select
import socket
import time
from collections.abc import AsyncIterator, Callable

import trio

from relay.ws.frames import FrameParser, ProtocolError

_GUID = b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11"
OP_TEXT, OP_BINARY, OP_CLOSE, OP_PING, OP_PONG = 1, 2, 8, 9, 10


class Closed(Exception):
    """The peer closed the socket (or sent a close frame)."""


class Conn:
    """A non-blocking TCP socket with trio waits, minus trio's per-call overhead."""

    __slots__ = ("pending", "sock")

    def __init__(self, sock: socket.socket) -> None:
        sock.setblocking(False)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.sock = sock
        self.pending = bytearray()  # what send_nowait could not hand to the kernel yet

    def _send_some(self, data: bytes | memoryview) -> int:
        """Hand the kernel what it takes of ``data`` now; how many bytes that was."""
        try:
            return self.sock.send(data)
        except BlockingIOError:
            return 0
        except OSError as exc:
            raise Closed(str(exc)) from None

    def _behind_pending(self, data: bytes) -> bytes:
        """``data`` behind what :meth:`send_nowait` left, which goes first."""
        if not self.pending:
            return data
        data = bytes(self.pending) + data
        self.pending.clear()
        return data

    def send_nowait(self, data: bytes) -> None:
        """Send ``data`` without waiting; what the kernel does not take now is kept,
        in order, and goes out first on this connection's next send."""
        data = self._behind_pending(data)
        sent = self._send_some(data)
        if sent < len(data):
            self.pending += memoryview(data)[sent:]

    def recv_nowait(self) -> bytes | None:
        """The bytes available now, or None if there are none; :class:`Closed` at EOF."""
        try:
            data = self.sock.recv(262144)
        except BlockingIOError:
            return None
        except OSError as exc:
            raise Closed(str(exc)) from None
        if not data:
            raise Closed("eof")
        return data

    async def send(self, data: bytes) -> None:
        """Send all of ``data`` (after anything :meth:`send_nowait` left); waits only
        when the kernel buffer is full."""
        view = memoryview(self._behind_pending(data))
        sent = self._send_some(view)
        while sent < len(view):
            await trio.lowlevel.wait_writable(self.sock)
            sent += self._send_some(view[sent:])

    async def recv(self) -> bytes:
        """The bytes available now (waiting for some); raises :class:`Closed` at EOF."""
        while (data := self.recv_nowait()) is None:
            await trio.lowlevel.wait_readable(self.sock)
        # A task that always finds data must still let the others run.
        await trio.lowlevel.checkpoint()
        return data

    def close(self) -> None:
        self.sock.close()


async def connect(host: str, port: int) -> Conn:
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setblocking(False)
    err = sock.connect_ex((host, port))
    if err not in (0, 115):  # 115: EINPROGRESS
        sock.close()
        raise OSError(err, os.strerror(err))
    await trio.lowlevel.wait_writable(sock)
    err = sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
    if err:
        sock.close()
        raise OSError(err, os.strerror(err))
    return Conn(sock)


async def read_head(conn: Conn) -> tuple[bytes, bytes]:
    """An HTTP head (up to the blank line) and whatever arrived after it."""
    buf = b""
    while b"\r\n\r\n" not in buf:
        buf += await conn.recv()
        if len(buf) > 65536:
            raise Closed("HTTP head too long")
    head, _, rest = buf.partition(b"\r\n\r\n")
    return head, rest


async def client_handshake(
    conn: Conn, host: str, resource: str, headers: list[tuple[str, str]]
) -> bytes:
    """Upgrade as a client; returns bytes already received after the 101."""
    key = base64.b64encode(os.urandom(16)).decode()
    lines = [
        f"GET {resource} HTTP/1.1",
        f"Host: {host}",
        "Upgrade: websocket",
        "Connection: Upgrade",
        f"Sec-WebSocket-Key: {key}",
        "Sec-WebSocket-Version: 13",
        *(f"{k}: {v}" for k, v in headers),
    ]
    await conn.send(("\r\n".join(lines) + "\r\n\r\n").encode("latin-1"))
    head, rest = await read_head(conn)
    status = head.split(b"\r\n", 1)[0]
    if b" 101 " not in status + b" ":
        raise Closed(f"handshake refused: {status.decode('latin-1')}")
    return rest


async def server_handshake(conn: Conn) -> tuple[str, bytes]:
    """Accept any upgrade; returns the request target and bytes received after it."""
    target, _, rest = await server_handshake_headers(conn)
    return target, rest


async def server_handshake_headers(conn: Conn) -> tuple[str, dict[str, str], bytes]:
    """Accept any upgrade; returns the request target, its headers (names lower-cased,
    the last of a repeated one) and bytes received after it."""
    head, rest = await read_head(conn)
    lines = head.decode("latin-1").split("\r\n")
    target = lines[0].split(" ")[1] if " " in lines[0] else "/"
    headers: dict[str, str] = {}
    for line in lines[1:]:
        name, _, value = line.partition(":")
        headers[name.strip().lower()] = value.strip()
    key = headers.get("sec-websocket-key", "")
    accept = base64.b64encode(hashlib.sha1(key.encode() + _GUID).digest()).decode()
    await conn.send(
        (
            "HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\n"
            f"Connection: Upgrade\r\nSec-WebSocket-Accept: {accept}\r\n\r\n"
        ).encode()
    )
    return target, headers, rest


def frame(payload: bytes, opcode: int = OP_TEXT, *, masked: bool = False) -> bytes:
    """One final frame; ``masked`` uses the zero key, so the payload goes out as is."""
    n = len(payload)
    mask_bit = 0x80 if masked else 0
    if n < 126:
        head = bytes((0x80 | opcode, mask_bit | n))
    elif n < 65536:
        head = bytes((0x80 | opcode, mask_bit | 126)) + n.to_bytes(2, "big")
    else:
        head = bytes((0x80 | opcode, mask_bit | 127)) + n.to_bytes(8, "big")
    if masked:
        head += b"\0\0\0\0"
    return head + payload


class Reader(FrameParser):
    """Incremental frame reader: :meth:`feed` bytes; whole messages land in ``messages``
    (text as ``str``, binary as ``bytes``) and control frames are returned as
    ``(opcode, payload)``, a close last.

    It is the relay's own ``relay.ws.frames.FrameParser``, so the bench also checks
    the relay's frames (masking by side, reserved bits, UTF-8); a broken frame ends
    the connection as :class:`Closed`. ``masked``: the peer is a client, whose frames
    are masked (the fake upstream reads the relay's frames so).
    """

    __slots__ = ()

    def __init__(self, *, masked: bool, max_message: int = 1 << 24) -> None:
        super().__init__(masked=masked, max_message=max_message)

    def feed(self, data: bytes | bytearray) -> list[tuple[int, bytes]]:
        try:
            return super().feed(data)
        except ProtocolError as err:
            raise Closed(f"protocol error {err.code}: {err.reason}") from None


async def accepted(listener: socket.socket) -> AsyncIterator[socket.socket]:
    """The connections a non-blocking listening socket accepts, as they come."""
    while True:
        await trio.lowlevel.wait_readable(listener)
        try:
            sock, _ = listener.accept()
        except BlockingIOError:
            continue  # woken, but the connection was already gone
        yield sock


class Poller:
    """The generators' steady state without a trio wake-up per message: one
    level-triggered epoll set whose readable sockets are handled as they come, and
    a callback every ``tick_ns`` on the monotonic clock.

    Why: with a trio task per socket, each message received cost the load side a
    pass through trio's scheduler, so on one shared core the fake upstream and the
    callers gave out at ~60 calls, before the relay they measure. :meth:`run`
    blocks in ``epoll_wait`` until the next tick is due and yields to trio once
    per tick, so setup and control tasks still run (at most a tick late).
    Handlers must not wait: they use :meth:`Conn.send_nowait`.
    """

    __slots__ = ("_epoll", "_handlers")

    def __init__(self) -> None:
        self._epoll = select.epoll()
        self._handlers: dict[int, Callable[[], None]] = {}

    def add(
        self, conn: Conn, on_data: Callable[[bytes], None], on_closed: Callable[[], None]
    ) -> None:
        """Watch ``conn``: ``on_data`` gets what arrives, ``on_closed`` its end."""

        def readable() -> None:
            try:
                data = conn.recv_nowait()
            except Closed:
                on_closed()
                return
            if data:
                on_data(data)

        fd = conn.sock.fileno()
        self._epoll.register(fd, select.EPOLLIN)
        self._handlers[fd] = readable

    def remove(self, conn: Conn) -> None:
        """Stop watching ``conn`` (before it is closed); nothing if it is not watched."""
        fd = conn.sock.fileno()
        if fd >= 0 and self._handlers.pop(fd, None) is not None:
            with contextlib.suppress(OSError):
                self._epoll.unregister(fd)

    async def run(self, on_tick: Callable[[int, int, int], None], tick_ns: int) -> None:
        """Handle input as it comes and call ``on_tick(tick, due, now)`` every
        ``tick_ns``; a late tick still polls input once, so readers never starve."""
        poll, handlers = self._epoll.poll, self._handlers
        start = time.monotonic_ns()
        tick = 0
        try:
            while True:
                due = start + tick * tick_ns
                now = time.monotonic_ns()
                while True:
                    # epoll_wait counts whole milliseconds (rounded up): a tick may
                    # run up to 1 ms late, which the callers' lag figure shows.
                    for fd, _ in poll(max(0, due - now) / 1e9):
                        handler = handlers.get(fd)
                        if handler is not None:
                            handler()
                    now = time.monotonic_ns()
                    if now >= due:
                        break
                on_tick(tick, due, now)
                tick += 1
                await trio.lowlevel.checkpoint()
        finally:
            self._epoll.close()
