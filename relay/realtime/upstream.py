"""Open the upstream OpenAI Realtime WebSocket.

Guarantees of :func:`open_upstream`:

- the request is exactly ``{realtime_url}?model=<model>`` with
  ``Authorization: Bearer <key>`` (and ``OpenAI-Beta: realtime=v1`` in the beta
  dialect only); the key is never logged nor put in an error;
- it either returns an open connection or raises :class:`UpstreamError`, within
  ``timeout`` seconds for TCP, TLS and the WebSocket handshake together;
- no socket outlives a failure, and the connection's socket is closed as soon
  as the connection is over (the peer closed, it was lost, our close finished)
  or the caller's nursery is cancelled: a task there holds it, the connection
  itself has no reader task (see ``relay.ws.connection``).
"""

from __future__ import annotations

import base64
import logging
import os
import ssl
import urllib.parse
from collections.abc import Sequence

import trio

from relay.realtime.dialect import Dialect
from relay.ws.connection import WebSocket
from relay.ws.handshake import MAX_HEAD, accept_value
from relay.ws.transport import Broken, Transport

log = logging.getLogger(__name__)


class UpstreamError(Exception):
    """The upstream socket could not be opened; ``reason`` is short and safe to show."""

    def __init__(self, reason: str, *, status: int | None = None) -> None:
        super().__init__(reason)
        self.reason = reason
        self.status = status  # the HTTP status of a refused handshake, else None


def upstream_url(realtime_url: str, model: str) -> str:
    """``{realtime_url}?model=<model>``: the model is the only query parameter."""
    return (
        f"{realtime_url}?{urllib.parse.urlencode({'model': model}, quote_via=urllib.parse.quote)}"
    )


def upstream_headers(api_key: str, dialect: Dialect) -> list[tuple[bytes, bytes]]:
    """The handshake headers the relay adds to the WebSocket ones."""
    headers = [(b"Authorization", f"Bearer {api_key}".encode())]
    if dialect.beta_header:
        headers.append((b"OpenAI-Beta", b"realtime=v1"))
    return headers


async def open_upstream(
    nursery: trio.Nursery,
    *,
    realtime_url: str,
    model: str,
    api_key: str,
    dialect: Dialect,
    timeout: float,
    max_message_size: int,
    stall_seconds: float | None = None,
    subprotocols: Sequence[str] | None = None,
) -> WebSocket:
    """Open the upstream socket; it is closed when ``nursery`` is cancelled.

    Raises :class:`UpstreamError` on refusal, network failure or timeout.
    """
    url = upstream_url(realtime_url, model)
    log.debug("opening upstream %s (%s dialect)", url, dialect.name)
    host, port, resource, tls = _endpoint(url)
    try:
        with trio.fail_after(timeout):
            transport = await _open_transport(host, port, tls)
            try:
                buffered = await _handshake(
                    transport,
                    host if port in (80, 443) else f"{_bracket(host)}:{port}",
                    resource,
                    upstream_headers(api_key, dialect),
                    list(subprotocols or ()),
                )
            except BaseException:
                transport.close()
                raise
    except trio.TooSlowError:
        raise UpstreamError("upstream connect timed out") from None
    ws = WebSocket(
        transport,
        client=True,
        max_message=max_message_size,
        stall_seconds=stall_seconds,
        buffered=buffered,
    )
    nursery.start_soon(_hold, ws)
    return ws


async def _hold(ws: WebSocket) -> None:
    """Closes the socket once the connection is over, or when the caller's nursery
    is cancelled, whichever comes first."""
    try:
        await ws.finished.wait()
    finally:
        ws.transport.close()


async def _open_transport(host: str, port: int, tls: bool) -> Transport:
    """TCP (and TLS, completed here so certificate errors are named as such)."""
    try:
        tcp = await trio.open_tcp_stream(host, port)
    except OSError as exc:
        raise UpstreamError("upstream unreachable") from exc
    if not tls:
        return Transport.adopt(tcp.socket)
    transport = Transport.adopt(tcp.socket, tls=ssl.create_default_context(), server_hostname=host)
    try:
        await transport.tls_handshake()
    except BaseException as exc:
        transport.close()
        if isinstance(exc, Broken | ssl.SSLError | OSError):
            raise UpstreamError("upstream TLS handshake failed") from None
        raise
    return transport


async def _handshake(
    transport: Transport,
    host_header: str,
    resource: str,
    headers: list[tuple[bytes, bytes]],
    subprotocols: list[str],
) -> bytes:
    """RFC 6455 §4.1 client handshake; returns the bytes read past the response."""
    key = base64.b64encode(os.urandom(16)).decode()
    lines = [
        f"GET {resource} HTTP/1.1",
        f"Host: {host_header}",
        "Upgrade: websocket",
        "Connection: Upgrade",
        f"Sec-WebSocket-Key: {key}",
        "Sec-WebSocket-Version: 13",
    ]
    if subprotocols:
        lines.append(f"Sec-WebSocket-Protocol: {', '.join(subprotocols)}")
    request = ("\r\n".join(lines) + "\r\n").encode("latin-1")
    request += b"".join(name + b": " + value + b"\r\n" for name, value in headers) + b"\r\n"
    try:
        transport.write(request)
        await transport.drain(None)
        data = b""
        while b"\r\n\r\n" not in data:
            if len(data) > MAX_HEAD:
                raise UpstreamError("upstream handshake failed")
            chunk = await transport.read()
            if not chunk:
                raise UpstreamError("upstream closed the connection during the handshake")
            data += chunk
    except Broken:
        raise UpstreamError("upstream closed the connection during the handshake") from None
    head, _, rest = data.partition(b"\r\n\r\n")
    status_line, *header_lines = head.decode("latin-1").split("\r\n")
    parts = status_line.split(" ", 2)
    if len(parts) < 2 or not parts[0].startswith("HTTP/1.") or not parts[1].isdigit():
        raise UpstreamError("upstream handshake failed")
    status = int(parts[1])
    if status != 101:
        raise UpstreamError(f"upstream refused handshake: {status}", status=status)
    fields: dict[str, str] = {}
    for line in header_lines:
        name, _, value = line.partition(":")
        fields[name.strip().lower()] = value.strip()
    if (
        fields.get("upgrade", "").lower() != "websocket"
        or "upgrade" not in fields.get("connection", "").lower()
        or fields.get("sec-websocket-accept") != accept_value(key)
    ):
        raise UpstreamError("upstream handshake failed")
    return rest


def _endpoint(url: str) -> tuple[str, int, str, bool]:
    """(host, port, path with query, TLS?) of a ws:// or wss:// URL."""
    parts = urllib.parse.urlsplit(url)
    if parts.scheme not in ("ws", "wss") or not parts.hostname:
        raise UpstreamError("upstream URL must be ws:// or wss:// with a host")
    tls = parts.scheme == "wss"
    port = parts.port or (443 if tls else 80)
    resource = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
    return parts.hostname, port, resource, tls


def _bracket(host: str) -> str:
    return f"[{host}]" if ":" in host else host
