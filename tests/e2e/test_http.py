"""Foundation, end to end: `relay serve` as a subprocess, real HTTP and WebSocket clients."""

from __future__ import annotations

import re
import signal
import subprocess
import sys
from pathlib import Path

import httpx
import pytest
import trio
import trio_websocket

from relay.admission.tokens import mint
from relay.testing.daemon import Daemon
from tests.conftest import require_tool

ROOT = Path(__file__).resolve().parents[2]
ORIGIN = [(b"Origin", b"https://gateframes.com")]


def key_of(d: Daemon) -> bytes:
    from relay.config import decode_encryption_key

    return decode_encryption_key(d.env["ENCRYPTION_KEY"])


async def upgrade_status(url: str, headers: list[tuple[bytes, bytes]]) -> int:
    """The HTTP status of a refused upgrade (101 if it was accepted)."""
    try:
        async with trio_websocket.open_websocket_url(url, extra_headers=headers) as ws:
            await ws.aclose()
            return 101
    except trio_websocket.ConnectionRejected as rejected:
        return int(rejected.status_code)


async def test_routes(daemon: Daemon) -> None:
    async with httpx.AsyncClient(base_url=daemon.http_url) as http:
        assert (await http.get("/healthz")).status_code == 200
        assert (await http.get("/readyz")).status_code == 200
        for path in ("/token/abc", "/auth/anything/at/all", "/token/x/realtime"):
            for method in ("GET", "POST", "DELETE"):
                r = await http.request(method, path)
                assert r.status_code == 200, (method, path)
        for path in ("/", "/foo", "/v1/realtime", "/twilio/convo"):
            r = await http.get(path)
            assert r.status_code == 426
            assert r.headers["upgrade"].lower() == "websocket"
        metrics = await http.get("/metrics")
        assert metrics.status_code == 200
        assert 'relay_sessions_active{kind="client"} 0.0' in metrics.text
        assert "process_resident_memory_bytes" in metrics.text


async def test_http_rate_limit_61st_request(start_daemon) -> None:  # type: ignore[no-untyped-def]
    async with (
        start_daemon({"limits": {"http_per_minute": 60}}) as d,
        httpx.AsyncClient(base_url=d.http_url) as http,
    ):
        statuses = [(await http.get("/healthz")).status_code for _ in range(60)]
        assert statuses == [200] * 60
        r = await http.get("/healthz")
        assert r.status_code == 429
        assert int(r.headers["retry-after"]) >= 1


async def test_ws_upgrade_checks(start_daemon) -> None:  # type: ignore[no-untyped-def]
    async with start_daemon({"limits": {"ws_upgrades_per_minute": 10}}) as d:
        key = key_of(d)
        token = mint(key, 60)
        url = f"{d.ws_url}/token/{token}"
        # Bad origin, bad token, bad model/voice: each refused before accept.
        assert await upgrade_status(url, [(b"Origin", b"https://evil.example")]) == 403
        assert await upgrade_status(url, []) == 403
        assert await upgrade_status(f"{d.ws_url}/token/not-a-token", ORIGIN) == 401
        assert await upgrade_status(f"{d.ws_url}/realtime", ORIGIN) == 401
        assert await upgrade_status(f"{d.ws_url}/?auth={mint(key, 60)}&model=gpt-9", ORIGIN) == 400
        assert await upgrade_status(f"{d.ws_url}/?auth={mint(key, 60)}&voice=robot", ORIGIN) == 400
        expired = mint(key, 10, now=trio.current_time() * 0 + 1_000_000)
        assert await upgrade_status(f"{d.ws_url}/auth/{expired}", ORIGIN) == 401
        # Seven used so far; the next three are allowed (no upstream here: 502), the 11th is 429.
        for _ in range(3):
            assert await upgrade_status(f"{d.ws_url}/auth/{mint(key, 60)}", ORIGIN) == 502
        assert await upgrade_status(f"{d.ws_url}/auth/{mint(key, 60)}", ORIGIN) == 429


async def test_retry_after_header_on_upgrade(start_daemon) -> None:  # type: ignore[no-untyped-def]
    async with start_daemon({"limits": {"ws_upgrades_per_minute": 1}}) as d:
        await upgrade_status(d.ws_url, ORIGIN)
        async with httpx.AsyncClient() as http:
            r = await http.get(
                d.http_url + "/x",
                headers={
                    "Connection": "Upgrade",
                    "Upgrade": "websocket",
                    "Sec-WebSocket-Version": "13",
                    "Sec-WebSocket-Key": "dGhlIHNhbXBsZSBub25jZQ==",
                    "Origin": "https://gateframes.com",
                },
            )
        assert r.status_code == 429
        assert int(r.headers["retry-after"]) >= 1


async def test_sigterm_exits_promptly_when_idle(daemon: Daemon) -> None:
    start = trio.current_time()
    daemon.signal(signal.SIGTERM)
    assert await daemon.wait(10) == 0
    # drain_seconds is 2 in tests; with nothing to drain the exit is immediate.
    assert trio.current_time() - start < 1.9


