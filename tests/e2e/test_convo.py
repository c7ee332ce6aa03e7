"""Conversations webhook (docs/contract.md §7), end to end.

`relay serve` runs as a subprocess pointed at the fake Twilio REST + chat
completions server, which runs inside each test's own Trio loop. The test
plays Twilio: it puts the message into the fake conversation (as Twilio does
before it calls the webhook), then POSTs the signed webhook form.

Most tests share one `relay serve` (module scope, started once: a daemon
takes a second or more to start) and each brings its own fake on the port
that daemon was configured with. They stay independent because every SID is
fresh and counters are read as deltas. Tests that need another config, a
signal or a dead daemon start their own with :func:`harness`.
"""

from __future__ import annotations

import re
import signal
import socket
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Iterator, Mapping
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest
import trio
from twilio.request_validator import RequestValidator

from relay.admission.twilio_auth import TwilioGate
from relay.config import load_secrets, parse_settings
from relay.daemon.handlers import twilio_routes
from relay.daemon.outbound import Outbound
from relay.daemon.state import DaemonState
from relay.edge.app import create_http_app
from relay.store.memory import MemoryStore
from relay.testing.daemon import (
    TEST_OPENAI_KEY,
    TEST_TWILIO_SID,
    TEST_TWILIO_TOKEN,
    Daemon,
    daemon_config,
    daemon_env,
    running_daemon,
    toml_dumps,
)
from relay.testing.fake_twilio import FakeConversation, FakeTwilio, fake_twilio
from relay.testing.metrics import sample_value

PUBLIC_URL = "https://relay.example.com"
WEBHOOK_URL = PUBLIC_URL + "/twilio/convo"
FORM = "application/x-www-form-urlencoded"
BOT = "gateframes-bot"
PROJECTED = "+14082605145"
CALLER_ID = "+14085550199"
VOICE_URL = "https://voice.example.com/twilio/voice"
INTRO = "Welcome to the group (test intro)."
SMS_PROMPT = "You are a terse SMS assistant (test prompt)."
ALICE = "+14155550100"
BOB = "+14155550101"
CAROL = "+14155550102"


def sign(form: Mapping[str, str], url: str = WEBHOOK_URL) -> str:
    return str(RequestValidator(TEST_TWILIO_TOKEN).compute_signature(url, dict(form)))


@dataclass(frozen=True)
class Metrics:
    """A /metrics scrape read relative to the one taken when the test began."""

    text: str
    baseline: str

    def __call__(self, name: str, **labels: str) -> float:
        return sample_value(self.text, name, **labels) - sample_value(self.baseline, name, **labels)


def config(fake_base: str, **sections: Mapping[str, Any]) -> dict[str, dict[str, Any]]:
    """The relay config for a fake at ``fake_base``; ``sections`` win per key."""
    base: dict[str, dict[str, Any]] = {
        "server": {"public_url": PUBLIC_URL},
        "twilio": {
            "api_base": fake_base,
            "bot_identity": BOT,
            "projected_address": PROJECTED,
            "caller_id": CALLER_ID,
            "voice_url": VOICE_URL,
            "intro_message": INTRO,
        },
        "openai": {"api_base": fake_base + "/v1", "chat_model": "gpt-test-mini"},
        "prompts": {"sms": SMS_PROMPT},
    }
    for section, values in sections.items():
        base.setdefault(section, {}).update(values)
    return base


