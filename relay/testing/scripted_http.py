"""A raw HTTP/1.1 server on 127.0.0.1 whose every answer a test writes by hand.

For testing what relay does with a peer it POSTs to (HTTP tools, call events):
the handler gets the parsed request and the bare socket stream, so it can answer
properly, answer nothing, trickle a body byte by byte, lie about its length or
redirect. One request per connection; the connection closes after the handler.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field

import trio

_MAX_HEAD = 64 * 1024
_MAX_BODY = 1024 * 1024


@dataclass
class Request:
    method: str
    target: str
    headers: dict[str, str]  # names lower-cased; a repeated header keeps its last value
    body: bytes


Handler = Callable[[Request, trio.SocketStream], Awaitable[None]]


@dataclass
class ScriptedServer:
    url: str  # http://127.0.0.1:<port>
    requests: list[Request] = field(default_factory=list)
    connections: int = 0


async def respond(
    stream: trio.abc.SendStream,
    status: int,
    body: bytes = b"",
    headers: dict[str, str] | None = None,
) -> None:
    """A complete answer with a Content-Length, then nothing more."""
    head = [f"HTTP/1.1 {status} Scripted", f"Content-Length: {len(body)}", "Connection: close"]
    head += [f"{k}: {v}" for k, v in (headers or {}).items()]
    await stream.send_all(("\r\n".join(head) + "\r\n\r\n").encode("latin-1") + body)


async def _read_request(stream: trio.SocketStream) -> Request | None:
    data = b""
    while b"\r\n\r\n" not in data:
        if len(data) > _MAX_HEAD:
            return None
        chunk = await stream.receive_some(65536)
        if not chunk:
            return None
        data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    request_line, *lines = head.decode("latin-1").split("\r\n")
    method, target, _version = request_line.split(" ", 2)
    headers: dict[str, str] = {}
    for line in lines:
        name, _, value = line.partition(":")
        headers[name.strip().lower()] = value.strip()
    length = min(int(headers.get("content-length", "0")), _MAX_BODY)
    while len(body) < length:
        chunk = await stream.receive_some(65536)
        if not chunk:
            break
        body += chunk
    return Request(method, target, headers, body[:length])


@asynccontextmanager
async def scripted_http(handler: Handler) -> AsyncIterator[ScriptedServer]:
    """Serve ``handler`` on a free loopback port until the block ends."""
    listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
    port = listeners[0].socket.getsockname()[1]
    server = ScriptedServer(url=f"http://127.0.0.1:{port}")

    async def connection(stream: trio.SocketStream) -> None:
        server.connections += 1
        async with stream:
            try:
                request = await _read_request(stream)
                if request is None:
                    return
                server.requests.append(request)
                await handler(request, stream)
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                pass  # the client went away; that is the client's business

    async with trio.open_nursery() as nursery:
        await nursery.start(trio.serve_listeners, connection, listeners)
        try:
            yield server
        finally:
            nursery.cancel_scope.cancel()
