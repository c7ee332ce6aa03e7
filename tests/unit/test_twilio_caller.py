"""The simulated Twilio caller against a tiny scripted relay over real loopback sockets."""

from __future__ import annotations

import base64
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from functools import partial
from typing import Any, Literal

import orjson
import pytest
import trio
import trio_websocket
from twilio.request_validator import RequestValidator

from relay.edge.twiml import connect_twiml
from relay.testing.twilio_caller import (
    USER_AGENT,
    parse_stream_twiml,
    pattern_frame,
    protocol_error,
    twilio_call,
)

TOKEN = "test-auth-token"
PUBLIC = "wss://relay.example.com/twilio/media"
SLACK = 0.06  # scheduling slack on a busy test machine, seconds

Json = dict[str, Any]


class ScriptedRelay:
    """Accepts one Twilio stream if its signature is valid for PUBLIC; records what arrives."""

    def __init__(self) -> None:
        self.headers: dict[str, str] = {}
        self.messages: list[tuple[float, Json]] = []
        self.ws: trio_websocket.WebSocketConnection | None = None
        self.accepted = trio.Event()
        self._changed = trio.Event()

    async def handler(self, request: trio_websocket.WebSocketRequest) -> None:
        self.headers = {k.decode().lower(): v.decode() for k, v in request.headers}
        signature = self.headers.get("x-twilio-signature", "")
        if not RequestValidator(TOKEN).validate(PUBLIC, {}, signature):
            await request.reject(403)
            return
        self.ws = await request.accept()
        self.accepted.set()
        try:
            while True:
                message = await self.ws.get_message()
                self.messages.append((trio.current_time(), orjson.loads(message)))
                self._changed.set()
                self._changed = trio.Event()
        except trio_websocket.ConnectionClosed:
            pass

    def of(self, kind: str) -> list[tuple[float, Json]]:
        return [(t, m) for t, m in self.messages if m["event"] == kind]

    async def wait_for(self, predicate: Callable[[], bool]) -> None:
        with trio.fail_after(5):
            while not predicate():
                await self._changed.wait()

    async def send(self, event: Json) -> float:
        assert self.ws is not None
        await self.ws.send_message(orjson.dumps(event).decode())
        return trio.current_time()

    async def media(self, sid: str, audio: bytes) -> float:
        payload = base64.b64encode(audio).decode()
        return await self.send({"event": "media", "streamSid": sid, "media": {"payload": payload}})

    async def mark(self, sid: str, name: str) -> float:
        return await self.send({"event": "mark", "streamSid": sid, "mark": {"name": name}})


@asynccontextmanager
async def scripted_relay() -> AsyncIterator[tuple[ScriptedRelay, str]]:
    relay = ScriptedRelay()
    async with trio.open_nursery() as nursery:
        serve = partial(trio_websocket.serve_websocket, relay.handler, "127.0.0.1", 0,
                        ssl_context=None)  # fmt: skip
        server = await nursery.start(serve)
        yield relay, f"ws://127.0.0.1:{server.port}/twilio/media"
        nursery.cancel_scope.cancel()


def marks_back(relay: ScriptedRelay) -> dict[str, float]:
    return {m["mark"]["name"]: t for t, m in relay.of("mark")}


async def test_handshake_is_signed_for_the_public_url_and_looks_like_twilio() -> None:
    async with scripted_relay() as (relay, url), twilio_call(
        url, public_url=PUBLIC, auth_token=TOKEN, send_audio=False,
        custom_parameters={"direction": "outbound-api", "amd": "human"},
    ) as call:  # fmt: skip
        await call.start()
        await relay.wait_for(lambda: len(relay.messages) == 2)
    assert relay.headers["user-agent"] == USER_AGENT
    assert "origin" not in relay.headers
    assert RequestValidator(TOKEN).validate(PUBLIC, {}, relay.headers["x-twilio-signature"])
    (_, connected), (_, start) = relay.messages
    assert connected == {"event": "connected", "protocol": "Call", "version": "1.0.0"}
    assert start["event"] == "start" and start["sequenceNumber"] == "1"
    assert start["streamSid"] == call.stream_sid == start["start"]["streamSid"]
    assert call.stream_sid.startswith("MZ") and start["start"]["callSid"].startswith("CA")
    assert start["start"]["accountSid"].startswith("AC")
    assert start["start"]["tracks"] == ["inbound"]
    assert start["start"]["mediaFormat"] == {
        "encoding": "audio/x-mulaw", "sampleRate": 8000, "channels": 1,
    }  # fmt: skip
    assert start["start"]["customParameters"] == {"direction": "outbound-api", "amd": "human"}


