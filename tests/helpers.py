"""Helpers shared by the test files: daemon clients, Twilio calls, scrapes, waits.

Kept here so that no test file imports another."""

from __future__ import annotations

import functools
import re
import signal
import socket
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from functools import partial
from typing import Any, ParamSpec

import httpx
import trio
import trio_websocket

from relay.admission.tokens import mint
from relay.config import decode_encryption_key
from relay.testing.daemon import (
    TEST_TWILIO_TOKEN,
    Daemon,
)
from relay.testing.metrics import sample_value
from relay.testing.twilio_caller import StreamOrder, TwilioCall, twilio_call
from relay.ws.connection import WebSocket
from relay.ws.handshake import upgrade_response
from relay.ws.transport import Transport

P = ParamSpec("P")
ORIGIN = [(b"Origin", b"http://localhost:5173")]


def client_url(d: Daemon, query: str = "") -> str:
    token = mint(decode_encryption_key(d.env["ENCRYPTION_KEY"]), 60)
    return f"{d.ws_url}/token/{token}/realtime{query}"


@asynccontextmanager
async def client(
    d: Daemon, query: str = "", **kw: Any
) -> AsyncIterator[trio_websocket.WebSocketConnection]:
    async with trio_websocket.open_websocket_url(
        client_url(d, query), extra_headers=ORIGIN, max_message_size=64 * 2**20, **kw
    ) as ws:
        yield ws


async def close_of(ws: trio_websocket.WebSocketConnection, timeout: float = 10) -> tuple[int, str]:
    """Read until the relay closes the socket; the (code, reason) it sent."""
    with trio.fail_after(timeout):
        while True:
            try:
                await ws.get_message()
            except trio_websocket.ConnectionClosed as closed:
                assert closed.reason is not None
                return closed.reason.code, closed.reason.reason or ""


async def scrape(d: Daemon, name: str, **labels: str) -> float:
    """One scrape: the sample ``name`` with exactly ``labels`` (0 when absent)."""
    # Connection: close, or Hypercorn keeps the socket until keep_alive_timeout.
    async with httpx.AsyncClient(headers={"Connection": "close"}) as http:
        text = (await http.get(d.http_url + "/metrics")).text
    return sample_value(text, name, **labels)


async def task_dump(d: Daemon) -> list[str]:
    """The daemon's live tasks and where each waits, as it logs them on SIGUSR1."""
    marker = "task dump: "
    before = d.log_text().count(marker)
    d.signal(signal.SIGUSR1)
    with trio.fail_after(10):
        while True:
            text = d.log_text()
            if text.count(marker) > before:
                head = text.rindex(marker)
                total = int(text[head + len(marker) :].split()[0])
                lines = [
                    line.split("task: ", 1)[1]
                    for line in text[head:].splitlines()
                    if "task: " in line
                ]
                if len(lines) >= total:
                    return lines[:total]
            await trio.sleep(0.05)


def tasks_gained(before: list[str], after: list[str]) -> str:
    """The tasks in ``after`` that ``before`` did not have (a leak check's message)."""
    left = list(before)
    gained = []
    for line in after:
        if line in left:
            left.remove(line)
        else:
            gained.append(line)
    return "tasks gained:\n" + "\n".join(gained)


async def assert_nothing_left(d: Daemon, kind: str, fds: int, listed: list[str], what: str) -> None:
    """Once the ``kind`` sessions are over, the daemon holds no more fds than ``fds``
    and no more Trio tasks than its earlier listing ``listed``.

    Tasks are counted from the daemon's SIGUSR1 listing, not /metrics: a scrape
    counts its own HTTP connection, whose tasks vary by one with timing (the
    "16 -> 17 tasks" these checks used to fail on now and then, with identical
    listings before and after)."""
    with trio.fail_after(10):  # sessions finish their closes asynchronously
        while await scrape(d, "relay_sessions_active", kind=kind) != 0:
            await trio.sleep(0.05)
    # Closing handshakes finish in the background (each bounded by CLOSE_TIMEOUT,
    # 2 s a side); a real leak stays past 15 s just the same.
    with trio.move_on_after(15):
        while d.fd_count() > fds or len(await task_dump(d)) > len(listed):
            await trio.sleep(0.1)
    fds_after, after = d.fd_count(), await task_dump(d)
    print(f"\nafter {what}: fds {fds} -> {fds_after}, trio tasks {len(listed)} -> {len(after)}")
    assert fds_after <= fds
    assert len(after) <= len(listed), tasks_gained(listed, after)


