"""A thin WebSocket over raw ASGI (Hypercorn), used instead of Quart's wrapper.

Only for an upgrade that arrives on a keep-alive connection Hypercorn already
serves: every other upgrade is served on the socket itself (``relay.edge.router``,
``relay.ws``). Both offer the same surface (``relay.ws.peer.PeerSocket``).

Why not ``quart.websocket``: quart-trio turns an empty binary message into
``None``, hides the client's close code (it cancels the handler on
disconnect), and dispatches a signal per message. A relay must pass empty
messages, report close codes and stay cheap per frame, so sessions speak
ASGI directly. HTTP routes stay on Quart-Trio.
"""

from __future__ import annotations

import contextlib
from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any
from urllib.parse import parse_qsl

from relay.ws.errors import Disconnected
from relay.ws.handshake import MAX_HEAD

__all__ = ["AsgiWebSocket", "Disconnected"]

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]


def head_size(scope: Scope) -> int:
    """The request head's size as sent, rebuilt from the scope: a lower bound (h11
    drops the whitespace around values), within a few bytes of the wire's."""
    target = len(scope.get("raw_path", b"")) + len(scope.get("query_string", b"")) + 1
    size = len("GET  HTTP/1.1\r\n") + target + 2  # the request line, the blank line
    for name, value in scope.get("headers", ()):
        size += len(name) + len(value) + 4  # "name: value\r\n"
    return size


class AsgiWebSocket:
    """One WebSocket connection, before and after accept."""

    __slots__ = (
        "_receive",
        "_receive_nowait",
        "_send",
        "accepted",
        "closed",
        "headers",
        "query",
        "scope",
    )

    def __init__(self, scope: Scope, receive: Receive, send: Send) -> None:
        self.scope = scope
        self._receive = receive
        self._send = send
        # Hypercorn's ``receive`` is the bound ``receive`` of a trio memory channel;
        # its ``receive_nowait`` lets a session take messages that are already
        # queued without a trip through the scheduler. Any other server: None.
        owner = getattr(receive, "__self__", None)
        nowait = getattr(owner, "receive_nowait", None)
        self._receive_nowait: Callable[[], Message] | None = nowait if callable(nowait) else None
        self.headers: dict[str, str] = {}
        for name, value in scope.get("headers", ()):
            # Repeated headers are joined, as HTTP allows for list-valued ones.
            key = name.decode("latin-1").lower()
            text = value.decode("latin-1")
            self.headers[key] = f"{self.headers[key]}, {text}" if key in self.headers else text
        qs = scope.get("query_string", b"").decode("latin-1")
        self.query: dict[str, str] = dict(parse_qsl(qs, keep_blank_values=True))
        self.accepted = False
        self.closed = False

    @property
    def path(self) -> str:
        return str(self.scope.get("path", "/"))

    @property
    def raw_query(self) -> str:
        return bytes(self.scope.get("query_string", b"")).decode("latin-1")

    @property
    def peer(self) -> str:
        client = self.scope.get("client")
        return str(client[0]) if client else ""

    @property
    def subprotocols(self) -> list[str]:
        return list(self.scope.get("subprotocols", ()))

    async def wait_connect(self) -> bool:
        """Consume ``websocket.connect``; False if the client left before it, or if
        its head was refused here (431: over MAX_HEAD, docs/contract.md §10).

        h11 itself refuses a head without Host or with a bare CR/LF in a line
        (400), but takes a head of any size that arrives in one read."""
        message = await self._receive()
        if message["type"] != "websocket.connect":
            return False
        if head_size(self.scope) > MAX_HEAD:
            await self.reject(431, f"request head over {MAX_HEAD // 1024} KiB")
            return False
        return True

    async def reject(
        self, status: int, reason: str, headers: tuple[tuple[str, str], ...] = ()
    ) -> None:
        """A real HTTP refusal of the upgrade (ASGI websocket.http.response)."""
        body = (reason + "\n").encode()
        raw_headers = [(b"content-type", b"text/plain; charset=utf-8")]
        raw_headers += [(k.lower().encode(), v.encode()) for k, v in headers]
        raw_headers.append((b"content-length", str(len(body)).encode()))
        self.closed = True
        # Hypercorn can refuse these for a request it has already half answered (h11
        # in SEND_BODY after a mangled keep-alive request, found by fuzzing); then
        # there is nobody left to tell, and raising would only log a traceback.
        with contextlib.suppress(Exception):
            await self._send(
                {"type": "websocket.http.response.start", "status": status, "headers": raw_headers}
            )
            await self._send(
                {"type": "websocket.http.response.body", "body": body, "more_body": False}
            )

    async def accept(self, subprotocol: str | None = None) -> None:
        await self._send({"type": "websocket.accept", "subprotocol": subprotocol})
        self.accepted = True

    async def receive(self) -> str | bytes:
        """The next message, text as str and binary as bytes (empty ones too)."""
        return self._unpack(await self._receive())

    def receive_nowait(self) -> str | bytes | None:
        """The next message if one is already waiting, else None (never blocks).

        Raises :class:`Disconnected` like :meth:`receive` when what waits is the
        client's disconnect.
        """
        if self._receive_nowait is None:
            return None
        try:
            message = self._receive_nowait()
        except Exception:  # trio.WouldBlock; a closed channel is reported by receive()
            return None
        return self._unpack(message)

    def _unpack(self, message: Message) -> str | bytes:
        kind = message["type"]
        if kind == "websocket.receive":
            # Text first: every Twilio message and most client ones are text.
            text = message.get("text")
            if text is not None:
                return str(text)
            data = message.get("bytes")
            return bytes(data) if data is not None else ""
        if kind == "websocket.disconnect":
            self.closed = True
            raise Disconnected(int(message.get("code", 1005)), str(message.get("reason") or ""))
        raise Disconnected(1006, f"unexpected ASGI message {kind}")

    async def send(self, data: str | bytes) -> None:
        if isinstance(data, str):
            await self._send({"type": "websocket.send", "text": data})
        else:
            await self._send({"type": "websocket.send", "bytes": data})

    async def send_texts(self, texts: tuple[bytes, ...]) -> None:
        for text in texts:  # ASGI carries text as str
            await self._send({"type": "websocket.send", "text": text.decode()})

    async def close(self, code: int, reason: str = "") -> None:
        """Close once; later calls, or a close after the client left, do nothing."""
        if self.closed:
            return
        self.closed = True
        # The transport may already be gone; then there is nobody left to tell.
        with contextlib.suppress(Exception):
            await self._send({"type": "websocket.close", "code": code, "reason": reason})
