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
from relay.testing.fake_realtime import (
    FakeConnection,
    ResponsePlan,
    ToolCall,
    chunk_audio,
    fake_realtime,
)

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


# -- scripting what docs/contract.md §11 needs: tool calls, usage, transcripts ----------


def output_item(call_id: str, output: dict[str, Any]) -> dict[str, Any]:
    text = orjson.dumps(output).decode()
    item = {"type": "function_call_output", "call_id": call_id, "output": text}
    return {"type": "conversation.item.create", "item": item}


@pytest.mark.parametrize("dialect", ["ga", "beta"])
async def test_a_response_that_speaks_then_calls_two_tools(dialect: str) -> None:
    d = GA if dialect == "ga" else BETA
    async with (
        fake_realtime(dialect) as fake,
        trio_websocket.open_websocket_url(url_of(fake.port)) as ws,
    ):
        fake.chunk_interval = 0
        await recv(ws)
        conn = await fake.wait_connection()
        calls = [ToolCall("lookup", {"order": "42"}), ToolCall("end_call", "{}", call_id="c_2")]
        conn.respond(chunks=2, text="One moment.", calls=calls)
        events = await recv_until(ws, "response.done")
        types = [e["type"] for e in events]
        assert types == [
            "response.created",
            "response.output_item.added",
            d.audio_delta,
            d.audio_delta,
            d.transcript_delta,
            d.audio_done,
            d.transcript_done,
            *[
                "response.output_item.added",
                "response.function_call_arguments.delta",
                "response.function_call_arguments.done",
                "response.output_item.done",
            ]
            * 2,
            "response.done",
        ]
        args_done = [e for e in events if e["type"] == "response.function_call_arguments.done"]
        first_id = conn.responses[0].call_ids[0]
        assert first_id.startswith("call_")
        assert [
            (e["call_id"], e["name"], e["arguments"], e["output_index"]) for e in args_done
        ] == [
            (first_id, "lookup", '{"order":"42"}', 1),
            ("c_2", "end_call", "{}", 2),
        ]
        resp_id = events[0]["response"]["id"]
        assert {e["response_id"] for e in args_done} == {resp_id}
        item_done = [e for e in events if e["type"] == "response.output_item.done"]
        assert [e["item"]["id"] for e in item_done] == [e["item_id"] for e in args_done]
        assert item_done[0]["item"] == {
            **item_done[0]["item"],
            "type": "function_call",
            "status": "completed",
            "call_id": first_id,
            "arguments": '{"order":"42"}',
        }
        done = events[-1]["response"]
        assert done["status"] == "completed"
        assert [o["type"] for o in done["output"]] == ["message", "function_call", "function_call"]
        assert done["usage"]["input_tokens"] == 33 and done["usage"]["output_tokens"] == 43
        assert done["usage"]["output_token_details"] == {"text_tokens": 3, "audio_tokens": 40}
        # The answers: recorded per call, and a second answer is recorded too.
        await send(ws, output_item(first_id, {"ok": True}))
        await send(ws, output_item("c_2", {"ok": True}))
        await send(ws, output_item("c_2", {"ok": True}))
        added = "conversation.item.created" if dialect == "beta" else "conversation.item.added"
        for _ in range(3):
            assert (await recv(ws))["type"] == added
        assert conn.output_for(first_id) == {"ok": True}
        with pytest.raises(AssertionError):
            conn.output_for("c_2")
        assert len(conn.function_outputs) == 3 and conn.errors == []


