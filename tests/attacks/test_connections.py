"""Attacks on connections themselves (docs/contract.md §10 "Connections"), end to end.

Each test runs ``relay serve`` as a subprocess and talks raw HTTP/1.1 over real
sockets on 127.0.0.1, so what is measured is the daemon's own socket handling:
when it closes, how many descriptors it holds, what it answers at its caps.
"""

from __future__ import annotations

import re
import resource
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager, contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import trio
import trio_websocket
from twilio.request_validator import RequestValidator

from relay.admission.tokens import mint
from relay.config import decode_encryption_key
from relay.testing.daemon import TEST_OPENAI_KEY, TEST_TWILIO_TOKEN, Daemon, running_daemon
from relay.testing.fake_realtime import FakeRealtime, fake_realtime
from relay.testing.metrics import sample_value

PUBLIC = "https://relay.example.com"
IDLE = 5.0  # the keep-alive timeout of docs/contract.md §10
HEAD_BODY = 10.0  # the time a request head or body has to arrive


@dataclass(frozen=True)
class Ask:
    """One request: its bytes, the status it must get, and a name for messages."""

    name: str
    raw: bytes
    status: int


def request(method: str, path: str, body: bytes = b"", *, close: bool, **headers: str) -> bytes:
    lines = [f"{method} {path} HTTP/1.1", "Host: relay.example.com"]
    lines += [f"{k.replace('_', '-')}: {v}" for k, v in headers.items()]
    if close:
        lines.append("Connection: close")
    if (body or method == "POST") and "Content_Length" not in headers:
        lines.append(f"Content-Length: {len(body)}")
    return ("\r\n".join(lines) + "\r\n\r\n").encode() + body


def form(**fields: str) -> bytes:
    return "&".join(f"{k}={v}" for k, v in fields.items()).encode()


def signed_voice(*, close: bool) -> bytes:
    fields = {"CallSid": "CA" + "1" * 32, "AccountSid": "AC" + "0" * 31 + "1"}
    signature = RequestValidator(TEST_TWILIO_TOKEN).compute_signature(
        PUBLIC + "/twilio/voice", fields
    )
    return request(
        "POST",
        "/twilio/voice",
        form(**fields),
        close=close,
        Content_Type="application/x-www-form-urlencoded",
        X_Twilio_Signature=signature,
    )


def answers(*, close: bool) -> list[Ask]:
    """Every kind of answer the HTTP routes give while the caller's bucket has room
    (five of them count against it: not the signed one, not the 413)."""
    post = "application/x-www-form-urlencoded"
    return [
        Ask("signed voice", signed_voice(close=close), 200),
        Ask("unsigned voice", request("POST", "/twilio/voice", b"a=b", close=close), 403),
        Ask("unsigned convo", request("POST", "/twilio/convo", b"a=b", close=close), 403),
        Ask("GET voice", request("GET", "/twilio/voice", close=close), 426),
        # Only the head of a too-large body: the daemon must answer without the rest.
        Ask(
            "oversize voice",
            request(
                "POST", "/twilio/voice", close=close, Content_Type=post, Content_Length="1000000"
            ),
            413,
        ),
        Ask("healthz", request("GET", "/healthz", close=close), 200),
        Ask("other path", request("GET", "/nope", close=close), 426),
    ]


def limited(*, close: bool) -> list[Ask]:
    """The same routes once the caller's bucket is empty."""
    return [
        Ask("limited voice", request("POST", "/twilio/voice", b"a=b", close=close), 429),
        Ask("limited healthz", request("GET", "/healthz", close=close), 429),
    ]


def status_of(data: bytes) -> int:
    found = re.match(rb"HTTP/1\.1 (\d{3}) ", data)
    return int(found.group(1)) if found else 0


