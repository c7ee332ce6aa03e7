"""Faults (issue "Reliability", part 2), end to end.

`relay serve` runs as a subprocess; the fake Realtime server, the fake Twilio
REST + chat server, the simulated Twilio caller and the browser clients are
real sockets on 127.0.0.1 in the test's own Trio loop. Each test breaks one
peer the way hosts and networks break — a TCP reset with no close frame, a
peer that stops reading, one that goes silent and answers no ping, a browser
that stops reading, an HTTP API that fails, rate-limits, hangs or trickles —
and checks three things:

- the broken session (or job) ends within a bound, with the close the
  contract names (docs/contract.md §5 table; ``limits.stall_seconds`` for stalls);
- two healthy sessions on the same daemon, a Twilio call and a browser
  client, keep relaying both ways during the fault and after it;
- afterwards the daemon's open fds and Trio tasks are back to their baseline
  and its log holds no traceback (:class:`relay.testing.fuzz.Watch`).
"""

from __future__ import annotations

import base64
import os
import re
import socket
import struct
from collections.abc import AsyncIterator, Callable, Mapping
from contextlib import AsyncExitStack, asynccontextmanager, suppress
from dataclasses import dataclass
from functools import partial
from typing import Any

import httpx
import orjson
import pytest
import trio
import trio_websocket
from twilio.request_validator import RequestValidator

from relay.admission.tokens import mint
from relay.config import decode_encryption_key
from relay.conversations.twilio_rest import TwilioRest, TwilioTransportError, ensure_participant
from relay.daemon.outbound import REST_TIMEOUT
from relay.testing.daemon import (
    TEST_OPENAI_KEY,
    TEST_TWILIO_SID,
    TEST_TWILIO_TOKEN,
    Daemon,
    running_daemon,
)
from relay.testing.fake_realtime import (
    TCP_CLOSE,
    TCP_ESTABLISHED,
    FakeConnection,
    FakeRealtime,
    fake_realtime,
)
from relay.testing.fake_twilio import FakeConversation, FakeFault, FakeTwilio, fake_twilio
from relay.testing.fuzz import Watch
from relay.testing.metrics import sample_value
from relay.testing.twilio_caller import FRAME_BYTES, TwilioCall, twilio_call

# The dead-peer timeout under test. `limits.stall_seconds` is set here and only
# here: relay/config.py refuses unknown keys, so a daemon without the key fails
# every test of this file at start-up with a message that names it.
STALL_SECONDS = 2.0
STALL_LIMITS: dict[str, Any] = {"stall_seconds": STALL_SECONDS}

# Bounds, in seconds from the moment the fault starts.
PROMPT = 5.0  # a peer plainly gone (TCP reset): the other side hears of it by then
# Data waiting and no byte taken for stall_seconds; the margin covers filling
# the kernel buffers first and the relay's check interval.
STALL_BOUND = STALL_SECONDS + 3.0
# Silent for stall_seconds, then a ping with no pong for stall_seconds.
SILENCE_BOUND = 2 * STALL_SECONDS + 3.0
HEALTHY_TIMEOUT = 5.0  # a healthy session answers a probe within this
# A stalled browser may cost the relay a few messages' worth of memory (64 KiB
# each here), not what the upstream offers: a relay that kept reading the
# upstream would queue ~35 MiB over the stall (this fake pushes ~17 MiB/s
# through the relay to a browser that does read).
RSS_BOUND_KIB = 16 * 1024

PUBLIC = "https://relay.example.com"
STREAM_URL = "wss://relay.example.com/twilio/media"
ORIGIN = "http://localhost:5173"
COMMIT = '{"type":"input_audio_buffer.commit"}'
COMMITTED = "input_audio_buffer.committed"
UPSTREAM_STALLED = (1011, "upstream stalled")


def relay_config(fake: FakeRealtime, **sections: Mapping[str, Any]) -> dict[str, dict[str, Any]]:
    base: dict[str, dict[str, Any]] = {
        "openai": {"realtime_url": fake.url, "dialect": fake.dialect.name},
        "server": {"public_url": PUBLIC},
        "limits": dict(STALL_LIMITS),
    }
    for section, values in sections.items():
        base.setdefault(section, {}).update(values)
    return base


