"""Attacks on the Twilio media stream (docs/contract.md §6, §10), end to end against
`relay serve`: the fake Realtime server upstream, the simulated Twilio caller.

Before stream tokens, the handshake signature was an HMAC of one fixed URL, so a
captured handshake replayed forever, for any call, and forged handshakes never met
a rate limit (issue 16, finding 6).
"""

from __future__ import annotations

import base64
import os
import secrets
import time
from collections.abc import AsyncIterator
from typing import Any

import httpx
import pytest
import trio
import trio_websocket
from twilio.request_validator import RequestValidator

from relay.admission.tokens import b64url_encode, mint
from relay.admission.twilio_auth import mint_stream_token
from relay.config import decode_encryption_key
from relay.testing.daemon import (
    TEST_OPENAI_KEY,
    TEST_TWILIO_SID,
    TEST_TWILIO_TOKEN,
    Daemon,
    running_daemon,
)
from relay.testing.fake_realtime import FakeRealtime, fake_realtime
from relay.testing.fake_twilio import fake_twilio
from relay.testing.twilio_caller import StreamOrder, twilio_call, voice_webhook
from tests.helpers import ordered_call

PUBLIC = "https://relay.example.com"
STREAM_BASE = "wss://relay.example.com/twilio/media"
TIMEOUT = 20


def config(fake: FakeRealtime, **twilio: Any) -> dict[str, dict[str, Any]]:
    return {
        "openai": {"realtime_url": fake.url},
        "server": {"public_url": PUBLIC},
        "limits": {"ws_upgrades_per_minute": 10},
        "twilio": twilio,
    }


@pytest.fixture
async def fake() -> AsyncIterator[FakeRealtime]:
    async with fake_realtime() as f:
        yield f


def new_call_sid() -> str:
    return "CA" + secrets.token_hex(16)


async def answer(d: Daemon, call_sid: str | None = None, **form: str) -> StreamOrder:
    """Twilio asks /twilio/voice what to do with a call; the relay's stream order."""
    fields = {
        "AccountSid": TEST_TWILIO_SID,
        "CallSid": call_sid or new_call_sid(),
        "Direction": "inbound",
        "From": "+14155550100",
        "To": "+14082605145",
        **form,
    }
    return await voice_webhook(d.http_url, fields, public_url=PUBLIC, auth_token=TEST_TWILIO_TOKEN)


async def refused(d: Daemon, path: str, **kw: Any) -> int:
    """The status of a handshake on ``path``, signed (unless ``sign``) for its public URL."""
    kw.setdefault("auth_token", TEST_TWILIO_TOKEN)
    kw.setdefault("public_url", PUBLIC.replace("https", "wss") + path)
    with pytest.raises(trio_websocket.ConnectionRejected) as rejected:
        async with twilio_call(d.ws_url + path, **kw):
            pass
    return int(rejected.value.status_code)


def key_of(d: Daemon) -> bytes:
    return decode_encryption_key(d.env["ENCRYPTION_KEY"])


async def test_the_twiml_stream_url_carries_a_token_that_connects_its_call(
    fake: FakeRealtime,
) -> None:
    """The positive path: what /twilio/voice orders is what Twilio can connect to,
    and the call's parties reach the session (logged)."""
    with trio.fail_after(TIMEOUT):
        async with running_daemon(config(fake, require_stream_token=True)) as d:
            order = await answer(d)
            assert order.url.startswith(STREAM_BASE + "/")
            assert len(order.url) > len(STREAM_BASE) + 40  # a token, not a fixed URL
            assert order.parameters == {
                "direction": "inbound",
                "from": "+14155550100",
                "to": "+14082605145",
            }
            async with ordered_call(d, order, send_audio=False) as c:
                await c.start()
                conn = await fake.wait_connection()
                await conn.wait_for("response.create")
                await c.stop()
                with trio.fail_after(5):
                    await c.closed.wait()
            log = d.log_text()
            assert "+14155550100" in log and order.call_sid in log
            # A fresh token every time: no two calls share a stream URL.
            assert (await answer(d)).url != (await answer(d)).url


async def test_a_replayed_stream_url_with_a_bad_token_is_refused(fake: FakeRealtime) -> None:
    """Each handshake is signed for its own URL, as a captured or crafted one would
    be; the token in it must still be ours, for Twilio, and unexpired: else 403 and
    nothing reaches OpenAI."""
    with trio.fail_after(TIMEOUT):
        async with running_daemon(config(fake)) as d:
            key = key_of(d)
            call = new_call_sid()
            expired = mint_stream_token(key, call, now=time.time() - 3600)
            other_key = mint_stream_token(os.urandom(32), call)
            client_token = mint(key, 60)  # a client token is not a stream token
            junk = b64url_encode(os.urandom(60))
            good = (await answer(d, call)).path.rsplit("/", 1)[1]
            tampered = good[:-2] + ("AA" if not good.endswith("AA") else "BB")
            for token in (expired, other_key, client_token, junk, tampered, "x", ""):
                status = await refused(d, f"/twilio/media/{token}")
                assert status == 403, (token, status)
            # Signed for another stream URL than the one it dials: no signature at all.
            status = await refused(
                d, f"/twilio/media/{good}", public_url=f"{STREAM_BASE}/{expired}"
            )
            assert status == 403
            assert fake.connections == []
            assert "Traceback" not in d.log_text()
            for token in (expired, good, client_token):
                assert token not in d.log_text()