async def answer_then_eof(port: int, ask: Ask, within: float) -> tuple[int, float | None]:
    """Send ``ask``; its status and how long after the answer the daemon closed
    (None: still open ``within`` seconds after the answer)."""
    async with await trio.open_tcp_stream("127.0.0.1", port) as stream:
        await stream.send_all(ask.raw)
        data = b""
        with trio.fail_after(10):
            while b"\r\n\r\n" not in data:
                chunk = await stream.receive_some(65536)
                assert chunk, f"{ask.name}: closed before any answer"
                data += chunk
        answered = trio.current_time()
        with trio.move_on_after(within):
            while await stream.receive_some(65536):
                pass
            return status_of(data), trio.current_time() - answered
        return status_of(data), None


async def check_all(
    port: int, asks: list[Ask], within: float
) -> dict[str, tuple[int, float | None]]:
    results: dict[str, tuple[int, float | None]] = {}

    async def one(ask: Ask) -> None:
        results[ask.name] = await answer_then_eof(port, ask, within)

    async with trio.open_nursery() as nursery:
        for ask in asks:
            nursery.start_soon(one, ask)
    return results


def expected(asks: list[Ask]) -> dict[str, int]:
    return {ask.name: ask.status for ask in asks}


def wait_config(**limits: int) -> dict[str, dict[str, Any]]:
    return {"server": {"public_url": PUBLIC}, "limits": dict(limits)}


async def test_connection_close_is_honoured_by_every_answer() -> None:
    with trio.fail_after(60):
        async with running_daemon(wait_config(http_per_minute=5)) as d:
            first = await check_all(d.port, answers(close=True), 2)
            then = await check_all(d.port, limited(close=True), 2)
    results = {**first, **then}
    assert {k: v[0] for k, v in results.items()} == expected(
        answers(close=True) + limited(close=True)
    )
    still_open = [name for name, (_, after) in results.items() if after is None]
    assert still_open == [], f"open 2 s after an answer with Connection: close: {still_open}"


async def test_kept_alive_connections_close_after_5_s_idle() -> None:
    with trio.fail_after(60):
        async with running_daemon(wait_config(http_per_minute=5)) as d:
            first = await check_all(d.port, answers(close=False), IDLE + 5)
            then = await check_all(d.port, limited(close=False), IDLE + 5)
    results = {**first, **then}
    assert {k: v[0] for k, v in results.items()} == expected(
        answers(close=False) + limited(close=False)
    )
    # Answers that leave an unread body close at once (they say Connection: close).
    at_once = {"oversize voice"}
    for name, (_, after) in results.items():
        assert after is not None, f"{name}: kept-alive connection still open {IDLE + 5} s on"
        if name not in at_once:
            assert IDLE - 0.5 < after < IDLE + 2, f"{name}: closed {after:.1f} s after its answer"


async def eof_after(stream: trio.SocketStream, start: float, trickle: bytes) -> float:
    """Feed ``trickle`` a byte a second until the daemon ends the connection; when it did."""
    received = b""

    async def feed() -> None:
        for byte in trickle:
            await trio.sleep(1)
            try:
                await stream.send_all(bytes([byte]))
            except trio.BrokenResourceError:
                return

    async with trio.open_nursery() as nursery:
        nursery.start_soon(feed)
        try:
            while chunk := await stream.receive_some(65536):
                received += chunk
        except trio.BrokenResourceError:
            pass  # reset: the daemon closed with our bytes unread
        nursery.cancel_scope.cancel()
    assert status_of(received) in (0, 408), received
    return trio.current_time() - start


