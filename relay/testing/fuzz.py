"""Blocking probes of a running daemon, for hypothesis properties (tests/fuzz/).

Each fuzz module runs one ``relay serve`` for all its properties; after every
property :class:`Watch` proves the daemon unharmed: it still answers
``/healthz``, its open fds and live Trio tasks are back to what they were before
the property, and its log has no traceback. Blocking sockets, not httpx: a fuzz
request is arbitrary bytes, which no HTTP client will send.

Also here: whole responses read off a raw socket (:func:`exchange`,
:func:`request`), WebSocket frames built and read by hand (:func:`ws_frame`,
:func:`read_frames`), metric samples by label (:func:`metric`), a check that no
secret reached the log (:func:`leaked`), a browser-like client session for
canaries (:func:`client_session`, :func:`echo_probe`), and :class:`DaemonKeeper`,
which starts the daemon again when an example killed it, so that every example
begins with a live daemon and hypothesis can shrink a crash to the input that
caused it.
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import os
import socket
import struct
import time
from collections.abc import AsyncIterator, Callable, Iterable, Sequence
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from dataclasses import dataclass, field

import trio
import trio_websocket

from relay.admission.tokens import mint
from relay.config import decode_encryption_key
from relay.testing.daemon import Daemon
from relay.testing.metrics import sample_value
from relay.testing.portal import Held, Portal

MAX_HEAD = 64 * 1024


def raw_exchange(port: int, data: bytes, *, timeout: float = 10) -> int | None:
    """Send ``data`` on a fresh connection, half-close, and return the status of the
    first response (None if the server closed without one, which is a fair answer
    to bytes that are not HTTP). Raises ``TimeoutError`` if no answer comes."""
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as sock:
        try:
            sock.sendall(data)
            sock.shutdown(socket.SHUT_WR)
        except (BrokenPipeError, ConnectionResetError):
            pass  # refused before it read everything; what it answered is below
        head = b""
        try:
            while b"\r\n" not in head and len(head) < MAX_HEAD:
                chunk = sock.recv(65536)
                if not chunk:
                    break
                head += chunk
        except ConnectionResetError:
            pass
    if not head:
        return None
    line = head.split(b"\r\n", 1)[0].split()
    if len(line) < 2 or not line[0].startswith(b"HTTP/1.") or not line[1].isdigit():
        raise AssertionError(f"not an HTTP response: {head[:200]!r}")
    return int(line[1])


def http_get(port: int, path: str, *, timeout: float = 10) -> tuple[int, str]:
    """A plain GET (Connection: close); the status and the body."""
    request = f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n".encode()
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as sock:
        sock.sendall(request)
        data = b""
        while chunk := sock.recv(65536):
            data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    return int(head.split()[1]), body.decode("utf-8", "replace")


@dataclass
class Watch:
    """Baseline of one daemon, and the check run after every property."""

    daemon: Daemon
    fds: int = 0
    tasks: float = 0
    log_offset: int = 0
    expected_tracebacks: int = 0
    history: list[str] = field(default_factory=list)

    def settled(self) -> tuple[int, float]:
        """(fds, tasks), the least of a few scrapes: each scrape's own connection
        adds a task and an fd that end a moment later, which is noise, not a leak."""
        fds, tasks = [], []
        for _ in range(3):
            tasks.append(sample_value(metrics_text(self.daemon.port), "relay_trio_tasks"))
            fds.append(self.daemon.fd_count())
            time.sleep(0.05)
        return min(fds), min(tasks)

    def baseline(self) -> None:
        self.fds, self.tasks = self.settled()
        self.log_offset = len(self.daemon.log_text())

    def check(self, label: str, *, timeout: float = 15) -> None:
        """Assert the daemon is back to its baseline (waiting up to ``timeout`` for
        sessions the property ended to finish closing)."""
        status, _ = http_get(self.daemon.port, "/healthz")
        assert status == 200, f"{label}: /healthz answered {status}"
        deadline = time.monotonic() + timeout
        while True:
            fds, tasks = self.settled()
            if (fds <= self.fds and tasks <= self.tasks) or time.monotonic() > deadline:
                break
            time.sleep(0.2)
        self.history.append(f"{label}: fds {self.fds}->{fds}, tasks {self.tasks:.0f}->{tasks:.0f}")
        assert fds <= self.fds, f"{label}: open fds {fds} > baseline {self.fds}"
        assert tasks <= self.tasks, f"{label}: trio tasks {tasks} > baseline {self.tasks}"
        log = self.daemon.log_text()
        assert "Traceback" not in log, f"{label}: traceback in the daemon log:\n{log[-4000:]}"


# -- whole HTTP responses off a raw socket ------------------------------------------

# Statuses with no body whatever their headers say (RFC 9110 §6.4.1).
_NO_BODY = frozenset({101, 204, 304})


@dataclass(frozen=True)
class Response:
    """One HTTP response as it came off the wire; header names lower-cased."""

    status: int
    headers: tuple[tuple[str, str], ...]
    body: bytes

    def header(self, name: str) -> str | None:
        """The first header called ``name`` (any case), else None."""
        name = name.lower()
        return next((v for k, v in self.headers if k == name), None)


def _recv(sock: socket.socket) -> bytes:
    """The next bytes, or b"" once the peer closed or reset the connection."""
    try:
        return sock.recv(65536)
    except ConnectionResetError:
        return b""


def read_response(sock: socket.socket, *, head_only: bool = False) -> Response | None:
    """Read one response. None if the connection ended before a single byte (a fair
    answer to bytes that are not HTTP). ``AssertionError`` if what came is not an HTTP
    response; ``TimeoutError`` (the socket's timeout) if it stalls part way.

    The body is read by Content-Length, else to the end of the connection; with
    ``head_only`` (or a status that has no body) only the head is read."""
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = _recv(sock)
        if not chunk:
            if not data:
                return None
            raise AssertionError(f"connection ended inside a response head: {data[:300]!r}")
        data += chunk
        assert len(data) <= MAX_HEAD, f"response head over {MAX_HEAD} bytes"
    head, _, rest = data.partition(b"\r\n\r\n")
    lines = head.split(b"\r\n")
    status_line = lines[0].split(b" ", 2)
    assert (
        len(status_line) >= 2 and status_line[0].startswith(b"HTTP/1.") and status_line[1].isdigit()
    ), f"not an HTTP response: {data[:300]!r}"
    status = int(status_line[1])
    headers = []
    for line in lines[1:]:
        name, sep, value = line.partition(b":")
        assert sep, f"malformed response header line {line!r}"
        headers.append((name.decode("latin-1").strip().lower(), value.decode("latin-1").strip()))
    response = Response(status, tuple(headers), b"")
    if head_only or status in _NO_BODY:
        return Response(status, response.headers, rest)
    length = response.header("content-length")
    if length is not None:
        while len(rest) < int(length):
            chunk = _recv(sock)
            if not chunk:
                break
            rest += chunk
        return Response(status, response.headers, rest[: int(length)])
    while chunk := _recv(sock):
        rest += chunk
    return Response(status, response.headers, rest)


def _send_all(sock: socket.socket, data: bytes) -> None:
    """Send what the server takes; it may answer (and close) before reading it all,
    and then what it answered is what counts."""
    view = memoryview(data)
    try:
        while view:
            sent = sock.send(view[:65536])
            view = view[sent:]
    except (BrokenPipeError, ConnectionResetError):
        pass
    except TimeoutError:
        pass  # the server stopped reading: its answer (or its silence) shows below


def exchange(
    port: int,
    data: bytes,
    *,
    half_close: bool = False,
    head_only: bool = False,
    timeout: float = 10,
) -> Response | None:
    """Send ``data`` on a fresh connection and read one response (see
    :func:`read_response`); the connection is then closed, abruptly. With
    ``half_close`` the write side is shut first, so a server waiting for the rest
    of a truncated request sees that none is coming."""
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as sock:
        _send_all(sock, data)
        if half_close:
            # Already reset by the server? Then its answer, if any, is below.
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_WR)
        return read_response(sock, head_only=head_only)


def request(
    port: int,
    method: str,
    target: str,
    headers: Sequence[tuple[str, str | bytes]] = (),
    body: bytes = b"",
    *,
    chunked: bool = False,
    timeout: float = 10,
) -> Response | None:
    """One HTTP/1.1 request (``Connection: close``); header values may be raw bytes.
    Content-Length is added unless ``chunked`` (then the body goes as one chunk)."""
    lines = [f"{method} {target} HTTP/1.1".encode(), b"Host: 127.0.0.1", b"Connection: close"]
    for name, value in headers:
        raw = value if isinstance(value, bytes) else value.encode("latin-1")
        lines.append(name.encode("latin-1") + b": " + raw)
    if chunked:
        lines.append(b"Transfer-Encoding: chunked")
        payload = (b"%x\r\n" % len(body) + body + b"\r\n" if body else b"") + b"0\r\n\r\n"
    else:
        lines.append(b"Content-Length: %d" % len(body))
        payload = body
    return exchange(port, b"\r\n".join(lines) + b"\r\n\r\n" + payload, timeout=timeout)


# -- WebSocket frames by hand ------------------------------------------------------

WS_GUID = b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11"


def ws_key() -> str:
    """A fresh Sec-WebSocket-Key: 16 random bytes, base64."""
    return base64.b64encode(os.urandom(16)).decode()


def ws_accept(key: str | bytes) -> str:
    """The Sec-WebSocket-Accept a server owes ``key`` (RFC 6455 §4.2.2)."""
    raw = key if isinstance(key, bytes) else key.encode("latin-1")
    return base64.b64encode(hashlib.sha1(raw + WS_GUID).digest()).decode()


def ws_frame(
    opcode: int,
    payload: bytes,
    *,
    fin: bool = True,
    rsv: int = 0,
    mask: bytes | None = None,
    length: int | None = None,
) -> bytes:
    """One frame as a client sends it (masked with ``mask``, random if None; pass
    ``b""`` for an unmasked frame). ``length`` overrides the declared length, to
    lie about it."""
    declared = len(payload) if length is None else length
    first = (0x80 if fin else 0) | ((rsv & 7) << 4) | (opcode & 0x0F)
    key = os.urandom(4) if mask is None else mask
    bit = 0x80 if key else 0
    if declared < 126:
        head = struct.pack("!BB", first, bit | declared)
    elif declared < 1 << 16:
        head = struct.pack("!BBH", first, bit | 126, declared)
    else:
        head = struct.pack("!BBQ", first, bit | 127, declared)
    if not key:
        return head + payload
    masked = bytes(b ^ key[i % 4] for i, b in enumerate(payload))
    return head + key + masked


@dataclass(frozen=True)
class Frame:
    fin: bool
    opcode: int
    payload: bytes

    @property
    def close_code(self) -> int | None:
        """The code of a close frame (None if it has none, or is no close)."""
        if self.opcode != 0x8 or len(self.payload) < 2:
            return None
        code: int = struct.unpack("!H", self.payload[:2])[0]
        return code


def read_frames(data: bytes) -> list[Frame]:
    """The complete frames at the start of ``data`` (as a server sends them: unmasked,
    though a mask is undone if present); an incomplete tail is ignored."""
    frames, i = [], 0
    while len(data) - i >= 2:
        first, second = data[i], data[i + 1]
        length, i2 = second & 0x7F, i + 2
        if length == 126:
            if len(data) - i2 < 2:
                break
            length, i2 = struct.unpack("!H", data[i2 : i2 + 2])[0], i2 + 2
        elif length == 127:
            if len(data) - i2 < 8:
                break
            length, i2 = struct.unpack("!Q", data[i2 : i2 + 8])[0], i2 + 8
        key = b""
        if second & 0x80:
            key, i2 = data[i2 : i2 + 4], i2 + 4
        if len(data) - i2 < length:
            break
        payload = data[i2 : i2 + length]
        if key:
            payload = bytes(b ^ key[j % 4] for j, b in enumerate(payload))
        frames.append(Frame(bool(first & 0x80), first & 0x0F, payload))
        i = i2 + length
    return frames


# -- metrics and logs ---------------------------------------------------------------


def metrics_text(port: int) -> str:
    """One scrape of /metrics; read it with relay.testing.metrics.sample_value."""
    status, text = http_get(port, "/metrics")
    assert status == 200, status
    return text


def leaked(log: str, values: Iterable[str], *, min_chars: int = 12) -> list[str]:
    """The ``values`` (tokens, signatures) that appear in ``log``. Values shorter than
    ``min_chars`` or with few distinct characters are skipped: "ok" or "0000…" in a
    log line says nothing about a leak."""
    return [v for v in values if len(v) >= min_chars and len(set(v)) >= min_chars // 2 and v in log]


# -- a daemon that a property may kill -----------------------------------------------


async def _returncode(daemon: Daemon) -> int | None:
    # trio.Process.returncode must be read in the daemon's own Trio loop.
    return daemon.proc.returncode


async def _wait_exit(daemon: Daemon, timeout: float) -> int | None:
    with trio.move_on_after(timeout):
        await daemon.proc.wait()
    return daemon.proc.returncode


class FuzzEnv:
    """Base of a fuzz module's environment: examples and cases per property, and a
    short repr (hypothesis prints every argument of a failing example)."""

    def __init__(self) -> None:
        self.examples: dict[str, int] = {}
        self.cases: dict[str, int] = {}

    def __repr__(self) -> str:
        return "Env(...)"

    def count(self, prop: str, cases: int) -> None:
        self.examples[prop] = self.examples.get(prop, 0) + 1
        self.cases[prop] = self.cases.get(prop, 0) + cases

    def tally(self) -> str:
        """``N cases (prop: e examples, c cases; ...)`` for the module's report."""
        per = "; ".join(
            f"{k}: {self.examples[k]} examples, {self.cases[k]} cases" for k in self.cases
        )
        return f"{sum(self.cases.values())} cases ({per})"


class DaemonKeeper:
    """One ``relay serve`` held open in a portal for a whole module.

    :meth:`ensure` (call it before each example) starts it again if it has died,
    after recording how in :attr:`deaths`: the example that killed it fails on its
    own (see :meth:`check_alive`), and every later example still meets a live
    daemon, which is what lets hypothesis shrink a crash to the input that caused
    it."""

    def __init__(
        self, portal: Portal, factory: Callable[[], AbstractAsyncContextManager[Daemon]]
    ) -> None:
        self.portal = portal
        self.factory = factory
        self.deaths: list[str] = []
        self._held: Held[Daemon] | None = None

    @property
    def daemon(self) -> Daemon:
        assert self._held is not None, "not started"
        return self._held.value

    def start(self) -> Daemon:
        self._held = self.portal.run(self.portal.hold, self.factory)
        return self.daemon

    def exit_status(self) -> int | None:
        return self.portal.run(_returncode, self.daemon)

    def serving(self) -> bool:
        """Running and answering /healthz. A crash takes a moment to end the process,
        and a request answered just before it may be what caused it: the health
        check closes that window."""
        if self.exit_status() is not None:
            return False
        try:
            r = request(self.daemon.port, "GET", "/healthz", timeout=5)
        except (OSError, AssertionError):  # refused, reset, or a torn answer
            return False
        return r is not None and r.status == 200

    def check_alive(self, what: str) -> None:
        """Assert the daemon survived ``what`` (with its log's end if it did not)."""
        if self.serving():
            return
        status = self.portal.run(_wait_exit, self.daemon, 10)
        raise AssertionError(
            f"{what} killed the daemon (exit {status}):\n{self.daemon.log_text()[-5000:]}"
        )

    def ensure(self) -> bool:
        """Start the daemon again if it is dead or dying; True if it had to."""
        if self.serving():
            return False
        status = self.portal.run(_wait_exit, self.daemon, 10)
        self.deaths.append(f"exit {status}:\n{self.daemon.log_text()[-6000:]}")
        self.stop()
        self.start()
        return True

    def stop(self) -> None:
        if self._held is not None:
            held, self._held = self._held, None
            self.portal.run(held.release, timeout=60)


# -- client sessions (canaries) -------------------------------------------------------

LOCAL_ORIGIN = "http://localhost:5173"  # allowed by the default allow_localhost


def client_url(daemon: Daemon, query: str = "") -> str:
    """A client relay URL with a fresh valid token (docs/contract.md §4) in the path."""
    token = mint(decode_encryption_key(daemon.env["ENCRYPTION_KEY"]), 60)
    return f"{daemon.ws_url}/token/{token}/realtime{query}"


@asynccontextmanager
async def client_session(
    daemon: Daemon, *, query: str = "", max_message_size: int = 64 * 2**20, queue: int = 256
) -> AsyncIterator[trio_websocket.WebSocketConnection]:
    """A browser client's WebSocket to the relay; a session the relay already ended
    is not an error on the way out (the test asserts how it ended)."""
    async with trio_websocket.open_websocket_url(
        client_url(daemon, query),
        extra_headers=[(b"Origin", LOCAL_ORIGIN.encode())],
        max_message_size=max_message_size,
        message_queue_size=queue,
    ) as ws:
        try:
            yield ws
        finally:
            with contextlib.suppress(trio_websocket.ConnectionClosed):
                await ws.aclose()
            # When the relay started the close, trio-websocket's aclose() returns early
            # and leaves the TCP connection open; a browser hangs up, and the relay
            # waits for that (up to 2 s) before it closes the upstream.
            await ws._close_stream()


async def echo_probe(ws: trio_websocket.WebSocketConnection, timeout: float = 5) -> None:
    """A session to an echoing upstream still relays a text and a binary message
    both ways, unchanged."""
    messages: list[str | bytes] = [f"probe {os.urandom(8).hex()} \u00e9\u20ac", os.urandom(40)]
    with trio.fail_after(timeout):
        for m in messages:
            await ws.send_message(m)
        got = [await ws.get_message() for _ in messages]
    assert got == messages, ("canary session lost its messages", got, messages)
