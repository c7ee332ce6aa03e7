"""Open the upstream OpenAI Realtime WebSocket.

Guarantees of :func:`open_upstream`:

- the request is exactly ``{realtime_url}?model=<model>`` with
  ``Authorization: Bearer <key>`` (and ``OpenAI-Beta: realtime=v1`` in the beta
  dialect only); the key is never logged nor put in an error;
- it either returns an open connection or raises :class:`UpstreamError`, within
  ``timeout`` seconds for TCP, TLS and the WebSocket handshake together;
- no socket outlives a failure, and the connection's socket is closed as soon
  as its reader task ends (peer closed, dropped, or the caller's nursery was
  cancelled), even where trio-websocket itself would leave it open (a rejected
  handshake, a close the peer started, an oversized message);
- the reader task runs in the caller's nursery: cancelling that nursery ends it.
"""

from __future__ import annotations

import logging
import ssl
import urllib.parse
from collections.abc import Awaitable, Callable, Sequence
from functools import partial
from typing import Any, cast

import h11
import trio
import trio_websocket
import wsproto.utilities

from relay.realtime.dialect import Dialect

log = logging.getLogger(__name__)

DEFAULT_MESSAGE_QUEUE_SIZE = 8
_Stream = trio.SocketStream | trio.SSLStream[trio.SocketStream]


_HANDSHAKE_ERRORS = (
    h11.LocalProtocolError,
    h11.RemoteProtocolError,
    wsproto.utilities.LocalProtocolError,
    wsproto.utilities.RemoteProtocolError,
    trio_websocket.HandshakeError,
    trio.BrokenResourceError,
    OSError,
)


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
    """The handshake headers the relay adds (trio-websocket adds the WebSocket ones)."""
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
    message_queue_size: int = DEFAULT_MESSAGE_QUEUE_SIZE,
    subprotocols: Sequence[str] | None = None,
) -> trio_websocket.WebSocketConnection:
    """Open the upstream socket; its reader task lives in ``nursery``.

    The caller closes the connection (``aclose``) or cancels ``nursery``.
    Raises :class:`UpstreamError` on refusal, network failure or timeout.
    """
    url = upstream_url(realtime_url, model)
    log.debug("opening upstream %s (%s dialect)", url, dialect.name)
    connect = partial(
        _connection_task,
        url,
        upstream_headers(api_key, dialect),
        message_queue_size=message_queue_size,
        max_message_size=max_message_size,
        subprotocols=list(subprotocols or ()),
    )
    try:
        with trio.fail_after(timeout):
            # Until it calls started(), the task runs under this fail_after, so the
            # timeout covers TCP, TLS and handshake; afterwards it moves to `nursery`.
            ws: trio_websocket.WebSocketConnection = await nursery.start(connect)
    except trio.TooSlowError:
        raise UpstreamError("upstream connect timed out") from None
    return ws


async def _connection_task(
    url: str,
    headers: list[tuple[bytes, bytes]],
    *,
    message_queue_size: int,
    max_message_size: int,
    subprotocols: list[str],
    task_status: trio.TaskStatus[trio_websocket.WebSocketConnection] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Connect, hand the connection to the caller, then host its reader until it ends."""
    host, port, resource, tls = _endpoint(url)
    stream = await _open_stream(host, port, tls)
    ws: trio_websocket.WebSocketConnection | None = None
    try:
        async with trio.open_nursery() as reader_nursery:
            with trio.CancelScope() as gave_up:
                reader_host = _ReaderHost(reader_nursery, on_return=gave_up.cancel)
                ws = await trio_websocket.wrap_client_stream(
                    cast(trio.Nursery, reader_host),
                    stream,
                    host if port in (80, 443) else f"{_bracket(host)}:{port}",
                    resource,
                    subprotocols=subprotocols,
                    extra_headers=headers,
                    message_queue_size=message_queue_size,
                    max_message_size=max_message_size,
                )
            if ws is not None:
                task_status.started(ws)
    except BaseExceptionGroup as group:
        # trio-websocket reports a refusal by raising from its reader task.
        rejected = group.subgroup(trio_websocket.ConnectionRejected)
        if rejected is None:
            # A reply that breaks the protocol (a wrong Sec-WebSocket-Accept, say)
            # surfaces as wsproto's error from the reader: before the handshake
            # completed, that is a failed connect like any other.
            if ws is None and group.subgroup(_HANDSHAKE_ERRORS) is not None:
                raise UpstreamError("upstream handshake failed") from None
            raise
        status = cast(trio_websocket.ConnectionRejected, _first_leaf(rejected)).status_code
        raise UpstreamError(f"upstream refused handshake: {status}", status=status) from None
    finally:
        # trio-websocket leaves the stream open after a refusal and after a
        # close the peer started; whatever ended the reader, the socket goes now.
        await trio.aclose_forcefully(stream)
    if ws is None:
        raise UpstreamError("upstream closed the connection during the handshake")


class _ReaderHost:
    """The "nursery" handed to trio-websocket, which only ever calls ``start_soon``
    with its reader task.

    trio-websocket never reports a reader that gives up before the handshake
    completes (peer closed, unparsable reply): it would leave the opener waiting
    for the timeout. Running the reader through here calls ``on_return`` when it
    returns, so the opener stops waiting at once.
    """

    def __init__(self, nursery: trio.Nursery, *, on_return: Callable[[], None]) -> None:
        self._nursery = nursery
        self._on_return = on_return

    def start_soon(self, async_fn: Callable[..., Awaitable[object]], *args: Any, **_: Any) -> None:
        self._nursery.start_soon(self._run, async_fn, *args)

    async def _run(self, async_fn: Callable[..., Awaitable[object]], *args: Any) -> None:
        await async_fn(*args)
        self._on_return()  # a no-op once the handshake is done: its scope has exited


async def _open_stream(host: str, port: int, tls: bool) -> _Stream:
    """TCP (and TLS, completed here so certificate errors are named as such)."""
    try:
        tcp = await trio.open_tcp_stream(host, port)
    except OSError as exc:
        raise UpstreamError("upstream unreachable") from exc
    if not tls:
        return tcp
    stream = trio.SSLStream(
        tcp, ssl.create_default_context(), server_hostname=host, https_compatible=True
    )
    try:
        await stream.do_handshake()
    except BaseException as exc:
        await trio.aclose_forcefully(stream)
        if isinstance(exc, trio.BrokenResourceError | OSError):
            raise UpstreamError("upstream TLS handshake failed") from exc
        raise
    return stream


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


def _first_leaf(group: BaseExceptionGroup[BaseException]) -> BaseException:
    exc: BaseException = group
    while isinstance(exc, BaseExceptionGroup):
        exc = exc.exceptions[0]
    return exc
