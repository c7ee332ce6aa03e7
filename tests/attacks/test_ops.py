"""Attacks on what an operator reads and trusts: the log, check-config's output, the
Redis URL, the start-up warnings (issue 16 findings 8, 9 and 11; docs/contract.md
§10 "Logs", "Secrets", "Risky settings"), end to end against `relay serve`."""

from __future__ import annotations

import re
import subprocess
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import trio

from relay.testing.daemon import TEST_TWILIO_TOKEN, Daemon, daemon_env, running_daemon, toml_dumps
from relay.testing.fake_realtime import fake_realtime
from relay.testing.redis_server import free_port, running_redis
from relay.testing.twilio_caller import twilio_call
from tests.conftest import needs_redis

PUBLIC = "https://relay.example.com"
STREAM_URL = "wss://relay.example.com/twilio/media"
# What an attacker wants an operator (or a log alert) to read as a record of its own.
FORGED = "1999-01-01 00:00:00.000 CRITICAL relay.daemon.server: FORGED admin token issued"


def forged_lines(log: str) -> list[str]:
    """Lines that start with the forged text, by every reader's idea of a line
    (str.splitlines breaks at \\n, \\r, \\x0b, \\x0c, \\x1c-\\x1e, \\x85, U+2028/9)."""
    return [line for line in log.splitlines() if line.startswith(FORGED[:10])]


async def wait_for_log(d: Daemon, pattern: str, timeout: float = 10) -> str:
    with trio.fail_after(timeout):
        while not re.search(pattern, text := d.log_text(), re.M):
            await trio.sleep(0.02)
    return text


async def test_a_twilio_stream_cannot_forge_a_log_line() -> None:
    """streamSid, callSid and customParameters are the caller's to write; with a line
    break in them, the old text log printed the rest as a record of its own."""
    with trio.fail_after(40):
        async with fake_realtime() as fake:
            config = {
                "openai": {"realtime_url": f"ws://127.0.0.1:{fake.port}/v1/realtime"},
                "server": {"public_url": PUBLIC},
            }
            async with running_daemon(config) as d:
                async with twilio_call(
                    f"{d.ws_url}/twilio/media",
                    public_url=STREAM_URL,
                    auth_token=TEST_TWILIO_TOKEN,
                    stream_sid=f"MZ1\n{FORGED}",
                    call_sid=f"CA1\r\n{FORGED}",
                    custom_parameters={
                        "direction": f"inbound\n{FORGED}",
                        "amd": f"human\u2028{FORGED}",
                    },
                ) as c:
                    await c.start()
                    await trio.sleep(0.3)
                    await c.stop()
                    with trio.fail_after(10):
                        await c.closed.wait()
                log = await wait_for_log(d, r"session end .*kind=twilio")
    assert forged_lines(log) == [], forged_lines(log)
    # The values were logged, escaped, on the session's own lines.
    assert "MZ1\\n" + FORGED in log


async def test_a_forwarded_header_cannot_forge_a_log_line() -> None:
    """A header value reached the log as the client IP (the peer is a trusted proxy;
    an IPv6 zone may hold any text). A bare LF the head parser let through, a NEL or
    a vertical tab in it each broke the old log line. Now the head parser refuses
    the bare LF (400), a hop with a zone is no address, and the log escapes
    whatever still gets there: no forged line either way."""
    head = (
        "GET /token/not-a-token HTTP/1.1\r\nHost: 127.0.0.1\r\nUpgrade: websocket\r\n"
        "Connection: Upgrade\r\nSec-WebSocket-Version: 13\r\n"
        "Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nOrigin: http://localhost:1\r\n"
        "X-Forwarded-For: fe80::1%{breaker}{forged}\r\n\r\n"
    )
    config = {"server": {"trusted_proxies": ["127.0.0.1/32"]}}
    with trio.fail_after(40):
        async with running_daemon(config) as d:
            for breaker in ("\n", "\x85", "\x0b"):
                request = head.format(breaker=breaker, forged=FORGED).encode("latin-1")
                stream = await trio.open_tcp_stream("127.0.0.1", d.port)
                async with stream:
                    await stream.send_all(request)
                    answer = await stream.receive_some(4096)
                status = b"400" if breaker == "\n" else b"401"
                assert answer.startswith(b"HTTP/1.1 " + status + b" "), answer
            with trio.fail_after(10):
                while (log := d.log_text()).count("refused: token") < 2:
                    await trio.sleep(0.02)
    assert forged_lines(log) == [], forged_lines(log)


