"""Client relay (docs/contract.md §5), end to end: `relay serve` as a subprocess, the fake
Realtime server."""

from __future__ import annotations

import contextlib
import signal
from collections.abc import AsyncIterator
from typing import Any

import httpx
import orjson
import pytest
import trio
import trio_websocket

from relay.testing.daemon import TEST_OPENAI_KEY, running_daemon
from relay.testing.fake_realtime import FakeConnection, FakeRealtime, fake_realtime
from tests.helpers import (
    assert_nothing_left,
    client,
    close_of,
    scrape,
    task_dump,
    until,
)

# Both drivers of the session core: the reactor's fast path, and the pumps alone.
pytestmark = pytest.mark.usefixtures("fast_path")

SMALL = 1000  # max_message_bytes for the oversize tests


def daemon_config(fake: FakeRealtime, **limits: Any) -> dict[str, dict[str, Any]]:
    return {
        "openai": {
            "realtime_url": f"ws://127.0.0.1:{fake.port}/v1/realtime",
            "dialect": fake.dialect.name,
        },
        "limits": limits,
    }


async def upstream_close(conn: FakeConnection) -> int | None:
    with trio.fail_after(10):
        await conn.closed.wait()
    return conn.close_code


@pytest.fixture
async def echo_fake() -> AsyncIterator[FakeRealtime]:
    async with fake_realtime(expected_key=TEST_OPENAI_KEY) as fake:
        fake.echo = True
        yield fake


async def test_messages_pass_unchanged_both_ways(echo_fake: FakeRealtime) -> None:
    async with running_daemon(daemon_config(echo_fake)) as d, client(d) as ws:
        messages: list[str | bytes] = ["hello", b"\x00\xffbinary", "", b"", '{"type":"x"}', "é✓"]
        for m in messages:
            await ws.send_message(m)
        got = [await ws.get_message() for _ in messages]
        assert got == messages
        assert [type(g) for g in got] == [type(m) for m in messages]
        conn = echo_fake.connections[0]
        assert conn.received == messages
        assert conn.path == "/v1/realtime?model=gpt-realtime"
        assert conn.header("Authorization") == f"Bearer {TEST_OPENAI_KEY}"
        assert conn.header("OpenAI-Beta") is None


async def test_model_choice_beta_header_and_voice_update() -> None:
    async with fake_realtime("beta") as fake:
        fake.echo = True
        async with running_daemon(daemon_config(fake)) as d:
            async with client(d, "?model=gpt-realtime-mini&voice=coral") as ws:
                await ws.send_message("first")
                echoed = orjson.loads(await ws.get_message())  # the relay's own update, echoed
                assert await ws.get_message() == "first"
            conn = fake.connections[0]
            assert conn.path == "/v1/realtime?model=gpt-realtime-mini"
            assert conn.header("OpenAI-Beta") == "realtime=v1"
            assert echoed == {"type": "session.update", "session": {"voice": "coral"}}
            assert conn.received[1] == "first"


async def test_ga_voice_update_shape_and_subprotocol(echo_fake: FakeRealtime) -> None:
    async with running_daemon(daemon_config(echo_fake)) as d:
        async with client(
            d, "?voice=marin", subprotocols=["realtime", "openai-beta.realtime-v1"]
        ) as ws:
            assert ws.subprotocol == "realtime"
            update = orjson.loads(await ws.get_message())
        assert update == {
            "type": "session.update",
            "session": {"type": "realtime", "audio": {"output": {"voice": "marin"}}},
        }
        async with client(d) as ws:
            assert ws.subprotocol is None
            await ws.send_message("x")
            assert await ws.get_message() == "x"  # no relay message of its own without voice


async def test_client_close_reaches_upstream_as_1000(echo_fake: FakeRealtime) -> None:
    async with running_daemon(daemon_config(echo_fake)) as d:
        async with client(d) as ws:
            await ws.send_message("hi")
            await ws.get_message()
            await ws.aclose(4001, "bye")
        assert await upstream_close(echo_fake.connections[0]) == 1000