PUBLIC = "https://relay.example.com"


STREAM_URL = "wss://relay.example.com/twilio/media"


@asynccontextmanager
async def call(d: Daemon, **params: Any) -> AsyncIterator[TwilioCall]:
    kw = {
        k: params.pop(k)
        for k in ("send_audio", "frame_source", "sign", "stream_sid", "echo_marks")
        if k in params
    }
    async with twilio_call(
        f"{d.ws_url}/twilio/media",
        public_url=STREAM_URL,
        auth_token=TEST_TWILIO_TOKEN,
        custom_parameters=params or {"direction": "inbound"},
        **kw,
    ) as c:
        yield c


def ordered_call(
    d: Daemon, order: StreamOrder, **kw: Any
) -> AbstractAsyncContextManager[TwilioCall]:
    """The stream Twilio opens on what ``/twilio/voice`` ordered: its URL (and
    token), signed, for its call, with its parameters; ``kw`` overrides."""
    kw.setdefault("call_sid", order.call_sid)
    kw.setdefault("custom_parameters", order.parameters)
    return twilio_call(
        d.ws_url + order.path, public_url=order.url, auth_token=TEST_TWILIO_TOKEN, **kw
    )


async def until(predicate: Any, timeout: float = 10) -> None:
    with trio.fail_after(timeout):
        while not predicate():
            await trio.sleep(0.01)


async def wait_closed(c: TwilioCall, timeout: float = 10) -> None:
    with trio.fail_after(timeout):
        await c.closed.wait()


@asynccontextmanager
async def raw_upstream(answer: bytes, after: bytes = b"") -> AsyncIterator[int]:
    """A bare TCP server answering every upgrade with a valid 101 (right accept value) plus
    ``answer`` as extra header lines, then ``after`` in the same write; yields its port."""

    async def handler(stream: trio.SocketStream) -> None:
        head = b""
        while b"\r\n\r\n" not in head:
            head += await stream.receive_some(65536)
        key = re.search(rb"(?i)sec-websocket-key: *(\S+)", head)
        assert key is not None
        await stream.send_all(
            upgrade_response(key.group(1).decode(), None)[:-2] + answer + b"\r\n" + after
        )
        await trio.sleep(10)

    async with trio.open_nursery() as nursery:
        listeners = await nursery.start(partial(trio.serve_tcp, handler, 0, host="127.0.0.1"))
        yield listeners[0].socket.getsockname()[1]
        nursery.cancel_scope.cancel()


def token_for(d: Daemon, ttl: int = 60) -> str:
    return mint(decode_encryption_key(d.env["ENCRYPTION_KEY"]), ttl)


async def wait_for_sample(http: httpx.AsyncClient, line: str, timeout: float = 10) -> str:
    with trio.fail_after(timeout):
        while True:
            text = (await http.get("/metrics")).text
            if line in text.splitlines():
                return text
            await trio.sleep(0.05)


def pair(
    stall: float | None = None, *, peer_stall: float | None = None, max_message: int = 1 << 20
) -> tuple[WebSocket, WebSocket]:
    """(client side, server side) of one connected socket pair."""
    a, b = socket.socketpair()
    for s in (a, b):
        s.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 16384)
        s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 16384)
    client = WebSocket(Transport(a), client=True, max_message=max_message, stall_seconds=stall)
    server = WebSocket(
        Transport(b), client=False, max_message=max_message, stall_seconds=peer_stall
    )
    return client, server


@asynccontextmanager
async def closing(*conns: WebSocket) -> AsyncIterator[None]:
    try:
        yield
    finally:
        for c in conns:
            c.transport.close()


def bounded(
    seconds: float,
) -> Callable[[Callable[P, Awaitable[None]]], Callable[P, Awaitable[None]]]:
    """Run a whole async test under ``trio.fail_after(seconds)`` (fixtures still
    resolve: the wrapper keeps the test's signature)."""

    def wrap(test: Callable[P, Awaitable[None]]) -> Callable[P, Awaitable[None]]:
        @functools.wraps(test)
        async def run(*args: P.args, **kwargs: P.kwargs) -> None:
            with trio.fail_after(seconds):
                await test(*args, **kwargs)

        return run

    return wrap
