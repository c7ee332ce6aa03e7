"""Attacks on who the client is and how many sessions it may hold (docs/contract.md
§10 "Client IP, one rule everywhere", "Client tokens"; §5 steps 1 and 3), each
against ``relay serve`` over real sockets."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from typing import Any
from urllib.parse import quote

import pytest
import trio
import trio_websocket

from relay.admission.tokens import mint
from relay.config import decode_encryption_key
from relay.testing.daemon import TEST_OPENAI_KEY, Daemon, daemon_env, running_daemon
from relay.testing.fake_realtime import FakeRealtime, fake_realtime
from relay.testing.metrics import sample_value
from relay.testing.redis_server import running_redis
from tests.conftest import needs_redis

ORIGIN = ("Origin", "http://localhost:5173")
UPGRADE = [
    ("Connection", "Upgrade"),
    ("Upgrade", "websocket"),
    ("Sec-WebSocket-Version", "13"),
    ("Sec-WebSocket-Key", "dGhlIHNhbXBsZSBub25jZQ=="),
]


async def request(
    host: str,
    port: int,
    path: str,
    headers: Sequence[tuple[str, str]] = (),
    *,
    method: str = "GET",
    body: bytes = b"",
) -> int:
    """One HTTP/1.1 request on its own connection, headers sent exactly as given
    (repeated lines stay separate lines); the answer's status."""
    head = [f"{method} {path} HTTP/1.1", f"Host: {f'[{host}]' if ':' in host else host}"]
    if not any(k.lower() == "connection" for k, _ in headers):
        head.append("Connection: close")
    head += [f"{k}: {v}" for k, v in headers]
    if body or method == "POST":
        head += ["Content-Type: application/x-www-form-urlencoded", f"Content-Length: {len(body)}"]
    stream = await trio.open_tcp_stream(host, port)
    async with stream:
        await stream.send_all(("\r\n".join(head) + "\r\n\r\n").encode() + body)
        data = b""
        while b"\r\n" not in data:
            chunk = await stream.receive_some(4096)
            if not chunk:
                break
            data += chunk
    return int(data.split(b" ", 2)[1])