@pytest.mark.parametrize(
    ("code", "reason", "expected"),
    [
        (1000, "done", 1000),
        (4000, "beta_api_shape_disabled", 4000),
        (1011, "oops", 1011),
        (1001, "going away", 1001),
        (3001, "", 3001),
    ],
)
async def test_upstream_close_code_reaches_client(code: int, reason: str, expected: int) -> None:
    async with fake_realtime() as fake:

        async def hook(conn: FakeConnection) -> None:
            await conn.wait_for("go")
            await conn.close(code, reason)

        fake.on_connect = hook
        fake.auto_respond = False
        async with running_daemon(daemon_config(fake)) as d, client(d) as ws:
            await ws.send_message('{"type":"go"}')
            assert await close_of(ws) == (expected, reason)


async def test_upstream_drop_without_close_is_1011() -> None:
    async with fake_realtime() as fake:

        async def hook(conn: FakeConnection) -> None:
            await conn.wait_for("go")
            conn.abort()

        fake.on_connect = hook
        async with running_daemon(daemon_config(fake)) as d, client(d) as ws:
            await ws.send_message('{"type":"go"}')
            code, _ = await close_of(ws)
            assert code == 1011


async def test_oversize_from_client(echo_fake: FakeRealtime) -> None:
    async with running_daemon(daemon_config(echo_fake, max_message_bytes=SMALL)) as d:
        async with client(d) as ws:
            await ws.send_message("a" * SMALL)  # exactly the limit: relayed
            assert await ws.get_message() == "a" * SMALL
            await ws.send_message(b"b" * SMALL)
            assert await ws.get_message() == b"b" * SMALL
            await ws.send_message(b"c" * (SMALL + 1))
            assert (await close_of(ws))[0] == 1009
        assert await upstream_close(echo_fake.connections[0]) == 1000
        # Text is measured in UTF-8 bytes: 334 three-byte chars is 1002 bytes but 334 chars.
        async with client(d) as ws:
            await ws.send_message("€" * 333 + "a")  # 1000 bytes: relayed
            assert await ws.get_message() == "€" * 333 + "a"
            await ws.send_message("€" * 334)
            assert (await close_of(ws))[0] == 1009
        assert await upstream_close(echo_fake.connections[1]) == 1000


async def test_oversize_from_upstream() -> None:
    async with fake_realtime() as fake:

        async def hook(conn: FakeConnection) -> None:
            await conn.wait_for("go")
            await conn.send_raw("x" * SMALL)
            await conn.send_raw("y" * (SMALL + 1))

        fake.on_connect = hook
        async with running_daemon(daemon_config(fake, max_message_bytes=SMALL)) as d:
            async with client(d) as ws:
                await ws.send_message('{"type":"go"}')
                # session.created and the fake's error for the unknown "go" come first.
                with trio.fail_after(10):
                    while await ws.get_message() != "x" * SMALL:
                        pass
                assert (await close_of(ws))[0] == 1009
            assert await upstream_close(fake.connections[0]) == 1000


async def test_session_time_limit(echo_fake: FakeRealtime) -> None:
    async with running_daemon(daemon_config(echo_fake, session_seconds=2, goodbye_seconds=1)) as d:
        async with client(d) as ws:
            start = trio.current_time()
            assert await close_of(ws) == (1000, "session time limit")
            elapsed = trio.current_time() - start
            assert 1.5 < elapsed < 4
        assert await upstream_close(echo_fake.connections[0]) == 1000


async def test_drain_closes_with_1001_then_exits(echo_fake: FakeRealtime) -> None:
    async with running_daemon({**daemon_config(echo_fake), "server": {"drain_seconds": 1}}) as d:
        async with client(d) as ws:
            await ws.send_message("x")
            await ws.get_message()
            d.signal(signal.SIGTERM)
            assert await close_of(ws) == (1001, "server shutting down")
        assert await upstream_close(echo_fake.connections[0]) == 1001
        assert await d.wait(10) == 0


