"""Every TCP connection starts here: WebSocket upgrades are served on the socket
itself (``relay.ws``), everything else goes to Hypercorn unchanged.

Why: a relayed frame crossed Hypercorn's protocol objects, wsproto, an ASGI
queue and a per-connection send lock on its way in or out; on the media path
that cost more than the relay's own work (README "Capacity"). The upgrade
request is read here, then the socket is handed to the front door directly.
HTTP requests (webhooks, /healthz, /metrics, the 426 of /token) keep Hypercorn
and Quart-Trio, with the bytes already read put back in front of the stream.

Mechanism: Hypercorn's trio worker serves each accepted stream with
``hypercorn.trio.run.TCPServer(app, config, context, state, stream)``; we
install a router under that name, so Hypercorn keeps the listeners, binds,
graceful shutdown and lifespan. Hypercorn is pinned (<0.19) for this, and a
test fails if the hook stops taking effect.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Awaitable, Callable
from typing import Any

import hypercorn.trio.run as hypercorn_run
import trio

from relay.ws.handshake import (
    MAX_HEAD,
    HeadError,
    RequestHead,
    parse_head,
    refusal_response,
    upgrade_problem,
)
from relay.ws.server import ServerWebSocket
from relay.ws.transport import Transport

log = logging.getLogger("relay.listener")

# After a refused head: how long, and how much, is read before closing.
REFUSAL_LINGER = 1.0
REFUSAL_DRAIN = 256 * 1024

WebSocketHandler = Callable[[ServerWebSocket], Awaitable[None]]

_ORIGINAL: Any = getattr(
    hypercorn_run,
    "_relay_original_tcp_server",
    getattr(hypercorn_run, "TCPServer"),  # noqa: B009
)
setattr(hypercorn_run, "_relay_original_tcp_server", _ORIGINAL)  # noqa: B010


class Router:
    """The per-connection entry point installed into Hypercorn."""

    def __init__(
        self,
        handler: WebSocketHandler,
        *,
        max_message: int,
        stall_seconds: float,
        head_seconds: float,
        max_connections: int,
        refused: Callable[[str, str], None] = lambda reason, detail: None,
    ) -> None:
        self.handler = handler
        self.max_message = max_message
        self.stall_seconds = stall_seconds
        self.head_seconds = head_seconds
        self.max_connections = max_connections
        self.refused = refused  # told (reason, one-line detail) of each refused connection
        self.live = 0  # TCP connections being served, of every kind

    def install(self) -> None:
        def tcp_server(app: Any, config: Any, context: Any, state: Any, stream: Any) -> Any:
            return self.serve(app, config, context, state, stream)

        setattr(hypercorn_run, "TCPServer", tcp_server)  # noqa: B010

    async def serve(self, app: Any, config: Any, context: Any, state: Any, stream: Any) -> None:
        """One accepted connection, counted while it lives (docs/contract.md §10)."""
        if self.live >= self.max_connections:
            # The fd is already spent; answering and closing at once gives it back
            # and tells the client why instead of leaving it to time out.
            self.refused("max_connections", "too many connections")
            if isinstance(stream, trio.SocketStream):
                await _refuse_raw(stream, 503, "too many connections", linger=False)
            else:
                await trio.aclose_forcefully(stream)
            return
        self.live += 1
        try:
            await self._serve(app, config, context, state, stream)
        finally:
            self.live -= 1

    async def _serve(self, app: Any, config: Any, context: Any, state: Any, stream: Any) -> None:
        if not isinstance(stream, trio.SocketStream):
            await _to_hypercorn(app, config, context, state, stream)  # TLS: all Hypercorn's
            return
        data = b""
        with trio.move_on_after(self.head_seconds) as waiting:
            try:
                while _head_end(data) < 0 and len(data) < MAX_HEAD:
                    chunk = await stream.receive_some(MAX_HEAD)
                    if not chunk:
                        break
                    data += chunk
            except (trio.BrokenResourceError, OSError):
                await trio.aclose_forcefully(stream)
                return
        if waiting.cancelled_caught:
            # No whole head within head_seconds: the connection ends here (Hypercorn
            # would give a part-sent head another keep-alive timeout).
            await trio.aclose_forcefully(stream)
            return
        end = _head_end(data)
        try:
            head = _complete_head(data, end)
        except HeadError as err:
            # Refused here whatever the request: too big (431), or complete but not
            # valid HTTP/1.1 (bare LF line ends or a bare CR/LF inside a line, a
            # target without "/", a header without a colon...), which Hypercorn's
            # WebSocket path crashes on or h11 reads differently.
            self.refused("head_too_large" if err.status == 431 else "malformed_head", err.reason)
            await _refuse_raw(stream, err.status, err.reason)
            return
        if head is not None and head.asks_websocket and not head.is_websocket_upgrade:
            self.refused("malformed_head", "malformed WebSocket upgrade")
            await _refuse_raw(stream, 400, "malformed WebSocket upgrade")  # same reason
            return
        if head is None or not head.is_websocket_upgrade:
            if not data:
                await trio.aclose_forcefully(stream)  # connected and said nothing
                return
            await _to_hypercorn(app, config, context, state, Replayed(stream, data))
            return
        addr = stream.socket.getpeername()
        peer = str(addr[0]) if isinstance(addr, tuple) else ""
        transport = Transport.adopt(stream.socket)
        try:
            ws = ServerWebSocket(
                transport,
                head,
                peer,
                max_message=self.max_message,
                stall_seconds=self.stall_seconds,
                buffered=data[end + 4 :],
            )
            problem = upgrade_problem(head)
            if problem is not None:
                status, reason = problem
                extra = (("sec-websocket-version", "13"),) if status == 426 else ()
                await ws.reject(status, reason, extra)
                return
            await self.handler(ws)
        finally:
            transport.close()


def _complete_head(data: bytes, end: int) -> RequestHead | None:
    """The head in ``data`` if it is complete, None if not (the client stopped or
    was too slow: Hypercorn answers that); :class:`HeadError` if it is refused."""
    if end + 4 > MAX_HEAD or (end < 0 and len(data) >= MAX_HEAD):
        raise HeadError(431, f"request head over {MAX_HEAD // 1024} KiB")
    if end < 0:
        return None
    if data[end : end + 4] != b"\r\n\r\n":
        raise HeadError(400, "malformed request (bare LF line ends)")
    return parse_head(data[:end])


def _head_end(data: bytes) -> int:
    """Where the head ends (its blank line), CRLF or bare LF; -1 if not yet."""
    crlf, lf = data.find(b"\r\n\r\n"), data.find(b"\n\n")
    if crlf < 0 or (0 <= lf < crlf):
        return lf
    return crlf


async def _refuse_raw(
    stream: trio.SocketStream, status: int, reason: str, *, linger: bool = True
) -> None:
    with trio.move_on_after(5), contextlib.suppress(trio.BrokenResourceError, OSError):
        await stream.send_all(refusal_response(status, reason))
        # A socket closed with unread input (the rest of a huge head) sends an RST,
        # which can destroy the answer before the client reads it: half-close, and
        # (unless the connection must go at once) read briefly what is still in flight.
        await stream.send_eof()
        if linger:
            with trio.move_on_after(REFUSAL_LINGER):
                for _ in range(REFUSAL_DRAIN // MAX_HEAD):
                    if not await stream.receive_some(MAX_HEAD):
                        break
    await trio.aclose_forcefully(stream)


async def _to_hypercorn(app: Any, config: Any, context: Any, state: Any, stream: Any) -> None:
    """Hypercorn serves the connection; an error it raises ends only this connection
    (unhandled, it would reach the listeners' nursery and stop the daemon)."""
    try:
        await _ORIGINAL(app, config, context, state, stream)
    except Exception as exc:
        # One line, not a traceback: whoever can send bytes can trigger these.
        log.warning("HTTP connection failed: %s", _describe(exc))
        await trio.aclose_forcefully(stream)


def _describe(exc: BaseException) -> str:
    while isinstance(exc, BaseExceptionGroup) and exc.exceptions:
        exc = exc.exceptions[0]
    return f"{type(exc).__name__}: {str(exc)[:200]}"


class Replayed(trio.abc.HalfCloseableStream):
    """A socket stream with bytes already read from it put back in front."""

    def __init__(self, stream: trio.SocketStream, prefix: bytes) -> None:
        self._stream = stream
        self._prefix = prefix
        # Hypercorn sends data under its own lock but its close's send_eof outside
        # it; a response body still being written (its last send is shielded, see
        # relay.edge.app) would then meet trio's BusyResourceError. One lock for both.
        self._sending = trio.Lock()
        self.socket = stream.socket  # Hypercorn reads peer and local addresses from it

    async def receive_some(self, max_bytes: int | None = None) -> bytes:
        if self._prefix:
            data, self._prefix = self._prefix, b""
            await trio.lowlevel.checkpoint()
            return data
        return await self._stream.receive_some(max_bytes)

    async def send_all(self, data: bytes | bytearray | memoryview) -> None:
        async with self._sending:
            await self._stream.send_all(data)

    async def wait_send_all_might_not_block(self) -> None:
        await self._stream.wait_send_all_might_not_block()

    async def send_eof(self) -> None:
        async with self._sending:
            await self._stream.send_eof()

    async def aclose(self) -> None:
        await self._stream.aclose()
