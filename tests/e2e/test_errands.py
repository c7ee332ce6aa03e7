"""SMS ⇄ call (docs/contract.md §12), end to end: `@call <number> <task>` in a
conversation, the call placed with a status callback, its stream finding the
task, the call ending, and exactly one report posted back in the conversation.

`relay serve` runs as a subprocess against the fake Twilio REST + chat server
and the fake Realtime server, all in the test's Trio loop. The test plays
Twilio throughout: the convo webhook, ``/twilio/voice`` for the placed call,
the media stream, and the status callback (signed forms, as Twilio sends them).
"""

from __future__ import annotations

import re
from collections.abc import AsyncIterator, Mapping
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any

import httpx
import pytest
import trio
from twilio.request_validator import RequestValidator

from relay.config import ConfigError, parse_settings
from relay.testing.daemon import (
    TEST_OPENAI_KEY,
    TEST_TWILIO_SID,
    TEST_TWILIO_TOKEN,
    Daemon,
    running_daemon,
)
from relay.testing.fake_realtime import FakeConnection, FakeRealtime, fake_realtime
from relay.testing.fake_twilio import FakeCall, FakeConversation, FakeTwilio, fake_twilio
from relay.testing.metrics import sample_value
from relay.testing.redis_server import free_port
from relay.testing.twilio_caller import TwilioCall, voice_webhook
from tests.conftest import needs_redis
from tests.helpers import bounded, ordered_call

PUBLIC = "https://relay.example.com"
BOT = "gateframes-bot"
CALLER_ID = "+14085550199"
ALICE = "+14155550100"
TASK = "ask whether Tuesday at 3 works for the cleaning"
SUMMARY = "They confirmed Tuesday at 3. They will bring supplies."


def sign(form: Mapping[str, str], path: str) -> str:
    return str(RequestValidator(TEST_TWILIO_TOKEN).compute_signature(PUBLIC + path, dict(form)))


def config(fake: FakeTwilio, realtime: FakeRealtime, **sections: Mapping[str, Any]) -> Any:
    base: dict[str, dict[str, Any]] = {
        "server": {"public_url": PUBLIC},
        "twilio": {
            "api_base": fake.base_url,
            "bot_identity": BOT,
            "caller_id": CALLER_ID,
            "voice_url": PUBLIC + "/twilio/voice",
        },
        "openai": {
            "api_base": fake.openai_base,
            "chat_model": "gpt-test-mini",
            "realtime_url": f"ws://127.0.0.1:{realtime.port}/v1/realtime",
        },
    }
    for section, values in sections.items():
        base.setdefault(section, {}).update(values)
    return base