async def test_done_after_waits_for_every_answer() -> None:
    async with fake_realtime() as fake, trio_websocket.open_websocket_url(url_of(fake.port)) as ws:
        await recv(ws)
        conn = await fake.wait_connection()
        conn.respond(chunks=0, calls=[ToolCall("a", call_id="c_a"), ToolCall("b", call_id="c_b")],
                     done="after")  # fmt: skip
        events = await recv_until(ws, "response.output_item.done")
        events += await recv_until(ws, "response.output_item.done")
        assert "response.output_item.added" in [e["type"] for e in events]
        assert events[1]["item"]["id"] == conn.responses[0].item_id  # no spoken part
        await send(ws, output_item("c_a", {"ok": True}))
        assert (await recv(ws))["type"] == "conversation.item.added"
        with trio.move_on_after(0.2):
            await recv(ws)
            raise AssertionError("response.done before every call was answered")
        assert conn.responding
        await send(ws, {"type": "response.create"})  # too early: the real error
        assert (await recv(ws))["error"]["code"] == "conversation_already_has_active_response"
        await send(ws, output_item("c_b", {"ok": False}))
        events = await recv_until(ws, "response.done")
        assert [e["type"] for e in events] == ["conversation.item.added", "response.done"]
        assert [o["type"] for o in events[-1]["response"]["output"]] == ["function_call"] * 2
        with trio.fail_after(1):
            await conn.wait_response_done()
        assert len(conn.errors) == 1


@pytest.mark.parametrize("which", ["arguments_done", "item_done"])
async def test_a_call_on_one_event_only(which: str) -> None:
    async with fake_realtime() as fake, trio_websocket.open_websocket_url(url_of(fake.port)) as ws:
        await recv(ws)
        conn = await fake.wait_connection()
        conn.respond(chunks=0, calls=[ToolCall("a")], call_events=which)  # type: ignore[arg-type]
        types = [e["type"] for e in await recv_until(ws, "response.done")]
        assert ("response.function_call_arguments.done" in types) == (which == "arguments_done")
        assert ("response.output_item.done" in types) == (which == "item_done")


async def test_plans_answer_the_next_response_creates_in_order() -> None:
    async with fake_realtime() as fake, trio_websocket.open_websocket_url(url_of(fake.port)) as ws:
        fake.chunk_interval = 0
        fake.plans = [
            ResponsePlan(chunks=0, calls=(ToolCall("x", call_id="c_x"),), usage={"input_text": 7}),
        ]
        await recv(ws)
        await send(ws, {"type": "response.create"})
        done = (await recv_until(ws, "response.done"))[-1]["response"]
        assert [o["call_id"] for o in done["output"]] == ["c_x"]
        assert done["usage"]["input_tokens"] == 7 and done["usage"]["output_tokens"] == 0
        await send(ws, {"type": "response.create"})  # plans used up: a plain spoken answer
        done = (await recv_until(ws, "response.done"))[-1]["response"]
        assert [o["type"] for o in done["output"]] == ["message"]
        conn = fake.connections[0]
        assert len(conn.response_creates) == 2
        assert conn.usage_sent()["input_tokens"] == 7 + 33
        assert conn.usage_sent()["output_audio_tokens"] == 40
        fake.usage = None
        await send(ws, {"type": "response.create"})
        assert "usage" not in (await recv_until(ws, "response.done"))[-1]["response"]


async def test_caller_transcript_and_typed_messages() -> None:
    async with fake_realtime() as fake, trio_websocket.open_websocket_url(url_of(fake.port)) as ws:
        await recv(ws)
        conn = await fake.wait_connection()
        item_id = await conn.emit_caller_transcript("I'd like to book.")
        events = [await recv(ws), await recv(ws)]
        assert events[1] == {
            **events[1],
            "type": "conversation.item.input_audio_transcription.completed",
            "item_id": item_id,
            "content_index": 0,
            "transcript": "I'd like to book.",
        }
        text = {"type": "input_text", "text": "The caller pressed 1 2 3."}
        message = {"type": "message", "role": "user", "content": [text]}
        await send(ws, {"type": "conversation.item.create", "item": message})
        assert (await recv(ws))["type"] == "conversation.item.added"
        assert conn.user_texts == ["The caller pressed 1 2 3."]


