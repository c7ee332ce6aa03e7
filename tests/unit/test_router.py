"""relay.edge.router: upgrades on the socket, the rest to Hypercorn (docs/contract.md §3-§6)."""

from __future__ import annotations

import base64
import os

import hypercorn.trio.run as hypercorn_run
import trio
import trio.testing

from relay.edge.router import Replayed, Router
from relay.testing.daemon import Daemon


def test_hypercorn_still_looks_the_server_up_by_name() -> None:
    """The hook works only while Hypercorn's worker builds each connection's server
    from the module global ``TCPServer``; a Hypercorn that stops doing so fails here."""
    assert "TCPServer" in hypercorn_run.worker_serve.__code__.co_names
    original = getattr(hypercorn_run, "TCPServer")  # noqa: B009

    async def handler(ws: object) -> None:
        raise AssertionError

    try:
        Router(handler, max_message=1, stall_seconds=1, head_seconds=1, max_connections=1).install()
        assert getattr(hypercorn_run, "TCPServer") is not original  # noqa: B009
    finally:
        setattr(hypercorn_run, "TCPServer", original)  # noqa: B010


async def test_replayed_stream_gives_the_prefix_first() -> None:
    a, b = trio.socket.socketpair()
    async with trio.SocketStream(a) as left, trio.SocketStream(b) as right:
        replayed = Replayed(left, b"GET / HT")
        await right.send_all(b"TP/1.1\r\n")
        assert await replayed.receive_some(100) == b"GET / HT"
        assert await replayed.receive_some(100) == b"TP/1.1\r\n"
        await replayed.send_all(b"back")
        assert await right.receive_some(100) == b"back"


def upgrade(path: str, *, version: str = "13", key: str | None = None) -> bytes:
    key = key if key is not None else base64.b64encode(os.urandom(16)).decode()
    return (
        f"GET {path} HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
        f"Sec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: {version}\r\n"
        "Origin: https://gateframes.com\r\n\r\n"
    ).encode()


async def exchange(port: int, data: bytes) -> bytes:
    """Send ``data`` and read until the server closes (or 5 s pass)."""
    stream = await trio.open_tcp_stream("127.0.0.1", port)
    out = b""
    async with stream:
        await stream.send_all(data)
        with trio.move_on_after(5):
            while chunk := await stream.receive_some(65536):
                out += chunk
    return out


async def test_refusals_on_the_socket_path(daemon: Daemon) -> None:
    answer = await exchange(daemon.port, upgrade("/token/not-a-token"))
    assert answer.startswith(b"HTTP/1.1 401 ")
    body = answer.split(b"\r\n\r\n", 1)[1]
    assert body.endswith(b"\n") and body.count(b"\n") == 1 and body.strip()  # one line
    answer = await exchange(daemon.port, upgrade("/token/x", version="8"))
    assert answer.startswith(b"HTTP/1.1 426 ")
    assert b"sec-websocket-version: 13" in answer.lower()
    answer = await exchange(daemon.port, upgrade("/token/x", key="short"))
    assert answer.startswith(b"HTTP/1.1 400 ")


async def test_upgrade_after_a_keep_alive_request_goes_through_hypercorn(daemon: Daemon) -> None:
    """A connection that first carried plain HTTP belongs to Hypercorn; an upgrade on it
    later is still checked by the same front door (over ASGI)."""
    first = b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n"
    answer = await exchange(daemon.port, first + upgrade("/token/not-a-token"))
    assert answer.startswith(b"HTTP/1.1 200 ")
    assert b"HTTP/1.1 401 " in answer


async def test_silent_connection_is_closed_and_a_split_head_is_read(daemon: Daemon) -> None:
    stream = await trio.open_tcp_stream("127.0.0.1", daemon.port)
    async with stream:
        # A head in pieces is still one request.
        for piece in (b"GET /hea", b"lthz HTTP/1.1\r\nHo", b"st: x\r\n\r\n"):
            await stream.send_all(piece)
            await trio.sleep(0.05)
        answer = b""
        with trio.move_on_after(5):
            while b"ok" not in answer:
                answer += await stream.receive_some(65536)
        assert answer.startswith(b"HTTP/1.1 200 ")


async def test_malformed_upgrade_heads_get_400_and_the_daemon_lives(daemon: Daemon) -> None:
    """Regression (fuzz): heads like these reached Hypercorn's WebSocket path, whose
    exception stopped the whole daemon."""
    key = "Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n"
    for head in (
        f"GET x HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n{key}\r\nX",
        f"GET / HTTP/1.0\r\nHost: x\r\nUpgrade: websocket\r\n"
        f"Connection: Upgrade, \x80\r\n{key}\r\n",
        "GET /t HTTP/1.1\nHost: x\nUpgrade: websocket\nConnection: Upgrade\n\nX",
    ):
        answer = await exchange(daemon.port, head.encode("latin-1"))
        assert answer.startswith(b"HTTP/1.1 400 "), (head, answer)
    answer = await exchange(
        daemon.port, b"GET /healthz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
    )
    assert answer.startswith(b"HTTP/1.1 200 ")


async def test_replayed_stream_serialises_a_send_and_the_eof() -> None:
    """Hypercorn writes under its own lock but sends its close's EOF outside it; on a
    bare SocketStream the two meet trio's BusyResourceError (seen in the upgrade
    fuzz as a traceback in the log). Through Replayed they queue instead."""
    left, right = trio.socket.socketpair()
    stream = Replayed(trio.SocketStream(left), b"")
    peer = trio.SocketStream(right)
    big = b"x" * (4 * 1024 * 1024)  # more than the socket buffers: send_all must wait
    received = bytearray()

    async def read_all() -> None:
        while chunk := await peer.receive_some(65536):
            received.extend(chunk)

    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(stream.send_all, big)
            await trio.testing.wait_all_tasks_blocked()
            nursery.start_soon(stream.send_eof)  # raised BusyResourceError unlocked
            await trio.testing.wait_all_tasks_blocked()
            nursery.start_soon(read_all)
    assert len(received) == len(big)
    await stream.aclose()
    await peer.aclose()
