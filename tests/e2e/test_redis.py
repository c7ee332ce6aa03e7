"""Two `relay serve` processes sharing one Redis (docs/contract.md §8), end to end.

This is the scale-out model the README describes: several instances (here on
two ports, as two systemd template instances would be) behind one load
balancer, limits and dedupe shared through Redis. The test plays the load
balancer, spreading one client's requests over both.

Each phase uses its own client IP (X-Forwarded-For from 127.0.0.1, a trusted
proxy here), so phases never share a bucket; /metrics is read from yet other
IPs so that polling it spends no phase's tokens.

redis-server is the Debian package of that name; without it (or without
coredis, the ``redis`` extra) these tests skip and say so.
"""

from __future__ import annotations

import itertools
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import httpx
import pytest
import trio
import trio_websocket
from twilio.request_validator import RequestValidator

pytest.importorskip("coredis", reason="coredis (the `redis` extra) is not installed")

from relay.admission.tokens import mint
from relay.config import decode_encryption_key
from relay.testing.daemon import (
    TEST_OPENAI_KEY,
    TEST_TWILIO_SID,
    TEST_TWILIO_TOKEN,
    Daemon,
    running_daemon,
)
from relay.testing.fake_realtime import fake_realtime
from relay.testing.fake_twilio import fake_twilio
from relay.testing.metrics import sample_value
from relay.testing.redis_server import (
    REDIS_SERVER,
    RedisServer,
    free_port,
    running_redis,
)
from tests.conftest import needs_redis

pytestmark = needs_redis

PUBLIC_URL = "https://relay.example.com"
ORIGIN = "http://localhost:5173"
ALICE = "+14155550100"
_metrics_ips = (f"10.9.{i // 250}.{i % 250 + 1}" for i in itertools.count())


def config(
    redis_url: str, twilio_base: str, openai_base: str, realtime_port: int = 9
) -> dict[str, dict[str, Any]]:
    return {
        "server": {
            "public_url": PUBLIC_URL,
            "trusted_proxies": ["127.0.0.1/32"],
            "metrics_allow": ["127.0.0.1/32", "10.9.0.0/16"],
        },
        # The contract's defaults (the test harness raises them for other tests).
        "limits": {"http_per_minute": 60, "ws_upgrades_per_minute": 10},
        "store": {"backend": "redis", "redis_url": redis_url},
        "twilio": {"api_base": twilio_base},
        "openai": {
            "api_base": openai_base,
            "realtime_url": f"ws://127.0.0.1:{realtime_port}/v1/realtime",
        },
    }


async def metrics(http: httpx.AsyncClient, d: Daemon) -> str:
    response = await http.get(
        d.http_url + "/metrics", headers={"X-Forwarded-For": next(_metrics_ips)}
    )
    assert response.status_code == 200, response.text
    return response.text


async def wait_degraded(http: httpx.AsyncClient, d: Daemon, value: float) -> None:
    with trio.fail_after(15):
        while sample_value(await metrics(http, d), "relay_store_degraded") != value:
            await trio.sleep(0.1)


async def healthz(http: httpx.AsyncClient, d: Daemon, ip: str) -> httpx.Response:
    return await http.get(d.http_url + "/healthz", headers={"X-Forwarded-For": ip})


async def burst(http: httpx.AsyncClient, daemons: list[Daemon], ip: str, n: int) -> list[int]:
    """``n`` concurrent /healthz from ``ip``, spread round robin: the statuses.

    Concurrent, so the burst takes far less than the one second in which a
    60-per-minute bucket earns a token back.
    """
    statuses: list[int] = []

    async def one(d: Daemon) -> None:
        statuses.append((await healthz(http, d, ip)).status_code)

    async with trio.open_nursery() as nursery:
        for i in range(n):
            nursery.start_soon(one, daemons[i % len(daemons)])
    return statuses


async def exhaust(http: httpx.AsyncClient, daemons: list[Daemon], ip: str) -> httpx.Response:
    """Spend the 60 tokens of ``ip``'s HTTP bucket across ``daemons``; the next
    request is refused: the 429, which is the 61st answer on any machine fast
    enough to send 61 requests within the second a token takes to come back.

    On a slower (loaded CI) machine, each token the bucket earned meanwhile
    may let one more request through; never more than that.
    """
    start = trio.current_time()
    assert sorted(await burst(http, daemons, ip, 60)) == [200] * 60
    extra = 0
    while True:
        response = await healthz(http, daemons[extra % len(daemons)], ip)
        if response.status_code == 429:
            return response
        assert response.status_code == 200
        extra += 1
        assert extra <= (trio.current_time() - start) * 60 / 60.0, "more than 60 per minute"


async def upgrade_status(d: Daemon, ip: str) -> int:
    """Status of a WebSocket upgrade with an allowed Origin and a bad token."""
    with pytest.raises(trio_websocket.ConnectionRejected) as refused:
        async with trio_websocket.open_websocket_url(
            d.ws_url + "/token/not-a-valid-token",
            extra_headers=[(b"Origin", ORIGIN.encode()), (b"X-Forwarded-For", ip.encode())],
        ):
            pass
    return int(refused.value.status_code)