@pytest.mark.parametrize(
    ("item", "param"),
    [
        ({"type": "function_call_output", "call_id": "call_never", "output": "{}"}, "item.call_id"),
        ({"type": "message", "role": "user", "content": []}, "item.content"),
        (
            {"type": "message", "role": "user", "content": [{"type": "output_text", "text": "x"}]},
            "item.content[0]",
        ),
        (
            {"type": "message", "role": "user", "content": [{"type": "input_text", "text": 5}]},
            "item.content[0]",
        ),
        (
            {"type": "message", "role": "robot", "content": [{"type": "input_text", "text": "x"}]},
            "item.role",
        ),
        ("not an object", "item"),
    ],
)
async def test_item_create_errors(item: Any, param: str) -> None:
    async with fake_realtime() as fake, trio_websocket.open_websocket_url(url_of(fake.port)) as ws:
        await recv(ws)
        await send(ws, {"type": "conversation.item.create", "item": item})
        error = await recv(ws)
        assert error["type"] == "error" and error["error"]["param"] == param
        conn = fake.connections[0]
        assert conn.answered == {} and len(conn.errors) == 1


async def test_output_with_a_non_string_output_is_refused() -> None:
    async with fake_realtime() as fake, trio_websocket.open_websocket_url(url_of(fake.port)) as ws:
        await recv(ws)
        conn = await fake.wait_connection()
        conn.respond(chunks=0, calls=[ToolCall("a", call_id="c_a")])
        await recv_until(ws, "response.done")
        item = {"type": "function_call_output", "call_id": "c_a", "output": {"ok": True}}
        await send(ws, {"type": "conversation.item.create", "item": item})
        assert (await recv(ws))["error"]["param"] == "item.output"
        assert conn.answered == {}


LOOKUP = {
    "type": "function",
    "name": "lookup_order",
    "description": "Look up an order",
    "parameters": {"type": "object", "properties": {"order": {"type": "string"}}},
}


def with_tools(dialect: str, **session: Any) -> dict[str, Any]:
    base: dict[str, Any] = {} if dialect == "beta" else {"type": "realtime"}
    return {"type": "session.update", "session": {**base, **session}}


@pytest.mark.parametrize("dialect", ["ga", "beta"])
async def test_tools_and_transcription_are_accepted(dialect: str) -> None:
    transcription = {"model": "gpt-4o-mini-transcribe"}
    if dialect == "beta":
        extra: dict[str, Any] = {"input_audio_transcription": transcription}
    else:
        extra = {"audio": {"input": {"transcription": transcription}}}
    async with (
        fake_realtime(dialect) as fake,
        trio_websocket.open_websocket_url(url_of(fake.port)) as ws,
    ):
        await recv(ws)
        await send(ws, with_tools(dialect, tools=[LOOKUP], tool_choice="auto", **extra))
        assert (await recv(ws))["type"] == "session.updated"
        assert fake.connections[0].errors == []


@pytest.mark.parametrize(
    ("session", "param"),
    [
        ({"tools": {"a": 1}}, "session.tools"),
        ({"tools": [{**LOOKUP, "type": "code"}]}, "session.tools[0].type"),
        ({"tools": [{**LOOKUP, "name": "has space"}]}, "session.tools[0].name"),
        ({"tools": [{**LOOKUP, "name": "x" * 65}]}, "session.tools[0].name"),
        ({"tools": [{**LOOKUP, "strict": True}]}, "session.tools[0].strict"),
        ({"tools": [{**LOOKUP, "parameters": "{}"}]}, "session.tools[0].parameters"),
        ({"tools": [LOOKUP, LOOKUP]}, "session.tools"),
        ({"tools": [LOOKUP], "tool_choice": "sometimes"}, "session.tool_choice"),
        (
            {"audio": {"input": {"transcription": {"model": 5}}}},
            "session.audio.input.transcription.model",
        ),
        ({"audio": {"input": {"transcription": "whisper"}}}, "session.audio.input.transcription"),
    ],
)
async def test_bad_tools_are_refused(session: dict[str, Any], param: str) -> None:
    async with fake_realtime() as fake, trio_websocket.open_websocket_url(url_of(fake.port)) as ws:
        await recv(ws)
        await send(ws, with_tools("ga", **session))
        error = await recv(ws)
        assert error["type"] == "error" and error["error"]["param"] == param
        assert len(fake.connections[0].errors) == 1