async def until(predicate: Callable[[], bool], timeout: float = 10, what: str = "") -> None:
    with trio.move_on_after(timeout):
        while not predicate():
            await trio.sleep(0.01)
        return
    raise AssertionError(f"not within {timeout:g} s: {what or predicate}")


class Stamps:
    """When each watched event fired, so a test can check a bound while doing
    other things (probing the healthy sessions) during the fault."""

    def __init__(self, nursery: trio.Nursery) -> None:
        self._nursery = nursery
        self.at: dict[str, float] = {}

    def watch(self, name: str, event: trio.Event) -> None:
        async def stamp() -> None:
            await event.wait()
            self.at[name] = trio.current_time()

        self._nursery.start_soon(stamp)

    async def seconds(self, name: str, t0: float, bound: float) -> float:
        """Seconds from ``t0`` to the event; fails if it has not fired by ``t0 + bound``."""
        with trio.move_on_at(t0 + bound):
            while name not in self.at:
                await trio.sleep(0.01)
        assert name in self.at, f"{name}: not within {bound:g} s of the fault"
        return self.at[name] - t0


# --- sessions ------------------------------------------------------------------------


class Browser:
    """A browser page on the client relay that reads all the relay sends, as a
    live page does, and notes how the relay closed it."""

    def __init__(self, ws: trio_websocket.WebSocketConnection) -> None:
        self.ws = ws
        self.received: list[str | bytes] = []
        self.close: tuple[int, str] | None = None
        self.closed = trio.Event()

    def got(self, event_type: str, since: int = 0) -> bool:
        return any(
            isinstance(m, str) and f'"type":"{event_type}"' in m for m in self.received[since:]
        )

    async def _read(self) -> None:
        try:
            while True:
                self.received.append(await self.ws.get_message())
        except trio_websocket.ConnectionClosed as exc:
            reason = exc.reason
            self.close = (int(reason.code), reason.reason or "") if reason else (1006, "")
            self.closed.set()


@asynccontextmanager
async def browser(d: Daemon) -> AsyncIterator[Browser]:
    async with (
        trio_websocket.open_websocket_url(
            f"{d.ws_url}/token/{token(d)}/realtime",
            extra_headers=[(b"Origin", ORIGIN.encode())],
            max_message_size=64 * 2**20,
        ) as ws,
        trio.open_nursery() as nursery,
    ):
        page = Browser(ws)
        nursery.start_soon(page._read)
        yield page
        nursery.cancel_scope.cancel()


def token(d: Daemon) -> str:
    return mint(decode_encryption_key(d.env["ENCRYPTION_KEY"]), 60)


@asynccontextmanager
async def twilio(d: Daemon, **kw: Any) -> AsyncIterator[TwilioCall]:
    async with twilio_call(
        f"{d.ws_url}/twilio/media",
        public_url=STREAM_URL,
        auth_token=TEST_TWILIO_TOKEN,
        custom_parameters={"direction": "inbound"},
        **kw,
    ) as call:
        yield call


# Sessions open one at a time, each waiting for its upstream, so that the
# fake's connections pair up with them in order.


async def open_call(
    stack: AsyncExitStack, d: Daemon, fake: FakeRealtime, **kw: Any
) -> tuple[TwilioCall, FakeConnection]:
    """A call that has started and heard the whole greeting."""
    n = len(fake.connections)
    call = await stack.enter_async_context(twilio(d, **kw))
    await call.start()
    with trio.fail_after(10):
        up = await fake.wait_connection(n)
    await until(lambda: len(call.received_media) >= fake.response_chunks, what="the greeting")
    await until(lambda: not up.responding, what="the greeting's end")
    return call, up


async def open_browser(
    stack: AsyncExitStack, d: Daemon, fake: FakeRealtime
) -> tuple[Browser, FakeConnection]:
    n = len(fake.connections)
    page = await stack.enter_async_context(browser(d))
    with trio.fail_after(10):
        up = await fake.wait_connection(n)
    await until(lambda: page.got("session.created"), what="session.created")
    return page, up