@dataclass
class Harness:
    """A relay, the fake it talks to, and an HTTP client for the relay.

    ``own`` is the daemon when the test started it (and may signal it).
    """

    fake: FakeTwilio
    http: httpx.AsyncClient
    port: int
    log_path: Path
    own: Daemon | None = None
    _baseline: str = ""
    _log_from: int = field(default=0)

    async def begin(self, *, scrape: bool = True) -> Harness:
        """Mark the start: log position and (unless ``scrape`` is off, as it costs
        a token of the HTTP bucket) the counters."""
        if scrape:
            self._baseline = (await self.http.get("/metrics")).text
        self._log_from = self.log_path.stat().st_size
        return self

    @property
    def daemon(self) -> Daemon:
        assert self.own is not None, "this test shares the module's relay"
        return self.own

    def log(self) -> str:
        """What the relay logged since the test began."""
        with open(self.log_path, "rb") as f:
            f.seek(self._log_from)
            return f.read().decode(errors="replace")

    async def post(self, form: Mapping[str, str], *, signed: bool = True) -> httpx.Response:
        headers = {"X-Twilio-Signature": sign(form)} if signed else {}
        return await self.http.post("/twilio/convo", data=dict(form), headers=headers)

    async def say(
        self, convo: FakeConversation, author: str, body: str, **extra: str
    ) -> httpx.Response:
        """``author`` sends ``body``: the message lands in the conversation, then the webhook."""
        message = self.fake.add_message(convo.sid, author, body)
        form = {
            "EventType": "onMessageAdded",
            "ConversationSid": convo.sid,
            "MessageSid": message.sid,
            "Index": str(message.index),
            "Author": author,
            "Body": body,
            "AccountSid": TEST_TWILIO_SID,
            "Source": "SMS",
        }
        form.update(extra)
        return await self.post(form)

    async def metrics(self) -> Metrics:
        response = await self.http.get("/metrics")
        assert response.status_code == 200
        return Metrics(response.text, self._baseline)

    async def settled(self, jobs: int, timeout: float = 10.0) -> Metrics:
        """Wait until ``jobs`` webhook jobs have ended (done or failed) since the test began."""
        with trio.fail_after(timeout):
            while True:
                m = await self.metrics()
                ended = m("relay_convo_events_total", outcome="done") + m(
                    "relay_convo_events_total", outcome="failed"
                )
                if ended >= jobs:
                    return m
                await trio.sleep(0.02)

    def posted(self, convo: FakeConversation) -> list[str]:
        """Bodies the bot posted in ``convo``."""
        return [m.body or "" for m in convo.messages if m.author == BOT]


def new_fake(port: int = 0) -> AbstractAsyncContextManager[FakeTwilio]:
    return fake_twilio(
        account_sid=TEST_TWILIO_SID,
        auth_token=TEST_TWILIO_TOKEN,
        openai_key=TEST_OPENAI_KEY,
        port=port,
    )


@asynccontextmanager
async def harness(
    env: Mapping[str, str] | None = None, scrape: bool = True, **sections: Mapping[str, Any]
) -> AsyncIterator[Harness]:
    """A relay of the test's own, with ``sections`` over the usual config."""
    async with (
        new_fake() as fake,
        running_daemon(config(fake.base_url, **sections), env=env) as d,
        httpx.AsyncClient(base_url=d.http_url, timeout=10) as http,
    ):
        yield await Harness(fake, http, d.port, d.log_path, own=d).begin(scrape=scrape)


@dataclass(frozen=True)
class SharedRelay:
    port: int
    fake_port: int
    log_path: Path


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


@pytest.fixture(scope="module")
def shared_relay(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SharedRelay]:
    """One `relay serve` for the module, configured for a fake on a port fixed up front.

    Synchronous, because each test runs its own Trio loop; it must stop cleanly (exit 0).
    """
    fake_port = free_port()
    workdir = tmp_path_factory.mktemp("relay")
    config_path = workdir / "config.toml"
    config_path.write_text(toml_dumps(daemon_config(config(f"http://127.0.0.1:{fake_port}"))))
    log_path = workdir / "relay.log"
    with open(log_path, "wb") as log_file:
        proc = subprocess.Popen(
            [sys.executable, "-m", "relay", "serve", "--config", str(config_path)],
            stdout=log_file,
            stderr=subprocess.STDOUT,
            env=daemon_env(),
        )
    try:
        deadline = time.monotonic() + 20
        while (found := re.search(r"listening on http://\S+:(\d+)", log_path.read_text())) is None:
            assert proc.poll() is None, log_path.read_text()
            assert time.monotonic() < deadline, "relay serve did not start"
            time.sleep(0.02)
        yield SharedRelay(int(found.group(1)), fake_port, log_path)
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            code = proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            proc.kill()
            code = proc.wait()
    log = log_path.read_text()
    assert code == 0, log[-3000:]
    assert "Traceback" not in log and TEST_TWILIO_TOKEN not in log and TEST_OPENAI_KEY not in log


@pytest.fixture
async def h(shared_relay: SharedRelay) -> AsyncIterator[Harness]:
    async with (
        new_fake(shared_relay.fake_port) as fake,
        httpx.AsyncClient(base_url=f"http://127.0.0.1:{shared_relay.port}", timeout=10) as http,
    ):
        yield await Harness(fake, http, shared_relay.port, shared_relay.log_path).begin()