async def scrape(d: Daemon, name: str, **labels: str) -> float:
    """One scrape: the sample ``name`` with exactly ``labels`` (0 when absent)."""
    stream = await trio.open_tcp_stream("127.0.0.1", d.port)
    async with stream:
        await stream.send_all(b"GET /metrics HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        data = b""
        while chunk := await stream.receive_some(65536):
            data += chunk
    return sample_value(data.decode().partition("\r\n\r\n")[2], name, **labels)


# -- X-Forwarded-For --------------------------------------------------------------


async def test_a_leading_forwarded_line_does_not_slip_the_http_bucket() -> None:
    """Behind a proxy that appends its own X-Forwarded-For line, a client adding a
    leading line of its own (a new address every time) is still one client."""
    config: dict[str, dict[str, Any]] = {
        "server": {"trusted_proxies": ["127.0.0.1/32"]},
        "limits": {"http_per_minute": 60},
    }
    with trio.fail_after(60):
        async with running_daemon(config) as d:
            statuses = []
            for n in range(80):
                lines = [("X-Forwarded-For", f"198.51.100.{n}"), ("X-Forwarded-For", "203.0.113.7")]
                statuses.append(
                    await request("127.0.0.1", d.port, "/twilio/voice", lines, method="POST")
                )
            # Unsigned: 403 while the bucket holds, then 429.
            assert statuses.count(429) >= 15, statuses
            # The plain routes and the upgrade path see the same client, whose bucket is empty.
            proxy = [("X-Forwarded-For", "198.51.100.250"), ("X-Forwarded-For", "203.0.113.7")]
            assert await request("127.0.0.1", d.port, "/healthz", proxy) == 429
            assert await request("127.0.0.1", d.port, "/healthz") == 200  # the proxy itself


async def test_hops_written_with_ports_do_not_stop_the_walk() -> None:
    """Proxies that write ``ip:port`` hops: each client is still itself, and the
    same client from another port is still the same client."""
    config: dict[str, dict[str, Any]] = {
        "server": {"trusted_proxies": ["127.0.0.1/32", "10.0.0.0/8"]},
        "limits": {"http_per_minute": 5},
    }
    with trio.fail_after(60):
        async with running_daemon(config) as d:
            for n in range(8):  # eight clients, one request each: none is limited
                xff = [("X-Forwarded-For", f"203.0.113.{n}:5555, 10.0.0.2:443")]
                assert await request("127.0.0.1", d.port, "/healthz", xff) == 200
            statuses = []
            for n in range(8):  # one client, eight source ports: five get through
                xff = [("X-Forwarded-For", f"[2001:db8::9]:{4000 + n}, 10.0.0.2:443")]
                statuses.append(await request("127.0.0.1", d.port, "/healthz", xff))
            assert statuses == [200] * 5 + [429] * 3


async def test_fourteen_addresses_of_one_ipv6_prefix_share_a_bucket() -> None:
    """An IPv6 host has a whole /64: counting per /128 would give it 2**64 buckets.
    Clients come through a trusted proxy on ::1, so they can have any address."""
    config: dict[str, dict[str, Any]] = {
        "server": {"bind": ["[::1]:0"], "trusted_proxies": ["::1/128"]},
        "limits": {"http_per_minute": 10, "ws_upgrades_per_minute": 10},
    }
    with trio.fail_after(60):
        async with running_daemon(config) as d:
            http, ws = [], []
            for n in range(1, 15):
                xff = [("X-Forwarded-For", f"2001:db8:1:2:{n:x}::{n:x}")]
                http.append(await request("::1", d.port, "/healthz", xff))
                ws.append(await request("::1", d.port, "/token/x", [*xff, *UPGRADE, ORIGIN]))
            assert http == [200] * 10 + [429] * 4
            assert ws[:10] == [401] * 10 and ws[10:] == [429] * 4  # a bad token, then the bucket
            neighbour = [("X-Forwarded-For", "2001:db8:1:3::1")]  # the next /64 is another client
            assert await request("::1", d.port, "/healthz", neighbour) == 200


# -- IPv4-mapped peers -------------------------------------------------------------


def dual_stack(**server: Any) -> dict[str, dict[str, Any]]:
    """On a dual-stack bind an IPv4 peer arrives as ``::ffff:127.0.0.1``."""
    return {"server": {"bind": ["[::]:0"], **server}, "limits": {"http_per_minute": 5}}


async def test_a_mapped_peer_matches_ipv4_metrics_allow() -> None:
    config = dual_stack(metrics_allow=["127.0.0.1/32"])
    with trio.fail_after(60):
        async with running_daemon(config) as d:
            assert await request("127.0.0.1", d.port, "/metrics") == 200


async def test_a_mapped_peer_matches_ipv4_trusted_proxies() -> None:
    config = dual_stack(trusted_proxies=["127.0.0.1/32"], metrics_allow=["127.0.0.1/32"])
    with trio.fail_after(60):
        async with running_daemon(config) as d:
            # Through the trusted (mapped) proxy, eight clients are eight buckets...
            for n in range(8):
                xff = [("X-Forwarded-For", f"198.51.100.{n}")]
                assert await request("127.0.0.1", d.port, "/healthz", xff) == 200
            # ...and a client it forwards may not read /metrics.
            forwarded = [("X-Forwarded-For", "198.51.100.1")]
            assert await request("127.0.0.1", d.port, "/metrics", forwarded) == 403


# -- session caps ------------------------------------------------------------------


@pytest.fixture
async def fake() -> AsyncIterator[FakeRealtime]:
    async with fake_realtime(expected_key=TEST_OPENAI_KEY) as server:
        server.echo = True
        yield server


def caps_config(fake: FakeRealtime, **caps: Any) -> dict[str, dict[str, Any]]:
    per_token = caps.pop("sessions_per_token", 0)
    return {
        "server": {"trusted_proxies": ["127.0.0.1/32"]},
        "openai": {"realtime_url": f"ws://127.0.0.1:{fake.port}/v1/realtime"},
        "auth": {"sessions_per_token": per_token},
        "limits": caps,
    }


@asynccontextmanager
async def session(
    d: Daemon, token: str, ip: str = "203.0.113.1", path: str = "/token/{}"
) -> AsyncIterator[trio_websocket.WebSocketConnection]:
    headers = [(b"Origin", ORIGIN[1].encode()), (b"X-Forwarded-For", ip.encode())]
    url = d.ws_url + path.format(token)
    async with trio_websocket.open_websocket_url(url, extra_headers=headers) as ws:
        await ws.send_message("ping")  # relayed and echoed: the session is live
        assert await ws.get_message() == "ping"
        yield ws


async def refused(
    d: Daemon, token: str, ip: str = "203.0.113.1", path: str = "/token/{}"
) -> tuple[int, str]:
    """The status and reason of an upgrade that must be refused."""
    try:
        async with session(d, token, ip, path):
            pass
    except trio_websocket.ConnectionRejected as rejected:
        return int(rejected.status_code), (rejected.body or b"").decode().strip()
    raise AssertionError("the upgrade was accepted")


def token_of(d: Daemon) -> str:
    return mint(decode_encryption_key(d.env["ENCRYPTION_KEY"]), 120)


async def test_one_token_holds_at_most_sessions_per_token(fake: FakeRealtime) -> None:
    with trio.fail_after(60):
        async with running_daemon(caps_config(fake, sessions_per_token=2)) as d:
            token = token_of(d)
            padded = token + "=" * (-len(token) % 4)
            async with contextlib.AsyncExitStack() as stack:
                first = await stack.enter_async_context(session(d, token))
                await stack.enter_async_context(session(d, token, "203.0.113.2", "/auth/{}"))
                # Every spelling and route of the token is the same token.
                assert await refused(d, token, "203.0.113.3") == (401, "token in use")
                assert await refused(d, token, path="/?auth={}") == (401, "token in use")
                if padded != token:
                    assert await refused(d, padded) == (401, "token in use")
                standard = quote(token.replace("-", "+").replace("_", "/"), safe="")
                assert await refused(d, standard, path="/?auth={}") == (401, "token in use")
                async with session(d, token_of(d)):  # another token is another token
                    pass
                await first.aclose()  # its lease comes back when the session ends
                with trio.fail_after(5):
                    while True:
                        with contextlib.suppress(trio_websocket.ConnectionRejected):
                            async with session(d, token):
                                break
                        await trio.sleep(0.05)
            assert await scrape(d, "relay_rejected_total", reason="token_in_use") >= 3


async def test_sessions_per_ip_then_max_sessions(fake: FakeRealtime) -> None:
    caps = caps_config(fake, sessions_per_ip=2, max_sessions=3)
    with trio.fail_after(60):
        async with running_daemon(caps) as d, contextlib.AsyncExitStack() as stack:
            a1 = await stack.enter_async_context(session(d, token_of(d), "203.0.113.1"))
            await stack.enter_async_context(session(d, token_of(d), "203.0.113.1"))
            status, reason = await refused(d, token_of(d), "203.0.113.1")
            assert status == 429 and reason == "too many sessions from this address"
            await stack.enter_async_context(session(d, token_of(d), "203.0.113.2"))
            assert await refused(d, token_of(d), "203.0.113.3") == (503, "server at capacity")
            await a1.aclose()  # a seat comes back when its session ends
            with trio.fail_after(5):
                while True:
                    with contextlib.suppress(trio_websocket.ConnectionRejected):
                        async with session(d, token_of(d), "203.0.113.3"):
                            break
                    await trio.sleep(0.05)
            assert await scrape(d, "relay_rejected_total", reason="sessions_per_ip") == 1
            assert await scrape(d, "relay_rejected_total", reason="max_sessions") >= 1


async def test_twilio_upgrades_count_against_max_sessions(fake: FakeRealtime) -> None:
    """A Twilio upgrade at capacity is refused (503) before its signature is even
    looked at; client sessions fill the process here."""
    caps = caps_config(fake, max_sessions=1)
    with trio.fail_after(60):
        async with running_daemon(caps) as d, session(d, token_of(d)):
            assert await request("127.0.0.1", d.port, "/twilio/media", UPGRADE) == 503
            assert await scrape(d, "relay_rejected_total", reason="max_sessions") == 1


@needs_redis
async def test_a_token_in_use_on_one_process_is_in_use_on_another(fake: FakeRealtime) -> None:
    """Two processes sharing a Redis share the token's sessions: moving to another
    process (another host behind the same balancer) does not reset the count."""
    env = daemon_env()
    with trio.fail_after(60):
        async with running_redis() as redis:
            config = caps_config(fake, sessions_per_token=1)
            config["store"] = {"backend": "redis", "redis_url": redis.url}
            async with running_daemon(config, env=env) as a, running_daemon(config, env=env) as b:
                token = token_of(a)
                async with session(a, token):
                    assert await refused(b, token) == (401, "token in use")
                    assert await refused(a, token) == (401, "token in use")
                with trio.fail_after(5):  # released through Redis when the session ends
                    while True:
                        with contextlib.suppress(trio_websocket.ConnectionRejected):
                            async with session(b, token):
                                break
                        await trio.sleep(0.05)
