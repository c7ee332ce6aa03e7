"""relay.conversations.twilio_rest against the fake Twilio over real loopback HTTP."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from collections.abc import AsyncIterator

import httpx
import pytest
import trio
from twilio.base.exceptions import TwilioException, TwilioRestException

from relay.conversations.twilio_rest import (
    Participant,
    TwilioHttpClient,
    TwilioRest,
    TwilioTransportError,
    create_group,
    ensure_participant,
    list_participants,
    place_call,
    post_message,
    recent_messages,
)
from relay.testing.fake_twilio import FakeTwilio, fake_twilio

SID = "AC" + "a1" * 16
TOKEN = "twilio-auth-token-do-not-log"
BOT = "gateframes-bot"
PROJECTED = "+14082605145"
AUTHOR = "+14155550100"


@pytest.fixture
async def fake() -> AsyncIterator[FakeTwilio]:
    async with fake_twilio(account_sid=SID, auth_token=TOKEN) as server:
        yield server


@pytest.fixture
async def rest(fake: FakeTwilio) -> AsyncIterator[TwilioRest]:
    async with TwilioRest(SID, TOKEN, api_base=fake.base_url, timeout=5.0) as client:
        yield client


# --- participants --------------------------------------------------------------------------


async def test_ensure_participant_adds_the_bot(fake: FakeTwilio, rest: TwilioRest) -> None:
    convo = fake.add_conversation(participants=[AUTHOR])
    await ensure_participant(rest.client, convo.sid, BOT, PROJECTED)
    bot = convo.participants[-1]
    assert (bot.identity, bot.projected_address, bot.address) == (BOT, PROJECTED, None)
    request = fake.requests[-1]
    assert (request.method, request.path) == ("POST", f"/v1/Conversations/{convo.sid}/Participants")
    assert request.form == [("Identity", BOT), ("MessagingBinding.ProjectedAddress", PROJECTED)]


async def test_ensure_participant_already_there_is_success(
    fake: FakeTwilio, rest: TwilioRest
) -> None:
    convo = fake.add_conversation(participants=[AUTHOR, BOT])
    await ensure_participant(rest.client, convo.sid, BOT, PROJECTED)
    assert len(convo.participants) == 2
    assert fake.requests[-1].status == 409


async def test_concurrent_ensure_participant_race(fake: FakeTwilio, rest: TwilioRest) -> None:
    convo = fake.add_conversation(participants=[AUTHOR])
    fake.delay = 0.05  # both requests are in flight together
    async with trio.open_nursery() as nursery:
        for _ in range(2):
            nursery.start_soon(ensure_participant, rest.client, convo.sid, BOT, PROJECTED)
    assert [p.identity for p in convo.participants] == [None, BOT]
    assert sorted(r.status for r in fake.requests) == [201, 409]


async def test_list_participants_all_pages(fake: FakeTwilio, rest: TwilioRest) -> None:
    numbers = [f"+1415555{i:04d}" for i in range(57)]  # more than one page of 50
    convo = fake.add_conversation(
        participants=[*numbers, {"identity": BOT, "projected_address": PROJECTED}]
    )
    found = await list_participants(rest.client, convo.sid)
    assert len(found) == 58
    assert found[0] == Participant(convo.participants[0].sid, None, numbers[0], None)
    assert found[-1].identity == BOT and found[-1].projected_address == PROJECTED
    pages = [r for r in fake.requests if r.method == "GET"]
    assert len(pages) == 2
    assert ("Page", "1") in pages[1].query  # the next-page URL was rewritten onto the fake


# --- messages ------------------------------------------------------------------------------


async def test_recent_messages_oldest_first(fake: FakeTwilio, rest: TwilioRest) -> None:
    history = [(AUTHOR if i % 2 else BOT, f"message {i}") for i in range(30)]
    convo = fake.add_conversation(participants=[AUTHOR, BOT], messages=history)
    recent = await recent_messages(rest.client, convo.sid, limit=5)
    assert recent == history[-5:]
    assert ("Order", "desc") in fake.requests[-1].query


async def test_recent_messages_skips_media_only(fake: FakeTwilio, rest: TwilioRest) -> None:
    convo = fake.add_conversation(participants=[AUTHOR], messages=[(AUTHOR, "hi")])
    fake.add_message(convo.sid, AUTHOR, None)
    assert await recent_messages(rest.client, convo.sid) == [(AUTHOR, "hi")]


async def test_post_message(fake: FakeTwilio, rest: TwilioRest) -> None:
    convo = fake.add_conversation(participants=[AUTHOR, BOT])
    await post_message(rest.client, convo.sid, BOT, "Hello, world & friends = 1+1")
    message = convo.messages[-1]
    assert (message.author, message.body) == (BOT, "Hello, world & friends = 1+1")


# --- calls ---------------------------------------------------------------------------------


async def test_place_call_with_machine_detection(fake: FakeTwilio, rest: TwilioRest) -> None:
    sid = await place_call(rest.client, "+14155550123", PROJECTED, "https://relay.test/voice")
    (call,) = fake.calls
    assert call.sid == sid
    assert (call.to, call.from_, call.url) == (
        "+14155550123",
        PROJECTED,
        "https://relay.test/voice",
    )
    assert call.machine_detection == "DetectMessageEnd"
    assert call.async_amd == "false"
    assert fake.requests[-1].path == f"/2010-04-01/Accounts/{SID}/Calls.json"
    # No status callback unless asked for.
    assert not any(k.startswith("StatusCallback") for k, _ in call.form)


async def test_place_call_with_a_status_callback(fake: FakeTwilio, rest: TwilioRest) -> None:
    await place_call(
        rest.client,
        "+14155550123",
        PROJECTED,
        "https://relay.test/voice",
        status_callback="https://relay.test/twilio/status",
    )
    (call,) = fake.calls
    fields = dict(call.form)
    assert fields["StatusCallback"] == "https://relay.test/twilio/status"
    assert fields["StatusCallbackMethod"] == "POST"
    assert [v for k, v in call.form if k == "StatusCallbackEvent"] == ["completed"]


async def test_place_call_invalid_number_raises(fake: FakeTwilio, rest: TwilioRest) -> None:
    with pytest.raises(TwilioRestException) as info:
        await place_call(rest.client, "555", PROJECTED, "https://relay.test/voice")
    assert (info.value.status, info.value.code) == (400, 21211)
    assert fake.calls == []


# --- errors --------------------------------------------------------------------------------


@pytest.mark.parametrize(("status", "code"), [(500, 20500), (429, 20429), (503, 20503)])
async def test_server_errors_raise_rest_exception(
    fake: FakeTwilio, rest: TwilioRest, status: int, code: int
) -> None:
    convo = fake.add_conversation(participants=[AUTHOR])
    fake.fail_status, fake.fail_next = status, 3
    with pytest.raises(TwilioRestException) as info:
        await post_message(rest.client, convo.sid, BOT, "hi")
    assert (info.value.status, info.value.code) == (status, code)
    # List calls too: the library alone would raise a bare TwilioException here.
    with pytest.raises(TwilioRestException) as info:
        await list_participants(rest.client, convo.sid)
    assert (info.value.status, info.value.code) == (status, code)
    with pytest.raises(TwilioRestException):
        await recent_messages(rest.client, convo.sid)
    assert fake.fail_next == 0
    await post_message(rest.client, convo.sid, BOT, "recovered")


async def test_unknown_conversation_is_404(rest: TwilioRest) -> None:
    with pytest.raises(TwilioRestException) as info:
        await ensure_participant(rest.client, "CH" + "f" * 32, BOT, PROJECTED)
    assert (info.value.status, info.value.code) == (404, 20404)


async def test_wrong_credentials_are_401_without_the_token(fake: FakeTwilio) -> None:
    async with TwilioRest(SID, "wrong-token", api_base=fake.base_url) as bad:
        with pytest.raises(TwilioRestException) as info:
            await place_call(bad.client, "+14155550123", PROJECTED, "https://relay.test/voice")
    assert (info.value.status, info.value.code) == (401, 20003)
    assert "wrong-token" not in str(info.value)


async def test_unreachable_api_raises_transport_error() -> None:
    with socket.socket() as sock:  # a port that was free a moment ago: nothing listens there
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    async with TwilioRest(SID, TOKEN, api_base=f"http://127.0.0.1:{port}") as rest:
        with pytest.raises(TwilioTransportError) as info:
            await post_message(rest.client, "CH" + "0" * 32, BOT, "hi")
    assert isinstance(info.value, TwilioException)
    assert TOKEN not in str(info.value)


async def test_slow_api_times_out(fake: FakeTwilio) -> None:
    convo = fake.add_conversation(participants=[AUTHOR])
    fake.delay = 2.0
    async with TwilioRest(SID, TOKEN, api_base=fake.base_url, timeout=0.2) as rest:
        with trio.fail_after(1.5), pytest.raises(TwilioTransportError):
            await post_message(rest.client, convo.sid, BOT, "hi")


# --- group creation ------------------------------------------------------------------------


async def test_create_group_adds_everyone_before_the_intro(
    fake: FakeTwilio, rest: TwilioRest
) -> None:
    numbers = ["+14155550201", "+14155550202", AUTHOR]  # the author listed again is harmless
    sid = await create_group(
        rest.client,
        author_address=AUTHOR,
        numbers=numbers,
        bot_identity=BOT,
        projected_address=PROJECTED,
        intro="Welcome, all!",
    )
    convo = fake.conversations[sid]
    assert [(p.identity, p.address, p.projected_address) for p in convo.participants] == [
        (BOT, None, PROJECTED),
        (None, AUTHOR, None),
        (None, "+14155550201", None),
        (None, "+14155550202", None),
    ]
    assert [(m.author, m.body) for m in convo.messages] == [(BOT, "Welcome, all!")]
    order = [(r.method, r.path.rsplit("/", 1)[-1]) for r in fake.requests]
    assert order == [
        ("POST", "Conversations"),
        *[("POST", "Participants")] * 4,
        ("POST", "Messages"),
    ]


async def test_create_group_failure_removes_the_half_made_conversation(
    fake: FakeTwilio, rest: TwilioRest
) -> None:
    with pytest.raises(TwilioRestException) as info:
        await create_group(
            rest.client,
            author_address=AUTHOR,
            numbers=["+14155550201", "+1555"],
            bot_identity=BOT,
            projected_address=PROJECTED,
            intro="Welcome",
        )
    assert (info.value.status, info.value.code) == (400, 50407)
    assert fake.conversations == {}
    assert not any(r.path.endswith("/Messages") for r in fake.requests)
    assert fake.requests[-1].method == "DELETE"


# --- the HTTP client itself ----------------------------------------------------------------


@pytest.mark.parametrize(
    ("base", "uri", "expected"),
    [
        (
            "",
            "https://api.twilio.com/2010-04-01/Accounts/AC1/Calls.json",
            "https://api.twilio.com/2010-04-01/Accounts/AC1/Calls.json",
        ),
        (
            "http://127.0.0.1:9000",
            "https://conversations.twilio.com/v1/Conversations?Page=2",
            "http://127.0.0.1:9000/v1/Conversations?Page=2",
        ),
        (
            "http://127.0.0.1:9000/",
            "https://api.twilio.com/2010-04-01/Accounts/AC1/Calls.json",
            "http://127.0.0.1:9000/2010-04-01/Accounts/AC1/Calls.json",
        ),
        (
            "https://proxy.example/twilio",
            "https://conversations.twilio.com/v1/Conversations",
            "https://proxy.example/twilio/v1/Conversations",
        ),
    ],
)
async def test_api_base_rewrites_scheme_and_host(base: str, uri: str, expected: str) -> None:
    client = TwilioHttpClient(api_base=base)
    try:
        assert client.rewrite(uri) == expected
    finally:
        await client.aclose()


def test_api_base_must_be_a_url() -> None:
    with pytest.raises(ValueError, match="api_base"):
        TwilioHttpClient(api_base="127.0.0.1:9000")


async def test_form_and_json_encoding(fake: FakeTwilio) -> None:
    client = TwilioHttpClient(api_base=fake.base_url)
    try:
        response = await client.request(
            "POST",
            "https://api.twilio.com/probe",
            params={"Q": ["a", "b"]},
            data={"StatusCallbackEvent": ["initiated", "answered"], "Record": True, "N": 3},
            headers={"Content-Type": "application/x-www-form-urlencoded"},
            auth=(SID, TOKEN),
        )
        assert response.status_code == 404  # the fake has no such route; it recorded it
        form_request = fake.requests[-1]
        assert form_request.form == [
            ("StatusCallbackEvent", "initiated"),
            ("StatusCallbackEvent", "answered"),
            ("Record", "true"),
            ("N", "3"),
        ]
        assert form_request.query == [("Q", "a"), ("Q", "b")]
        await client.request(
            "POST",
            "https://api.twilio.com/probe",
            data={"Types": ["a"], "On": True},
            headers={"Content-Type": "application/json"},
            auth=(SID, TOKEN),
        )
        assert fake.requests[-1].json == {"Types": ["a"], "On": True}
    finally:
        await client.aclose()


# --- the fake as a process -----------------------------------------------------------------


async def test_fake_runs_as_a_process() -> None:
    env = {**os.environ, "TWILIO_ACCOUNT_SID": SID, "TWILIO_AUTH_TOKEN": TOKEN}
    proc = await trio.lowlevel.open_process(
        [sys.executable, "-m", "relay.testing.fake_twilio", "--port", "0"],
        stdout=subprocess.PIPE,
        env=env,
    )
    try:
        assert proc.stdout is not None
        line = b""
        with trio.fail_after(10):
            while not line.endswith(b"\n"):
                chunk = await proc.stdout.receive_some(1)
                assert chunk, "the fake exited before printing its URL"
                line += chunk
        base_url = line.decode().strip()
        assert base_url.startswith("http://127.0.0.1:")
        async with TwilioRest(SID, TOKEN, api_base=base_url) as rest:
            sid = await place_call(rest.client, "+14155550123", PROJECTED, "https://x.test/v")
        async with httpx.AsyncClient() as http:
            state = (await http.get(base_url + "/_fake/state")).json()
        assert [c["sid"] for c in state["calls"]] == [sid]
    finally:
        proc.kill()
        await proc.wait()
