"""The fake Twilio's live-call updates (hang up, redirect) through the real twilio
library (``relay.conversations.twilio_rest.update_call``), over loopback HTTP."""

from __future__ import annotations

import json
import secrets
from collections.abc import AsyncIterator

import httpx
import pytest
import trio
from twilio.base.exceptions import TwilioRestException

from relay.conversations.twilio_rest import TwilioRest, update_call
from relay.testing.fake_twilio import FakeTwilio, fake_twilio

SID = "AC" + "b2" * 16
TOKEN = "twilio-auth-token-for-call-updates"
DIAL = "<Response><Dial>+14155550100</Dial></Response>"


def call_sid() -> str:
    return "CA" + secrets.token_hex(16)


@pytest.fixture
async def fake() -> AsyncIterator[FakeTwilio]:
    async with fake_twilio(account_sid=SID, auth_token=TOKEN) as server:
        yield server


@pytest.fixture
async def rest(fake: FakeTwilio) -> AsyncIterator[TwilioRest]:
    async with TwilioRest(SID, TOKEN, api_base=fake.base_url, timeout=5.0) as client:
        yield client


async def test_hang_up_and_redirect_are_recorded(fake: FakeTwilio, rest: TwilioRest) -> None:
    first, second = call_sid(), call_sid()
    with trio.fail_after(10):
        await update_call(rest.client, first, twiml=DIAL)
        await update_call(rest.client, second, status="completed")
    updates = fake.call_updates
    assert [(u.call_sid, u.status, u.twiml, u.answered) for u in updates] == [
        (first, None, DIAL, 200),
        (second, "completed", None, 200),
    ]
    assert all(u.ok for u in updates)
    assert fake.requests[-1].path == f"/2010-04-01/Accounts/{SID}/Calls/{second}.json"


async def test_a_hung_up_call_cannot_be_updated_again(fake: FakeTwilio, rest: TwilioRest) -> None:
    sid = call_sid()
    with trio.fail_after(10):
        await update_call(rest.client, sid, status="completed")
        with pytest.raises(TwilioRestException) as info:
            await update_call(rest.client, sid, twiml=DIAL)
    assert (info.value.status, info.value.code) == (400, 21220)
    assert [u.ok for u in fake.call_updates] == [True, False]


@pytest.mark.parametrize("status", [404, 500])
async def test_the_next_update_can_be_made_to_fail(
    fake: FakeTwilio, rest: TwilioRest, status: int
) -> None:
    sid = call_sid()
    fake.fail_call_updates(status)
    with trio.fail_after(10):
        with pytest.raises(TwilioRestException) as info:
            await update_call(rest.client, sid, twiml=DIAL)
        assert info.value.status == status
        await update_call(rest.client, sid, twiml=DIAL)  # only the next one failed
    assert [(u.twiml, u.answered) for u in fake.call_updates] == [(DIAL, status), (DIAL, 200)]


@pytest.mark.parametrize(
    ("form", "status"),
    [
        ({"Status": "busy"}, 400),  # not a status an update may set
        ({"Twiml": "<Response><Dial>+1"}, 400),  # not well-formed
        ({"Twiml": "<Dial>+14155550100</Dial>"}, 400),  # no <Response> root
        ({}, 400),
    ],
)
async def test_bad_updates_are_refused(fake: FakeTwilio, form: dict[str, str], status: int) -> None:
    sid = call_sid()
    with trio.fail_after(10):
        async with httpx.AsyncClient(auth=(SID, TOKEN)) as http:
            url = f"{fake.base_url}/2010-04-01/Accounts/{SID}/Calls/{sid}.json"
            answer = await http.post(url, data=form)
    assert answer.status_code == status
    assert json.loads(answer.text)["status"] == status
    assert [u.answered for u in fake.call_updates] == [status]


@pytest.mark.parametrize(
    "path",
    [
        f"/2010-04-01/Accounts/{SID}/Calls/CAnothex.json",
        f"/2010-04-01/Accounts/AC{'0' * 32}/Calls/CA{'0' * 32}.json",  # another account
        f"/2010-04-01/Accounts/{SID}/Calls/CA{'0' * 32}",  # no .json
    ],
)
async def test_unknown_resources_are_404(fake: FakeTwilio, path: str) -> None:
    with trio.fail_after(10):
        async with httpx.AsyncClient(auth=(SID, TOKEN)) as http:
            answer = await http.post(fake.base_url + path, data={"Status": "completed"})
    assert answer.status_code == 404
    assert fake.ended_calls == set()


async def test_updates_need_the_credentials(fake: FakeTwilio) -> None:
    sid = call_sid()
    with trio.fail_after(10):
        async with httpx.AsyncClient(auth=(SID, "wrong")) as http:
            url = f"{fake.base_url}/2010-04-01/Accounts/{SID}/Calls/{sid}.json"
            answer = await http.post(url, data={"Status": "completed"})
    assert answer.status_code == 401
    assert fake.ended_calls == set()