@dataclass
class Errands:
    fake: FakeTwilio
    realtime: FakeRealtime
    relays: list[Daemon]
    http: httpx.AsyncClient

    @property
    def d(self) -> Daemon:
        return self.relays[0]

    async def say(self, convo: FakeConversation, body: str, d: Daemon | None = None) -> None:
        """ALICE sends ``body`` in ``convo``; the relay's webhook hears of it."""
        message = self.fake.add_message(convo.sid, ALICE, body)
        form = {
            "AccountSid": TEST_TWILIO_SID,
            "EventType": "onMessageAdded",
            "ConversationSid": convo.sid,
            "MessageSid": message.sid,
            "Index": str(message.index),
            "Author": ALICE,
            "Body": body,
            "Source": "SMS",
        }
        response = await self.http.post(
            (d or self.d).http_url + "/twilio/convo",
            data=form,
            headers={"X-Twilio-Signature": sign(form, "/twilio/convo")},
        )
        assert (response.status_code, response.text.strip()) == (200, "ok")

    async def task_call(self, convo: FakeConversation, body: str, count: int = 1) -> list[FakeCall]:
        """``body`` (an @call) placed ``count`` calls and was confirmed in ``convo``."""
        before = len(self.fake.calls)
        confirmed = len(posted(convo)) + 1
        await self.say(convo, body)
        await posts(convo, confirmed)
        calls = self.fake.calls[before:]
        assert len(calls) == count
        return calls

    def status_form(self, call: FakeCall, status: str, **more: str) -> dict[str, str]:
        """Twilio's status callback form for ``call`` ending with ``status``."""
        form = {
            "AccountSid": TEST_TWILIO_SID,
            "ApiVersion": "2010-04-01",
            "CallSid": call.sid,
            "CallStatus": status,
            "CallDuration": "0",
            "Direction": "outbound-api",
            "From": call.from_,
            "To": call.to,
            "CallbackSource": "call-progress-events",
            "SequenceNumber": "0",
        }
        form.update(more)
        return form

    async def status(
        self,
        form: Mapping[str, str],
        *,
        d: Daemon | None = None,
        signature: str | None = None,
    ) -> httpx.Response:
        headers = {"X-Twilio-Signature": signature or sign(form, "/twilio/status")}
        if signature == "":
            headers = {}
        return await self.http.post(
            (d or self.d).http_url + "/twilio/status", data=dict(form), headers=headers
        )

    async def status_count(self, outcome: str, d: Daemon | None = None) -> float:
        """``relay_call_status_total{outcome}`` as ``d`` counts it."""
        text = (await self.http.get((d or self.d).http_url + "/metrics")).text
        return sample_value(text, "relay_call_status_total", outcome=outcome)

    @asynccontextmanager
    async def answered(
        self, call: FakeCall, answered_by: str = "human", d: Daemon | None = None
    ) -> AsyncIterator[tuple[TwilioCall, FakeConnection]]:
        """Twilio answers ``call``: asks ``/twilio/voice``, then opens the stream it names."""
        relay = d or self.d
        order = await voice_webhook(
            relay.http_url,
            call.voice_form(TEST_TWILIO_SID, answered_by),
            public_url=PUBLIC,
            auth_token=TEST_TWILIO_TOKEN,
        )
        index = len(self.realtime.connections)
        async with ordered_call(relay, order, account_sid=TEST_TWILIO_SID) as c:
            await c.start()
            with trio.fail_after(10):
                conn = await self.realtime.wait_connection(index)
                while not updates(conn):
                    await trio.sleep(0.01)
            yield c, conn


@asynccontextmanager
async def errands(
    relays: int = 1, redis_url: str | None = None, **sections: Mapping[str, Any]
) -> AsyncIterator[Errands]:
    async with (
        fake_twilio(
            account_sid=TEST_TWILIO_SID, auth_token=TEST_TWILIO_TOKEN, openai_key=TEST_OPENAI_KEY
        ) as fake,
        fake_realtime() as realtime,
        httpx.AsyncClient(timeout=10) as http,
    ):
        fake.chat_reply = SUMMARY
        realtime.response_chunks = 3
        if redis_url is not None:
            sections = {**sections, "store": {"backend": "redis", "redis_url": redis_url}}
        cfg = config(fake, realtime, **sections)
        async with running_daemon(cfg) as a:
            if relays == 1:
                yield Errands(fake, realtime, [a], http)
                started = [a]
            else:
                async with running_daemon(cfg) as b:
                    yield Errands(fake, realtime, [a, b], http)
                started = [a, b]
        for d in started:
            log = d.log_text()
            assert "Traceback" not in log
            assert TEST_TWILIO_TOKEN not in log and TEST_OPENAI_KEY not in log


def posted(convo: FakeConversation) -> list[str]:
    return [m.body or "" for m in convo.messages if m.author == BOT]


async def posts(convo: FakeConversation, count: int, timeout: float = 15) -> list[str]:
    """The bot's messages in ``convo`` once there are ``count``; then a moment more,
    so that a wrong extra one would show."""
    with trio.fail_after(timeout):
        while len(posted(convo)) < count:
            await trio.sleep(0.02)
    await trio.sleep(0.3)
    return posted(convo)


def updates(conn: FakeConnection) -> list[dict[str, Any]]:
    return [e for e in conn.events if e.get("type") == "session.update"]


async def converse(c: TwilioCall, conn: FakeConnection, said: str) -> None:
    """The greeting plays, the person called answers ``said``, the model ends the call."""
    await c.wait_until(lambda: len(c.received_media) >= 3 and not c.pending_marks())
    await conn.send_event(
        {
            "type": "conversation.item.input_audio_transcription.completed",
            "item_id": "item_caller_1",
            "content_index": 0,
            "transcript": said,
        }
    )
    await conn.send_event(
        {
            "type": "response.function_call_arguments.done",
            "response_id": "resp_end",
            "item_id": "item_end",
            "output_index": 0,
            "call_id": "call_end",
            "name": "end_call",
            "arguments": '{"reason": "done"}',
        }
    )
    await conn.send_event(
        {"type": "response.done", "response": {"id": "resp_end", "status": "completed"}}
    )
    with trio.fail_after(10):
        await c.closed.wait()


