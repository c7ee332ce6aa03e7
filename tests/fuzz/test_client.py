"""The browser client relay (docs/contract.md §5), fuzzed with hypothesis against one
``relay serve`` for the whole module, with ``max_message_bytes`` small (32 KiB) so that messages
around it are cheap.

Messages of every size around the limit, text (1- to 4-byte UTF-8 characters, so
bytes and characters disagree at the boundary) and binary, empty ones, in both
directions and interleaved: each message within the limit arrives unchanged and
in order (text stays text, binary stays binary); one byte more closes the
client with 1009 and the upstream with 1000. Close codes pass through as the
The contract's table says. Garbage frames on a raw socket cost only their own session.

After each property the daemon is back to its baseline
(:class:`relay.testing.fuzz.Watch`) and a session opened before the property
still relays both ways.
"""

from __future__ import annotations

import contextlib
import socket
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any

import pytest
import trio
import trio_websocket
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from relay.testing.daemon import TEST_OPENAI_KEY, Daemon, running_daemon
from relay.testing.fake_realtime import FakeConnection, FakeRealtime, fake_realtime
from relay.testing.fuzz import (
    LOCAL_ORIGIN,
    DaemonKeeper,
    FuzzEnv,
    Watch,
    client_session,
    client_url,
    echo_probe,
    read_frames,
    read_response,
    ws_accept,
    ws_frame,
    ws_key,
)
from relay.testing.portal import Held, Portal, trio_portal

# Both drivers of the session core: the reactor's fast path, and the pumps alone.
pytestmark = pytest.mark.usefixtures("fast_path")