def one_to_one(h: Harness, *messages: tuple[str, str]) -> FakeConversation:
    return h.fake.add_conversation(participants=[ALICE], messages=messages)


# --- one-to-one and groups --------------------------------------------------------------


async def test_one_to_one_gets_an_ai_reply_as_the_bot(h: Harness) -> None:
    h.fake.chat_reply = "  Sure, 3pm works.  "
    convo = one_to_one(h, (ALICE, "hi"))
    h.fake.add_message(convo.sid, BOT, "Hello! How can I help?")
    response = await h.say(convo, ALICE, "can we meet at 3?")
    assert (response.status_code, response.text.strip()) == (200, "ok")
    await h.settled(1)
    assert h.posted(convo)[-1] == "Sure, 3pm works."
    [post] = [r for r in h.fake.requests if r.method == "POST" and r.path.endswith("/Messages")]
    assert post.field("Author") == BOT
    # The bot was added with its projected address.
    bots = [p for p in convo.participants if p.identity == BOT]
    assert [(b.projected_address, b.address) for b in bots] == [(PROJECTED, None)]
    [chat] = h.fake.chat_requests
    assert chat.headers["authorization"] == f"Bearer {TEST_OPENAI_KEY}"
    assert chat.json["model"] == "gpt-test-mini"
    assert chat.json["messages"] == [
        {"role": "system", "content": SMS_PROMPT},
        {"role": "user", "content": f"{ALICE}: hi"},
        {"role": "assistant", "content": "Hello! How can I help?"},
        {"role": "user", "content": f"{ALICE}: can we meet at 3?"},
    ]


async def test_group_replies_only_when_asked_with_ai(h: Harness) -> None:
    convo = h.fake.add_conversation(participants=[ALICE, BOB, BOT])
    assert (await h.say(convo, ALICE, "lunch tomorrow?")).status_code == 200
    await h.settled(1)
    assert h.posted(convo) == []
    assert h.fake.chat_requests == []
    assert (await h.say(convo, BOB, "@AI where should we eat?")).status_code == 200
    await h.settled(2)
    assert h.posted(convo) == [h.fake.chat_reply]
    posts = [r for r in h.fake.requests if r.method == "POST" and r.path.endswith("/Messages")]
    assert [r.field("Author") for r in posts] == [BOT]
    [chat] = h.fake.chat_requests
    roles = [m["role"] for m in chat.json["messages"]]
    assert roles == ["system", "user", "user"]


async def test_long_reply_is_cut_to_what_twilio_accepts(h: Harness) -> None:
    h.fake.chat_reply = "word " * 1000
    convo = one_to_one(h)
    await h.say(convo, ALICE, "tell me everything")
    await h.settled(1)
    [reply] = h.posted(convo)
    assert len(reply) <= 1600 and reply.startswith("word word") and reply.endswith("\u2026")


async def test_two_participants_and_the_missing_bot_count_as_a_group(h: Harness) -> None:
    # Two people, no bot yet: once the bot is added there are three, so no @ai, no reply.
    convo = h.fake.add_conversation(participants=[ALICE, BOB])
    await h.say(convo, ALICE, "hello")
    await h.settled(1)
    assert [p.identity for p in convo.participants].count(BOT) == 1
    assert h.posted(convo) == []


async def test_new_conversation_two_messages_at_once(h: Harness) -> None:
    """Both jobs try to add the bot; the loser's 409 counts as success."""
    convo = one_to_one(h)
    h.fake.delay = 0.3  # both participant POSTs are in flight together
    async with trio.open_nursery() as nursery:
        for body in ("first", "second"):
            nursery.start_soon(h.say, convo, ALICE, body)
    with trio.fail_after(5):
        while sum(r.path.endswith("/Participants") for r in h.fake.requests) < 2:
            await trio.sleep(0.01)
    h.fake.delay = 0
    m = await h.settled(2)
    assert m("relay_convo_events_total", outcome="failed") == 0
    adds = [r for r in h.fake.requests if r.method == "POST" and r.path.endswith("/Participants")]
    assert sorted(r.status for r in adds) == [201, 409]
    assert [p.identity for p in convo.participants].count(BOT) == 1
    assert h.posted(convo) == [h.fake.chat_reply] * 2
    # The bot is known now: a later message does not try to add it again.
    await h.say(convo, ALICE, "third")
    await h.settled(3)
    adds = [r for r in h.fake.requests if r.method == "POST" and r.path.endswith("/Participants")]
    assert len(adds) == 2


