"""The fake Realtime server: protocol, rule enforcement, scripting, lifecycle."""

from __future__ import annotations

import base64
import os
import subprocess
import sys
from typing import Any

import orjson
import pytest
import trio
import trio_websocket

from relay.sessions.dialect import BETA, GA, append_audio, phone_session_update, truncate
from relay.testing.fake_realtime import FakeConnection, chunk_audio, fake_realtime

Ws = trio_websocket.WebSocketConnection


async def send(ws: Ws, event: dict[str, Any]) -> None:
    await ws.send_message(orjson.dumps(event).decode())


async def recv(ws: Ws) -> dict[str, Any]:
    with trio.fail_after(5):
        event: dict[str, Any] = orjson.loads(await ws.get_message())
    return event


async def recv_until(ws: Ws, event_type: str) -> list[dict[str, Any]]:
    """Every event up to and including the first of ``event_type``."""
    events = [await recv(ws)]
    while events[-1]["type"] != event_type:
        events.append(await recv(ws))
    return events


def url_of(port: int, model: str = "gpt-realtime") -> str:
    return f"ws://127.0.0.1:{port}/v1/realtime?model={model}"


@pytest.mark.parametrize("dialect", ["ga", "beta"])
async def test_session_created_and_updated(dialect: str) -> None:
    d = GA if dialect == "ga" else BETA
    async with (
        fake_realtime(dialect) as fake,
        trio_websocket.open_websocket_url(url_of(fake.port)) as ws,
    ):
        created = await recv(ws)
        assert created["type"] == "session.created" and created["event_id"]
        assert created["session"]["model"] == "gpt-realtime"
        assert ("type" in created["session"]) == (dialect == "ga")
        await send(ws, phone_session_update(d, voice="ash", instructions="x", turn_detection=False))
        updated = await recv(ws)
        assert updated["type"] == "session.updated"
        conn = fake.connections[0]
        assert conn.errors == []
        if dialect == "ga":
            assert updated["session"]["audio"]["input"]["turn_detection"] is None
            assert updated["session"]["audio"]["output"]["voice"] == "ash"
        else:
            assert updated["session"]["output_audio_format"] == "g711_ulaw"


async def test_ga_closes_4000_on_beta_shape() -> None:
    async with (
        fake_realtime("ga") as fake,
        trio_websocket.open_websocket_url(url_of(fake.port)) as ws,
    ):
        await recv(ws)
        beta = phone_session_update(BETA, voice="ash", instructions="x", turn_detection=True)
        await send(ws, beta)
        with pytest.raises(trio_websocket.ConnectionClosed) as info:
            await recv(ws)
        assert info.value.reason is not None
        reason = info.value.reason
        assert (reason.code, reason.reason) == (4000, "beta_api_shape_disabled")
        assert fake.connections[0].server_close == (4000, "beta_api_shape_disabled")


@pytest.mark.parametrize(
    ("session", "code"),
    [
        ({"audio": {"output": {"voice": "ash"}}}, "missing_required_parameter"),
        ({"type": "realtime", "output_modalities": ["text", "audio"]}, "invalid_value"),
        ({"type": "realtime", "audio": {"input": {"format": "g711_ulaw"}}}, "invalid_value"),
        ({"type": "realtime", "audio": {"output": {"voice": "nobody"}}}, "invalid_value"),
        ({"type": "realtime", "colour": "red"}, "unknown_parameter"),
    ],
)
async def test_ga_session_update_errors(session: dict[str, Any], code: str) -> None:
    async with (
        fake_realtime("ga") as fake,
        trio_websocket.open_websocket_url(url_of(fake.port)) as ws,
    ):
        await recv(ws)
        await send(ws, {"type": "session.update", "event_id": "evt_1", "session": session})
        error = await recv(ws)
        assert error["type"] == "error"
        assert error["error"]["code"] == code and error["error"]["event_id"] == "evt_1"
        assert fake.connections[0].errors == [error["error"]]


async def test_beta_rejects_ga_shape() -> None:
    async with (
        fake_realtime("beta") as fake,
        trio_websocket.open_websocket_url(url_of(fake.port)) as ws,
    ):
        await recv(ws)
        await send(ws, phone_session_update(GA, voice="ash", instructions="x", turn_detection=True))
        error = await recv(ws)
        assert error["error"]["code"] == "unknown_parameter"
        assert len(fake.connections[0].errors) == 1