def check_config(config: Mapping[str, Mapping[str, Any]], tmp: Path, **env: str) -> str:
    path = tmp / "config.toml"
    path.write_text(toml_dumps(config))
    out = subprocess.run(
        [sys.executable, "-m", "relay", "check-config", "--config", str(path)],
        capture_output=True,
        text=True,
        env=daemon_env(**env),
        timeout=60,
        check=False,
    )
    assert out.returncode == 0, out.stderr
    return out.stdout + out.stderr


def test_check_config_masks_redis_passwords(tmp_path: Path) -> None:
    config = {"store": {"backend": "redis", "redis_url": "redis://:file-pass-123@cache:6379/0"}}
    out = check_config(config, tmp_path)
    assert "file-pass-123" not in out
    assert 'redis_url = "redis://:***@cache:6379/0"' in out
    out = check_config(config, tmp_path, REDIS_URL="rediss://relay:env-pass-456@cache2:6380/1")
    assert "file-pass-123" not in out and "env-pass-456" not in out
    assert 'redis_url = "rediss://relay:***@cache2:6380/1"' in out
    assert "REDIS_URL set" in out


@needs_redis
async def test_the_redis_url_secret_wins_and_its_password_stays_out_of_the_log() -> None:
    password = "redis-secret-pass-789"
    with trio.fail_after(40):
        async with running_redis() as redis:
            assert b"+OK" in await redis.command("CONFIG", "SET", "requirepass", password)
            dead = f"redis://127.0.0.1:{free_port()}/0"  # nobody listens there
            config = {"store": {"backend": "redis", "redis_url": dead}}
            secret = f"redis://:{password}@127.0.0.1:{redis.port}/0"
            async with running_daemon(config, env=daemon_env(REDIS_URL=secret)) as d:
                log = await wait_for_log(d, r"shared through redis|unreachable")
                # The relay really writes there (its health probe's key), with the password.
                stream = await trio.open_tcp_stream("127.0.0.1", redis.port)
                async with stream:
                    auth = f"AUTH {password}\r\nEXISTS relay:probe\r\n".encode()
                    await stream.send_all(auth)
                    reply = b""
                    while reply.count(b"\r\n") < 2:
                        reply += await stream.receive_some(256)
    assert f"shared through redis at redis://127.0.0.1:{redis.port}/0" in log, log
    assert "unreachable" not in log
    assert reply == b"+OK\r\n:1\r\n"
    assert password not in log


async def test_serve_names_risky_settings_at_start() -> None:
    """One warning line each, before the listener is up. (validate_signatures = false
    needs a public bind; it is checked by tests/unit/test_risky.py and check-config, so
    that this test never listens beyond loopback.)"""
    config = {
        "server": {"public_url": PUBLIC},  # https, loopback bind, no trusted_proxies
        "openai": {
            "realtime_url": "ws://realtime.example.invalid/v1/realtime",
            "api_base": "http://openai.example.invalid/v1",
        },
        "twilio": {"api_base": "http://twilio.example.invalid"},
    }
    with trio.fail_after(30):
        async with running_daemon(config) as d:
            log = d.log_text()
    warnings = [line for line in log.splitlines() if "risky setting: " in line]
    assert [w.split("risky setting: ", 1)[1].split(" ", 1)[0] for w in warnings] == [
        "openai.realtime_url",
        "openai.api_base",
        "twilio.api_base",
        "server.public_url",
    ], log
    assert all(" WARNING relay.config: " in w for w in warnings)
    assert log.index("risky setting: ") < log.index("listening on")