LIMIT = 32 * 1024  # max_message_bytes
FUZZ = settings(
    deadline=None,
    database=None,  # CI runs fresh examples every time; failures print their input
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
WS = trio_websocket.WebSocketConnection

# -- messages ------------------------------------------------------------------------

UNITS = ("a", "\u00e9", "\u20ac", "\U0001f600")  # 1, 2, 3 and 4 UTF-8 bytes
_FILL = bytes(range(256))


@dataclass(frozen=True)
class Msg:
    """A message of exactly ``size`` bytes (UTF-8 bytes for text): ``head``, then
    ``unit`` repeated, then ASCII to make up the last bytes; with ``unit_last``,
    ASCII then one ``unit`` at the very end, so that a multi-byte character can
    straddle the limit. A recipe, so that a failing example prints in a line, not
    in 32 KiB."""

    binary: bool
    size: int
    unit: str = "a"
    head: str = ""
    unit_last: bool = False

    def build(self) -> str | bytes:
        if self.binary:
            raw = self.head.encode()[: self.size]
            rest = self.size - len(raw)
            return raw + (_FILL * (rest // 256 + 1))[:rest]
        head = self.head
        while len(head.encode()) > self.size:
            head = head[:-1]
        rest = self.size - len(head.encode())
        width = len(self.unit.encode())
        if self.unit_last and rest >= width:
            text = head + "a" * (rest - width) + self.unit
        else:
            text = head + self.unit * (rest // width) + "a" * (rest % width)
        assert len(text.encode()) == self.size
        return text

    @property
    def oversize(self) -> bool:
        return self.size > LIMIT


def _sizes() -> st.SearchStrategy[int]:
    return st.one_of(
        st.integers(LIMIT - 4, LIMIT + 4),  # the boundary, exactly
        st.integers(0, 64),
        st.just(0),
        st.integers(0, LIMIT),
        st.integers(LIMIT + 1, 4 * LIMIT),  # well over, many TCP reads
    )


def msgs(*, sizes: st.SearchStrategy[int] | None = None) -> st.SearchStrategy[Msg]:
    return st.builds(
        Msg,
        st.booleans(),
        _sizes() if sizes is None else sizes,
        st.sampled_from(UNITS),
        st.sampled_from(["", "", '{"type":"x"}']) | st.text(max_size=12),
        st.booleans(),
    )


within = msgs(sizes=st.one_of(st.integers(LIMIT - 4, LIMIT), st.integers(0, 64), st.just(0)))


def _describe(m: str | bytes) -> str:
    kind = "bytes" if isinstance(m, bytes) else "str"
    size = len(m) if isinstance(m, bytes) else len(m.encode())
    return f"{kind}[{size}]"


def same(got: Sequence[str | bytes], want: Sequence[str | bytes]) -> bool:
    """Equal, types included (``"" != b""``)."""
    return len(got) == len(want) and all(
        type(g) is type(w) and g == w for g, w in zip(got, want, strict=True)
    )


def assert_same(got: Sequence[str | bytes], want: Sequence[str | bytes], what: str) -> None:
    assert same(got, want), (what, [_describe(g) for g in got], [_describe(w) for w in want])


def is_interleaving(got: Sequence[Any], a: Sequence[Any], b: Sequence[Any]) -> bool:
    """Is ``got`` a merge of ``a`` and ``b`` that keeps the order of each?"""
    if len(got) != len(a) + len(b):
        return False

    def eq(x: Any, y: Any) -> bool:
        return type(x) is type(y) and bool(x == y)

    # reach[j]: can got[:i + j] be a merge of a[:i] and b[:j]?
    reach = [True] + [False] * len(b)
    for j in range(1, len(b) + 1):
        reach[j] = reach[j - 1] and eq(got[j - 1], b[j - 1])
    for i in range(1, len(a) + 1):
        reach[0] = reach[0] and eq(got[i - 1], a[i - 1])
        for j in range(1, len(b) + 1):
            k = i + j - 1
            reach[j] = (reach[j] and eq(got[k], a[i - 1])) or (
                reach[j - 1] and eq(got[k], b[j - 1])
            )
    return reach[len(b)]


# -- the module's daemon and sessions ------------------------------------------------------


@dataclass
class Session:
    held: Held[WS]
    conn: FakeConnection

    @property
    def ws(self) -> WS:
        return self.held.value


class Env(FuzzEnv):
    """The module's fake, daemon, canary and tallies."""

    def __init__(self, portal: Portal, fake: FakeRealtime, keeper: DaemonKeeper) -> None:
        super().__init__()
        self.portal = portal
        self.fake = fake
        self.keeper = keeper
        self.watch: Watch | None = None
        self.canary: Session | None = None
        self.current: Session | None = None

    @property
    def daemon(self) -> Daemon:
        return self.keeper.daemon

    async def open(self) -> Session:
        index = len(self.fake.connections)
        d = self.daemon
        held = await self.portal.hold(lambda: client_session(d, max_message_size=8 * LIMIT))
        with trio.fail_after(10):
            conn = await self.fake.wait_connection(index)
        return Session(held, conn)

    async def session(self) -> Session:
        """The session examples use; a new one if the last example ended it."""
        if self.current is not None and self.current.ws.closed is not None:
            await self.end_current()
        if self.current is None:
            self.current = await self.open()
        return self.current

    async def end_current(self) -> None:
        if self.current is not None:
            current, self.current = self.current, None
            await current.held.release()
            with trio.fail_after(10):
                await current.conn.closed.wait()

    def start(self) -> None:
        """(Re)open the canary and take the baseline on the current daemon."""
        self.canary = self.portal.run(self.open)
        self.portal.run(echo_probe, self.canary.ws)
        self.watch = Watch(self.daemon)
        self.watch.baseline()

    def ensure(self) -> None:
        if self.keeper.ensure():
            self.current = None  # its daemon is gone, and so is it
            self.start()


@asynccontextmanager
async def _fake() -> AsyncIterator[FakeRealtime]:
    async with fake_realtime(echo=True, expected_key=TEST_OPENAI_KEY) as fake:
        yield fake


@pytest.fixture(scope="module")
def env() -> Iterator[Env]:
    with trio_portal(_fake) as (portal, fake):
        config: dict[str, dict[str, Any]] = {
            "openai": {"realtime_url": fake.url},
            "limits": {"max_message_bytes": LIMIT},
        }
        e = Env(portal, fake, DaemonKeeper(portal, lambda: running_daemon(config)))
        e.keeper.start()
        e.start()
        print(f"\nclient fuzz: daemon log {e.daemon.log_path}")
        started = time.monotonic()
        try:
            yield e
        finally:
            portal.run(e.end_current)
            if e.canary is not None:
                portal.run(e.canary.held.release)
            e.keeper.stop()
            took = time.monotonic() - started
            print(f"\nclient fuzz: {e.tally()} in {took:.0f} s")
            if e.watch is not None:
                print("client fuzz: " + "; ".join(e.watch.history))
            for death in e.keeper.deaths:
                print(f"client fuzz: the daemon died: {death[-3000:]}")


@pytest.fixture(autouse=True)
def after_property(env: Env, request: pytest.FixtureRequest) -> Iterator[None]:
    env.ensure()
    yield
    env.portal.run(env.end_current)
    env.keeper.check_alive(request.node.name)
    assert env.canary is not None and env.watch is not None
    env.portal.run(echo_probe, env.canary.ws)
    env.watch.check(request.node.name)


# -- helpers ------------------------------------------------------------------------------


async def close_of(ws: WS, timeout: float = 10) -> tuple[list[str | bytes], int, str]:
    """Read until the relay closes: what came first, and the close code and reason."""
    got: list[str | bytes] = []
    with trio.fail_after(timeout):
        while True:
            try:
                got.append(await ws.get_message())
            except trio_websocket.ConnectionClosed as closed:
                assert closed.reason is not None
                return got, closed.reason.code, closed.reason.reason or ""


async def read_n(ws: WS, n: int, timeout: float = 10) -> list[str | bytes]:
    with trio.fail_after(timeout):
        return [await ws.get_message() for _ in range(n)]


async def upstream_closed(conn: FakeConnection) -> int | None:
    with trio.fail_after(10):
        await conn.closed.wait()
    return conn.close_code


def prefix_before_oversize(messages: Sequence[Msg]) -> tuple[list[Msg], bool]:
    out: list[Msg] = []
    for m in messages:
        if m.oversize:
            return out, True
        out.append(m)
    return out, False


# -- properties ---------------------------------------------------------------------------


async def _client_sends(env: Env, messages: list[Msg]) -> None:
    s = await env.session()
    base = len(s.conn.received)
    before, oversize = prefix_before_oversize(messages)
    expected = [m.build() for m in before]
    for m in messages:
        # Past an oversized message the client keeps sending, as a real one may:
        # nothing after it may reach upstream.
        with contextlib.suppress(trio_websocket.ConnectionClosed):
            await s.ws.send_message(m.build())
    if not oversize:
        assert_same(await read_n(s.ws, len(expected)), expected, "echoes")
        assert_same(s.conn.received[base:], expected, "upstream received")
        return
    got, code, _ = await close_of(s.ws)
    assert code == 1009, ("client close code", code)
    # The close may overtake echoes still on their way back; never reorder them.
    assert_same(got, expected[: len(got)], "echoes before the close")
    # Hang up once the close is in, as a browser does (the relay waits up to 2 s for
    # that before it closes the upstream).
    await env.end_current()
    assert s.conn.close_code == 1000, ("upstream close code", s.conn.close_code)
    assert_same(s.conn.received[base:], expected, "upstream received")


@settings(FUZZ, max_examples=400)
@given(messages=st.lists(msgs(), min_size=1, max_size=5))
def test_client_messages_around_the_limit(env: Env, messages: list[Msg]) -> None:
    env.ensure()
    env.count("client_to_upstream", len(messages))
    env.portal.run(_client_sends, env, messages)


async def _upstream_sends(env: Env, messages: list[Msg]) -> None:
    s = await env.session()
    before, oversize = prefix_before_oversize(messages)
    expected = [m.build() for m in before]
    for m in messages:
        await s.conn.send_raw(m.build())
        if m.oversize:
            break
    if not oversize:
        assert_same(await read_n(s.ws, len(expected)), expected, "client received")
        return
    got, code, _ = await close_of(s.ws)
    # Every message within the limit, in order, then the close.
    assert_same(got, expected, "client received before the close")
    assert code == 1009, ("client close code", code)
    await env.end_current()
    assert s.conn.close_code == 1000, ("upstream close code", s.conn.close_code)


@settings(FUZZ, max_examples=400)
@given(messages=st.lists(msgs(), min_size=1, max_size=5))
def test_upstream_messages_around_the_limit(env: Env, messages: list[Msg]) -> None:
    env.ensure()
    env.count("upstream_to_client", len(messages))
    env.portal.run(_upstream_sends, env, messages)


@dataclass(frozen=True)
class Ending:
    side: str  # "none" | "client" | "upstream"
    code: int = 1000
    reason: str = ""


# Codes a peer may send (RFC 6455 §7.4): the registered ones, and the private ranges.
SENDABLE = [1000, 1001, 1002, 1003, 1007, 1008, 1009, 1010, 1011, 1012, 1013, 1014,
            3000, 3999, 4000, 4999]  # fmt: skip
# The test client (wsproto) refuses 1014, which IANA registered after it was written;
# test_upstream_close_codes reads close frames off a raw socket and covers it.
CLIENT_READABLE = [c for c in SENDABLE if c != 1014]
endings = st.one_of(
    st.just(Ending("none")),
    st.builds(
        Ending,
        st.just("client"),
        st.sampled_from([1000, 1001, 3000, 4000, 4999]),
        st.text(max_size=20),
    ),
    st.builds(Ending, st.just("upstream"), st.sampled_from(CLIENT_READABLE), st.text(max_size=30)),
)


async def _both_ways(env: Env, up: list[Msg], down: list[Msg], ending: Ending) -> None:
    s = await env.session()
    base = len(s.conn.received)
    a, b = [m.build() for m in up], [m.build() for m in down]

    async def client_side() -> None:
        for m in a:
            await s.ws.send_message(m)

    async def upstream_side() -> None:
        for m in b:
            await s.conn.send_raw(m)

    async with trio.open_nursery() as nursery:
        nursery.start_soon(client_side)
        nursery.start_soon(upstream_side)
        got = await read_n(s.ws, len(a) + len(b))
    # Each direction keeps its order; how the two interleave is up to the network.
    assert is_interleaving(got, a, b), (
        [_describe(g) for g in got],
        [_describe(m) for m in a],
        [_describe(m) for m in b],
    )
    assert_same(s.conn.received[base:], a, "upstream received")
    if ending.side == "client":
        await s.ws.aclose(ending.code, ending.reason)
        await env.end_current()
        assert s.conn.close_code == 1000, ("upstream close code", s.conn.close_code)
    elif ending.side == "upstream":
        await s.conn.close(ending.code, ending.reason)
        _, code, reason = await close_of(s.ws)
        assert (code, reason) == (ending.code, ending.reason), (code, reason)
        await env.end_current()


@settings(FUZZ, max_examples=300)
@given(
    up=st.lists(within, max_size=6),
    down=st.lists(within, max_size=6),
    ending=endings,
)
def test_both_ways_at_once(env: Env, up: list[Msg], down: list[Msg], ending: Ending) -> None:
    env.ensure()
    env.count("both_ways", len(up) + len(down) + (ending.side != "none"))
    env.portal.run(_both_ways, env, up, down, ending)


# -- garbage on a raw socket ------------------------------------------------------------------


@dataclass(frozen=True)
class Garbage:
    """One frame of whatever shape (or ``raw`` bytes instead of a frame)."""

    opcode: int = 1
    payload: bytes = b""
    fin: bool = True
    rsv: int = 0
    masked: bool = True
    length: int | None = None  # a lie about the payload's length
    raw: bytes | None = None

    def encode(self) -> bytes:
        if self.raw is not None:
            return self.raw
        return ws_frame(
            self.opcode,
            self.payload,
            fin=self.fin,
            rsv=self.rsv,
            mask=None if self.masked else b"",
            length=self.length,
        )


garbage = st.one_of(
    st.builds(
        Garbage,
        st.integers(0, 15),
        st.binary(max_size=200),
        st.booleans(),
        st.integers(0, 7),
        st.booleans(),
        st.none() | st.integers(0, 2**16 + 10),
    ),
    st.builds(Garbage, raw=st.binary(min_size=1, max_size=64)),
    # Well framed, wrong content: bad UTF-8, bad close payloads, long control frames.
    st.sampled_from(
        [
            Garbage(1, b"\xff\xfe"),
            Garbage(1, "\u20ac".encode()[:2]),
            Garbage(8, b"\x03"),
            Garbage(8, b"\x03\xe7"),  # 999
            Garbage(8, b"\x03\xed"),  # 1005
            Garbage(8, b"\x13\x88"),  # 5000
            Garbage(8, b"\x03\xe8\xff"),  # 1000 with a reason that is not UTF-8
            Garbage(9, b"p" * 126),
            Garbage(9, b"p", fin=False),
            Garbage(0, b"continuation"),
            Garbage(1, b"x", fin=False),
            Garbage(2, b"x" * 10, length=2**63 - 1),
        ]
    ),
)


def _handshake(d: Daemon) -> tuple[socket.socket, bytes]:
    """A client upgrade by hand; the socket after a 101, and what followed it."""
    key = ws_key()
    target = client_url(d).removeprefix(d.ws_url)
    request = (
        f"GET {target} HTTP/1.1\r\nHost: 127.0.0.1:{d.port}\r\nUpgrade: websocket\r\n"
        f"Connection: Upgrade\r\nSec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n"
        f"Origin: {LOCAL_ORIGIN}\r\n\r\n"
    ).encode()
    sock = socket.create_connection(("127.0.0.1", d.port), timeout=10)
    sock.sendall(request)
    r = read_response(sock, head_only=True)
    assert r is not None and r.status == 101, r
    assert r.header("sec-websocket-accept") == ws_accept(key)
    return sock, r.body


def _send_garbage(sock: socket.socket, frames: list[Garbage]) -> bytes:
    """Send the frames, half-close, and read what the relay sends until it hangs up."""
    with contextlib.suppress(OSError):  # the relay may hang up part way
        sock.sendall(b"".join(f.encode() for f in frames))
        sock.shutdown(socket.SHUT_WR)
    data = b""
    deadline = time.monotonic() + 10
    with contextlib.suppress(ConnectionResetError):
        while chunk := sock.recv(65536):
            data += chunk
            assert time.monotonic() < deadline, "the relay never hung up"
    return data


@settings(FUZZ, max_examples=300)
@given(frames=st.lists(garbage, min_size=1, max_size=4))
def test_garbage_frames_cost_only_their_session(env: Env, frames: list[Garbage]) -> None:
    env.ensure()
    env.count("garbage", len(frames))
    index = len(env.fake.connections)
    sock, early = _handshake(env.daemon)
    with sock:
        conn = env.portal.run(env.fake.wait_connection, index)
        data = _send_garbage(sock, frames)
    for frame in read_frames(early + data):
        if frame.opcode == 0x8 and frame.close_code is not None:
            # A close the relay chose: a code a server may send (RFC 6455 §7.4.1).
            assert 1000 <= frame.close_code <= 4999, frame.close_code
            assert frame.close_code not in (1004, 1005, 1006, 1015), frame.close_code
    assert env.portal.run(upstream_closed, conn) == 1000, "upstream close code"
    env.keeper.check_alive("these frames")
    assert env.canary is not None
    env.portal.run(echo_probe, env.canary.ws)


def _read_close(sock: socket.socket, data: bytes) -> tuple[int | None, bytes]:
    """Frames off a raw client socket (``data`` already read) until the relay's close;
    answer it. Its code and reason bytes."""
    with contextlib.suppress(ConnectionResetError):
        while True:
            frames = read_frames(data)
            close = next((f for f in frames if f.opcode == 0x8), None)
            if close is not None:
                with contextlib.suppress(OSError):
                    sock.sendall(ws_frame(0x8, close.payload[:2]))
                return close.close_code, close.payload[2:]
            chunk = sock.recv(65536)
            if not chunk:
                break
            data += chunk
    raise AssertionError(f"the relay hung up without a close frame: {data[:200]!r}")


async def _spawn(env: Env, afn: Callable[..., Awaitable[Any]], *args: Any) -> None:
    env.portal.nursery.start_soon(afn, *args)


# Valid on the wire and passed through as they are (docs/contract.md §5); the rest become 1011.
_PASSED = frozenset(SENDABLE) | frozenset(range(3000, 5000))


@settings(FUZZ, max_examples=150)
@given(
    # 1005/1006/1015 cannot be in a close frame (the fake's wsproto would send 1000 for
    # them); a close with no code at all (None) is what the relay receives as 1005.
    code=st.sampled_from([*SENDABLE, 1004, 1016, 2999, 999, 5000, 65535, None])
    | st.integers(3000, 4999),
    reason=st.text(max_size=30),
)
def test_upstream_close_codes(env: Env, code: int | None, reason: str) -> None:
    """docs/contract.md §5: upstream closes with code c, reason r → the client gets c, r; codes that
    cannot be sent (1005/1006/1015, and those invalid on the wire) become 1011."""
    env.ensure()
    env.count("close_codes", 1)
    index = len(env.fake.connections)
    sock, early = _handshake(env.daemon)
    with sock:
        conn = env.portal.run(env.fake.wait_connection, index)
        # None: a close frame with no code at all (received as 1005). In the background:
        # the fake waits for the relay's answer, which may wait for this client's.
        env.portal.run(_spawn, env, conn.close, code, reason if code is not None else "")
        got_code, got_reason = _read_close(sock, early)
    if code in _PASSED:
        assert (got_code, got_reason.decode()) == (code, reason), (got_code, got_reason)
    else:
        assert got_code == 1011, got_code
    env.portal.run(upstream_closed, conn)