async def test_bot_already_present_is_not_duplicated(h: Harness) -> None:
    convo = h.fake.add_conversation(
        participants=[ALICE, {"identity": BOT, "projected_address": PROJECTED}]
    )
    await h.say(convo, ALICE, "hi")
    m = await h.settled(1)
    assert m("relay_convo_events_total", outcome="done") == 1
    assert [p.identity for p in convo.participants].count(BOT) == 1
    assert h.posted(convo) == [h.fake.chat_reply]


# --- signatures, filters, dedupe, limits --------------------------------------------


async def test_signature_and_event_filters(h: Harness) -> None:
    convo = one_to_one(h)
    form = {
        "EventType": "onMessageAdded",
        "ConversationSid": convo.sid,
        "MessageSid": h.fake.new_sid("IM"),
        "Author": ALICE,
        "Body": "hi",
    }
    assert (await h.post(form, signed=False)).status_code == 403
    headers = {"X-Twilio-Signature": "bm90IGEgc2lnbmF0dXJl"}
    r = await h.http.post("/twilio/convo", data=form, headers=headers)
    assert r.status_code == 403
    # Signed for another URL, or for another form, is no signature at all.
    headers = {"X-Twilio-Signature": sign(form, "https://evil.example.com/twilio/convo")}
    assert (await h.http.post("/twilio/convo", data=form, headers=headers)).status_code == 403
    headers = {"X-Twilio-Signature": sign(form)}
    tampered = {**form, "Body": "@call 4155550000"}
    assert (await h.http.post("/twilio/convo", data=tampered, headers=headers)).status_code == 403

    for event in ("onConversationAdded", "onParticipantAdded", "onMessageUpdated", ""):
        r = await h.post({**form, "EventType": event, "MessageSid": h.fake.new_sid("IM")})
        assert (r.status_code, r.text.strip()) == (200, "ok"), event
    r = await h.post({**form, "Author": BOT, "MessageSid": h.fake.new_sid("IM")})
    assert (r.status_code, r.text.strip()) == (200, "ok")

    await trio.sleep(0.3)  # any job would have reached the fake by now
    assert h.fake.requests == []
    m = await h.metrics()
    assert m("relay_convo_events_total", outcome="forbidden") == 4
    assert m("relay_convo_events_total", outcome="ignored_event") == 4
    assert m("relay_convo_events_total", outcome="ignored_bot") == 1
    assert m("relay_convo_events_total", outcome="accepted") == 0
    assert sign(form) not in h.log()
    assert TEST_TWILIO_TOKEN not in h.log()


async def test_missing_twilio_secrets_fail_closed() -> None:
    env = daemon_env()
    del env["TWILIO_ACCOUNT_SID"], env["TWILIO_AUTH_TOKEN"]
    async with harness(env=env) as h:
        convo = one_to_one(h)
        form = {
            "EventType": "onMessageAdded",
            "ConversationSid": convo.sid,
            "Author": ALICE,
            "Body": "hi",
            "MessageSid": h.fake.new_sid("IM"),
        }
        for signed in (True, False):
            assert (await h.post(form, signed=signed)).status_code == 503
        await trio.sleep(0.3)
        assert h.fake.requests == []


async def test_duplicates_get_one_reply(h: Harness) -> None:
    convo = one_to_one(h)
    message = h.fake.add_message(convo.sid, ALICE, "hi")
    form = {
        "EventType": "onMessageAdded",
        "ConversationSid": convo.sid,
        "MessageSid": message.sid,
        "Index": "0",
        "Author": ALICE,
        "Body": "hi",
    }
    assert [(await h.post(form)).status_code for _ in range(3)] == [200] * 3
    # Without a MessageSid, ConversationSid:Index is the key.
    del form["MessageSid"]
    form["Index"] = "1"
    h.fake.add_message(convo.sid, ALICE, "again")
    form["Body"] = "again"
    assert [(await h.post(form)).status_code for _ in range(2)] == [200] * 2
    m = await h.settled(2)
    assert m("relay_convo_events_total", outcome="duplicate") == 3
    assert m("relay_convo_events_total", outcome="accepted") == 2
    assert h.posted(convo) == [h.fake.chat_reply] * 2
    # The same Index in another conversation is another message.
    other = one_to_one(h, (ALICE, "x"), (ALICE, "y"))
    assert (await h.post({**form, "ConversationSid": other.sid})).status_code == 200
    await h.settled(3)
    assert h.posted(other) == [h.fake.chat_reply]