# --- the task call, end to end ----------------------------------------------------------------


@bounded(60)
async def test_a_task_call_is_pursued_and_summarised_once_in_its_conversation() -> None:
    async with errands() as e:
        convo = e.fake.add_conversation(participants=[ALICE])
        other = e.fake.add_conversation(participants=[ALICE])
        [call] = await e.task_call(convo, f"@call 415-555-0100 {TASK}")
        [confirmation] = posted(convo)
        assert "Calling +14155550100." in confirmation and f'"{TASK}"' in confirmation
        assert "I'll post what I learn here." in confirmation
        fields = dict(call.form)
        assert fields["StatusCallback"] == PUBLIC + "/twilio/status"
        assert [v for k, v in call.form if k == "StatusCallbackEvent"] == ["completed"]
        assert (call.to, call.machine_detection) == ("+14155550100", "DetectMessageEnd")

        async with e.answered(call) as (c, conn):
            session = updates(conn)[0]["session"]
            assert TASK in session["instructions"]
            assert "end_call" in [t["name"] for t in session["tools"]]
            assert session["audio"]["input"]["transcription"]["model"]
            await converse(c, conn, "Yes, Tuesday at 3 is fine, we'll bring supplies.")
        assert c.close_code == 1000

        assert await posts(convo, 2) == [confirmation, f"415-555-0100: {SUMMARY}"]
        [chat] = e.fake.chat_requests
        assert chat.json["model"] == "gpt-test-mini"
        asked = chat.json["messages"][1]["content"]
        assert TASK in asked and "Them: Yes, Tuesday at 3 is fine" in asked
        # Twilio's "completed" afterwards (and its retries) add nothing.
        for _ in range(3):
            response = await e.status(e.status_form(call, "completed", CallDuration="12"))
            assert (response.status_code, response.text.strip()) == (200, "ok")
        assert await posts(convo, 2) == [confirmation, f"415-555-0100: {SUMMARY}"]
        assert posted(other) == []


@bounded(60)
async def test_a_voicemail_is_reported_as_such() -> None:
    async with errands() as e:
        convo = e.fake.add_conversation(participants=[ALICE])
        [call] = await e.task_call(convo, f"@call (415) 555-0101: {TASK}")
        async with e.answered(call, "machine_end_beep") as (c, conn):
            session = updates(conn)[0]["session"]
            assert TASK in session["instructions"]
            with trio.fail_after(10):
                await c.closed.wait()
        assert (await posts(convo, 2))[1:] == ["(415) 555-0101: left a voicemail"]
        assert e.fake.chat_requests == []


@bounded(60)
async def test_chat_down_still_reports_that_the_call_ended() -> None:
    async with errands(openai={"api_base": f"http://127.0.0.1:{free_port()}/v1"}) as e:
        convo = e.fake.add_conversation(participants=[ALICE])
        [call] = await e.task_call(convo, f"@call 4155550102 {TASK}")
        async with e.answered(call) as (c, conn):
            await converse(c, conn, "Tuesday works.")
        assert (await posts(convo, 2))[1:] == ["4155550102: call ended (the assistant hung up)"]
        assert "call summary failed" in e.d.log_text()


@bounded(60)
async def test_busy_and_no_answer_are_reported_once_each_without_a_stream() -> None:
    async with errands() as e:
        convo = e.fake.add_conversation(participants=[ALICE])
        busy, unanswered, lost = await e.task_call(
            convo, f"@call 415-555-0103, 4155550104 and +1 415 555 0114 {TASK}", 3
        )
        assert "what I learn on each call" in posted(convo)[0]
        # Twilio's REST is slow now: the callbacks are still answered at once.
        e.fake.delay = 1.5
        # The third was answered, but its stream never reached this relay.
        for call, status in ((busy, "busy"), (unanswered, "no-answer"), (lost, "completed")):
            for _ in range(3):  # Twilio retrying the callback
                start = trio.current_time()
                response = await e.status(e.status_form(call, status))
                assert (response.status_code, response.text.strip()) == (200, "ok")
                assert trio.current_time() - start < 1.0
        assert sorted((await posts(convo, 4))[1:]) == [
            "+1 415 555 0114: answered, but the call never reached the assistant",
            "415-555-0103: busy",
            "4155550104: no answer",
        ]


