"""Regression tests for defects the Twilio fuzz suite found in relay/sessions/twilio_session.py.

(The oversize defect it found in Hypercorn is held by
tests/e2e/test_client.py::test_oversize_then_other_type.)
"""

from __future__ import annotations

import base64
from typing import Any

import pytest
import trio

from relay.testing.daemon import TEST_TWILIO_TOKEN, Daemon, running_daemon
from relay.testing.fake_realtime import FakeRealtime, fake_realtime
from relay.testing.fuzz import http_get
from relay.testing.twilio_caller import twilio_call
from tests.helpers import call

# Both drivers of the session core: the reactor's fast path, and the pumps alone.
pytestmark = pytest.mark.usefixtures("fast_path")

LIMIT = 32 * 1024
PUBLIC = "https://relay.example.com"
STREAM_URL = "wss://relay.example.com/twilio/media"


def config(fake: FakeRealtime) -> dict[str, dict[str, Any]]:
    return {
        "openai": {"realtime_url": f"ws://127.0.0.1:{fake.port}/v1/realtime"},
        "server": {"public_url": PUBLIC},
        "limits": {"max_message_bytes": LIMIT},
    }


async def _alive(d: Daemon) -> None:
    assert d.proc.returncode is None, d.log_text()[-3000:]
    assert (await trio.to_thread.run_sync(http_get, d.port, "/healthz"))[0] == 200
    assert "CRITICAL" not in d.log_text() and "Traceback" not in d.log_text()


async def test_caller_audio_that_is_not_base64_is_not_sent_upstream() -> None:
    """docs/contract.md §6: everything sent upstream must be valid for the real service. A media
    payload that is not base64 is forwarded as an append, and OpenAI answers with
    an error per frame. Fixed by is_audio in relay/sessions/twilio_session.py."""
    async with (
        fake_realtime() as fake,
        running_daemon(config(fake)) as d,
        twilio_call(
            f"{d.ws_url}/twilio/media",
            public_url=STREAM_URL,
            auth_token=TEST_TWILIO_TOKEN,
            send_audio=False,
        ) as c,
    ):
        await c.start()
        conn = await fake.wait_connection()
        await conn.wait_for("response.create")
        for bad in ("A", "AB=C", "abc", "!!!!"):
            await c.send_raw('{"event":"media","media":{"payload":"' + bad + '"}}')
        await c.send_media(b"\x01" * 160)
        with trio.fail_after(5):
            while bytes(conn.input_audio) != b"\x01" * 160:
                await trio.sleep(0.01)
        assert conn.errors == []


async def test_oversize_right_behind_media_still_closes_1009() -> None:
    """docs/contract.md: a message over max_message_bytes closes the stream with 1009. When it
    arrived right behind a media frame, the pump found it while joining waiting
    frames, took it for Twilio hanging up and dropped the socket with no close
    frame (Twilio saw 1006): found by tests/fuzz/test_twilio.py in a new user's
    run, then 57 times in 60 with this sequence."""
    async with fake_realtime() as fake, running_daemon(config(fake)) as d:
        for i in range(3):  # the two frames land in one read or in two: both close 1009
            async with call(d, send_audio=False) as c:
                await c.start()
                conn = await fake.wait_connection(i)
                await conn.wait_for("response.create")
                await c.send_media(b"\x02" * 160)
                await c.send_raw("x" * (LIMIT + 1))
                with trio.fail_after(10):
                    await c.closed.wait()
                assert c.close_code == 1009, (c.close_code, d.log_text()[-1000:])
                with trio.fail_after(10):
                    await conn.closed.wait()
                assert conn.close_code == 1000
        await _alive(d)
        # The session logs its end after both closes: the last line may trail them.
        with trio.fail_after(5):
            while d.log_text().count("outcome=twilio_closed close_code=1009") < 3:
                await trio.sleep(0.02)
        assert d.log_text().count("outcome=twilio_closed close_code=1009") == 3


async def test_assistant_audio_that_is_not_base64_is_not_sent_to_twilio() -> None:
    """A delta that is not base64 reaches Twilio as a media whose payload is not
    base64 (Twilio error 31924). Fixed in TwilioSession._on_delta."""
    async with fake_realtime() as fake, running_daemon(config(fake)) as d:
        fake.auto_respond = False
        async with call(d, send_audio=False) as c:
            await c.start()
            conn = await fake.wait_connection()
            await conn.wait_for("response.create")
            for bad in ("A", "AB=C", "a b"):
                await conn.send_event(
                    {"type": "response.output_audio.delta", "item_id": "item_x", "delta": bad}
                )
            good = base64.b64encode(b"\x02" * 160).decode()
            conn.item_audio["item_y"] = 160
            await conn.send_event(
                {"type": "response.output_audio.delta", "item_id": "item_y", "delta": good}
            )
            with trio.fail_after(5):
                while not c.received_media:
                    await trio.sleep(0.01)
            await trio.sleep(0.2)
            assert c.protocol_errors == []
            assert c.received_media == [b"\x02" * 160]


async def test_no_truncate_for_audio_without_an_item_id() -> None:
    """A delta without item_id is filed under "" and a barge-in then truncates item
    "" (OpenAI: "Only model output audio messages can be truncated"). Fixed: _on_delta
    drops deltas without a non-empty item_id."""
    async with fake_realtime() as fake, running_daemon(config(fake)) as d:
        fake.auto_respond = False
        async with call(d, send_audio=False) as c:
            await c.start()
            conn = await fake.wait_connection()
            await conn.wait_for("response.create")
            audio = base64.b64encode(b"\x03" * 8000).decode()  # one second: still unplayed
            await conn.send_event({"type": "response.output_audio.delta", "delta": audio})
            await trio.sleep(0.2)
            await conn.emit_speech_started(0)
            await trio.sleep(0.5)
            assert conn.errors == []
