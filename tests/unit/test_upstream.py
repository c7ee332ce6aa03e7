"""open_upstream against the fake Realtime server over real loopback sockets."""

from __future__ import annotations

import logging
import os
import socket
from collections.abc import AsyncIterator
from functools import partial

import orjson
import pytest
import trio

from relay.sessions.dialect import BETA, GA, Dialect
from relay.sessions.upstream import UpstreamError, _endpoint, open_upstream, upstream_url
from relay.testing.fake_realtime import FakeRealtime, fake_realtime
from relay.ws import reactor
from relay.ws.connection import WebSocket
from relay.ws.errors import UpstreamClosed
from tests.helpers import raw_upstream

KEY = "sk-test-secret-key"


def open_fds() -> int:
    # The run's one reactor (its epoll fd) is part of the baseline, as in the daemon.
    reactor.reactor()
    return len(os.listdir("/proc/self/fd"))


@pytest.fixture
async def fake() -> AsyncIterator[FakeRealtime]:
    async with fake_realtime("ga", expected_key=KEY) as f:
        yield f


async def connect(
    nursery: trio.Nursery,
    url: str,
    *,
    dialect: Dialect = GA,
    model: str = "gpt-realtime",
    key: str = KEY,
    limit: float = 5.0,
) -> WebSocket:
    return await open_upstream(
        nursery,
        realtime_url=url,
        model=model,
        api_key=key,
        dialect=dialect,
        timeout=limit,
        max_message_size=1 << 20,
    )


async def settle(fake: FakeRealtime) -> None:
    """Wait until the fake has finished with every connection (its side is closed)."""
    for conn in fake.connections:
        await conn.closed.wait()


def test_url_has_only_the_model() -> None:
    base = "wss://api.openai.com/v1/realtime"
    assert upstream_url(base, "gpt-realtime") == f"{base}?model=gpt-realtime"
    assert upstream_url(base, "a b/c&d") == f"{base}?model=a%20b%2Fc%26d"


def test_endpoint_split() -> None:
    assert _endpoint("wss://api.openai.com/v1/realtime?model=m") == (
        "api.openai.com", 443, "/v1/realtime?model=m", True,
    )  # fmt: skip
    assert _endpoint("ws://127.0.0.1:9/x") == ("127.0.0.1", 9, "/x", False)
    with pytest.raises(UpstreamError):
        _endpoint("https://api.openai.com/v1/realtime")


async def test_ga_handshake(fake: FakeRealtime, nursery: trio.Nursery) -> None:
    ws = await connect(nursery, fake.url)
    created = orjson.loads(await ws.receive())
    assert created["type"] == "session.created"
    assert created["session"]["type"] == "realtime"
    conn = fake.connections[0]
    assert conn.path == "/v1/realtime?model=gpt-realtime"
    assert conn.header("authorization") == f"Bearer {KEY}"
    assert conn.header("OpenAI-Beta") is None
    await ws.close(1000)
    await conn.closed.wait()
    assert conn.close_code == 1000


async def test_beta_handshake_sends_beta_header(nursery: trio.Nursery) -> None:
    async with fake_realtime("beta") as fake:
        ws = await connect(nursery, fake.url, dialect=BETA, model="gpt-4o-realtime-preview")
        assert orjson.loads(await ws.receive())["type"] == "session.created"
        conn = fake.connections[0]
        assert conn.path == "/v1/realtime?model=gpt-4o-realtime-preview"
        assert conn.header("OpenAI-Beta") == "realtime=v1"
        assert conn.header("Authorization") == f"Bearer {KEY}"
        await ws.close(1000)


@pytest.mark.parametrize("status", [401, 429, 500])
async def test_refusal_is_upstream_error_and_leaks_nothing(fake: FakeRealtime, status: int) -> None:
    fake.refuse_status = status
    async with trio.open_nursery() as nursery:
        with pytest.raises(UpstreamError) as info:
            await connect(nursery, fake.url)
    assert info.value.reason == f"upstream refused handshake: {status}"
    assert info.value.status == status
    await settle(fake)
    before = open_fds()
    # Kept alive on purpose: their tracebacks would otherwise let the garbage
    # collector close a leaked socket and hide the leak.
    kept: list[UpstreamError] = []
    async with trio.open_nursery() as nursery:  # a refusal must not disturb the caller's nursery
        for _ in range(150):
            with pytest.raises(UpstreamError) as info:
                await connect(nursery, fake.url)
            kept.append(info.value)
    await settle(fake)
    assert open_fds() <= before


async def test_wrong_key_is_refused_and_key_never_in_error(fake: FakeRealtime) -> None:
    async with trio.open_nursery() as nursery:
        with pytest.raises(UpstreamError) as info:
            await connect(nursery, fake.url, key="sk-wrong-secret")
    assert info.value.status == 401
    assert "secret" not in str(info.value) and "secret" not in repr(info.value.__cause__)


async def test_unreachable_port() -> None:
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    before = open_fds()
    async with trio.open_nursery() as nursery:
        with pytest.raises(UpstreamError, match="unreachable"):
            await connect(nursery, f"ws://127.0.0.1:{port}/v1/realtime")
    assert open_fds() <= before


async def test_stalled_handshake_times_out(fake: FakeRealtime) -> None:
    fake.accept_delay = 5.0
    before = open_fds()
    start = trio.current_time()
    async with trio.open_nursery() as nursery:
        with pytest.raises(UpstreamError, match="timed out"):
            await connect(nursery, fake.url, limit=0.3)
    assert 0.25 < trio.current_time() - start < 1.5
    fake.accept_delay = 0
    assert open_fds() <= before + 1  # at most the fake's own end, still stalling


