"""The server side of a WebSocket whose upgrade request the listener has read.

It offers the same surface as :class:`relay.edge.asgi_ws.AsgiWebSocket` (the front
door and the sessions run unchanged on either): request accessors, then
``reject`` (a real HTTP refusal) or ``accept`` (the 101), then the messages.
"""

from __future__ import annotations

from urllib.parse import parse_qsl

import trio

from relay.ws.connection import WebSocket
from relay.ws.errors import Disconnected
from relay.ws.handshake import RequestHead, refusal_response, upgrade_response
from relay.ws.transport import Broken, Transport

# A client that does not even read the answer to its own upgrade is not waited for.
HANDSHAKE_WRITE_SECONDS = 10.0


class ServerWebSocket(WebSocket):
    __slots__ = ("accepted", "head", "headers", "peer", "query", "rejected")

    def __init__(
        self,
        transport: Transport,
        head: RequestHead,
        peer: str,
        *,
        max_message: int,
        stall_seconds: float | None,
        buffered: bytes = b"",
    ) -> None:
        super().__init__(
            transport,
            client=False,
            max_message=max_message,
            stall_seconds=stall_seconds,
            buffered=buffered,
        )
        self.head = head
        self.peer = peer
        self.headers: dict[str, str] = {}
        for name, value in head.headers:
            key = name.decode("latin-1")
            text = value.decode("latin-1")
            self.headers[key] = f"{self.headers[key]}, {text}" if key in self.headers else text
        qs = head.query_string.decode("latin-1")
        self.query: dict[str, str] = dict(parse_qsl(qs, keep_blank_values=True))
        self.accepted = False
        self.rejected = False

    @property
    def path(self) -> str:
        return self.head.path

    @property
    def raw_query(self) -> str:
        return self.head.query_string.decode("latin-1")

    @property
    def subprotocols(self) -> list[str]:
        value = self.headers.get("sec-websocket-protocol", "")
        return [p.strip() for p in value.split(",") if p.strip()]

    async def wait_connect(self) -> bool:
        return True  # the listener only builds one for a complete upgrade request

    async def reject(
        self, status: int, reason: str, headers: tuple[tuple[str, str], ...] = ()
    ) -> None:
        """Answer the upgrade with an HTTP refusal; the connection then closes."""
        if self.accepted or self.rejected:
            return
        self.rejected = True
        try:
            self.transport.write(refusal_response(status, reason, headers))
            await self.transport.drain(HANDSHAKE_WRITE_SECONDS)
        except (Broken, trio.TooSlowError):
            pass  # the client left before reading why; nothing more to tell it

    async def accept(self, subprotocol: str | None = None) -> None:
        key = self.headers.get("sec-websocket-key", "")
        try:
            self.transport.write(upgrade_response(key, subprotocol))
            await self.transport.drain(HANDSHAKE_WRITE_SECONDS)
        except (Broken, trio.TooSlowError):
            raise Disconnected(1006, "client left during the handshake") from None
        self.accepted = True