@pytest.mark.parametrize("sign", [False, "wrong"])
async def test_refused_handshake_raises_with_the_status(sign: bool | Literal["wrong"]) -> None:
    async with scripted_relay() as (relay, url):
        with pytest.raises(trio_websocket.ConnectionRejected) as refused:
            async with twilio_call(url, public_url=PUBLIC, auth_token=TOKEN, sign=sign):
                pytest.fail("handshake should have been refused")
    assert refused.value.status_code == 403
    assert ("x-twilio-signature" in relay.headers) == (sign == "wrong")


async def test_signature_over_the_connected_url_by_default() -> None:
    async with scripted_relay() as (relay, url):
        with pytest.raises(trio_websocket.ConnectionRejected):
            async with twilio_call(url, auth_token=TOKEN):
                pass
        assert RequestValidator(TOKEN).validate(url, {}, relay.headers["x-twilio-signature"])


async def test_caller_audio_is_paced_frames_in_twilio_shape() -> None:
    frames = [pattern_frame(i) for i in range(10)]
    async with scripted_relay() as (relay, url), twilio_call(
        url, public_url=PUBLIC, auth_token=TOKEN, frame_source=frames,
    ) as call:  # fmt: skip
        await call.start()
        await relay.wait_for(lambda: len(relay.of("media")) == 10)
        await call.send_dtmf("7")
        await call.stop()
        await relay.wait_for(lambda: len(relay.of("stop")) == 1)
    media = relay.of("media")
    got = [base64.b64decode(m["media"]["payload"]) for _, m in media]
    assert got == frames and bytes(call.sent_audio) == b"".join(frames)
    assert [m["media"]["chunk"] for _, m in media] == [str(i) for i in range(1, 11)]
    assert [m["sequenceNumber"] for _, m in media] == [str(i) for i in range(2, 12)]
    assert all(m["media"]["track"] == "inbound" and m["streamSid"] == call.stream_sid
               for _, m in media)  # fmt: skip
    stamps = [int(m["media"]["timestamp"]) for _, m in media]
    assert stamps == sorted(stamps) and 170 <= stamps[-1] - stamps[0] <= 180 + SLACK * 1000
    span = media[-1][0] - media[0][0]
    assert 0.18 - 0.01 <= span <= 0.18 + SLACK
    (_, dtmf), (_, stop) = relay.of("dtmf")[0], relay.of("stop")[0]
    assert dtmf["dtmf"] == {"track": "inbound_track", "digit": "7"}
    assert dtmf["sequenceNumber"] == "12"
    assert stop["stop"] == {"accountSid": call.account_sid, "callSid": call.call_sid}
    assert stop["sequenceNumber"] == "13"


async def test_marks_echo_when_the_audio_before_them_has_played() -> None:
    async with scripted_relay() as (relay, url), twilio_call(
        url, public_url=PUBLIC, auth_token=TOKEN, send_audio=False,
    ) as call:  # fmt: skip
        await call.start()
        sid = call.stream_sid
        await relay.accepted.wait()
        sent = await relay.media(sid, b"\x01" * 1600)  # 200 ms
        await relay.mark(sid, "a")
        await relay.media(sid, b"\x02" * 800)  # 100 ms more, queued behind
        await relay.mark(sid, "b")
        await relay.mark(sid, "c")  # nothing between b and c: echoed together
        await relay.wait_for(lambda: len(relay.of("mark")) == 3)
        back = marks_back(relay)
        assert 0.2 <= back["a"] - sent <= 0.2 + SLACK
        assert 0.3 <= back["b"] - sent <= 0.3 + SLACK
        assert back["c"] - back["b"] <= SLACK / 2
        assert [c.nbytes for c in call.playback] == [1600, 800]
        assert call.played_bytes() == 2400
        assert call.received_media == [b"\x01" * 1600, b"\x02" * 800]
        # idle again: a new chunk starts when it arrives
        later = await relay.media(sid, b"\x03" * 400)
        await relay.mark(sid, "d")
        await relay.wait_for(lambda: len(relay.of("mark")) == 4)
        assert 0.05 <= marks_back(relay)["d"] - later <= 0.05 + SLACK
        echoed = relay.of("mark")
        assert all(m["streamSid"] == sid for _, m in echoed)
        seqs = [int(m["sequenceNumber"]) for _, m in echoed]
        assert seqs == sorted(seqs) and len(set(seqs)) == 4
    assert call.protocol_errors == []