async def test_slow_head_and_slow_body_end_the_connection_within_10_s() -> None:
    head = b"GET /healthz HTTP/1.1\r\nHost: x\r\n"
    body_head = request("POST", "/twilio/voice", close=False, Content_Length="1000")
    ended: dict[str, float | None] = {}  # None: still open 20 s on
    with trio.fail_after(60):
        async with running_daemon(wait_config()) as d:

            async def slow(name: str, first: bytes, trickle: bytes) -> None:
                async with await trio.open_tcp_stream("127.0.0.1", d.port) as stream:
                    start = trio.current_time()
                    await stream.send_all(first)
                    ended[name] = None
                    with trio.move_on_after(20):
                        ended[name] = await eof_after(stream, start, trickle)

            async with trio.open_nursery() as nursery:
                # Bytes keep coming, a whole head or body never does.
                nursery.start_soon(slow, "head", head, b"X-Slow: " + b"a" * 40)
                nursery.start_soon(slow, "body", body_head + b"a=b", b"&" * 40)
    for name, after in ended.items():
        assert after is not None, f"slow {name}: connection still open after 20 s"
        assert HEAD_BODY - 0.5 < after < HEAD_BODY + 1.5, f"slow {name} ended after {after:.1f} s"


@contextmanager
def own_nofile(soft: int) -> Iterator[None]:
    """This test process's soft open-files limit set to ``soft`` (children inherit it)."""
    old = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (soft, old[1]))
    try:
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, old)


async def hold_answered(port: int, asks: list[Ask], parallel: int) -> list[trio.SocketStream]:
    """Send each request on its own connection, read its answer, keep the socket open."""
    held: list[trio.SocketStream] = []
    limiter = trio.CapacityLimiter(parallel)

    async def one(ask: Ask) -> None:
        async with limiter:
            stream = await trio.open_tcp_stream("127.0.0.1", port)
            held.append(stream)
            await stream.send_all(ask.raw)
            data = b""
            while b"\r\n\r\n" not in data:
                chunk = await stream.receive_some(65536)
                assert chunk, "closed before any answer"
                data += chunk
            # Past the bucket (500 a minute) the same requests get 429.
            assert status_of(data) in (ask.status, 429), data[:100]

    async with trio.open_nursery() as nursery:
        for ask in asks:
            nursery.start_soon(one, ask)
    return held


async def test_1000_held_connections_give_their_fds_back_within_10_s() -> None:
    hard = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
    with own_nofile(min(hard, 4096)), trio.fail_after(90):
        async with running_daemon(wait_config(http_per_minute=500)) as d:
            # Warm up every route once (imports, pools), then take the idle figure.
            await check_all(d.port, answers(close=True), 2)
            await trio.sleep(0.5)
            idle = d.fd_count()
            asks = [Ask("voice", request("POST", "/twilio/voice", b"a=b", close=False), 403)]
            asks += [Ask("GET voice", request("GET", "/twilio/voice", close=False), 426)]
            held = await hold_answered(d.port, asks * 250 + asks[:1] * 500, 50)
            # 1 000 answered (403, 426, then 429 past the bucket), every socket still open.
            answered = trio.current_time()
            peak = d.fd_count()
            try:
                with trio.move_on_after(10):
                    while d.fd_count() > idle:
                        await trio.sleep(0.1)
                after = d.fd_count()
                took = trio.current_time() - answered
            finally:
                for stream in held:
                    await trio.aclose_forcefully(stream)
    assert peak >= idle + 900, f"the daemon never held the connections ({idle} -> {peak})"
    assert after <= idle, f"{after} fds 10 s after 1 000 answers (idle: {idle}, peak {peak})"
    assert took < 10


async def test_max_connections_refuses_the_next_with_503() -> None:
    with trio.fail_after(30):
        async with running_daemon(wait_config(max_connections=10)) as d:
            silent = [await trio.open_tcp_stream("127.0.0.1", d.port) for _ in range(10)]
            await trio.sleep(0.3)  # all ten accepted and counted
            refused = Ask("11th", request("GET", "/healthz", close=False), 503)
            status, after = await answer_then_eof(d.port, refused, 1)
            assert status == 503
            assert after is not None, "the refused connection was left open"
            for stream in silent[:2]:
                await stream.aclose()
            await trio.sleep(0.3)
            scrape = Ask("metrics", request("GET", "/metrics", close=True), 200)
            async with await trio.open_tcp_stream("127.0.0.1", d.port) as stream:
                await stream.send_all(scrape.raw)
                text = b""
                while chunk := await stream.receive_some(65536):
                    text += chunk
            for stream in silent[2:]:
                await stream.aclose()
    assert status_of(text) == 200
    body = text.partition(b"\r\n\r\n")[2].decode()
    assert sample_value(body, "relay_rejected_total", reason="max_connections") == 1.0
    assert sample_value(body, "relay_connections_open") == 9  # 8 silent ones and this


