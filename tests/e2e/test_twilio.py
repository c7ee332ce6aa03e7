"""Twilio Media Streams bridge (docs/contract.md §6), end to end: `relay serve` as a subprocess,
the fake Realtime server and the simulated Twilio caller, all on 127.0.0.1."""

from __future__ import annotations

import base64
import random
import signal
import statistics
from collections.abc import AsyncIterator
from typing import Any

import httpx
import pytest
import trio
import trio_websocket
from twilio.request_validator import RequestValidator

from relay.config import DEFAULT_PROMPTS
from relay.testing.daemon import TEST_TWILIO_TOKEN, daemon_env, running_daemon
from relay.testing.fake_realtime import FakeConnection, FakeRealtime, chunk_audio, fake_realtime
from relay.testing.twilio_caller import pattern_frame, twilio_call
from tests.helpers import PUBLIC, call, until, wait_closed

# Both drivers of the session core: the reactor's fast path, and the pumps alone.
pytestmark = pytest.mark.usefixtures("fast_path")

MACHINES = ["machine_start", "machine_end_beep", "machine_end_silence", "machine_end_other", "fax"]


def config(fake: FakeRealtime, **limits: Any) -> dict[str, dict[str, Any]]:
    return {
        "openai": {
            "realtime_url": f"ws://127.0.0.1:{fake.port}/v1/realtime",
            "dialect": fake.dialect.name,
        },
        "server": {"public_url": PUBLIC},
        "limits": limits,
    }


@pytest.fixture
async def fake() -> AsyncIterator[FakeRealtime]:
    async with fake_realtime() as f:
        yield f


def updates(conn: FakeConnection) -> list[dict[str, Any]]:
    return [e for e in conn.events if e.get("type") == "session.update"]


async def test_call_greets_and_relays_audio_both_ways(fake: FakeRealtime) -> None:
    fake.response_chunks = 10
    async with running_daemon(config(fake)) as d:
        async with call(d, direction="inbound") as c:
            conn = await fake.wait_connection()  # opened at accept, before `start`
            assert conn.events == []
            await c.start()
            # The greeting: every delta becomes one media (same bytes, in order) and a mark.
            # Each media is followed by its mark: wait for the 10th mark too.
            await until(lambda: len(c.received_events) >= 20)
            assert c.received_media == [chunk_audio(i, 160) for i in range(10)]
            kinds = [e["event"] for e in c.received_events]
            assert kinds == ["media", "mark"] * 10
            await trio.sleep(0.5)  # 25 caller frames
            await c.stop()
            await wait_closed(c)
            await until(lambda: conn.closed.is_set())
        assert c.protocol_errors == []
        assert conn.errors == []
        assert [e["type"] for e in conn.events[:2]] == ["session.update", "response.create"]
        assert len(updates(conn)) == 1
        session = updates(conn)[0]["session"]
        assert session["type"] == "realtime"
        assert session["output_modalities"] == ["audio"]
        assert session["audio"]["input"]["format"] == {"type": "audio/pcmu"}
        assert session["audio"]["input"]["turn_detection"]["type"] == "server_vad"
        assert session["audio"]["output"] == {"format": {"type": "audio/pcmu"}, "voice": "ash"}
        assert session["instructions"] == DEFAULT_PROMPTS["inbound"]
        # Caller audio arrives upstream byte-identical and in order.
        assert len(c.sent_audio) >= 20 * 160
        assert bytes(conn.input_audio) == bytes(c.sent_audio)
        assert conn.close_code == 1000


async def test_an_odd_stream_sid_comes_back_verbatim(fake: FakeRealtime) -> None:
    """The relay splices the sid (JSON-encoded once) into every media and mark."""
    sid = 'MZ"odd\\sid\u00e9 \u260e</'
    fake.response_chunks = 3
    async with running_daemon(config(fake)) as d:
        async with call(d, stream_sid=sid, direction="inbound") as c:
            await c.start()
            await until(lambda: len(c.received_events) >= 6)
            assert [e["event"] for e in c.received_events] == ["media", "mark"] * 3
            assert {e["streamSid"] for e in c.received_events} == {sid}
            assert c.protocol_errors == []
            await c.stop()
            await wait_closed(c)