@pytest.mark.parametrize("status", [401, 429, 500])
async def test_upstream_refusal_is_502(status: int) -> None:
    async with fake_realtime() as fake:
        fake.refuse_status = status
        async with running_daemon(daemon_config(fake)) as d:
            with pytest.raises(trio_websocket.ConnectionRejected) as refused:
                async with client(d):
                    pass
            assert refused.value.status_code == 502


async def test_upstream_unreachable_and_silent_are_502_within_timeout() -> None:
    with trio.socket.socket() as unused:  # a port with nothing listening
        await unused.bind(("127.0.0.1", 0))
        dead_port = unused.getsockname()[1]
    async with fake_realtime() as fake:
        fake.accept_delay = 30
        for port in (dead_port, fake.port):
            config = {
                "openai": {
                    "realtime_url": f"ws://127.0.0.1:{port}/v1/realtime",
                    "connect_timeout_seconds": 1,
                }
            }
            async with running_daemon(config) as d:
                start = trio.current_time()
                with pytest.raises(trio_websocket.ConnectionRejected) as refused:
                    async with client(d):
                        pass
                assert refused.value.status_code == 502
                assert trio.current_time() - start < 2.5


async def test_burst_of_10000_each_way_in_order(echo_fake: FakeRealtime) -> None:
    async with (
        running_daemon(daemon_config(echo_fake)) as d,
        client(d, message_queue_size=20000) as ws,
    ):
        n = 10_000
        start = trio.current_time()

        async def sender() -> None:
            for i in range(n):
                await ws.send_message(f'{{"type":"seq","n":{i}}}')

        received: list[int] = []
        async with trio.open_nursery() as nursery:
            nursery.start_soon(sender)
            while len(received) < n:
                received.append(orjson.loads(await ws.get_message())["n"])
        elapsed = trio.current_time() - start
        assert received == list(range(n))
        assert [orjson.loads(m)["n"] for m in echo_fake.connections[0].received] == list(range(n))
        print(
            f"\n10000 messages each way through one session in {elapsed:.2f} s "
            f"({n / elapsed:.0f} msg/s each way)"
        )


@pytest.mark.slow
async def test_300_sessions_leave_no_fd_or_task_behind() -> None:
    async with fake_realtime() as fake:

        async def hook(conn: FakeConnection) -> None:
            event = await conn.wait_for("end")
            how = orjson.loads(conn.received[-1])["how"] if event else ""
            if how == "upstream_close":
                await conn.close(1000, "bye")
            elif how == "upstream_abort":
                conn.abort()
            elif how == "upstream_big":
                await conn.send_raw("z" * (SMALL + 1))

        fake.on_connect = hook
        config = daemon_config(fake, max_message_bytes=SMALL)
        async with running_daemon(config) as d:

            async def one(how: str) -> None:
                async with client(d) as ws:
                    await ws.get_message()  # session.created: the session is fully up
                    if how == "client_close":
                        await ws.aclose(1000)
                        return
                    if how == "client_big":
                        await ws.send_message(b"q" * (SMALL + 1))
                    else:
                        await ws.send_message(orjson.dumps({"type": "end", "how": how}).decode())
                    await close_of(ws)

            ways = [
                "client_close",
                "client_big",
                "upstream_close",
                "upstream_abort",
                "upstream_big",
            ]
            await one("client_close")  # warm-up: lazily created pools and caches
            await trio.sleep(0.5)
            fds, listed = d.fd_count(), await task_dump(d)
            for i in range(300):
                await one(ways[i % len(ways)])
            await assert_nothing_left(d, "client", fds, listed, "300 sessions")


