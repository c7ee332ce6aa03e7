"""Attacks on the signed Twilio webhooks (docs/contract.md §6, §7), end to end against
`relay serve` and the fake Twilio REST + chat completions server.

Twilio's signature is an HMAC over the URL and the sorted field names and values
run together (``AccountSid`` ``AC…`` ``Author`` ``+1…`` …), so it cannot tell where
one field ends: a captured webhook whose MessageSid swallows the field after it,
or is swallowed by the one before, still verifies, and its dedupe key is new. It
ran twice (issue 16, finding 7). And ``@call`` placed as many calls as one SMS
named (finding 11, toll fraud).
"""

from __future__ import annotations

import secrets
from collections.abc import AsyncIterator, Mapping
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any

import httpx
import trio
from twilio.request_validator import RequestValidator

from relay.testing.daemon import TEST_OPENAI_KEY, TEST_TWILIO_SID, TEST_TWILIO_TOKEN, running_daemon
from relay.testing.fake_twilio import FakeConversation, FakeTwilio, fake_twilio

PUBLIC = "https://relay.example.com"
BOT = "gateframes-bot"
ALICE = "+14155550100"
BOB = "+14155550101"
OTHER_ACCOUNT = "AC" + "9" * 32
TIMEOUT = 30


def sign(path: str, form: Mapping[str, str]) -> str:
    return str(RequestValidator(TEST_TWILIO_TOKEN).compute_signature(PUBLIC + path, dict(form)))


@dataclass
class Relay:
    fake: FakeTwilio
    http: httpx.AsyncClient

    async def post(
        self, path: str, form: Mapping[str, str], signature: str | None = None
    ) -> httpx.Response:
        signature = signature or sign(path, form)
        return await self.http.post(
            path, data=dict(form), headers={"X-Twilio-Signature": signature}
        )

    def posted(self, convo: FakeConversation) -> list[str]:
        return [m.body or "" for m in convo.messages if m.author == BOT]

    async def replies(self, convo: FakeConversation, count: int) -> list[str]:
        with trio.fail_after(10):
            while len(self.posted(convo)) < count:
                await trio.sleep(0.02)
        return self.posted(convo)


@asynccontextmanager
async def relay(**twilio: Any) -> AsyncIterator[Relay]:
    async with fake_twilio(
        account_sid=TEST_TWILIO_SID, auth_token=TEST_TWILIO_TOKEN, openai_key=TEST_OPENAI_KEY
    ) as fake:
        config = {
            "server": {"public_url": PUBLIC},
            "twilio": {"api_base": fake.base_url, "bot_identity": BOT, **twilio},
            "openai": {"api_base": fake.openai_base},
        }
        async with (
            running_daemon(config) as d,
            httpx.AsyncClient(base_url=d.http_url, timeout=10) as http,
        ):
            yield Relay(fake, http)
            assert "Traceback" not in d.log_text()


def moved(form: dict[str, str], into: str, swallowed: str) -> dict[str, str]:
    """``form`` with field ``swallowed`` run into the value of ``into`` (the field
    just before it in Twilio's sort order): the same signature, other fields."""
    out = {k: v for k, v in form.items() if k != swallowed}
    out[into] = form[into] + swallowed + form[swallowed]
    return out


async def test_a_boundary_moving_replay_is_refused_and_runs_once() -> None:
    with trio.fail_after(TIMEOUT):
        async with relay() as r:
            convo = r.fake.add_conversation(participants=[ALICE])
            # An MMS (it has Media): Index, Media, MessageSid, ParticipantSid in a row.
            mms = r.fake.add_message(convo.sid, ALICE, "what time is it?")
            form = {**r.fake.message_added_form(convo.sid, mms), "Media": "[]"}
            order = sorted(form)
            at = order.index("Index")
            assert order[at : at + 4] == ["Index", "Media", "MessageSid", "ParticipantSid"]
            # A plain SMS: Index right before MessageSid.
            sms = r.fake.add_message(convo.sid, ALICE, "and the date?")
            plain = r.fake.message_added_form(convo.sid, sms)
            for original in (form, plain):
                answer = await r.post("/twilio/convo", original)
                assert (answer.status_code, answer.text) == (200, "ok\n")
            assert await r.replies(convo, 2) == [r.fake.chat_reply] * 2

            # Each replay carries the captured signature, which still verifies.
            refused = [
                (form, moved(form, "MessageSid", "ParticipantSid")),
                (plain, moved(plain, "Index", "MessageSid")),
            ]
            for original, replay in refused:
                signature = sign("/twilio/convo", original)
                assert sign("/twilio/convo", replay) == signature
                answer = await r.post("/twilio/convo", replay, signature)
                assert answer.status_code == 400, (replay, answer.status_code)
            # Well formed, but the same message: its position was recorded too.
            replay = moved(form, "Media", "MessageSid")
            signature = sign("/twilio/convo", form)
            assert sign("/twilio/convo", replay) == signature
            answer = await r.post("/twilio/convo", replay, signature)
            assert (answer.status_code, answer.text) == (200, "ok\n")

            await trio.sleep(0.5)  # any job would have reached the fake by now
            assert r.posted(convo) == [r.fake.chat_reply] * 2
            assert len(r.fake.chat_requests) == 2