async def test_beta_dialect_outbound_voice_and_dtmf_noise() -> None:
    async with fake_realtime("beta") as fake, running_daemon(config(fake)) as d:
        async with call(d, direction="outbound-api", voice="coral") as c:
            await c.start()
            await c.send_dtmf("5")
            await c.send_raw("not json")
            await c.send_raw(b"\x00binary")
            await c.send_raw('{"event":"mystery","x":1}')
            await c.send_raw('{"event":"media","media":{"payload":5}}')
            await until(lambda: len(c.received_media) == 5)
            await trio.sleep(0.2)
            await c.stop()
            await wait_closed(c)
        conn = fake.connections[0]
        assert conn.errors == []
        session = updates(conn)[0]["session"]
        # The default [calls] offers end_call and transcribes the caller (§11).
        tools = session.pop("tools")
        assert [t["name"] for t in tools] == ["end_call"]
        assert session == {
            "modalities": ["text", "audio"],
            "instructions": DEFAULT_PROMPTS["outbound"],
            "voice": "coral",
            "input_audio_format": "g711_ulaw",
            "output_audio_format": "g711_ulaw",
            "turn_detection": {"type": "server_vad"},
            "input_audio_transcription": {"model": "gpt-4o-mini-transcribe"},
            "tool_choice": "auto",
        }
        assert bytes(conn.input_audio) == bytes(c.sent_audio)


async def test_unknown_voice_falls_back_to_default(fake: FakeRealtime) -> None:
    async with running_daemon(config(fake)) as d:
        async with call(d, direction="inbound", voice="robot", send_audio=False) as c:
            await c.start()
            conn = await fake.wait_connection()
            await conn.wait_for("response.create")
        assert updates(conn)[0]["session"]["audio"]["output"]["voice"] == "ash"


async def test_barge_in_clears_at_once_and_truncates_at_played_position(
    fake: FakeRealtime,
) -> None:
    fake.response_chunks = 150  # 3 s of audio, sent as fast as possible
    fake.chunk_interval = 0
    async with running_daemon(config(fake)) as d:
        async with call(d, send_audio=False) as c:
            await c.start()
            conn = await fake.wait_connection()
            await until(lambda: len(c.received_media) == 150)
            await trio.sleep(0.7)
            sent_at = trio.current_time()
            item = next(iter(conn.item_audio))
            await conn.emit_speech_started(700)
            await until(lambda: c.clears)
            latency_ms = (c.clears[0] - sent_at) * 1000
            truncate = await conn.wait_for("conversation.item.truncate")
            truth_ms = c.cleared_at_bytes[0] / 8
            await trio.sleep(0.3)
        print(
            f"\nbarge-in: clear reached the caller {latency_ms:.2f} ms after speech_started "
            f"left the fake; audio_end_ms {truncate['audio_end_ms']} vs played {truth_ms:.0f} ms"
        )
        assert latency_ms < 100  # generous: two loopback hops; the real figure is printed
        assert truncate["item_id"] == item
        assert truncate["content_index"] == 0
        assert abs(truncate["audio_end_ms"] - truth_ms) <= 40
        assert len([e for e in conn.events if e["type"] == "conversation.item.truncate"]) == 1
        assert conn.errors == []
        assert c.protocol_errors == []


async def test_no_truncate_when_nothing_is_unplayed(fake: FakeRealtime) -> None:
    fake.response_chunks = 3
    async with running_daemon(config(fake)) as d:
        async with call(d, send_audio=False) as c:
            await c.start()
            conn = await fake.wait_connection()
            await until(lambda: len(c.echoed_marks) == 3)  # all played
            await conn.emit_speech_started(100)
            await trio.sleep(0.3)
        assert c.clears == []
        assert [e for e in conn.events if e["type"] == "conversation.item.truncate"] == []