async def test_a_start_for_another_call_closes_1008_before_anything_goes_upstream(
    fake: FakeRealtime,
) -> None:
    """A stream token names one call: a valid URL replayed within its two minutes
    cannot be used for another call."""
    with trio.fail_after(TIMEOUT):
        async with running_daemon(config(fake)) as d:
            order = await answer(d)
            # Not the call the token was minted for:
            async with ordered_call(d, order, call_sid=new_call_sid()) as c:
                conn = await fake.wait_connection()  # opened at accept, as always
                await c.start()
                with trio.fail_after(5):
                    await c.closed.wait()
                    await conn.closed.wait()
            assert c.close_code == 1008
            assert conn.events == [] and bytes(conn.input_audio) == b""
            assert conn.close_code == 1000
            assert c.received_events == []


async def test_the_11th_forged_upgrade_in_a_minute_gets_429(fake: FakeRealtime) -> None:
    """Forged Twilio handshakes count against the IP's upgrade bucket (10 a minute
    here); a validly signed one still skips it."""
    with trio.fail_after(TIMEOUT):
        async with running_daemon(config(fake)) as d:
            forged = [await refused(d, "/twilio/media", sign="wrong") for _ in range(10)]
            assert forged == [403] * 10
            assert await refused(d, "/twilio/media", sign="wrong") == 429
            assert await refused(d, "/twilio/media/" + "A" * 60) == 429  # bad token: same
            async with httpx.AsyncClient() as http:
                metrics = (await http.get(d.http_url + "/metrics")).text
            assert 'relay_rejected_total{reason="twilio_signature"} 10.0' in metrics
            assert 'relay_rejected_total{reason="ws_rate"} 2.0' in metrics
            order = await answer(d)
            async with ordered_call(d, order, send_audio=False) as c:
                await c.start()
                conn = await fake.wait_connection()
                await conn.wait_for("response.create")


async def test_require_stream_token_refuses_plain_media(fake: FakeRealtime) -> None:
    with trio.fail_after(TIMEOUT):
        async with running_daemon(config(fake, require_stream_token=True)) as d:
            assert await refused(d, "/twilio/media") == 403
            assert await refused(d, "/elsewhere?mode=twilio") == 403
            assert fake.connections == []
        async with running_daemon(config(fake)) as d:  # off (the default): still served
            async with twilio_call(
                d.ws_url + "/twilio/media",
                public_url=STREAM_BASE,
                auth_token=TEST_TWILIO_TOKEN,
                send_audio=False,
            ) as c:
                await c.start()
                conn = await fake.wait_connection()
                await conn.wait_for("response.create")


def test_stream_tokens_are_opaque() -> None:
    """The CallSid is inside the AES-GCM claim, not readable from the URL."""
    call = new_call_sid()
    token = mint_stream_token(os.urandom(32), call)
    raw = base64.urlsafe_b64decode(token + "=" * (-len(token) % 4))
    assert call.encode() not in raw and call not in token


async def test_a_call_placed_by_at_call_connects_on_its_own_token(fake: FakeRealtime) -> None:
    """The whole outbound path with require_stream_token on: @call → Twilio REST
    (the fake records the call) → Twilio asks /twilio/voice → the stream connects
    with that call's SID, and the parties reach the session."""
    async with fake_twilio(
        account_sid=TEST_TWILIO_SID, auth_token=TEST_TWILIO_TOKEN, openai_key=TEST_OPENAI_KEY
    ) as rest:
        cfg = config(fake, require_stream_token=True, api_base=rest.base_url)
        cfg["openai"]["api_base"] = rest.openai_base
        with trio.fail_after(TIMEOUT):
            async with (
                running_daemon(cfg) as d,
                httpx.AsyncClient(base_url=d.http_url, timeout=10) as http,
            ):
                convo = rest.add_conversation(participants=["+14155550100"])
                message = rest.add_message(convo.sid, "+14155550100", "@call 415-555-0123")
                form = rest.message_added_form(convo.sid, message)
                signature = RequestValidator(TEST_TWILIO_TOKEN).compute_signature(
                    PUBLIC + "/twilio/convo", form
                )
                r = await http.post(
                    "/twilio/convo", data=form, headers={"X-Twilio-Signature": signature}
                )
                assert r.status_code == 200
                while not rest.calls:
                    await trio.sleep(0.02)
                [placed] = rest.calls
                order = await voice_webhook(
                    d.http_url,
                    placed.voice_form(TEST_TWILIO_SID, answered_by="human"),
                    public_url=PUBLIC,
                    auth_token=TEST_TWILIO_TOKEN,
                )
                assert order.parameters["to"] == "+14155550123"
                async with ordered_call(
                    d, order, call_sid=placed.sid, account_sid=TEST_TWILIO_SID, send_audio=False
                ) as c:
                    await c.start()
                    conn = await fake.wait_connection()
                    await conn.wait_for("response.create")
                    update = conn.events[0]
                    assert update["type"] == "session.update"
                assert "+14155550123" in d.log_text()