async def test_append_audio_rules_and_byte_identity() -> None:
    frames = [bytes(range(i, i + 160)) for i in range(0, 50, 10)]
    async with fake_realtime() as fake, trio_websocket.open_websocket_url(url_of(fake.port)) as ws:
        await recv(ws)
        for frame in frames:
            await send(ws, append_audio(base64.b64encode(frame).decode()))
        await send(ws, append_audio("not base64!"))
        error = await recv(ws)
        assert error["error"]["type"] == "invalid_request_error"
        assert (error["error"]["code"], error["error"]["param"]) == ("invalid_value", "audio")
        conn = fake.connections[0]
        assert bytes(conn.input_audio) == b"".join(frames)
        assert len(conn.errors) == 1


@pytest.mark.parametrize("dialect", ["ga", "beta"])
async def test_response_is_spoken(dialect: str) -> None:
    d = GA if dialect == "ga" else BETA
    async with (
        fake_realtime(dialect) as fake,
        trio_websocket.open_websocket_url(url_of(fake.port)) as ws,
    ):
        fake.chunk_interval = 0
        fake.response_chunks = 4
        await recv(ws)
        for _ in range(2):
            await send(ws, {"type": "response.create"})
            events = await recv_until(ws, "response.done")
            types = [e["type"] for e in events]
            assert types[:2] == ["response.created", "response.output_item.added"]
            assert types[-3:] == [d.audio_done, d.transcript_done, "response.done"]
            item_id = events[1]["item"]["id"]
            deltas = [e for e in events if e["type"] == d.audio_delta]
            assert len(deltas) == 4
            for e in deltas:
                assert (e["item_id"], e["output_index"], e["content_index"]) == (item_id, 0, 0)
                assert e["response_id"] == events[0]["response"]["id"]
            assert events[-1]["response"]["status"] == "completed"
        conn = fake.connections[0]
        audio = [base64.b64decode(e["delta"]) for e in conn.sent if e["type"] == d.audio_delta]
        assert audio == [chunk_audio(i, 160) for i in range(8)]  # in order across responses
        assert conn.item_ms(item_id) == 80 and conn.errors == []


async def test_response_pacing() -> None:
    async with fake_realtime() as fake, trio_websocket.open_websocket_url(url_of(fake.port)) as ws:
        fake.response_chunks = 5  # 20 ms apart by default
        await recv(ws)
        start = trio.current_time()
        await send(ws, {"type": "response.create"})
        await recv_until(ws, "response.done")
        assert trio.current_time() - start >= 0.09


async def test_truncate_rules() -> None:
    async with fake_realtime() as fake, trio_websocket.open_websocket_url(url_of(fake.port)) as ws:
        fake.chunk_interval = 0
        fake.response_chunks = 3  # 60 ms of audio
        await recv(ws)
        await send(ws, {"type": "response.create"})
        item_id = (await recv_until(ws, "response.done"))[1]["item"]["id"]
        await send(ws, truncate(item_id, 61))
        error = await recv(ws)
        assert error["error"]["message"] == "Audio content of 60 ms is already shorter than 61 ms"
        await send(ws, truncate("item_unknown", 10))
        error = await recv(ws)
        assert error["error"]["message"] == "Only model output audio messages can be truncated"
        await send(ws, truncate(item_id, 40))
        truncated = await recv(ws)
        assert truncated == {**truncated, "type": "conversation.item.truncated", "audio_end_ms": 40}
        await send(ws, truncate(item_id, 50))  # a truncated item keeps only 40 ms
        error = await recv(ws)
        assert error["error"]["message"] == "Audio content of 40 ms is already shorter than 50 ms"
        assert fake.connections[0].truncations == [(item_id, 40)]
        assert len(fake.connections[0].errors) == 3


async def test_malformed_and_unknown_events() -> None:
    async with fake_realtime() as fake, trio_websocket.open_websocket_url(url_of(fake.port)) as ws:
        await recv(ws)
        await ws.send_message("{not json")
        assert (await recv(ws))["type"] == "error"
        await ws.send_message(b"\x00\x01")
        assert (await recv(ws))["type"] == "error"
        await send(ws, {"type": "session.frobnicate"})
        error = (await recv(ws))["error"]
        assert (error["type"], error["code"]) == ("invalid_request_error", "unknown_event")
        assert len(fake.connections[0].errors) == 3
        assert fake.connections[0].received[:2] == ["{not json", b"\x00\x01"]


async def test_one_response_at_a_time_and_cancel() -> None:
    async with fake_realtime() as fake, trio_websocket.open_websocket_url(url_of(fake.port)) as ws:
        fake.response_chunks = 1000
        await recv(ws)
        await send(ws, {"type": "response.create"})
        await send(ws, {"type": "response.create"})
        events = await recv_until(ws, "error")
        assert events[-1]["error"]["code"] == "conversation_already_has_active_response"
        await send(ws, {"type": "response.cancel"})
        assert fake.connections[0].responding
        done = (await recv_until(ws, "response.done"))[-1]
        assert done["response"]["status"] == "cancelled"
        assert not fake.connections[0].responding
        await send(ws, {"type": "response.cancel"})
        assert (await recv(ws))["error"]["code"] == "response_cancel_not_active"