async def test_serve_raises_its_soft_nofile_limit_to_the_hard_one() -> None:
    hard = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
    soft = 256
    assert hard > soft, "needs a hard open-files limit above 256"
    with trio.fail_after(30):
        with own_nofile(soft):
            daemon = running_daemon(wait_config())
            d = await daemon.__aenter__()
        try:
            limits = Path(f"/proc/{d.pid}/limits").read_text()
            log = d.log_text()
        finally:
            await daemon.__aexit__(None, None, None)
    line = next(x for x in limits.splitlines() if x.startswith("Max open files"))
    daemon_soft, daemon_hard = line.split()[3:5]
    assert daemon_soft == daemon_hard == str(hard), line
    assert f"open files limit raised from {soft} to {hard}" in log


@asynccontextmanager
async def echo_fake() -> AsyncIterator[FakeRealtime]:
    async with fake_realtime(expected_key=TEST_OPENAI_KEY) as fake:
        fake.echo = True
        yield fake


async def opens(d: Daemon) -> bool:
    token = mint(decode_encryption_key(d.env["ENCRYPTION_KEY"]), 60)
    async with trio_websocket.open_websocket_url(
        f"{d.ws_url}/token/{token}/realtime",
        extra_headers=[(b"Origin", b"http://localhost:5173")],
    ) as ws:
        await ws.aclose()
    return True


async def test_a_flood_at_200_fds_delays_health_and_upgrades_by_seconds_only() -> None:
    with trio.fail_after(90):
        async with echo_fake() as fake:
            config = {
                **wait_config(),
                "openai": {
                    "realtime_url": f"ws://127.0.0.1:{fake.port}/v1/realtime",
                    "dialect": fake.dialect.name,
                },
            }
            async with running_daemon(config) as d:
                # As if started under `ulimit -n 200`: raising to the hard limit gives nothing.
                resource.prlimit(d.pid, resource.RLIMIT_NOFILE, (200, 200))
                flood = request("POST", "/twilio/voice", b"a=b", close=False)
                held: list[trio.SocketStream] = []
                async with trio.open_nursery() as nursery:

                    async def one() -> None:
                        stream = await trio.open_tcp_stream("127.0.0.1", d.port)
                        held.append(stream)
                        await stream.send_all(flood)  # its answer is never read

                    for _ in range(220):
                        nursery.start_soon(one)
                try:
                    # Those past 200 fds wait in the backlog; health and an upgrade
                    # come after them and need the answered ones to be closed.
                    with trio.fail_after(IDLE + 6):
                        health = await answer_then_eof(
                            d.port, Ask("healthz", request("GET", "/healthz", close=True), 200), 2
                        )
                    with trio.fail_after(IDLE + 6):
                        upgraded = await opens(d)
                finally:
                    for stream in held:
                        await trio.aclose_forcefully(stream)
                log = d.log_text()
    assert health[0] == 200
    assert upgraded
    assert "Traceback" not in log
    # The flood did run the daemon out of descriptors, and that was said once.
    assert 1 <= log.count("accept failed (EMFILE)") <= 2, log[-2000:]


@pytest.fixture(autouse=True)
def _enough_fds() -> Iterator[None]:
    """The tests hold up to ~1 000 sockets at once."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < 4096 <= hard:
        with own_nofile(4096):
            yield
    else:
        yield
