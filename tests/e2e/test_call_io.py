"""HTTP tools and the ``call.ended`` event through ``relay serve`` (docs/contract.md §11):
the fake Realtime server calls the operator's tools, real HTTP servers on 127.0.0.1
answer them and receive the event, and check the signature as a receiver would."""

from __future__ import annotations

import json
import signal
from typing import Any

import trio

from relay.calls.signing import verify
from relay.testing.daemon import daemon_env, running_daemon
from relay.testing.fake_realtime import FakeConnection, fake_realtime
from relay.testing.scripted_http import Request, respond, scripted_http
from tests.helpers import PUBLIC, call, scrape, until, wait_closed

KEY = "e2e-events-signing-key-0123456789"


async def model_calls(conn: FakeConnection, response: str, *calls: tuple[str, str, Any]) -> None:
    """The model's response ``response`` makes the function calls ``(call_id, name, args)``."""
    await conn.send_event({"type": "response.created", "response": {"id": response}})
    for call_id, name, args in calls:
        await conn.send_event(
            {
                "type": "response.function_call_arguments.done",
                "response_id": response,
                "item_id": f"it_{call_id}",
                "output_index": 0,
                "call_id": call_id,
                "name": name,
                "arguments": json.dumps(args),
            }
        )
    await conn.send_event(
        {"type": "response.done", "response": {"id": response, "status": "completed"}}
    )


def outputs(conn: FakeConnection) -> dict[str, str]:
    """call_id -> the output the relay answered with."""
    return {
        e["item"]["call_id"]: e["item"]["output"]
        for e in conn.events
        if e.get("type") == "conversation.item.create"
        and e.get("item", {}).get("type") == "function_call_output"
    }


async def test_tools_answered_and_the_event_delivered_signed() -> None:
    async def tool(request: Request, stream: trio.SocketStream) -> None:
        if request.target == "/lookup":
            order = json.loads(request.body)["arguments"]["order"]
            await respond(stream, 200, json.dumps({"order": order, "status": "shipped"}).encode())
        else:
            await respond(stream, 500, b"internal error")

    events_seen: list[Request] = []

    async def receiver(request: Request, stream: trio.SocketStream) -> None:
        # A real receiver: refuse what is not signed with the key, take the rest.
        ok = verify(request.headers.get("x-relay-signature"), request.body, KEY)
        if ok:
            events_seen.append(request)
        await respond(stream, 204 if ok else 401)

    with trio.fail_after(60):
        async with (
            fake_realtime() as fake,
            scripted_http(tool) as tools,
            scripted_http(receiver) as events,
        ):
            fake.response_chunks = 2
            schema = {
                "type": "object",
                "properties": {"order": {"type": "string"}},
                "required": ["order"],
            }
            config: dict[str, dict[str, Any]] = {
                "openai": {"realtime_url": f"ws://127.0.0.1:{fake.port}/v1/realtime"},
                "server": {"public_url": PUBLIC},
                "calls": {
                    "events_url": events.url + "/events",
                    "http_tools": [
                        {
                            "name": "lookup_order",
                            "url": tools.url + "/lookup",
                            "parameters": schema,
                        },
                        {"name": "broken", "url": tools.url + "/broken", "timeout_seconds": 2},
                    ],
                },
            }
            env = daemon_env(EVENTS_SIGNING_KEY=KEY)
            async with running_daemon(config, env=env) as d:
                async with call(d, direction="inbound") as c:
                    conn = await fake.wait_connection()
                    await c.start()
                    update = await conn.wait_for("session.update")
                    offered = [t["name"] for t in update["session"]["tools"]]
                    assert offered == ["end_call", "lookup_order", "broken"]
                    await until(lambda: not conn.responding)  # the greeting is over
                    await model_calls(
                        conn,
                        "r_tools",
                        ("c1", "lookup_order", {"order": "A-17"}),
                        ("c2", "broken", {}),
                    )
                    await until(lambda: len(outputs(conn)) == 2)
                    answers = outputs(conn)
                    assert json.loads(answers["c1"]) == {"order": "A-17", "status": "shipped"}
                    assert json.loads(answers["c2"]) == {
                        "ok": False,
                        "error": "tool answered HTTP 500",
                    }
                    # What the tool received, signed with the same key.
                    lookup = next(r for r in tools.requests if r.target == "/lookup")
                    assert verify(lookup.headers["x-relay-signature"], lookup.body, KEY)
                    assert json.loads(lookup.body)["call_id"] == "c1"
                    # The model goes on after both answers: one response.create for them.
                    await conn.wait_for("response.create", 2)
                    await c.stop()
                    await wait_closed(c)
                await until(lambda: len(events_seen) == 1, timeout=15)
                event = json.loads(events_seen[0].body)
                assert event["type"] == "call.ended"
                assert event["outcome"] == "caller_hung_up"
                # In the order the answers came (the failing tool is often first).
                assert sorted(event["tools"], key=lambda t: t["name"]) == [
                    {"name": "broken", "ok": False},
                    {"name": "lookup_order", "ok": True},
                ]
                assert await scrape(d, "relay_call_events_total", outcome="sent") == 1
                assert await scrape(d, "relay_call_events_total", outcome="failed") == 0
                log = d.log_text()
                assert KEY not in log
            assert len(events.requests) == 1  # delivered at once: no retry


async def test_the_drain_waits_for_an_event_being_retried() -> None:
    """SIGTERM right after a call: the event's receiver is down for the first attempt;
    the daemon retries within its drain time and exits only after delivering."""
    answers = [503, 204]

    async def receiver(request: Request, stream: trio.SocketStream) -> None:
        await respond(stream, answers.pop(0) if len(answers) > 1 else answers[0])

    with trio.fail_after(60):
        async with fake_realtime() as fake, scripted_http(receiver) as events:
            fake.response_chunks = 1
            config: dict[str, dict[str, Any]] = {
                "openai": {"realtime_url": f"ws://127.0.0.1:{fake.port}/v1/realtime"},
                "server": {"public_url": PUBLIC, "drain_seconds": 5},
                "calls": {"events_url": events.url + "/events"},
            }
            async with running_daemon(config, env=daemon_env(EVENTS_SIGNING_KEY=KEY)) as d:
                async with call(d, direction="inbound") as c:
                    await c.start()
                    await until(lambda: len(c.received_media) == 1)
                    await c.stop()
                    await wait_closed(c)
                await until(lambda: len(events.requests) == 1)
                d.signal(signal.SIGTERM)
                assert await d.wait(15) == 0
                log = d.log_text()
            assert len(events.requests) == 2  # the refused attempt, then the delivery
            for request in events.requests:
                assert verify(request.headers["x-relay-signature"], request.body, KEY)
            assert "not delivered" not in log and KEY not in log