async def test_per_conversation_limit(h: Harness) -> None:
    """13 events in a burst: 12 handled, the 13th answered 200 and dropped."""
    convo = h.fake.add_conversation(participants=[ALICE, BOB, BOT])  # a group: no AI replies
    other = h.fake.add_conversation(participants=[ALICE, BOB, BOT])
    with trio.fail_after(5):
        statuses = [(await h.say(convo, ALICE, f"msg {i}")).status_code for i in range(13)]
    assert statuses == [200] * 13
    assert (await h.say(other, ALICE, "another conversation is not limited")).status_code == 200
    m = await h.settled(13)
    assert m("relay_convo_events_total", outcome="accepted") == 13
    assert m("relay_convo_events_total", outcome="rate_limited") == 1
    lists = [r for r in h.fake.requests if r.method == "GET" and r.path.endswith("/Participants")]
    assert sum(convo.sid in r.path for r in lists) == 12
    assert sum(other.sid in r.path for r in lists) == 1


async def test_signed_webhooks_skip_the_http_bucket() -> None:
    async with harness(scrape=False, limits={"http_per_minute": 5}) as h:
        form = {"EventType": "onConversationUpdated", "ConversationSid": h.fake.new_sid("CH")}
        for i in range(20):
            r = await h.post({**form, "Index": str(i)})
            assert (r.status_code, r.text.strip()) == (200, "ok"), i
        statuses = [(await h.post(form, signed=False)).status_code for _ in range(7)]
        assert statuses == [403] * 5 + [429] * 2
        r = await h.post(form, signed=False)
        assert r.status_code == 429 and int(r.headers["retry-after"]) >= 1
        # Signed ones still pass after the bucket is empty.
        assert (await h.post(form)).status_code == 200
        # A 429 goes out only once the body is in, so a keep-alive client (or a
        # proxy) can send its next request on the same connection.
        stream = await trio.open_tcp_stream("127.0.0.1", h.port)
        async with stream:
            for _ in range(3):
                status, _ = await raw_post(stream, b"EventType=x", FORM, pause=0.2)
                assert status == 429


# --- commands -------------------------------------------------------------------------


async def test_call_command(h: Harness) -> None:
    convo = h.fake.add_conversation(participants=[ALICE, BOB, BOT])
    await h.say(convo, ALICE, "@call 4155550000, (415) 555-0001")
    await h.settled(1)
    assert [(c.to, c.from_, c.url) for c in h.fake.calls] == [
        ("+14155550000", CALLER_ID, VOICE_URL),
        ("+14155550001", CALLER_ID, VOICE_URL),
    ]
    # Machine detection on (and waiting for the greeting's end, so a voicemail lands).
    assert {c.machine_detection for c in h.fake.calls} == {"DetectMessageEnd"}
    [confirmation] = h.posted(convo)
    assert "+14155550000" in confirmation and "+14155550001" in confirmation
    assert h.fake.chat_requests == []  # a command gets its confirmation, not an AI reply


async def test_call_command_names_what_it_could_not_read(h: Harness) -> None:
    convo = one_to_one(h)
    await h.say(convo, ALICE, "@call 4155550002 bananas, 555-12")
    await h.settled(1)
    assert [c.to for c in h.fake.calls] == ["+14155550002"]
    [confirmation] = h.posted(convo)
    assert "+14155550002" in confirmation
    assert "bananas" in confirmation and "555-12" in confirmation
    # Nothing readable at all: no call, and the reply says why.
    await h.say(convo, ALICE, "@call my mom")
    await h.settled(2)
    assert len(h.fake.calls) == 1
    assert "my mom" in h.posted(convo)[-1]


async def test_call_refused_by_twilio_is_reported(h: Harness) -> None:
    convo = one_to_one(h)
    h.fake.fail_status, h.fake.fail_next, h.fake.fail_match = 400, 1, "Calls.json"
    await h.say(convo, ALICE, "@call 4155550003 4155550004")
    m = await h.settled(1)
    assert m("relay_convo_events_total", outcome="done") == 1
    assert [c.to for c in h.fake.calls] == ["+14155550004"]
    [confirmation] = h.posted(convo)
    assert "Could not call +14155550003" in confirmation
    assert "Calling +14155550004" in confirmation