@dataclass
class Healthy:
    """A Twilio call and a browser client that must keep relaying both ways
    whatever happens to the faulted sessions beside them."""

    call: TwilioCall
    call_up: FakeConnection
    page: Browser
    page_up: FakeConnection

    async def check(self, when: str) -> None:
        """Probe both directions of both sessions now."""
        try:
            with trio.fail_after(HEALTHY_TIMEOUT):
                # Caller audio keeps reaching the upstream, byte for byte.
                sent = len(self.call_up.input_audio)
                while len(self.call_up.input_audio) < sent + 5 * FRAME_BYTES:
                    await trio.sleep(0.01)
                # A fresh answer reaches the caller.
                while self.call_up.responding:
                    await trio.sleep(0.01)
                heard = len(self.call.received_media)
                self.call_up.respond(chunks=3)
                while len(self.call.received_media) < heard + 3:
                    await trio.sleep(0.01)
                # The page's message reaches the upstream, and the answer the page.
                seen, events = len(self.page.received), len(self.page_up.events)
                await self.page.ws.send_message(COMMIT)
                while not self.page.got(COMMITTED, seen):
                    await trio.sleep(0.01)
                assert any(
                    e["type"] == "input_audio_buffer.commit" for e in self.page_up.events[events:]
                )
        except trio.TooSlowError:
            raise AssertionError(f"a healthy session stopped relaying {when}") from None
        assert not self.call.closed.is_set(), f"the healthy call was closed {when}"
        assert not self.page.closed.is_set(), f"the healthy page was closed ({self.page.close})"

    def assert_clean(self) -> None:
        assert self.call.protocol_errors == []
        assert self.call_up.errors == [] and self.page_up.errors == []
        assert bytes(self.call_up.input_audio) == bytes(self.call.sent_audio)


@asynccontextmanager
async def healthy_sessions(d: Daemon, fake: FakeRealtime) -> AsyncIterator[Healthy]:
    async with AsyncExitStack() as stack:
        call, call_up = await open_call(stack, d, fake)
        page, page_up = await open_browser(stack, d, fake)
        ok = Healthy(call, call_up, page, page_up)
        await ok.check("before the fault")
        yield ok
        await ok.check("after the fault")
        # Hang up as Twilio does, so that every caller frame sent has had its
        # chance to arrive upstream before the audio is compared.
        await call.stop()
        await until(lambda: call.closed.is_set() and call_up.closed.is_set(), what="hang-up")
        ok.assert_clean()


@asynccontextmanager
async def scene(
    d: Daemon, fake: FakeRealtime
) -> AsyncIterator[tuple[Healthy, trio.Nursery, AsyncExitStack]]:
    """The healthy sessions; a nursery for the test's background tasks; a stack
    for the faulted sessions, closed before the nursery's tasks are cancelled
    (and all of them before the healthy sessions' last check)."""
    async with healthy_sessions(d, fake) as ok, trio.open_nursery() as nursery:
        async with AsyncExitStack() as stack:
            yield ok, nursery, stack
        nursery.cancel_scope.cancel()


async def baseline(d: Daemon) -> Watch:
    watch = Watch(d)
    await trio.to_thread.run_sync(watch.baseline)
    return watch


async def back_to_baseline(watch: Watch, label: str) -> None:
    """Every session is over: fds and Trio tasks as before, no traceback logged."""
    await trio.to_thread.run_sync(watch.check, label)
    print(f"\n{watch.history[-1]}")