async def test_a_mark_read_with_waiting_media_still_confirms_the_audio(
    fake: FakeRealtime,
) -> None:
    """Caller frames and a mark that reach the relay in one read: the frames go up
    joined into one append, and the mark that ended the join still confirms the
    assistant's audio as played (else the barge-in below would truncate it)."""
    fake.response_chunks = 3
    async with running_daemon(config(fake)) as d:
        async with call(d, send_audio=False, echo_marks=False) as c:
            await c.start()
            conn = await fake.wait_connection()
            await until(lambda: len(c.pending_marks()) == 3)
            await trio.sleep(0.1)  # the 60 ms of audio have played; the relay is idle
            frames = [pattern_frame(i) for i in range(3)]
            last = c.mark_message(c.pending_marks()[-1])
            await c.send_together([*(c.media_message(f) for f in frames), last])
            await until(lambda: conn.input_audio.endswith(b"".join(frames)))
            appends = [e for e in conn.events if e["type"] == "input_audio_buffer.append"]
            assert base64.b64decode(appends[-1]["audio"]) == b"".join(frames)  # joined
            await conn.emit_speech_started(100)
            await trio.sleep(0.3)
        assert c.clears == []
        assert [e for e in conn.events if e["type"] == "conversation.item.truncate"] == []
        assert conn.errors == []


@pytest.mark.slow
async def test_200_randomized_barge_ins_never_overshoot() -> None:
    rng = random.Random(20261124)
    async with fake_realtime() as fake:
        fake.auto_respond = True
        fake.response_chunks = 25  # 500 ms per answer
        fake.chunk_interval = 0.004  # faster than real time: Twilio's buffer fills
        async with running_daemon(config(fake)) as d:
            setup = trio.Lock()  # one call connects at a time, so connections pair up

            async def one_call(runs: int) -> tuple[int, list[float]]:
                errors: list[float] = []
                async with setup:
                    index = len(fake.connections)
                    c_cm = call(d, send_audio=False)
                    c = await c_cm.__aenter__()
                    conn = await fake.wait_connection(index)
                try:
                    await c.start()
                    await conn.wait_for("response.create")
                    done, truncates, base = 0, 0, 0
                    for _ in range(runs):
                        await trio.sleep(rng.uniform(0.0, 0.3))
                        clears_before = len(c.clears)
                        await conn.emit_speech_started(0)
                        await trio.sleep(0.05)
                        if len(c.clears) > clears_before:
                            truncates += 1
                            with trio.fail_after(5):
                                cut = await conn.wait_for("conversation.item.truncate", truncates)
                            # What the caller heard of this answer: played since it began.
                            truth = (c.cleared_at_bytes[-1] - base) / 8
                            errors.append(cut["audio_end_ms"] - truth)
                        done += 1
                        with trio.move_on_after(0.5):
                            while conn.responding:  # let a cancelled answer finish
                                await trio.sleep(0.005)
                        await until(lambda: not c.pending_marks())
                        base = c.played_bytes()
                        conn.respond()
                    assert conn.errors == [], conn.errors
                    assert c.protocol_errors == []
                finally:
                    await c_cm.__aexit__(None, None, None)
                return done, errors

            results: list[tuple[int, list[float]]] = []

            async def runner() -> None:
                results.append(await one_call(50))

            async with trio.open_nursery() as nursery:
                for _ in range(4):
                    nursery.start_soon(runner)
        total = sum(r[0] for r in results)
        errors = [e for r in results for e in r[1]]
        assert total == 200
        print(
            f"\n{total} barge-ins, {len(errors)} with audio unplayed; truncate - truth (ms): "
            f"min {min(errors):.0f}, max {max(errors):.0f}"
        )
        # The strict 40 ms check is the single barge-in test above; across 200 runs on a
        # shared machine, scheduling hiccups make single outliers, so the median is held.
        assert statistics.median(abs(e) for e in errors) <= 40
        assert all(
            not e.get("message", "").startswith("Audio content")
            for c in fake.connections
            for e in c.errors
        )