async def test_an_account_sid_that_is_not_ours_is_403() -> None:
    with trio.fail_after(TIMEOUT):
        async with relay() as r:
            convo = r.fake.add_conversation(participants=[ALICE])
            message = r.fake.add_message(convo.sid, ALICE, "hi")
            form = {**r.fake.message_added_form(convo.sid, message), "AccountSid": OTHER_ACCOUNT}
            assert (await r.post("/twilio/convo", form)).status_code == 403
            voice = {
                "AccountSid": OTHER_ACCOUNT,
                "CallSid": "CA" + secrets.token_hex(16),
                "From": ALICE,
                "To": BOB,
            }
            answer = await r.post("/twilio/voice", voice)
            assert answer.status_code == 403 and "<Stream" not in answer.text
            await trio.sleep(0.3)
            assert r.fake.requests == []
            # Ours is served (and one with no AccountSid at all, as before).
            assert (
                await r.post("/twilio/voice", {**voice, "AccountSid": TEST_TWILIO_SID})
            ).status_code == 200


async def test_sids_of_the_wrong_shape_are_400() -> None:
    hexes = secrets.token_hex(16)
    with trio.fail_after(TIMEOUT):
        async with relay() as r:
            convo = r.fake.add_conversation(participants=[ALICE])
            message = r.fake.add_message(convo.sid, ALICE, "hi")
            form = r.fake.message_added_form(convo.sid, message)
            bad = [
                {"MessageSid": "MB" + hexes},  # a participant's prefix
                {"MessageSid": "IM" + message.sid[2:].upper()},  # upper-case hex
                {"ParticipantSid": "MB" + hexes[:-1]},  # short
                {"ConversationSid": "CH" + hexes.upper()},
                {"WebhookSid": "WH" + hexes + "0"},
                {"SomethingSid": "x"},  # an unknown kind: still two letters + 32 hex
                {"Index": "1MessageSid"},
            ]
            for change in bad:
                answer = await r.post("/twilio/convo", {**form, **change})
                assert answer.status_code == 400, (change, answer.status_code)
            voice = {"AccountSid": TEST_TWILIO_SID, "CallSid": "CA1", "From": ALICE, "To": BOB}
            assert (await r.post("/twilio/voice", voice)).status_code == 400
            await trio.sleep(0.3)
            assert r.fake.requests == []
            # Unknown SID fields of the right shape pass.
            ok = await r.post("/twilio/convo", {**form, "SomethingSid": "ZZ" + hexes})
            assert (ok.status_code, ok.text) == (200, "ok\n")


async def test_call_with_eight_numbers_calls_five() -> None:
    numbers = [f"+1415555{n:04d}" for n in range(110, 118)]
    with trio.fail_after(TIMEOUT):
        async with relay(max_call_targets=5) as r:
            convo = r.fake.add_conversation(participants=[ALICE])
            message = r.fake.add_message(convo.sid, ALICE, "@call " + ", ".join(numbers))
            answer = await r.post("/twilio/convo", r.fake.message_added_form(convo.sid, message))
            assert answer.status_code == 200
            [reply] = await r.replies(convo, 1)
            assert [c.to for c in r.fake.calls] == numbers[:5]
            for number in numbers[5:]:
                assert number in reply.split("not:")[1], reply
            # @group: the author and the first five, never the rest.
            message = r.fake.add_message(convo.sid, ALICE, "@group " + " ".join(numbers))
            await r.post("/twilio/convo", r.fake.message_added_form(convo.sid, message))
            [_, reply] = await r.replies(convo, 2)
            [group] = [c for c in r.fake.conversations.values() if c is not convo]
            sms = {p.address for p in group.participants if p.address}
            assert sms == {ALICE, *numbers[:5]}
            for number in numbers[5:]:
                assert number in reply.split("not:")[1], reply