def webhook_form(convo: str, message: str) -> dict[str, str]:
    return {
        "EventType": "onMessageAdded",
        "ConversationSid": convo,
        "MessageSid": message,
        "Index": "0",
        "Author": ALICE,
        "Body": "hello there",
        "AccountSid": TEST_TWILIO_SID,
        "Source": "SMS",
    }


def signature(form: Mapping[str, str]) -> str:
    validator = RequestValidator(TEST_TWILIO_TOKEN)
    return str(validator.compute_signature(PUBLIC_URL + "/twilio/convo", dict(form)))


async def test_two_processes_share_limits_and_dedupe_and_survive_redis_outage() -> None:
    async with (
        running_redis() as redis,
        fake_twilio(
            account_sid=TEST_TWILIO_SID, auth_token=TEST_TWILIO_TOKEN, openai_key=TEST_OPENAI_KEY
        ) as fake,
        fake_realtime(echo=True) as realtime,
    ):
        cfg = config(redis.url, fake.base_url, fake.openai_base, realtime.port)
        async with (
            running_daemon(cfg) as a,
            running_daemon(cfg) as b,
            httpx.AsyncClient(timeout=10) as http,
        ):
            both = [a, b]
            for d in both:
                assert sample_value(await metrics(http, d), "relay_store_degraded") == 0
                assert "shared through redis" in d.log_text()

            # 1. The 11th upgrade from one IP across both processes is 429; the
            #    first 10 pass the rate check and fail the token check (401).
            #    (A token comes back every 6 s: 11 handshakes take well under that.)
            statuses = [await upgrade_status(both[i % 2], "203.0.113.1") for i in range(11)]
            assert statuses == [401] * 10 + [429]

            # 2. The 61st HTTP request from one IP across both is 429.
            refused = await exhaust(http, both, "203.0.113.2")
            assert int(refused.headers["Retry-After"]) >= 1

            # 3. One webhook delivered to both (a retry landing elsewhere) is handled once.
            convo = fake.add_conversation(participants=[ALICE])
            message = fake.add_message(convo.sid, ALICE, "hello there")
            form = webhook_form(convo.sid, message.sid)
            answers: list[httpx.Response] = []

            async def deliver(d: Daemon) -> None:
                answers.append(
                    await http.post(
                        d.http_url + "/twilio/convo",
                        data=form,
                        headers={"X-Twilio-Signature": signature(form)},
                    )
                )

            async with trio.open_nursery() as nursery:
                for d in both:
                    nursery.start_soon(deliver, d)
            assert [r.status_code for r in answers] == [200, 200]
            texts = [await metrics(http, d) for d in both]
            outcomes = {
                outcome: sum(
                    sample_value(t, "relay_convo_events_total", outcome=outcome) for t in texts
                )
                for outcome in ("accepted", "duplicate")
            }
            assert outcomes == {"accepted": 1, "duplicate": 1}
            with trio.fail_after(10):
                while len(fake.chat_requests) < 1:
                    await trio.sleep(0.02)
            await trio.sleep(0.2)
            assert len(fake.chat_requests) == 1

            # 4. Redis dies: both keep serving, on per-process limits, and say so;
            #    a session in progress does not notice (sessions never use the store).
            async with trio_websocket.open_websocket_url(
                f"{a.ws_url}/token/{mint(decode_encryption_key(a.env['ENCRYPTION_KEY']), 60)}",
                extra_headers=[(b"Origin", ORIGIN.encode()), (b"X-Forwarded-For", b"203.0.113.8")],
            ) as ws:
                await ws.send_message("before the outage")
                assert await ws.get_message() == "before the outage"
                await redis.kill()
                for d in both:
                    assert (await healthz(http, d, "203.0.113.3")).status_code == 200
                    await wait_degraded(http, d, 1)
                    assert "unreachable" in d.log_text()
                for d in both:  # each process has its own 60 now: 120 in all pass
                    await exhaust(http, [d], "203.0.113.4")
                await ws.send_message("during the outage")
                assert await ws.get_message() == "during the outage"

            # 5. Redis is back on the same port: shared limits again, degraded 0.
            await redis.start()
            for d in both:
                await wait_degraded(http, d, 0)
                assert "is back" in d.log_text()
            await exhaust(http, both, "203.0.113.5")
            for d in both:  # one warning and one info per outage, not one per request
                log = d.log_text()
                assert log.count("is unreachable") == 1 and log.count("is back") == 1


async def test_redis_down_at_start_serves_degraded_then_joins() -> None:
    port = free_port()
    url = f"redis://127.0.0.1:{port}/0"
    cfg = config(url, "http://127.0.0.1:9", "http://127.0.0.1:9/v1")
    async with running_daemon(cfg) as d, httpx.AsyncClient(timeout=10) as http:
        assert (await healthz(http, d, "203.0.113.6")).status_code == 200
        assert sample_value(await metrics(http, d), "relay_store_degraded") == 1
        assert "is unreachable" in d.log_text()
        async with running_redis(port):
            await wait_degraded(http, d, 0)
            await exhaust(http, [d], "203.0.113.7")
            assert b"relay:http:203.0.113.7" in await running_command(port, "KEYS", "*")
        d.signal()
        assert await d.wait(10) == 0
    assert d.log_text().count("is unreachable") == 1


async def running_command(port: int, *args: str) -> bytes:
    """One raw command to the Redis on ``port``."""
    server = RedisServer(port, Path("."), REDIS_SERVER or "redis-server")
    return await server.command(*args)