async def test_hook_drives_barge_in() -> None:
    async def script(conn: FakeConnection) -> None:
        await conn.send_event({"type": "custom.hello"})
        conn.respond(chunks=1000)
        await trio.sleep(0.1)
        await conn.emit_speech_started(1234, "item_caller")

    async with fake_realtime() as fake, trio_websocket.open_websocket_url(url_of(fake.port)) as ws:
        fake.on_connect = script
        events = await recv_until(ws, "response.done")
        types = [e["type"] for e in events]
        assert types[:2] == ["session.created", "custom.hello"]
        started = events[types.index("input_audio_buffer.speech_started")]
        assert (started["audio_start_ms"], started["item_id"]) == (1234, "item_caller")
        assert events[-1]["response"]["status"] == "cancelled"
        assert 1 < types.count(GA.audio_delta) < 1000


async def test_close_and_abort_are_recorded() -> None:
    async with fake_realtime() as fake:
        async with trio_websocket.open_websocket_url(url_of(fake.port)) as ws:
            await recv(ws)
            await ws.aclose(4321, "done here")
        conn = await fake.wait_connection(0)
        await conn.closed.wait()
        assert (conn.close_code, conn.close_reason) == (4321, "done here")

        async def drop(conn: FakeConnection) -> None:
            conn.abort()

        fake.on_connect = drop
        async with trio_websocket.open_websocket_url(url_of(fake.port)) as ws:
            with pytest.raises(trio_websocket.ConnectionClosed) as info:
                while True:
                    await ws.get_message()
            assert info.value.reason is not None and info.value.reason.code == 1006
        conn = await fake.wait_connection(1)
        await conn.closed.wait()
        assert conn.close_code is None


async def test_refusals() -> None:
    async with fake_realtime(expected_key="sk-right") as fake:
        right, wrong = [(b"Authorization", b"Bearer sk-right")], [(b"Authorization", b"Bearer x")]
        cases = [
            (url_of(fake.port), wrong, 401),
            (url_of(fake.port).replace("/v1/realtime", "/v2"), right, 404),
        ]
        for url, headers, status in cases:
            with pytest.raises(trio_websocket.ConnectionRejected) as info:
                async with trio_websocket.open_websocket_url(url, extra_headers=headers):
                    pass
            assert info.value.status_code == status
        assert [c.refused_status for c in fake.connections] == [401, 404]
        assert not any(c.accepted for c in fake.connections)


async def test_echo_mode_relays_10000_each_way() -> None:
    n = 10_000
    async with (
        fake_realtime(echo=True) as fake,
        trio_websocket.open_websocket_url(url_of(fake.port), message_queue_size=n) as ws,
    ):
        sent: list[str | bytes] = [f"m{i}" if i % 2 else f"b{i}".encode() for i in range(n)]
        sent += ["", b""]

        async def pump() -> None:
            for m in sent:
                await ws.send_message(m)

        async with trio.open_nursery() as nursery:
            nursery.start_soon(pump)
            with trio.fail_after(30):
                got = [await ws.get_message() for _ in sent]
        assert got == sent  # types, bytes and order kept; no session.created first
        assert fake.connections[0].received == sent


async def test_context_exit_closes_everything() -> None:
    before = len(os.listdir("/proc/self/fd"))
    async with fake_realtime() as fake:
        fake.response_chunks = 10_000
        ws_cm = trio_websocket.open_websocket_url(url_of(fake.port))
        async with ws_cm as ws:
            await send(ws, {"type": "response.create"})
            await recv(ws)
            port = fake.port
        conn = fake.connections[0]
    assert conn.closed.is_set()
    assert len(os.listdir("/proc/self/fd")) <= before
    with pytest.raises(OSError):
        await trio.open_tcp_stream("127.0.0.1", port)


def test_runs_as_a_process() -> None:
    proc = subprocess.Popen(
        [sys.executable, "-m", "relay.testing.fake_realtime", "--port", "0", "--dialect", "beta"],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert proc.stdout is not None
        url = proc.stdout.readline().strip()
        assert url.startswith("ws://127.0.0.1:") and url.endswith("/v1/realtime")

        async def check() -> None:
            async with trio_websocket.open_websocket_url(url + "?model=m") as ws:
                created = await recv(ws)
                assert created["session"]["modalities"] == ["text", "audio"]

        trio.run(check)
    finally:
        proc.terminate()
        proc.wait(timeout=5)