@bounded(60)
async def test_a_call_without_a_task_is_placed_as_before_and_its_status_does_nothing() -> None:
    async with errands() as e:
        convo = e.fake.add_conversation(participants=[ALICE])
        [call] = await e.task_call(convo, "@call 4155550105")
        assert posted(convo) == ["Calling +14155550105."]
        assert dict(call.form)["StatusCallback"] == PUBLIC + "/twilio/status"
        requests = len(e.fake.requests)
        for status in ("busy", "completed", "failed"):
            response = await e.status(e.status_form(call, status))
            assert (response.status_code, response.text.strip()) == (200, "ok")
        await trio.sleep(0.5)
        assert len(e.fake.requests) == requests and len(posted(convo)) == 1


def _calls_section_parsed() -> bool:
    try:
        parse_settings({"calls": {"summaries": False}})
    except ConfigError:
        return False
    return True


# [calls] is parsed by the change for the calls' other settings; until it is here,
# summaries = false cannot be configured.
@pytest.mark.skipif(not _calls_section_parsed(), reason="[calls] is not parsed yet")
@bounded(60)
async def test_summaries_off_places_the_task_call_and_posts_nothing_after() -> None:
    async with errands(calls={"summaries": False}) as e:
        convo = e.fake.add_conversation(participants=[ALICE])
        [call] = await e.task_call(convo, f"@call 4155550106 {TASK}")
        assert "I'll post" not in posted(convo)[0]
        async with e.answered(call) as (c, conn):
            assert TASK in updates(conn)[0]["session"]["instructions"]
            await converse(c, conn, "Sure.")
        await e.status(e.status_form(call, "busy"))
        await trio.sleep(0.5)
        assert len(posted(convo)) == 1 and e.fake.chat_requests == []


@bounded(60)
async def test_the_drain_waits_for_a_report_in_flight() -> None:
    async with errands() as e:
        convo = e.fake.add_conversation(participants=[ALICE])
        [call] = await e.task_call(convo, f"@call 4155550107 {TASK}")
        e.fake.delay = 1.0  # the report's REST post is in flight when SIGTERM comes
        assert (await e.status(e.status_form(call, "failed"))).status_code == 200
        e.d.signal()
        assert await e.d.wait() == 0
        assert posted(convo)[1:] == ["4155550107: the call failed"]


@needs_redis
@bounded(60)
async def test_a_second_process_sharing_redis_finds_the_task_and_reports_once() -> None:
    pytest.importorskip("coredis", reason="coredis (the `redis` extra) is not installed")
    from relay.testing.redis_server import running_redis

    async with running_redis() as redis, errands(2, redis_url=redis.url) as e:
        a, b = e.relays
        convo = e.fake.add_conversation(participants=[ALICE])
        [call, unanswered] = await e.task_call(convo, f"@call 4155550108 4155550109 {TASK}", 2)
        # A placed the calls; Twilio's stream lands on B, which finds the task in Redis.
        async with e.answered(call, d=b) as (c, conn):
            assert TASK in updates(conn)[0]["session"]["instructions"]
            await converse(c, conn, "Tuesday at 3 works.")
        # The status callbacks land on either process, and are retried on both.
        for d in (a, b, a):
            assert (await e.status(e.status_form(call, "completed"), d=d)).status_code == 200
        retry = e.status_form(unanswered, "no-answer")

        async def deliver(d: Daemon) -> None:
            assert (await e.status(retry, d=d)).status_code == 200

        async with trio.open_nursery() as nursery:
            for d in (a, b, a, b):
                nursery.start_soon(deliver, d)
        assert sorted((await posts(convo, 3))[1:]) == [
            "4155550108: " + SUMMARY,
            "4155550109: no answer",
        ]
        assert "call report posted" in b.log_text()


# --- attacks ------------------------------------------------------------------------------