async def test_group_command(h: Harness) -> None:
    origin = one_to_one(h)
    await h.say(origin, ALICE, "@group 415-555-0101 +1 415 555 0102")
    await h.settled(1)
    [created] = [c for sid, c in h.fake.conversations.items() if sid != origin.sid]
    people = sorted(
        (p.address, p.identity, p.projected_address)
        for p in created.participants
        if p.identity != BOT
    )
    assert people == [(ALICE, None, None), (BOB, None, None), (CAROL, None, None)]
    [bot] = [p for p in created.participants if p.identity == BOT]
    assert (bot.projected_address, bot.address) == (PROJECTED, None)
    # Everyone was added before the intro was posted, and the intro is the only message.
    assert [(m.author, m.body) for m in created.messages] == [(BOT, INTRO)]
    order = [
        (r.method, r.path.rsplit("/", 1)[-1])
        for r in h.fake.requests
        if created.sid in r.path and r.method == "POST"
    ]
    assert order == [("POST", "Participants")] * 4 + [("POST", "Messages")]
    adds = [r for r in h.fake.requests if created.sid in r.path and r.path.endswith("Participants")]
    assert {tuple(sorted(r.form)) for r in adds} == {
        (("Identity", BOT), ("MessagingBinding.ProjectedAddress", PROJECTED)),
        (("MessagingBinding.Address", ALICE),),
        (("MessagingBinding.Address", BOB),),
        (("MessagingBinding.Address", CAROL),),
    }
    [confirmation] = h.posted(origin)
    assert BOB in confirmation and CAROL in confirmation
    assert h.fake.chat_requests == []


# --- slow OpenAI and the drain ----------------------------------------------------------


async def test_slow_chat_answers_at_once_and_the_drain_waits_for_the_reply() -> None:
    async with harness(server={"drain_seconds": 10}) as h:
        h.fake.chat_delay = 3.0
        convo = one_to_one(h)
        started = trio.current_time()
        r = await h.say(convo, ALICE, "tell me something")
        answered = trio.current_time() - started
        assert (r.status_code, r.text.strip()) == (200, "ok")
        assert answered < 1.0, answered
        await trio.sleep(0.5)
        assert len(h.fake.chat_requests) == 1 and h.posted(convo) == []
        h.daemon.signal(signal.SIGTERM)
        with trio.fail_after(2):  # draining: not ready, still serving HTTP
            while (await h.http.get("/readyz")).status_code != 503:
                await trio.sleep(0.02)
        assert await h.daemon.wait(timeout=15) == 0
        stopped = trio.current_time() - started
        assert h.posted(convo) == [h.fake.chat_reply]
        # It stopped once the job was done, not at the end of drain_seconds.
        assert 3.0 <= stopped < 6.0, stopped


# --- garbage and failures ---------------------------------------------------------------


