"""Open the upstream OpenAI Realtime WebSocket.

Guarantees of :func:`open_upstream`:

- the request is exactly ``{realtime_url}?model=<model>`` with
  ``Authorization: Bearer <key>`` (and ``OpenAI-Beta: realtime=v1`` in the beta
  dialect only); the key is never logged nor put in an error;
- the answer is checked by ``websockets``' sans-I/O client (RFC 6455 §4.1: status,
  accept value, no extension or subprotocol that was not offered); one that fails
  is an :class:`UpstreamError`, a 502 for the client (docs/contract.md §5);
- it either returns an open connection or raises :class:`UpstreamError`, within
  ``timeout`` seconds for TCP, TLS and the WebSocket handshake together;
- no socket outlives a failure, and the connection's socket is closed as soon
  as the connection is over (the peer closed, it was lost, our close finished)
  or the caller's nursery is cancelled: a task there holds it, the connection
  itself has no reader task (see ``relay.ws.connection``).
"""

from __future__ import annotations

import logging
import ssl
import urllib.parse
from collections.abc import Sequence

import trio
from websockets.client import ClientProtocol
from websockets.exceptions import InvalidStatus, InvalidURI
from websockets.protocol import OPEN
from websockets.typing import Subprotocol
from websockets.uri import parse_uri

from relay.sessions.dialect import Dialect
from relay.ws.connection import WebSocket
from relay.ws.handshake import MAX_HEAD
from relay.ws.transport import Broken, Transport

log = logging.getLogger(__name__)
# The protocol logs the request's headers at DEBUG, Authorization included: its logger
# never goes below INFO, whatever the root level, so the key stays out of the log.
_wire_log = logging.getLogger(f"{__name__}.wire")
_wire_log.setLevel(logging.INFO)


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
    host, port, _, tls = _endpoint(url)
    try:
        with trio.fail_after(timeout):
            transport = await _open_transport(host, port, tls)
            try:
                buffered = await _handshake(
                    transport, url, upstream_headers(api_key, dialect), list(subprotocols or ())
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
    url: str,
    headers: list[tuple[bytes, bytes]],
    subprotocols: list[str],
) -> bytes:
    """RFC 6455 §4.1 client handshake through ``websockets``' sans-I/O ``ClientProtocol``:
    it builds the request and checks the answer (status, ``Upgrade``, ``Connection``,
    ``Sec-WebSocket-Accept``, and that any extension or subprotocol answered was one we
    offered: we offer no extension, so any is refused). Returns the bytes read past the
    response, which belong to ``relay.ws``: the frames path stays ours.
    """
    try:
        uri = parse_uri(url)
    except InvalidURI:
        raise UpstreamError("upstream URL is not a valid WebSocket URL") from None
    protocol = ClientProtocol(
        uri,
        subprotocols=[Subprotocol(p) for p in subprotocols] or None,
        max_size=None,  # unused: frames are parsed by relay.ws, not by the protocol
        logger=_wire_log,
    )
    request = protocol.connect()
    for raw_name, value in headers:
        name = raw_name.decode()
        if name in request.headers:  # ours win (a user:pass@ in the URL would add Basic)
            del request.headers[name]
        request.headers[name] = value.decode()
    protocol.send_request(request)
    try:
        transport.write(b"".join(protocol.data_to_send()))
        await transport.drain(None)
        # Only the head goes to the protocol: past a 101 it would parse (and eat) our frames.
        data = b""
        while (end := data.find(b"\r\n\r\n")) < 0:
            if len(data) > MAX_HEAD:
                raise UpstreamError("upstream handshake failed: response head too large")
            chunk = await transport.read()
            if not chunk:
                raise UpstreamError("upstream closed the connection during the handshake")
            data += chunk
        protocol.receive_data(data[: end + 4])
        rest = data[end + 4 :]
        # A refusal may carry a body; read it (within the caller's timeout) so the status
        # comes out as such rather than as a broken response.
        while not protocol.events_received() and protocol.handshake_exc is None:
            if rest:
                protocol.receive_data(rest)
                rest = b""
            elif chunk := await transport.read():
                protocol.receive_data(chunk)
            else:
                protocol.receive_eof()
                break
    except Broken:
        raise UpstreamError("upstream closed the connection during the handshake") from None
    exc = protocol.handshake_exc
    if isinstance(exc, InvalidStatus):
        status = exc.response.status_code
        raise UpstreamError(f"upstream refused handshake: {status}", status=status)
    if exc is not None:
        raise UpstreamError(f"upstream handshake failed: {_short(exc)}")
    if protocol.state is not OPEN:
        raise UpstreamError("upstream closed the connection during the handshake")
    return rest


def _short(exc: Exception) -> str:
    """One line, bounded: the library's reason (it names the header, never our key)."""
    return str(exc).splitlines()[0][:120] if str(exc) else type(exc).__name__


def _endpoint(url: str) -> tuple[str, int, str, bool]:
    """(host, port, path with query, TLS?) of a ws:// or wss:// URL."""
    parts = urllib.parse.urlsplit(url)
    if parts.scheme not in ("ws", "wss") or not parts.hostname:
        raise UpstreamError("upstream URL must be ws:// or wss:// with a host")
    tls = parts.scheme == "wss"
    port = parts.port or (443 if tls else 80)
    resource = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
    return parts.hostname, port, resource, tls