async def test_clear_drops_unplayed_audio_and_returns_pending_marks_at_once() -> None:
    async with scripted_relay() as (relay, url), twilio_call(
        url, public_url=PUBLIC, auth_token=TOKEN, send_audio=False,
    ) as call:  # fmt: skip
        await call.start()
        sid = call.stream_sid
        await relay.accepted.wait()
        sent = await relay.media(sid, b"\x01" * 8000)  # one second
        await relay.mark(sid, "a")
        await relay.media(sid, b"\x02" * 8000)
        await relay.mark(sid, "b")
        await trio.sleep(0.3)
        cleared = await relay.send({"event": "clear", "streamSid": sid})
        await relay.wait_for(lambda: len(relay.of("mark")) == 2)
        back = marks_back(relay)
        assert max(back.values()) - cleared <= SLACK / 2
        assert len(call.clears) == 1 and call.pending_marks() == []
        played = call.cleared_at_bytes[0]
        assert abs(played - (call.clears[0] - sent) * 8000) <= 8 * SLACK * 1000 / 2
        assert 2400 <= played <= 2400 + 8 * SLACK * 1000
        assert [c.index for c in call.playback] == [0]  # the second chunk never started
        assert call.playback[0].nbytes == played
        await trio.sleep(0.05)
        assert call.played_bytes() == played  # nothing plays after a clear
        # after a clear the buffer is empty: new audio plays from its arrival
        again = await relay.media(sid, b"\x03" * 800)
        await relay.mark(sid, "c")
        await relay.wait_for(lambda: len(relay.of("mark")) == 3)
        assert 0.1 <= marks_back(relay)["c"] - again <= 0.1 + SLACK
        assert call.played_bytes() == played + 800
    assert call.protocol_errors == []


async def test_relay_messages_twilio_would_reject_are_recorded() -> None:
    async with scripted_relay() as (relay, url), twilio_call(
        url, public_url=PUBLIC, auth_token=TOKEN, send_audio=False,
    ) as call:  # fmt: skip
        await call.start()
        sid = call.stream_sid
        await relay.accepted.wait()
        assert relay.ws is not None
        bad: list[Json] = [
            {"event": "response.create"},
            {"event": "media", "streamSid": "MZother", "media": {"payload": "AAAA"}},
            {"event": "media", "streamSid": sid, "media": {"payload": "not base64!"}},
            {"event": "media", "streamSid": sid},
            {"event": "mark", "streamSid": sid, "mark": {"name": ""}},
            {"event": "clear"},
        ]
        for event in bad:
            await relay.send(event)
        await relay.ws.send_message(b"binary")
        await relay.ws.send_message("{not json")
        await relay.mark(sid, "ok")
        await call.wait_until(lambda: len(call.echoed_marks) == 1)
    assert len(call.protocol_errors) == len(bad) + 2
    assert call.received_media == [] and call.clears == []


def test_protocol_error_accepts_exactly_twilios_three_messages() -> None:
    sid = "MZ1"
    media = {"event": "media", "streamSid": sid, "media": {"payload": ""}}
    assert protocol_error(media, sid) is None
    assert protocol_error({"event": "mark", "streamSid": sid, "mark": {"name": "x"}}, sid) is None
    assert protocol_error({"event": "clear", "streamSid": sid}, sid) is None
    assert protocol_error({"event": "stop", "streamSid": sid}, sid) is not None


async def test_relay_close_is_seen_with_code_and_reason() -> None:
    async with scripted_relay() as (relay, url), twilio_call(
        url, public_url=PUBLIC, auth_token=TOKEN,
    ) as call:  # fmt: skip
        await call.start()
        await relay.wait_for(lambda: len(relay.of("media")) >= 2)
        assert relay.ws is not None
        await relay.ws.aclose(1000, "bye")
        with trio.fail_after(2):
            await call.closed.wait()
        assert call.close_code == 1000 and call.close_reason == "bye"


async def test_exit_ends_every_task_even_with_marks_pending() -> None:
    async with scripted_relay() as (relay, url):
        with trio.fail_after(2):
            async with twilio_call(url, public_url=PUBLIC, auth_token=TOKEN) as call:
                await call.start()
                await relay.accepted.wait()
                await relay.media(call.stream_sid, b"\x01" * 80000)  # ten seconds
                await relay.mark(call.stream_sid, "late")
                await call.wait_until(lambda: call.pending_marks() == ["late"])
        await relay.wait_for(lambda: relay.ws is not None and relay.ws.closed is not None)
        assert relay.ws is not None and relay.ws.closed is not None
        assert relay.ws.closed.code == 1000
    assert call.closed.is_set()


async def test_errors_in_the_body_propagate_unwrapped() -> None:
    async with scripted_relay() as (_, url):
        with pytest.raises(KeyError):
            async with twilio_call(url, public_url=PUBLIC, auth_token=TOKEN):
                raise KeyError("boom")


def test_stream_order_read_from_twiml() -> None:
    url = "wss://relay.example.com/twilio/media/TOKEN-abc_1"
    xml = connect_twiml(url, "outbound-api", "human", (("from", "+14155550100"), ("to", "")))
    order = parse_stream_twiml(xml, "CA" + "1" * 32)
    assert order.url == url and order.path == "/twilio/media/TOKEN-abc_1"
    assert order.parameters == {"direction": "outbound-api", "amd": "human", "from": "+14155550100"}
    with pytest.raises(ValueError):
        parse_stream_twiml("<Response><Say>hi</Say></Response>", "CA1")