def recipe(marker: str) -> str:
    text = (ROOT / "README.md").read_text()
    block = re.search(rf"<!-- {marker} -->\s*```\w+\n(.*?)```", text, re.S)
    assert block is not None, marker
    return block.group(1)


async def test_python_recipe_token_accepted(daemon: Daemon, tmp_path: Path) -> None:
    script = tmp_path / "mint.py"
    script.write_text(recipe("python-recipe"))
    out = subprocess.run(
        [sys.executable, str(script)], env=daemon.env, capture_output=True, text=True, check=True
    )
    token = out.stdout.strip()
    assert await upgrade_status(f"{daemon.ws_url}/token/{token}", ORIGIN) == 502  # past 401


async def test_node_recipe_token_accepted(daemon: Daemon, tmp_path: Path) -> None:
    node = require_tool("node", "Debian: apt-get install nodejs")
    script = tmp_path / "mint.js"
    script.write_text(recipe("node-recipe"))
    out = subprocess.run(
        [node, str(script)], env=daemon.env, capture_output=True, text=True, check=True
    )
    token = out.stdout.strip()
    assert await upgrade_status(f"{daemon.ws_url}/token/{token}", ORIGIN) == 502
    assert await upgrade_status(f"{daemon.ws_url}/token/{token[:-2]}", ORIGIN) == 401


async def _flood(port: int, count: int, first: int) -> int:
    """``count`` pipelined requests, each from its own X-Forwarded-For IP; returns 200s seen.

    Hypercorn closes a keep-alive connection after 1000 requests, so each
    connection carries at most that many.
    """
    ok = 0
    per_connection, batch = 1000, 200
    for conn_start in range(first, first + count, per_connection):
        conn_end = min(conn_start + per_connection, first + count)
        stream = await trio.open_tcp_stream("127.0.0.1", port)
        async with stream:
            for start in range(conn_start, conn_end, batch):
                n = min(batch, conn_end - start)
                await stream.send_all(
                    b"".join(
                        f"GET /healthz HTTP/1.1\r\nHost: x\r\nX-Forwarded-For: "
                        f"10.{(i >> 16) & 255}.{(i >> 8) & 255}.{i & 255}\r\n\r\n".encode()
                        for i in range(start, start + n)
                    )
                )
                seen, tail = 0, b""
                while seen < n:
                    chunk = await stream.receive_some(65536)
                    assert chunk, "daemon closed the connection early"
                    # Count status lines in the new bytes plus a tail that may hold a split one.
                    window = tail + chunk
                    seen += window.count(b"HTTP/1.1 ")
                    ok += window.count(b"HTTP/1.1 200")
                    tail = window[-11:].replace(b"HTTP/1.1 ", b"")
    return ok


@pytest.mark.slow
async def test_distinct_ip_flood_keeps_memory_flat(start_daemon) -> None:  # type: ignore[no-untyped-def]
    """Every request from a new IP makes a rate bucket (~200 B in the store);
    buckets that refilled must be forgotten, or a flood of spoofed
    X-Forwarded-For addresses grows the daemon without bound.

    The warm-up flood is as large as the measured one's live set ever gets, so
    the dict, allocator arenas and caches have reached their size before
    ``before``: what the measured 30,000 new IPs add is then near 0 if buckets
    are forgotten (0.1 to 0.7 MiB measured) and 9 MiB when prune was disabled.
    """
    config = {"server": {"trusted_proxies": ["127.0.0.1/32"]}, "limits": {"http_per_minute": 60}}
    async with start_daemon(config) as d:
        assert await _flood(d.port, 20_000, 0) == 20_000
        before = d.rss_kib()
        results: list[int] = []

        async def worker(first: int) -> None:
            results.append(await _flood(d.port, 7_500, first))

        async with trio.open_nursery() as nursery:
            for w in range(4):
                nursery.start_soon(worker, 1_000_000 + w * 7_500)
        assert sum(results) == 30_000  # every IP is new: none is limited
        await trio.sleep(11)  # one periodic prune
        after = d.rss_kib()
        print(
            f"\nRSS after 20000 distinct IPs {before} KiB, after 30000 more + prune {after} KiB "
            f"(+{after - before} KiB)"
        )
        assert after - before < 2 * 1024


async def test_sigusr1_lists_live_tasks_and_where_they_wait(daemon: Daemon) -> None:
    from tests.helpers import task_dump

    lines = await task_dump(daemon)
    names = [line.split("  waits in ", 1)[0] for line in lines]
    assert "relay.ws.reactor" in names and "relay.ws.liveness" in names
    reactor = next(line for line in lines if line.startswith("relay.ws.reactor "))
    assert "reactor.py" in reactor and " run" in reactor
    # The daemon goes on serving: SIGUSR1 is a request for a listing, not a stop.
    async with httpx.AsyncClient() as http:
        assert (await http.get(daemon.http_url + "/healthz")).status_code == 200
    again = await task_dump(daemon)
    assert reactor in again and len(again) >= len(lines)
    # /metrics counts the same tasks, plus those of the scrape's own connection.
    from tests.helpers import scrape

    assert await scrape(daemon, "relay_trio_tasks") > len(lines)