async def test_garbage_never_500_never_a_stuck_job() -> None:
    """Signatures off, so the garbage reaches every check behind them."""
    async with harness(twilio={"validate_signatures": False}, server={"drain_seconds": 10}) as h:
        convo = one_to_one(h)
        sid = convo.sid
        added = f"EventType=onMessageAdded&ConversationSid={sid}"
        multipart = "multipart/form-data; boundary=x"
        garbage: list[tuple[str, bytes | str, str | None]] = [
            ("empty", b"", None),
            ("empty form", b"", FORM),
            ("no fields", "a=b&c=d", FORM),
            ("no ConversationSid", "EventType=onMessageAdded&Body=hi", FORM),
            ("bad ConversationSid", "EventType=onMessageAdded&ConversationSid=../../x", FORM),
            ("ConversationSid with a query", f"{added}%3Fa=1", FORM),
            (
                "unknown conversation",
                f"EventType=onMessageAdded&ConversationSid=CH{'f' * 32}",
                FORM,
            ),
            ("no Body, no Author", f"{added}&Index=90", FORM),
            ("repeated keys", f"{added}&{added}&Body=a&Body=b&Index=91&Index=92", FORM),
            ("non-UTF-8", added.encode() + b"&Index=93&Author=%ff%fe&Body=\xff\xfe caf\xe9", FORM),
            ("raw non-UTF-8 key", b"\xff\xfe=\x80&EventType=onMessageAdded", FORM),
            ("percent garbage", "EventType=%zz%&ConversationSid=%%%", FORM),
            (
                "JSON body",
                '{"EventType": "onMessageAdded", "ConversationSid": "' + sid + '"}',
                "application/json",
            ),
            ("JSON labelled as a form", '{"EventType": "onMessageAdded"}', FORM),
            (
                "multipart",
                b'--x\r\nContent-Disposition: form-data; name="EventType"\r\n\r\n'
                b"onMessageAdded\r\n--x--\r\n",
                multipart,
            ),
            ("broken multipart", b"--x\r\nnope", multipart),
            ("huge body", b"EventType=onMessageAdded&Body=" + b"a" * (1 << 20), FORM),
            ("huge single field", b"a" * (1 << 20), FORM),
            ("many fields", "&".join(f"k{i}=v" for i in range(20000)), FORM),
            ("NUL bytes", b"EventType=onMessageAdded\x00&ConversationSid=\x00", FORM),
        ]
        for name, body, content_type in garbage:
            headers = {"Content-Type": content_type} if content_type else {}
            r = await h.http.post("/twilio/convo", content=body, headers=headers)
            assert 400 <= r.status_code < 500 or (r.status_code, r.text.strip()) == (200, "ok"), (
                name,
                r.status_code,
                r.text,
            )
        assert (await h.http.get("/healthz")).status_code == 200
        # A huge body is refused as such.
        r = await h.http.post(
            "/twilio/convo", content=b"Body=" + b"a" * (1 << 20), headers={"Content-Type": FORM}
        )
        assert r.status_code == 413
        m = await h.metrics()
        accepted = m("relay_convo_events_total", outcome="accepted")
        # Whatever was accepted ends (the unknown conversation fails with a 404).
        m = await h.settled(int(accepted))
        assert m("relay_convo_events_total", outcome="failed") >= 1
        assert "Traceback" not in h.log()
        # Nothing is left running: the drain ends at once.
        started = trio.current_time()
        h.daemon.signal(signal.SIGTERM)
        assert await h.daemon.wait(timeout=10) == 0
        assert trio.current_time() - started < 2.0
        # No reply went to a person from garbage, except real (if odd) messages in `convo`.
        assert all(m.body == h.fake.chat_reply for m in convo.messages if m.author == BOT)


@pytest.mark.parametrize(
    ("setup", "stage"),
    [
        ({"fail_status": 500, "fail_next": 100, "fail_match": "Participants"}, "twilio"),
        ({"fail_status": 429, "fail_next": 100, "fail_match": "Participants"}, "twilio"),
        ({"fail_status": 500, "fail_next": 100, "fail_match": "Messages"}, "twilio"),
        ({"chat_status": 500}, "openai"),
        ({"chat_status": 401}, "openai"),
        ({"chat_reply": ""}, "openai"),
    ],
    ids=[
        "participants-500",
        "participants-429",
        "messages-500",
        "chat-500",
        "chat-401",
        "chat-empty",
    ],
)
async def test_failures_end_the_job(h: Harness, setup: dict[str, Any], stage: str) -> None:
    for knob, value in setup.items():
        setattr(h.fake, knob, value)
    convo = one_to_one(h)
    await h.say(convo, ALICE, "hi")
    m = await h.settled(1)
    assert m("relay_convo_events_total", outcome="failed") == 1
    assert m("relay_jobs_failed_total", stage=stage) == 1
    assert h.posted(convo) == []
    log_text = h.log()
    assert "conversation job failed" in log_text and "Traceback" not in log_text
    assert TEST_OPENAI_KEY not in log_text and TEST_TWILIO_TOKEN not in log_text
    # The daemon is fine, and so is the next message once the trouble is over.
    h.fake.fail_next, h.fake.chat_status, h.fake.chat_reply = 0, None, "back"
    await h.say(convo, ALICE, "still there?")
    await h.settled(2)
    assert h.posted(convo) == ["back"]


async def test_hanging_chat_times_out() -> None:
    # The chat deadline is 3x openai.connect_timeout_seconds: 1.5 s here.
    async with harness(openai={"connect_timeout_seconds": 0.5}) as h:
        h.fake.chat_delay = 60
        convo = one_to_one(h)
        await h.say(convo, ALICE, "hi")
        m = await h.settled(1, timeout=5)
        assert m("relay_jobs_failed_total", stage="openai") == 1
        assert h.posted(convo) == []
        assert "timed out" in h.log()