class RawClient:
    """A browser client on a bare socket: after the handshake the test decides
    exactly what is read (nothing, for a stalled client) and how it leaves (a
    TCP reset, for a crashed one)."""

    def __init__(self, sock: trio.socket.SocketType) -> None:
        self.sock = sock

    @classmethod
    async def connect(cls, d: Daemon, *, rcvbuf: int | None = None) -> RawClient:
        sock = trio.socket.socket()
        if rcvbuf is not None:
            # Before connecting, so the advertised window is small from the start
            # and the relay's sends back up after a few KiB, not megabytes.
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
        await sock.connect(("127.0.0.1", d.port))
        key = base64.b64encode(os.urandom(16)).decode()
        request = (
            f"GET /token/{token(d)}/realtime HTTP/1.1\r\nHost: 127.0.0.1:{d.port}\r\n"
            f"Upgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Key: {key}\r\n"
            f"Sec-WebSocket-Version: 13\r\nOrigin: {ORIGIN}\r\n\r\n"
        )
        client = cls(sock)
        await client._send_all(request.encode())
        head = b""
        with trio.fail_after(10):
            while not head.endswith(b"\r\n\r\n"):
                byte = await sock.recv(1)  # one at a time: no frame is read by accident
                assert byte, f"closed during the handshake: {head!r}"
                head += byte
        assert head.startswith(b"HTTP/1.1 101"), head
        return client

    async def send_text(self, text: str) -> None:
        """One masked text frame, as every client frame must be."""
        payload, mask = text.encode(), os.urandom(4)
        n = len(payload)
        head = bytes([0x81]) + (
            bytes([0x80 | n])
            if n < 126
            else bytes([0x80 | 126]) + struct.pack("!H", n)
            if n < 65536
            else bytes([0x80 | 127]) + struct.pack("!Q", n)
        )
        masked = bytes(b ^ mask[i % 4] for i, b in enumerate(payload))
        await self._send_all(head + mask + masked)

    def tcp_state(self) -> int:
        """The kernel's TCP state, read without reading any data."""
        return self.sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, 8)[0]

    def reset(self) -> None:
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        self.sock.close()

    async def _send_all(self, data: bytes) -> None:
        view = memoryview(data)
        while view:
            view = view[await self.sock.send(view) :]


@asynccontextmanager
async def raw_client(d: Daemon, *, rcvbuf: int | None = None) -> AsyncIterator[RawClient]:
    client = await RawClient.connect(d, rcvbuf=rcvbuf)
    try:
        yield client
    finally:
        client.sock.close()


# --- (a) upstream reset --------------------------------------------------------------


async def test_upstream_reset_mid_session_closes_call_and_client_promptly() -> None:
    """The upstream host drops mid-session with a TCP reset and no close frame:
    the browser gets 1011 (docs/contract.md §5, "upstream fails without a close") and the
    Twilio stream is closed, both within PROMPT seconds."""
    async with fake_realtime() as fake, running_daemon(relay_config(fake)) as d:
        watch = await baseline(d)
        async with scene(d, fake) as (ok, nursery, stack):
            call, call_up = await open_call(stack, d, fake)
            page, page_up = await open_browser(stack, d, fake)
            stamps = Stamps(nursery)
            stamps.watch("call", call.closed)
            stamps.watch("page", page.closed)
            # Mid-call: the caller's audio is flowing, the page has a message in flight.
            await until(lambda: len(call_up.input_audio) >= 10 * FRAME_BYTES)
            await page.ws.send_message(COMMIT)
            t0 = trio.current_time()
            call_up.abort(reset=True)
            page_up.abort(reset=True)
            await ok.check("while two upstreams were reset")
            call_s = await stamps.seconds("call", t0, PROMPT)
            page_s = await stamps.seconds("page", t0, PROMPT)
            print(
                f"\nupstream reset: call closed {call.close_code} after {call_s:.2f} s, "
                f"page closed {page.close} after {page_s:.2f} s"
            )
            assert page.close is not None and page.close[0] == 1011
            assert call.close_code in (1000, 1011), "not a WebSocket close"
        await back_to_baseline(watch, "upstream reset")


# --- (b) upstream stalls -------------------------------------------------------------


async def flood_call(call: TwilioCall) -> None:
    """Caller audio as fast as the relay takes it, 2 s of μ-law per message, so
    the relay's sends to a non-reading upstream back up in a fraction of a second."""
    with suppress(trio_websocket.ConnectionClosed):
        while True:
            await call.send_media(b"\xff" * 16000)


async def flood_page(page: Browser) -> None:
    """~1 MiB appends from the page as fast as the relay takes them."""
    audio = base64.b64encode(b"\xff" * (768 * 1024)).decode()
    message = orjson.dumps({"type": "input_audio_buffer.append", "audio": audio}).decode()
    with suppress(trio_websocket.ConnectionClosed):
        while True:
            await page.ws.send_message(message)