@pytest.mark.parametrize("amd", MACHINES)
async def test_voicemail_plays_whole_then_closes(fake: FakeRealtime, amd: str) -> None:
    fake.response_chunks = 10
    async with running_daemon(config(fake)) as d:
        async with call(d, direction="outbound-api", amd=amd) as c:
            await c.start()
            await wait_closed(c, 10)
            played = c.played_bytes()
        conn = fake.connections[0]
        session = updates(conn)[0]["session"]
        assert session["audio"]["input"]["turn_detection"] is None
        assert session["instructions"] == DEFAULT_PROMPTS["voicemail"]
        assert [e for e in conn.events if e["type"] == "input_audio_buffer.append"] == []
        assert len(c.received_media) == 10
        assert played == 10 * 160  # the whole message played before the close
        assert c.close_code == 1000
        await until(lambda: conn.closed.is_set())
        assert conn.close_code == 1000


async def test_goodbye_before_time_limit() -> None:
    async with fake_realtime() as fake:
        fake.response_chunks = 25  # 0.5 s greeting and goodbye
        async with running_daemon(config(fake, session_seconds=6, goodbye_seconds=3)) as d:
            async with call(d) as c:
                start = trio.current_time()
                await c.start()
                await wait_closed(c, 10)
                elapsed = trio.current_time() - start
        conn = fake.connections[0]
        creates = [e for e in conn.events if e["type"] == "response.create"]
        assert len(creates) == 2
        assert creates[1]["response"]["instructions"] == DEFAULT_PROMPTS["goodbye"]
        assert c.close_code == 1000
        assert c.played_bytes() == 50 * 160  # greeting and goodbye both played whole
        print(f"\ngoodbye: call closed {elapsed:.2f} s after start (limit 6 s)")
        assert 3.4 < elapsed <= 6.3
        # No caller audio after the goodbye was asked for.
        index = conn.events.index(creates[1])
        assert all(e["type"] != "input_audio_buffer.append" for e in conn.events[index + 1 :])


async def test_time_limit_closes_even_if_goodbye_never_plays() -> None:
    async with fake_realtime() as fake:
        fake.auto_respond = False
        async with running_daemon(config(fake, session_seconds=3, goodbye_seconds=1)) as d:
            async with call(d) as c:
                start = trio.current_time()
                await c.start()
                await wait_closed(c, 10)
                elapsed = trio.current_time() - start
        assert c.close_code == 1000
        assert 2.8 < elapsed < 3.8
        await until(lambda: fake.connections[0].closed.is_set())
        assert fake.connections[0].close_code == 1000


async def test_upstream_close_ends_the_call(fake: FakeRealtime) -> None:
    async def hook(conn: FakeConnection) -> None:
        await conn.wait_for("response.create")
        await conn.close(1000, "done")

    fake.on_connect = hook
    async with running_daemon(config(fake)) as d, call(d) as c:
        await c.start()
        await wait_closed(c)
        assert c.close_code in (1000, 1011)


async def test_signatures(fake: FakeRealtime) -> None:
    async with running_daemon(config(fake)) as d:
        for sign in (False, "wrong"):
            with pytest.raises(trio_websocket.ConnectionRejected) as refused:
                async with call(d, sign=sign):
                    pass
            assert refused.value.status_code == 403
        with pytest.raises(trio_websocket.ConnectionRejected) as refused:
            async with twilio_call(
                f"{d.ws_url}/twilio/media",
                public_url="wss://elsewhere.example.com/twilio/media",
                auth_token=TEST_TWILIO_TOKEN,
            ):
                pass
        assert refused.value.status_code == 403
        assert fake.connections == []  # nothing reached upstream
    env = daemon_env()
    del env["TWILIO_AUTH_TOKEN"]
    async with running_daemon(config(fake), env=env) as d:
        with pytest.raises(trio_websocket.ConnectionRejected) as refused:
            async with call(d):
                pass
        assert refused.value.status_code == 503