@bounded(60)
async def test_unsigned_or_forged_status_callbacks_are_refused() -> None:
    async with errands() as e:
        convo = e.fake.add_conversation(participants=[ALICE])
        victim, mine = await e.task_call(convo, f"@call 4155550110 4155550111 {TASK}", 2)
        form = e.status_form(victim, "busy")
        refused = [
            await e.status(form, signature=""),
            await e.status(form, signature="bm90IGEgc2lnbmF0dXJl"),
            # A genuine signature, for another call's form: someone else's CallSid.
            await e.status(form, signature=sign(e.status_form(mine, "busy"), "/twilio/status")),
            # Signed for another URL (the convo webhook's).
            await e.status(form, signature=sign(form, "/twilio/convo")),
        ]
        assert [r.status_code for r in refused] == [403] * 4
        # Signed, but another account's, or a CallSid of the wrong shape.
        other = {**form, "AccountSid": "AC" + "9" * 32}
        assert (await e.status(other)).status_code == 403
        bad = {**form, "CallSid": "CA../../Calls/" + victim.sid}
        assert (await e.status(bad)).status_code == 400
        assert (await e.status({**form, "CallSid": ""})).status_code == 400
        # Wrong types and sizes: JSON is no signed form; a huge body is refused whole.
        url = e.d.http_url + "/twilio/status"
        headers = {"X-Twilio-Signature": sign(form, "/twilio/status")}
        r = await e.http.post(url, json=form, headers=headers)
        assert r.status_code == 403
        r = await e.http.post(url, data={**form, "Pad": "x" * 300_000}, headers=headers)
        assert (r.status_code, r.headers.get("connection")) == (413, "close")
        # Signed, but a status that is not a final one (or spelled otherwise): nothing.
        for odd in ("busy\n", "BUSY", "in-progress", "ringing", ""):
            response = await e.status({**form, "CallStatus": odd})
            assert (response.status_code, response.text.strip()) == (200, "ok")
        await trio.sleep(0.5)
        assert len(posted(convo)) == 1
        assert await e.status_count("forbidden") == 6
        assert await e.status_count("malformed") == 2  # the 413 is the server's own
        assert await e.status_count("ignored") == 5
        assert await e.status_count("accepted") == 0
        assert sign(form, "/twilio/status") not in e.d.log_text()
        # The genuine one still goes through.
        assert (await e.status(form)).status_code == 200
        assert (await posts(convo, 2))[1:] == ["4155550110: busy"]


@bounded(60)
async def test_a_flood_of_replayed_status_callbacks_posts_one_message() -> None:
    async with errands() as e:
        convo = e.fake.add_conversation(participants=[ALICE])
        [call] = await e.task_call(convo, f"@call 4155550112 {TASK}")
        form = e.status_form(call, "canceled")
        statuses: list[int] = []

        async def replay() -> None:
            statuses.append((await e.status(form)).status_code)

        with trio.fail_after(30):
            async with trio.open_nursery() as nursery:
                for _ in range(300):
                    nursery.start_soon(replay)
        assert statuses == [200] * 300
        # Replays stop at the route, before they cost a background job.
        assert await e.status_count("accepted") == 1
        assert await e.status_count("duplicate") == 299
        assert (await posts(convo, 2))[1:] == ["4155550112: the call was canceled"]
        messages = [r for r in e.fake.requests if r.method == "POST" and "/Messages" in r.path]
        assert len(messages) == 2  # the confirmation and the one report


@bounded(60)
async def test_a_huge_task_with_control_characters_is_cut_and_stays_on_one_line() -> None:
    forged = "\n2026-12-03 09:00:00,000 ERROR relay: forged line\r\x1b[2J\u2028"
    task = "ask " + forged + "x" * 5000
    async with errands() as e:
        convo = e.fake.add_conversation(participants=[ALICE])
        [call] = await e.task_call(convo, f"@call 4155550113 {task}")
        [confirmation] = posted(convo)
        assert "cut to its first 1000 characters" in confirmation
        assert "\n" not in confirmation and "\x1b" not in confirmation
        assert len(confirmation) <= 1600
        async with e.answered(call) as (c, conn):
            instructions = updates(conn)[0]["session"]["instructions"]
            carried = instructions.split("gave you this task: ", 1)[1].split("\n", 1)[0]
            assert carried.startswith("ask 2026-12-03 09:00:00,000 ERROR relay: forged line")
            assert len(carried) == 1000 and not re.search(r"[\r\x1b\u2028]", carried)
            await converse(c, conn, "What?")
        await posts(convo, 2)
        asked = e.fake.chat_requests[0].json["messages"][1]["content"]
        assert "forged line [2J" in asked and "\r" not in asked
        log = e.d.log_text()
        assert not re.search(r"^\S* ?ERROR relay: forged", log, re.M)
        assert "forged" not in log  # the task itself is never logged