async def test_twilio_unreachable_ends_the_job() -> None:
    with socket.socket() as sock:  # bound, never listening: connections are refused
        sock.bind(("127.0.0.1", 0))
        dead = f"http://127.0.0.1:{sock.getsockname()[1]}"
        async with harness(twilio={"api_base": dead}) as h:
            await h.say(one_to_one(h), ALICE, "hi")
            m = await h.settled(1)
            assert m("relay_jobs_failed_total", stage="twilio") == 1
            assert "TwilioTransportError" in h.log()


# --- keep-alive connections after early answers ---------------------------------------


async def raw_post(
    stream: trio.SocketStream, body: bytes, content_type: str, *, pause: float
) -> tuple[int, dict[str, str]]:
    """POST /twilio/convo on a kept-alive connection, the body sent ``pause`` s after
    the headers (as a slow client or a proxy may). Returns status and headers."""
    head = (
        f"POST /twilio/convo HTTP/1.1\r\nHost: relay\r\nContent-Type: {content_type}\r\n"
        f"Content-Length: {len(body)}\r\n\r\n"
    ).encode()
    await stream.send_all(head)
    await trio.sleep(pause)
    await stream.send_all(body)
    data = b""
    with trio.fail_after(3):
        while b"\r\n\r\n" not in data:
            chunk = await stream.receive_some(65536)
            assert chunk, "connection closed without an answer"
            data += chunk
        raw_head, _, rest = data.partition(b"\r\n\r\n")
        lines = raw_head.decode("latin-1").split("\r\n")
        headers = {k.lower(): v.strip() for k, _, v in (line.partition(":") for line in lines[1:])}
        length = int(headers.get("content-length", "0"))
        while len(rest) < length:
            rest += await stream.receive_some(65536)
    return int(lines[0].split()[1]), headers


async def test_answers_wait_for_the_whole_body(h: Harness) -> None:
    """A body the webhook does not parse (JSON) is still read before the answer,
    so the connection stays usable for the next request."""
    stream = await trio.open_tcp_stream("127.0.0.1", h.port)
    async with stream:
        for body, content_type in [
            (b'{"EventType": "onMessageAdded"}', "application/json"),
            (b"EventType=onConversationAdded", FORM),
        ]:
            status, _ = await raw_post(stream, body, content_type, pause=0.2)
            assert status == 403
    # Too large is refused before it is read: the client is told to close.
    r = await h.http.post("/twilio/convo", content=b"x" * (1 << 20), headers={"Content-Type": FORM})
    assert (r.status_code, r.headers.get("connection")) == (413, "close")


# --- in process -------------------------------------------------------------------------


async def test_background_work_is_bounded(caplog: pytest.LogCaptureFixture) -> None:
    """Past the bound, an event is refused (200 ok, counted, logged), not queued.

    In process, with room for two jobs: a flood big enough to reach the real
    bound (256) through a subprocess takes longer than this whole file should.
    """
    async with new_fake() as fake:
        settings = parse_settings(config(fake.base_url), load_secrets(daemon_env()))
        rt = DaemonState(settings, MemoryStore())
        rt.max_jobs = 2
        app = create_http_app(rt, *twilio_routes(rt, TwilioGate(settings), Outbound(rt)))
        fake.chat_delay = 60
        convos = [fake.add_conversation(participants=[ALICE]) for _ in range(3)]
        try:
            async with trio.open_nursery() as jobs, app.test_app() as test_app:
                rt.attach_jobs(jobs)
                client = test_app.test_client()
                for convo in convos:
                    message = fake.add_message(convo.sid, ALICE, "hi")
                    form = {
                        "EventType": "onMessageAdded",
                        "ConversationSid": convo.sid,
                        "MessageSid": message.sid,
                        "Author": ALICE,
                        "Body": "hi",
                    }
                    r = await client.post(
                        "/twilio/convo", form=form, headers={"X-Twilio-Signature": sign(form)}
                    )
                    assert (r.status_code, await r.get_data(as_text=True)) == (200, "ok\n")
                assert rt.jobs_in_flight == 2
                text = rt.metrics.render().decode()
                assert sample_value(text, "relay_convo_events_total", outcome="accepted") == 2
                assert sample_value(text, "relay_convo_events_total", outcome="overloaded") == 1
                assert "background work is at its bound" in caplog.text
                fake.chat_delay = 0  # releases the two waiting jobs
                with trio.fail_after(5):
                    await rt.wait_idle()
                rt.attach_jobs(None)
        finally:
            for close in rt.closers:
                await close()
        assert [len([m for m in c.messages if m.author == BOT]) for c in convos] == [1, 1, 0]