async def test_peer_closing_mid_handshake_fails_fast() -> None:
    async def hang_up(stream: trio.SocketStream) -> None:
        await stream.receive_some()
        await stream.aclose()

    async def garbage(stream: trio.SocketStream) -> None:
        await stream.receive_some()
        await stream.send_all(b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n")
        await trio.sleep(10)

    for handler in (hang_up, garbage):
        async with trio.open_nursery() as server:
            listeners = await server.start(trio.serve_tcp, handler, 0)
            port = listeners[0].socket.getsockname()[1]
            start = trio.current_time()
            with pytest.raises(UpstreamError):
                await connect(server, f"ws://127.0.0.1:{port}/v1/realtime", limit=5)
            assert trio.current_time() - start < 1.0  # not the timeout
            server.cancel_scope.cancel()


async def test_wss_speaks_tls(fake: FakeRealtime) -> None:
    # The fake speaks plain HTTP; a wss:// URL must attempt TLS and fail as such.
    async with trio.open_nursery() as nursery:
        with pytest.raises(UpstreamError, match="TLS"):
            await connect(nursery, f"wss://127.0.0.1:{fake.port}/v1/realtime")


async def test_socket_closed_when_peer_closes(fake: FakeRealtime) -> None:
    async def close_4000(conn: object) -> None:
        await fake.connections[-1].close(4000, "bye")

    await settle(fake)
    before = open_fds()
    fake.on_connect = close_4000
    async with trio.open_nursery() as nursery:
        ws = await connect(nursery, fake.url)
        with pytest.raises(UpstreamClosed) as info:
            while True:
                await ws.receive()
        assert info.value.code == 4000
        assert info.value.reason == "bye"
        # No close() from us: the socket must still go when the nursery ends.
    await settle(fake)
    assert open_fds() <= before


async def test_cancelling_the_nursery_closes_the_socket(fake: FakeRealtime) -> None:
    before = open_fds()
    async with trio.open_nursery() as nursery:
        ws = await connect(nursery, fake.url)
        await ws.receive()
        nursery.cancel_scope.cancel()
    await settle(fake)
    assert open_fds() <= before


async def test_bad_accept_header_is_an_upstream_error() -> None:
    """A server whose 101 carries a wrong Sec-WebSocket-Accept: wsproto raises from the
    reader; the opener must still answer UpstreamError (the client then gets 502)."""

    async def handler(stream: trio.SocketStream) -> None:
        await stream.receive_some(65536)
        await stream.send_all(
            b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\n"
            b"Connection: Upgrade\r\nSec-WebSocket-Accept: wrong\r\n\r\n"
        )
        await trio.sleep(5)

    async with trio.open_nursery() as nursery:
        listeners = await nursery.start(partial(trio.serve_tcp, handler, 0, host="127.0.0.1"))
        port = listeners[0].socket.getsockname()[1]
        async with trio.open_nursery() as conn:
            with pytest.raises(UpstreamError):
                await open_upstream(
                    conn,
                    realtime_url=f"ws://127.0.0.1:{port}/v1/realtime",
                    model="m",
                    api_key="k",
                    dialect=GA,
                    timeout=3,
                    max_message_size=1000,
                )
        nursery.cancel_scope.cancel()


@pytest.mark.parametrize(
    ("answer", "offered", "complaint"),
    [
        (b"Sec-WebSocket-Extensions: permessage-deflate\r\n", (), "no extensions supported"),
        (b"Sec-WebSocket-Protocol: realtime\r\n", (), "no subprotocols supported"),
        (b"Sec-WebSocket-Protocol: other\r\n", ("realtime",), "unsupported subprotocol"),
    ],
)
async def test_unrequested_extension_or_subprotocol_is_an_upstream_error(
    answer: bytes, offered: tuple[str, ...], complaint: str
) -> None:
    """The server may only pick from what we offered (RFC 6455 §4.1, items 5 and 6);
    we offer no extension, so frames with RSV bits set would follow an accepted one."""
    async with raw_upstream(answer) as port, trio.open_nursery() as conn:
        with trio.fail_after(5), pytest.raises(UpstreamError) as info:
            await open_upstream(
                conn,
                realtime_url=f"ws://127.0.0.1:{port}/v1/realtime",
                model="m",
                api_key=KEY,
                dialect=GA,
                timeout=3,
                max_message_size=1000,
                subprotocols=offered,
            )
    assert info.value.reason.startswith("upstream handshake failed")
    assert complaint in info.value.reason


async def test_offered_subprotocol_and_frames_in_the_same_segment_as_the_101() -> None:
    """Bytes after the head belong to relay.ws, even when they come with the 101."""
    frame = b"\x81\x05hello"  # unmasked text "hello", as a server sends
    async with (
        raw_upstream(b"Sec-WebSocket-Protocol: realtime\r\n", after=frame) as port,
        trio.open_nursery() as conn,
    ):
        with trio.fail_after(5):
            ws = await open_upstream(
                conn,
                realtime_url=f"ws://127.0.0.1:{port}/v1/realtime",
                model="m",
                api_key=KEY,
                dialect=GA,
                timeout=3,
                max_message_size=1000,
                subprotocols=["realtime"],
            )
            assert await ws.receive() == "hello"
        conn.cancel_scope.cancel()


async def test_key_stays_out_of_a_debug_log(
    fake: FakeRealtime, nursery: trio.Nursery, caplog: pytest.LogCaptureFixture
) -> None:
    # websockets' protocol logs request headers at DEBUG; a debug-level run must not show
    # the Authorization header.
    caplog.set_level(logging.DEBUG)
    ws = await connect(nursery, fake.url)
    await ws.receive()
    await ws.close(1000)
    assert "sk-test" not in caplog.text