async def test_voice_webhook_twiml(fake: FakeRealtime) -> None:
    form = {
        "CallSid": "CA" + "1" * 32,
        "Direction": "outbound-api",
        "AnsweredBy": "machine_end_beep",
        "From": "+14082605145",
        "To": "+14155550100",
    }
    signature = RequestValidator(TEST_TWILIO_TOKEN).compute_signature(
        PUBLIC + "/twilio/voice", form
    )
    async with running_daemon(config(fake)) as d, httpx.AsyncClient() as http:
        r = await http.post(
            d.http_url + "/twilio/voice", data=form, headers={"X-Twilio-Signature": signature}
        )
        assert r.status_code == 200
        assert r.headers["content-type"].startswith("text/xml")
        # The stream URL carries a stream token for this call (docs/contract.md §10).
        assert '<Stream url="wss://relay.example.com/twilio/media/' in r.text
        assert '<Parameter name="direction" value="outbound-api" />' in r.text
        assert '<Parameter name="amd" value="machine_end_beep" />' in r.text
        assert '<Parameter name="from" value="+14082605145" />' in r.text
        assert '<Parameter name="to" value="+14155550100" />' in r.text
        assert "<Connect>" in r.text
        r = await http.post(d.http_url + "/twilio/voice", data=form)
        assert r.status_code == 403


@pytest.mark.slow
async def test_200_calls_leave_no_fd_or_task_behind(fake: FakeRealtime) -> None:
    fake.response_chunks = 2
    fake.chunk_interval = 0
    from tests.helpers import assert_nothing_left, task_dump

    async with running_daemon(config(fake)) as d:

        async def one(i: int) -> None:
            async with call(d, send_audio=False) as c:
                await c.start()
                await until(lambda: len(c.echoed_marks) == 2)
                if i % 2:
                    await c.stop()
                    await wait_closed(c)
            # even calls: the caller hangs up (socket close) without `stop`

        await one(0)
        await trio.sleep(0.5)
        fds, listed = d.fd_count(), await task_dump(d)
        for i in range(200):
            await one(i)
        await assert_nothing_left(d, "twilio", fds, listed, "200 calls")
        # The fake runs in this (loaded) test process: its handlers may see the last
        # closes a moment after the daemon has let go of everything.
        with trio.fail_after(10):
            while not all(conn.closed.is_set() for conn in fake.connections):
                await trio.sleep(0.05)


async def test_drain_says_goodbye_then_exits(fake: FakeRealtime) -> None:
    fake.response_chunks = 10
    async with running_daemon(
        {**config(fake), "server": {"public_url": PUBLIC, "drain_seconds": 4}}
    ) as d:
        async with call(d) as c:
            await c.start()
            await until(lambda: len(c.echoed_marks) == 10)
            d.signal(signal.SIGTERM)
            await wait_closed(c, 10)
        conn = fake.connections[0]
        creates = [e for e in conn.events if e["type"] == "response.create"]
        assert creates[-1].get("response", {}).get("instructions") == DEFAULT_PROMPTS["goodbye"]
        assert c.close_code == 1000
        assert await d.wait(10) == 0


async def test_goodbye_interrupts_a_long_answer_and_is_played_whole() -> None:
    async with fake_realtime() as fake:
        fake.response_chunks = 500  # a 10 s greeting, still going when the goodbye is due

        async def shorten(conn: FakeConnection) -> None:
            await conn.wait_for("response.create")
            fake.response_chunks = 5  # the goodbye: 100 ms

        fake.on_connect = shorten
        async with running_daemon(config(fake, session_seconds=5, goodbye_seconds=2)) as d:
            async with call(d) as c:
                start = trio.current_time()
                await c.start()
                await wait_closed(c, 10)
                elapsed = trio.current_time() - start
        conn = fake.connections[0]
        kinds = [e["type"] for e in conn.events if e["type"].startswith("response.")]
        assert kinds == ["response.create", "response.cancel", "response.create"]
        goodbye_audio = [
            chunk_audio(i, 160) for i in range(len(c.received_media) - 5, len(c.received_media))
        ]
        assert c.received_media[-5:] == goodbye_audio
        assert c.played_bytes() == len(c.received_media) * 160  # nothing cut short
        assert c.close_code == 1000
        # After the goodbye played; by the hard limit at the latest (once, in a full-suite
        # run, it closed at the limit: noted on issue 4 for follow-up).
        assert 3.0 < elapsed <= 5.3