async def chatter(conn: FakeConnection) -> None:
    """The upstream keeps talking, so it is never silent: only the "takes no
    bytes" rule can find it dead, not the ping."""
    with suppress(trio_websocket.ConnectionClosed):
        while True:
            await conn.send_event({"type": "rate_limits.updated", "rate_limits": []})
            await trio.sleep(0.05)


async def test_upstream_that_stops_reading_is_dead_after_stall_seconds() -> None:
    """An upstream that takes no more bytes while the relay has data for it (and
    keeps sending) is dead after stall_seconds: browser and Twilio get 1011
    "upstream stalled", and the relay aborts the upstream TCP connection."""
    async with fake_realtime() as fake, running_daemon(relay_config(fake)) as d:
        watch = await baseline(d)
        async with scene(d, fake) as (ok, nursery, stack):
            call, call_up = await open_call(stack, d, fake, send_audio=False)
            page, page_up = await open_browser(stack, d, fake)
            stamps = Stamps(nursery)
            stamps.watch("call", call.closed)
            stamps.watch("page", page.closed)
            call_up.stop_reading()
            page_up.stop_reading()
            t0 = trio.current_time()
            call_up.respond(chunks=100_000, chunk_interval=0.05)  # audio to the caller
            nursery.start_soon(chatter, page_up)
            nursery.start_soon(flood_call, call)
            nursery.start_soon(flood_page, page)
            await ok.check("while two upstreams took no bytes")
            await both_stalled("upstream stopped reading", stamps, t0, STALL_BOUND, call, page)
            await upstreams_reset(call_up, page_up)
        await back_to_baseline(watch, "upstream stopped reading")


async def both_stalled(
    label: str, stamps: Stamps, t0: float, bound: float, call: TwilioCall, page: Browser
) -> None:
    """The call and the page both ended with 1011 "upstream stalled" within ``bound``."""
    call_s = await stamps.seconds("call", t0, bound)
    page_s = await stamps.seconds("page", t0, bound)
    print(
        f"\n{label}: call closed {call.close_code} "
        f"{call.close_reason!r} after {call_s:.2f} s, page closed {page.close} "
        f"after {page_s:.2f} s (stall_seconds {STALL_SECONDS:g})"
    )
    assert (call.close_code, call.close_reason) == UPSTREAM_STALLED
    assert page.close == UPSTREAM_STALLED


async def upstreams_reset(*ups: FakeConnection) -> None:
    """Aborted: a reset reached each fake (a polite close could not: a stalled peer
    reads nothing)."""
    for n, up in enumerate(ups):
        await until(partial(is_reset, up), 2, f"upstream {n} reset")


def is_reset(up: FakeConnection) -> bool:
    return up.tcp_state() == TCP_CLOSE


async def page_keeps_talking(page: Browser) -> None:
    with suppress(trio_websocket.ConnectionClosed):
        while True:
            await page.ws.send_message(COMMIT)
            await trio.sleep(0.2)


async def test_silent_upstream_that_answers_no_ping_is_dead() -> None:
    """An upstream that sends nothing at all, not even a pong, is dead once it
    has been silent for stall_seconds and then left a ping unanswered for
    stall_seconds: 1011 "upstream stalled" to browser and Twilio, upstream TCP
    aborted. The healthy sessions' upstreams are just as silent between probes
    but answer pings, and must live on."""
    async with fake_realtime() as fake, running_daemon(relay_config(fake)) as d:
        watch = await baseline(d)
        async with scene(d, fake) as (ok, nursery, stack):
            call, call_up = await open_call(stack, d, fake)  # caller audio keeps flowing
            page, page_up = await open_browser(stack, d, fake)
            stamps = Stamps(nursery)
            stamps.watch("call", call.closed)
            stamps.watch("page", page.closed)
            call_up.stop_writing()
            page_up.stop_writing()
            t0 = trio.current_time()
            nursery.start_soon(page_keeps_talking, page)
            await ok.check("while two upstreams were silent")
            await both_stalled("upstream silent, no pong", stamps, t0, SILENCE_BOUND, call, page)
            await upstreams_reset(call_up, page_up)
            await ok.check("after two upstreams were found dead")
        await back_to_baseline(watch, "upstream silent")