async def test_oversize_then_other_type(echo_fake: FakeRealtime) -> None:
    """Found by fuzzing: Hypercorn kept an oversized message's buffer, so binary then
    text killed the whole server, and a large oversized message (many TCP reads)
    never reached the session, which lingered. See relay/edge/hypercorn_fix.py."""
    limit = 32 * 1024
    async with running_daemon(daemon_config(echo_fake, max_message_bytes=limit)) as d:
        for first, second in (
            (b"\0" * (4 * limit), "text behind it"),
            ("t" * (4 * limit), b"binary behind it"),
        ):
            index = len(echo_fake.connections)
            async with client(d) as ws:
                await ws.send_message(first)
                with contextlib.suppress(trio_websocket.ConnectionClosed):
                    await ws.send_message(second)
                code, _ = await close_of(ws)
                assert code == 1009
            conn = echo_fake.connections[index]
            with trio.fail_after(3):  # the session ends with the socket, not with TCP later
                await conn.closed.wait()
            assert conn.close_code == 1000
        async with httpx.AsyncClient() as http:
            assert (await http.get(d.http_url + "/healthz")).status_code == 200
        assert d.proc.returncode is None
        assert "Traceback" not in d.log_text()


async def test_token_usage_of_response_done_in_metrics_and_end_log() -> None:
    """docs/contract.md §9/§11: every response.done's usage is counted for browser
    sessions too (both drivers), while every message still passes unchanged."""
    first: dict[str, Any] = {
        "type": "response.done",
        "response": {
            "id": "resp_1",
            "status": "completed",
            # Long, as real ones are: judged by its head (relay/sessions/response_done.py).
            "output": [{"type": "message", "content": [{"transcript": "Sure. " * 300}]}],
            "usage": {
                "total_tokens": 185,
                "input_tokens": 120,
                "output_tokens": 65,
                "input_token_details": {"text_tokens": 20, "audio_tokens": 100},
                "output_token_details": {"text_tokens": 15, "audio_tokens": 50},
            },
        },
    }
    # "type" last, spaced, no details: the text tokens are the totals.
    second = (
        '{"response": {"usage": {"input_tokens": 7, "output_tokens": 3}}, "type": "response.done"}'
    )
    # Mentions that are not a response.done: never counted.
    decoys: list[str | bytes] = [
        orjson.dumps(
            {
                "type": "response.output_audio_transcript.done",
                "transcript": 'I said "response.done" {"usage": {"input_tokens": 5000}}' * 30,
            }
        ).decode(),
        orjson.dumps(
            {
                "type": "session.updated",
                "session": {"response.done": 1},
                "response": first["response"],
            }
        ).decode(),
        orjson.dumps(first).decode().encode(),  # binary: not a Realtime event
    ]
    sent: list[str | bytes] = []

    async with fake_realtime() as fake:

        async def hook(conn: FakeConnection) -> None:
            await conn.wait_for("go")
            await conn.send_event(first)
            sent.append(orjson.dumps(conn.sent[-1]).decode())
            for message in [*decoys, second, "last"]:
                await conn.send_raw(message)
                sent.append(message)

        fake.on_connect = hook
        fake.auto_respond = False
        config = {**daemon_config(fake), "server": {"log_format": "json", "drain_seconds": 2}}
        async with running_daemon(config) as d:
            async with client(d) as ws:
                await ws.send_message('{"type":"go"}')
                got: list[str | bytes] = []  # session.created and more come first
                with trio.fail_after(10):
                    while not got or got[-1] != "last":
                        got.append(await ws.get_message())
                assert got[-len(sent) :] == sent  # unchanged, in order, counted or not

                async def tokens(direction: str, modality: str) -> float:
                    labels = {"kind": "client", "direction": direction, "modality": modality}
                    return await scrape(d, "relay_openai_tokens_total", **labels)

                # Counted as each response.done passes, not only at the end.
                assert await tokens("input", "text") == 20 + 7
                assert await tokens("input", "audio") == 100
                assert await tokens("output", "text") == 15 + 3
                assert await tokens("output", "audio") == 50

            def ends() -> list[dict[str, Any]]:
                lines = [orjson.loads(x) for x in d.log_text().splitlines() if x.startswith("{")]
                return [o for o in lines if o.get("msg") == "session end"]

            await until(lambda: ends())
            (end,) = ends()
            assert end["kind"] == "client"
            assert (end["tokens_in"], end["tokens_out"]) == (127, 68)