# --- (c) Twilio or browser reset -----------------------------------------------------


async def test_twilio_and_client_reset_close_upstream_with_1000_promptly() -> None:
    """Twilio (and a browser) drop mid-call with a TCP reset and no close frame:
    the relay closes their upstreams with 1000 within PROMPT seconds."""
    async with fake_realtime() as fake, running_daemon(relay_config(fake)) as d:
        watch = await baseline(d)
        async with scene(d, fake) as (ok, nursery, stack):
            call, call_up = await open_call(stack, d, fake)
            n = len(fake.connections)
            raw = await stack.enter_async_context(raw_client(d))
            with trio.fail_after(10):
                raw_up = await fake.wait_connection(n)
            await raw.send_text(COMMIT)
            await raw_up.wait_for("input_audio_buffer.commit")
            await until(lambda: len(call_up.input_audio) >= 10 * FRAME_BYTES)  # mid-call
            stamps = Stamps(nursery)
            stamps.watch("call upstream", call_up.closed)
            stamps.watch("page upstream", raw_up.closed)
            t0 = trio.current_time()
            call.abort(reset=True)
            raw.reset()
            await ok.check("while a caller and a page had just reset")
            call_s = await stamps.seconds("call upstream", t0, PROMPT)
            page_s = await stamps.seconds("page upstream", t0, PROMPT)
            print(
                f"\ndownstream reset: call upstream closed {call_up.close_code} after "
                f"{call_s:.2f} s, page upstream closed {raw_up.close_code} after {page_s:.2f} s"
            )
            assert call_up.close_code == 1000
            assert raw_up.close_code == 1000
        await back_to_baseline(watch, "downstream reset")


# --- (d) a browser that stops reading ------------------------------------------------


async def test_stalled_client_costs_bounded_memory_and_is_aborted() -> None:
    """A browser that reads nothing while the upstream streams audio to it as
    fast as it can: the relay's memory stays bounded (it must stop reading the
    upstream, not queue), and within stall_seconds + a margin it aborts the
    browser's connection (a polite close cannot reach a peer that reads
    nothing) and closes the upstream with 1000."""
    async with fake_realtime() as fake, running_daemon(relay_config(fake)) as d:
        watch = await baseline(d)
        async with scene(d, fake) as (ok, nursery, stack):
            n = len(fake.connections)
            raw = await stack.enter_async_context(raw_client(d, rcvbuf=4096))
            with trio.fail_after(10):
                up = await fake.wait_connection(n)
            stamps = Stamps(nursery)
            stamps.watch("upstream", up.closed)
            rss_before = peak = d.rss_kib()
            t0 = trio.current_time()
            # 2048 chunks of 48 KiB (64 KiB in base64): up to 96 MiB, no pause.
            item = up.respond(chunks=2048, chunk_bytes=48 * 1024, chunk_interval=0)

            async def sample_rss() -> None:
                nonlocal peak
                while True:
                    peak = max(peak, d.rss_kib())
                    await trio.sleep(0.02)

            nursery.start_soon(sample_rss)
            await ok.check("while a client stalled")
            await until(
                lambda: raw.tcp_state() != TCP_ESTABLISHED,
                t0 + STALL_BOUND - trio.current_time(),
                "the stalled client's connection to end",
            )
            aborted_s = trio.current_time() - t0
            state = raw.tcp_state()
            up_s = await stamps.seconds("upstream", t0, STALL_BOUND + 3)
            offered = up.item_audio[item]
            grew = peak - rss_before
            print(
                f"\nstalled client: RSS grew {grew} KiB (peak {peak} KiB) while "
                f"{offered / 2**20:.1f} MiB of audio ({offered * 4 / 3 / 2**20:.1f} MiB base64) "
                f"were offered; connection ended after {aborted_s:.2f} s (TCP state {state}), "
                f"upstream closed {up.close_code} after {up_s:.2f} s"
            )
            assert state == TCP_CLOSE, "the relay did not abort (reset) the stalled client"
            # Caught by the send path (stall_seconds without room in the kernel), not
            # only by the ping path at 2 x stall_seconds: window probes let the kernel
            # take a byte now and then, which once counted as progress.
            assert aborted_s < 2 * STALL_SECONDS, f"aborted after {aborted_s:.2f} s"
            assert up.close_code == 1000
            assert grew < RSS_BOUND_KIB, f"RSS grew {grew} KiB for one stalled client"
        await back_to_baseline(watch, "stalled client")


# --- (e) webhook jobs against failing HTTP APIs --------------------------------------

ALICE = "+14155550100"
BOT = "gateframes-bot"
CHAT_CONNECT = 2.0  # openai.connect_timeout_seconds: the SMS chat deadline is 3x this
# Every job ends within this of its webhook: a REST call never outlives
# REST_TIMEOUT, the chat deadline (6 s here) is shorter, plus scheduling slack.
JOB_BOUND = REST_TIMEOUT + 4.0
FAILED_LINE = re.compile(r"conversation job failed at (\w+): .* conversation=(CH[0-9a-f]+)")


def webhook_form(
    convo: FakeConversation, message_sid: str, index: int, body: str
) -> dict[str, str]:
    return {
        "EventType": "onMessageAdded",
        "ConversationSid": convo.sid,
        "MessageSid": message_sid,
        "Index": str(index),
        "Author": ALICE,
        "Body": body,
        "AccountSid": TEST_TWILIO_SID,
        "Source": "SMS",
    }


async def say(http: httpx.AsyncClient, tw: FakeTwilio, convo: FakeConversation, body: str) -> float:
    """Alice sends ``body``: it lands in the conversation, then the signed
    webhook goes out. Returns how long the webhook took to answer."""
    message = tw.add_message(convo.sid, ALICE, body)
    form = webhook_form(convo, message.sid, message.index, body)
    url = PUBLIC + "/twilio/convo"
    signature = RequestValidator(TEST_TWILIO_TOKEN).compute_signature(url, form)
    t0 = trio.current_time()
    response = await http.post(
        "/twilio/convo", data=form, headers={"X-Twilio-Signature": signature}
    )
    took = trio.current_time() - t0
    assert (response.status_code, response.text.strip()) == (200, "ok")
    return took


def bot_posts(convo: FakeConversation) -> list[str]:
    return [m.body or "" for m in convo.messages if m.author == BOT]


async def test_webhook_jobs_end_whatever_twilio_and_openai_do() -> None:
    """Each webhook answers 200 within 1 s and its background job ends within
    JOB_BOUND, logged and counted as failed, when Twilio REST answers 500, or
    429 with Retry-After, or never answers, or trickles its answer forever
    (the regression: it used to hold the job for good), or when the chat
    endpoint hangs; a job on a healthy conversation beside them is done."""
    async with (
        fake_realtime() as fake,
        fake_twilio(
            account_sid=TEST_TWILIO_SID, auth_token=TEST_TWILIO_TOKEN, openai_key=TEST_OPENAI_KEY
        ) as tw,
    ):
        config = relay_config(
            fake,
            twilio={"api_base": tw.base_url, "bot_identity": BOT},
            openai={"api_base": tw.openai_base, "connect_timeout_seconds": CHAT_CONNECT},
        )
        async with (
            running_daemon(config) as d,
            httpx.AsyncClient(base_url=d.http_url, timeout=10) as http,
        ):
            # A first job opens the relay's HTTP connection pools, which then stay
            # (keep-alive): the baseline is taken with them open.
            warm = tw.add_conversation(participants=[ALICE])
            await say(http, tw, warm, "hi")
            await until(lambda: bool(bot_posts(warm)), 10, "the warm-up reply")
            watch = await baseline(d)
            before = (await http.get("/metrics")).text
            async with healthy_sessions(d, fake) as ok:
                convos = {
                    name: tw.add_conversation(participants=[ALICE])
                    for name in ("500", "429", "hang", "trickle", "chat hang", "healthy")
                }
                tw.faults += [
                    FakeFault(convos["500"].sid, status=500),
                    FakeFault(convos["429"].sid, status=429, retry_after=30),
                    FakeFault(convos["hang"].sid, hang=True),
                    FakeFault(convos["trickle"].sid, trickle=0.5),
                ]
                tw.chat_delay = 3600  # only "chat hang" gets as far as the chat
                t0 = trio.current_time()
                answered = {
                    "500": await say(http, tw, convos["500"], "hello?"),
                    "429": await say(http, tw, convos["429"], "hello?"),
                    "hang": await say(http, tw, convos["hang"], "hello?"),
                    "trickle": await say(http, tw, convos["trickle"], "hello?"),
                    "chat hang": await say(http, tw, convos["chat hang"], "hello?"),
                    "healthy": await say(http, tw, convos["healthy"], "@call 415-555-0123"),
                }
                await ok.check("while webhook jobs were stuck")
                ended: dict[str, tuple[float, str]] = {}  # name -> (seconds, how)
                names = {c.sid: name for name, c in convos.items()}
                with trio.move_on_at(t0 + JOB_BOUND):
                    while len(ended) < len(convos):
                        for stage, sid in FAILED_LINE.findall(d.log_text()):
                            if sid in names and names[sid] not in ended:
                                ended[names[sid]] = (trio.current_time() - t0, f"failed: {stage}")
                        if "healthy" not in ended and bot_posts(convos["healthy"]):
                            ended["healthy"] = (trio.current_time() - t0, "done")
                        await trio.sleep(0.05)
                for name in convos:
                    took, how = ended.get(name, (float("nan"), "STILL RUNNING"))
                    print(
                        f"\njob {name!r}: webhook answered in {answered[name] * 1000:.0f} ms; "
                        f"job {how} after {took:.1f} s"
                    )
                assert all(s < 1.0 for s in answered.values()), answered
                assert set(ended) == set(convos), f"jobs still running after {JOB_BOUND:g} s"
                assert ended["healthy"][1] == "done"
                assert bot_posts(convos["healthy"]) == ["Calling +14155550123."]
                for name in ("500", "429", "hang", "trickle"):
                    assert ended[name][1] == "failed: twilio", (name, ended[name])
                assert ended["chat hang"][1] == "failed: openai"
                # 429 + Retry-After: 30 ended the job (well before 30 s), without hammering.
                hits_429 = [r for r in tw.requests if convos["429"].sid in r.path]
                assert len(hits_429) <= 3, len(hits_429)
                after = (await http.get("/metrics")).text

                def delta(name: str, **labels: str) -> float:
                    return sample_value(after, name, **labels) - sample_value(
                        before, name, **labels
                    )

                assert delta("relay_convo_events_total", outcome="failed") == 5
                assert delta("relay_convo_events_total", outcome="done") == 1
                assert delta("relay_jobs_failed_total", stage="twilio") == 4
                assert delta("relay_jobs_failed_total", stage="openai") == 1
                # Faults off: a last job runs normally on the same relay (and the
                # pools drop the connections the faults left idle).
                tw.faults.clear()
                tw.chat_delay = 0
                last = tw.add_conversation(participants=[ALICE])
                await say(http, tw, last, "still there?")
                await until(lambda: bool(bot_posts(last)), 10, "the reply after the faults")
            await back_to_baseline(watch, "webhook faults")


async def test_twilio_rest_call_has_an_overall_deadline() -> None:
    """Regression: httpx's timeout bounds each read, so a Twilio answer that
    trickles in a byte at a time held a REST call, and the webhook job waiting
    on it, forever. Now every call ends within the client's timeout."""
    async with fake_twilio(account_sid=TEST_TWILIO_SID, auth_token=TEST_TWILIO_TOKEN) as tw:
        tw.faults.append(FakeFault("/Participants", trickle=0.1))
        async with TwilioRest(
            TEST_TWILIO_SID, TEST_TWILIO_TOKEN, api_base=tw.base_url, timeout=1.0
        ) as rest:
            t0 = trio.current_time()
            with pytest.raises(TwilioTransportError), trio.fail_after(5):
                await ensure_participant(rest.client, "CH" + "0" * 32, BOT, "+14082605145")
            assert trio.current_time() - t0 < 2.0
