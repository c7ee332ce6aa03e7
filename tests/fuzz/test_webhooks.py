"""Twilio webhooks (docs/contract.md §3, §6, §7) with hostile forms, fuzzed with hypothesis against
one ``relay serve`` for the whole module, signature validation on, a fake Twilio
REST + chat completions server as the target of every background job.

Forms with missing fields, repeated keys, percent-encoded bytes that are not
UTF-8, raw bytes, other content types, 1 MiB bodies; unsigned, signed wrongly,
or signed as Twilio signs. Unsigned: 403, and nothing reaches Twilio. Signed:
``POST /twilio/convo`` answers ``200 ok`` within a second and does exactly what
§7 says (ignore, dedupe, rate-limit, call, group, AI reply) in a job that ends;
``POST /twilio/voice`` answers TwiML that connects the call to the media stream
with the call's direction and AMD result. Never a 5xx, never a hang.

After each property the daemon is back to its baseline
(:class:`relay.testing.fuzz.Watch`), every job it accepted has ended without
crashing, and a client session opened before the property still relays.
"""

from __future__ import annotations

import os
import re
import time
import urllib.parse
import xml.etree.ElementTree as ET
from collections import Counter, deque
from collections.abc import AsyncIterator, Iterator, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any, TypeVar

import orjson
import pytest
import trio_websocket
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from twilio.request_validator import RequestValidator

from relay.admission.twilio_auth import SID_PREFIXES
from relay.edge.twiml import xml_safe
from relay.testing.daemon import (
    TEST_OPENAI_KEY,
    TEST_TWILIO_SID,
    TEST_TWILIO_TOKEN,
    Daemon,
    running_daemon,
)
from relay.testing.fake_realtime import FakeRealtime, fake_realtime
from relay.testing.fake_twilio import FakeTwilio, RecordedRequest, fake_twilio
from relay.testing.fuzz import (
    DaemonKeeper,
    FuzzEnv,
    Response,
    Watch,
    client_session,
    echo_probe,
    metrics_text,
    request,
)
from relay.testing.metrics import sample_value
from relay.testing.portal import Held, Portal, trio_portal

PUBLIC = "https://relay.example.com"
BOT = "gateframes-bot"
PROJECTED = "+14082605145"
CALLER_ID = "+14085550199"
VOICE_URL = "https://voice.example.com/twilio/voice"
INTRO = "Welcome to the group (fuzz intro)."
SMS_PROMPT = "You are a terse SMS assistant (fuzz prompt)."
CHAT_MODEL = "gpt-test-mini"
ALICE, BOB, CAROL = "+14155550100", "+14155550101", "+14155550102"
FORM = "application/x-www-form-urlencoded"
PATHS = ("/twilio/convo", "/twilio/voice")
SID = re.compile(r"\ACH[0-9a-f]{32}\Z")
# §7: any SID field is two capitals and 32 lower-case hex digits, the capitals fixed
# for the kinds Twilio documents (relay.admission.twilio_auth.SID_PREFIXES names them).
ANY_SID = re.compile(r"\A[A-Z]{2}[0-9a-f]{32}\Z")
INDEX = re.compile(r"\A[0-9]{1,12}\Z")
CONVO_EVENTS = 12  # limits.convo_events (the default), per 30 s
HUGE = 1024 * 1024

FUZZ = settings(
    deadline=None,
    database=None,  # CI runs fresh examples every time; failures print their input
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)

# -- forms ------------------------------------------------------------------------------

MISSING = None


@dataclass(frozen=True)
class Number:
    """A phone number as someone types it, and what it must become (None: unreadable)."""

    text: str
    e164: str | None


# docs/contract.md §7: "comma or space separated; 10 digits mean +1, or E.164". Nothing with a
# space inside it, which the contract would split.
NUMBERS = [
    Number("4155550123", "+14155550123"),
    Number("(415)555-0124", "+14155550124"),
    Number("415-555-0125", "+14155550125"),
    Number("+442071838750", "+442071838750"),
    Number(ALICE, ALICE),
    Number("12345", None),
    Number("abc", None),
    Number("+12", None),
]
# Authors that are phone numbers (an @group needs one), as Twilio sends them: E.164.
AUTHOR_NUMBERS = {ALICE: ALICE, BOB: BOB}
# The fields §7 decides on; extra fields never repeat them (repeats: test_odd_bodies).
DECIDING = frozenset({"EventType", "ConversationSid", "MessageSid", "Index", "Author", "Body"})


@dataclass(frozen=True)
class Body:
    """What a message says: ``kind`` is "text" (no command), "ai" (mentions @ai),
    "call"/"group" with ``numbers``, or "raw" (anything at all)."""

    kind: str
    text: str = ""
    numbers: tuple[Number, ...] = ()

    def render(self) -> str:
        if self.kind == "text":
            return self.text
        if self.kind == "ai":
            return f"@ai {self.text}" if len(self.text) % 2 else f"{self.text} @AI"
        if self.kind in ("call", "group"):
            word = "@call" if self.kind == "call" else "@group"
            return f"{word} " + ", ".join(n.text for n in self.numbers)
        return self.text

    @property
    def command(self) -> bool | None:
        """Is it a command? None if the text could be read either way."""
        if self.kind in ("call", "group"):
            return True
        head = self.render().lstrip().lower()
        if head.startswith(("@call", "@group")):
            return None
        return False

    @property
    def mentions_ai(self) -> bool | None:
        if self.kind == "ai":
            return True
        return None if "@ai" in self.render().lower() else False


# No "@": a random text is never a command nor a mention, unless it is a "raw" body.
plain_text = st.text(
    st.characters(blacklist_characters="@", blacklist_categories=["Cs"]), max_size=60
)
bodies = st.one_of(
    st.builds(Body, st.just("text"), plain_text),
    st.builds(Body, st.just("ai"), plain_text),
    st.builds(
        Body,
        st.sampled_from(["call", "group"]),
        numbers=st.lists(st.sampled_from(NUMBERS), max_size=4).map(tuple),
    ),
    st.builds(
        Body,
        st.just("raw"),
        st.text(max_size=80)
        | st.sampled_from(["@call", "@callme 4155550123", "@ai", "me@ai.com", "@group:"]),
    ),
)


@dataclass(frozen=True)
class Event:
    """One Conversations webhook as Twilio would send it, give or take fields.
    ``convo``: "one" / "group" (index ``at`` into the preloaded conversations),
    "unknown" (well formed, not in Twilio), "malformed" (``raw``), or MISSING."""

    event_type: str | None
    author: str | None
    convo: str | None
    at: int
    raw: str
    message_sid: str | None  # "fresh", "again" (an earlier one), "" or MISSING
    index: str | None
    body: Body | None
    extra: tuple[tuple[str, str], ...]


T = TypeVar("T")


def mostly(
    common: Sequence[T], rare: st.SearchStrategy[T], rare_in: int = 5
) -> st.SearchStrategy[T]:
    """One of ``common``, or once in ``rare_in`` a draw from ``rare`` (shrinks to
    ``common[0]``)."""
    dice, sampled = st.integers(0, rare_in - 1), st.sampled_from(common)

    @st.composite
    def draw_one(draw: st.DrawFn) -> T:
        return draw(rare) if draw(dice) == rare_in - 1 else draw(sampled)

    return draw_one()


events = st.builds(
    Event,
    mostly(
        ["onMessageAdded"] * 12 + ["onConversationAdded", "onMessageUpdated", "", "onmessageadded"],
        st.none() | st.text(max_size=12),
        8,
    ),
    mostly(
        [ALICE, ALICE, BOB, "+1 (415) 555-0100", BOT, "system", "", None], st.text(max_size=12), 8
    ),
    st.sampled_from(["one", "one", "one", "group", "group", "group", "unknown", "malformed", None]),
    st.integers(0, 1000),
    st.sampled_from(["CH../../x", "CH" + "0" * 31, "ch" + "a" * 32, "CH" + "g" * 32, "?x=1", ""])
    | st.text(max_size=40),
    st.sampled_from(["fresh"] * 6 + ["again", "again", "", None]),
    mostly([None, None, None, "0", "17"], st.integers(0, 10**6).map(str) | st.text(max_size=5)),
    st.none() | bodies,
    mostly(
        [()],
        st.lists(
            st.tuples(
                st.sampled_from(
                    ["AccountSid", "Source", "ParticipantSid", "Attributes", "DateCreated"]
                )
                | st.text(max_size=10).filter(lambda k: k not in DECIDING),
                st.text(max_size=20),
            ),
            min_size=1,
            max_size=3,
        ).map(tuple),
    ),
)

# -- the module's fakes and daemon ---------------------------------------------------------


class Env(FuzzEnv):
    """The module's fakes, daemon, canary and oracle state."""

    def __init__(
        self, portal: Portal, twilio: FakeTwilio, realtime: FakeRealtime, keeper: DaemonKeeper
    ) -> None:
        super().__init__()
        self.portal = portal
        self.twilio = twilio
        self.realtime = realtime
        self.keeper = keeper
        self.watch: Watch | None = None
        self.canary: Held[trio_websocket.WebSocketConnection] | None = None
        self.one_to_one: list[str] = []
        self.groups: list[str] = []
        self.warm_up = ""  # a conversation of its own for the warm-up job
        self.seen: set[str] = set()  # dedupe keys the daemon has seen
        self.message_sids: list[str] = []
        self.takes: dict[str, deque[float]] = {}  # convo -> times of accepted events
        self.outcomes: dict[str, int] = {}
        self.statuses: Counter[tuple[str, int]] = Counter()  # (path, status) answered
        self.slowest = 0.0  # the longest a signed convo webhook took to answer

    @property
    def daemon(self) -> Daemon:
        return self.keeper.daemon

    def start(self) -> None:
        d = self.daemon
        self.canary = self.portal.run(self.portal.hold, lambda: client_session(d))
        self.portal.run(echo_probe, self.canary.value)
        # The daemon's memory store starts empty: so does what the oracle knows of it.
        self.seen.clear()
        self.takes.clear()
        # One job (Twilio REST and chat completions) before the baseline: its HTTP
        # clients keep one pooled connection each, which is a pool, not a leak.
        sid = "IM" + os.urandom(16).hex()
        pairs = [("EventType", "onMessageAdded"), ("ConversationSid", self.warm_up),
                 ("MessageSid", sid), ("Author", ALICE), ("Body", "hi")]  # fmt: skip
        body = urllib.parse.urlencode(pairs).encode()
        r, _ = post(self, "/twilio/convo", body, FORM, sign("/twilio/convo", pairs))
        assert r.status == 200, r
        wait_jobs(d.port)
        self.watch = Watch(d)
        self.watch.baseline()

    def ensure(self) -> None:
        if self.keeper.ensure():
            self.start()


def _config(twilio: FakeTwilio, realtime: FakeRealtime) -> dict[str, dict[str, Any]]:
    return {
        "server": {"public_url": PUBLIC},
        "twilio": {
            "api_base": twilio.base_url,
            "bot_identity": BOT,
            "projected_address": PROJECTED,
            "caller_id": CALLER_ID,
            "voice_url": VOICE_URL,
            "intro_message": INTRO,
        },
        "openai": {
            "api_base": twilio.openai_base,
            "chat_model": CHAT_MODEL,
            "realtime_url": realtime.url,
        },
        "prompts": {"sms": SMS_PROMPT},
    }


@asynccontextmanager
async def _fakes() -> AsyncIterator[tuple[FakeTwilio, FakeRealtime]]:
    async with (
        fake_twilio(
            account_sid=TEST_TWILIO_SID, auth_token=TEST_TWILIO_TOKEN, openai_key=TEST_OPENAI_KEY
        ) as twilio,
        fake_realtime(echo=True, expected_key=TEST_OPENAI_KEY) as realtime,
    ):
        yield twilio, realtime


@pytest.fixture(scope="module")
def env() -> Iterator[Env]:
    with trio_portal(_fakes) as (portal, (twilio, realtime)):
        config = _config(twilio, realtime)
        e = Env(portal, twilio, realtime, DaemonKeeper(portal, lambda: running_daemon(config)))
        # Many conversations, so that the per-conversation limit (12 per 30 s) is
        # rarely what decides an example.
        e.one_to_one = [twilio.add_conversation(participants=[ALICE]).sid for _ in range(40)]
        e.groups = [
            twilio.add_conversation(participants=[ALICE, BOB, CAROL]).sid for _ in range(40)
        ]
        e.warm_up = twilio.add_conversation(participants=[ALICE]).sid
        e.keeper.start()
        e.start()
        print(f"\nwebhook fuzz: daemon log {e.daemon.log_path}")
        started = time.monotonic()
        try:
            yield e
        finally:
            if e.canary is not None:
                portal.run(e.canary.release)
            e.keeper.stop()
            took = time.monotonic() - started
            print(f"\nwebhook fuzz: {e.tally()} in {took:.0f} s")
            print(f"webhook fuzz: convo outcomes {e.outcomes}")
            print(f"webhook fuzz: answers {dict(sorted(e.statuses.items()))}")
            print(f"webhook fuzz: slowest signed answer {e.slowest:.3f} s")
            if e.watch is not None:
                print("webhook fuzz: " + "; ".join(e.watch.history))
            for death in e.keeper.deaths:
                print(f"webhook fuzz: the daemon died: {death[-3000:]}")


def jobs(text: str) -> tuple[float, float, float]:
    """(accepted, ended, crashed) convo jobs, from a /metrics scrape."""
    accepted = sample_value(text, "relay_convo_events_total", outcome="accepted")
    ended = sample_value(text, "relay_convo_events_total", outcome="done") + sample_value(
        text, "relay_convo_events_total", outcome="failed"
    )
    return accepted, ended, sample_value(text, "relay_jobs_failed_total", stage="internal")


def wait_jobs(port: int, timeout: float = 15) -> tuple[float, float, float]:
    """Wait until every accepted job has ended; the counts."""
    deadline = time.monotonic() + timeout
    while True:
        accepted, ended, crashed = jobs(metrics_text(port))
        if ended >= accepted or time.monotonic() > deadline:
            return accepted, ended, crashed
        time.sleep(0.01)


@pytest.fixture(autouse=True)
def after_property(env: Env, request: pytest.FixtureRequest) -> Iterator[None]:
    env.ensure()
    before = jobs(metrics_text(env.daemon.port))
    yield
    env.keeper.check_alive(request.node.name)
    accepted, ended, crashed = wait_jobs(env.daemon.port)
    # docs/contract.md §7: the work runs after the answer and ends; none of it may crash.
    assert ended == accepted, f"{accepted - ended:.0f} convo jobs never ended"
    assert crashed == before[2], f"{crashed - before[2]:.0f} convo jobs crashed"
    assert env.canary is not None and env.watch is not None
    env.portal.run(echo_probe, env.canary.value)
    env.watch.check(request.node.name)


# -- requests ---------------------------------------------------------------------------------


class Pairs:
    """Form pairs with the ``getall`` that RequestValidator uses for repeated keys."""

    def __init__(self, pairs: Sequence[tuple[str, str]]) -> None:
        self.pairs = list(pairs)

    def __iter__(self) -> Iterator[str]:
        return iter({k for k, _ in self.pairs})

    def __bool__(self) -> bool:
        return bool(self.pairs)

    def getall(self, name: str) -> list[str]:
        return [v for k, v in self.pairs if k == name]


def sign(path: str, pairs: Sequence[tuple[str, str]]) -> str:
    """X-Twilio-Signature as Twilio computes it: HMAC-SHA1 over the URL it called and
    the form's keys and values, sorted (RequestValidator.compute_signature)."""
    return str(RequestValidator(TEST_TWILIO_TOKEN).compute_signature(PUBLIC + path, Pairs(pairs)))


def post(
    env: Env,
    path: str,
    body: bytes,
    content_type: str | None = FORM,
    signature: str | None = None,
    *,
    chunked: bool = False,
) -> tuple[Response, float]:
    headers: list[tuple[str, str | bytes]] = []
    if content_type is not None:
        headers.append(("Content-Type", content_type))
    if signature is not None:
        headers.append(("X-Twilio-Signature", signature))
    start = time.monotonic()
    r = request(env.daemon.port, "POST", path, headers, body, chunked=chunked, timeout=15)
    took = time.monotonic() - start
    env.keeper.check_alive("this request")
    assert r is not None, "the daemon closed the connection without an answer"
    env.statuses[path, r.status] += 1
    assert r.status < 500, (r.status, r.body[:300])
    if r.status != 200:
        # A refusal: one line of reason.
        assert b"\n" not in r.body.rstrip(b"\n"), r.body[:300]
    return r, took


def event_pairs(
    env: Env, e: Event, *, oracle: bool = True
) -> tuple[list[tuple[str, str]], str | None]:
    """The form of ``e`` (fields in a fixed order, extras last), and its conversation.
    Without ``oracle``, one that cannot touch what the oracle tracks: a conversation
    unknown to Twilio (its own rate bucket) and a MessageSid never used again."""
    convo: str | None
    if not oracle and e.convo in ("one", "group"):
        convo = "CH" + os.urandom(16).hex()
    elif e.convo == "one":
        convo = env.one_to_one[e.at % len(env.one_to_one)]
    elif e.convo == "group":
        convo = env.groups[e.at % len(env.groups)]
    elif e.convo == "unknown":
        convo = "CH" + os.urandom(16).hex()
    elif e.convo == "malformed":
        convo = e.raw
    else:
        convo = None
    message_sid = e.message_sid
    if message_sid == "fresh" or (message_sid == "again" and not oracle):
        message_sid = "IM" + os.urandom(16).hex()
        if oracle:
            env.message_sids.append(message_sid)
    elif message_sid == "again":
        message_sid = env.message_sids[e.at % len(env.message_sids)] if env.message_sids else ""
    fields = [
        ("EventType", e.event_type),
        ("ConversationSid", convo),
        ("MessageSid", message_sid),
        ("Index", e.index),
        ("Author", e.author),
        ("Body", e.body.render() if e.body is not None else None),
    ]
    pairs = [(k, v) for k, v in fields if v is not None]
    return pairs + list(e.extra), convo


# -- the §7 oracle -----------------------------------------------------------------------------


@dataclass
class Verdict:
    outcomes: frozenset[str]  # relay_convo_events_total outcomes the answer may count
    statuses: frozenset[int]
    convo: str = ""


def form_verdict(form: dict[str, str]) -> tuple[str, int] | None:
    """§7 on any signed Twilio form: not our account (forbidden, 403), or a SID field
    of the wrong shape (malformed, 400); empty fields count as absent."""
    account = form.get("AccountSid")
    if account and account != TEST_TWILIO_SID:
        return "forbidden", 403
    for name, value in form.items():
        if not name.endswith("Sid") or not value:
            continue
        if not ANY_SID.match(value) or not value.startswith(SID_PREFIXES.get(name, value[:2])):
            return "malformed", 400
    return None


def judge(env: Env, pairs: Sequence[tuple[str, str]]) -> Verdict:
    """What docs/contract.md §7 says of a validly signed form (keys unique)."""
    form = dict(pairs)
    refused = form_verdict(form)
    if refused is not None:
        return Verdict(frozenset({refused[0]}), frozenset({refused[1]}))
    if form.get("EventType") != "onMessageAdded":
        return Verdict(frozenset({"ignored_event"}), frozenset({200}))
    if form.get("Author") == BOT:
        return Verdict(frozenset({"ignored_bot"}), frozenset({200}))
    convo = form.get("ConversationSid", "")
    index = form.get("Index", "")
    if not convo or (index and not INDEX.match(index)):
        # Nothing to act on (no conversation), or a position that is no number.
        return Verdict(frozenset({"malformed"}), frozenset({400}))
    # Dedupe on MessageSid, or ConversationSid:Index without one; a first delivery
    # with a MessageSid also puts its position on record (a replay that ran its
    # MessageSid into another field still meets it).
    message = form.get("MessageSid", "")
    position = f"{convo}:{index}"
    if message:
        seen = message in env.seen
        if not seen:
            env.seen.add(message)
            if index:
                env.seen.add(position)
    else:
        seen = position in env.seen
        env.seen.add(position)
    if seen:
        return Verdict(frozenset({"duplicate"}), frozenset({200}))
    now = time.monotonic()
    recent = env.takes.setdefault(convo, deque())
    while recent and recent[0] < now - 31:
        recent.popleft()
    # A bucket of 12 refilled continuously over 30 s: with at most 10 taken in the
    # last 30 s (one spare for clock skew) a token is certainly free.
    if len(recent) <= CONVO_EVENTS - 2:
        return Verdict(frozenset({"accepted"}), frozenset({200}), convo)
    return Verdict(frozenset({"accepted", "rate_limited"}), frozenset({200}), convo)


def _outcome_deltas(before: str, after: str) -> dict[str, float]:
    names = ("ignored_event", "ignored_bot", "malformed", "duplicate", "rate_limited",
             "accepted", "overloaded", "forbidden")  # fmt: skip
    out = {}
    for name in names:
        delta = sample_value(after, "relay_convo_events_total", outcome=name) - sample_value(
            before, "relay_convo_events_total", outcome=name
        )
        if delta:
            out[name] = delta
    return out


def check_rest(requests: Sequence[RecordedRequest]) -> None:
    """Whatever a job did at Twilio and OpenAI is well formed: conversation SIDs only
    in paths (no injection), messages from the bot, calls as §7 places them."""
    for r in requests:
        parts = r.path.strip("/").split("/")
        if parts[:2] == ["v1", "Conversations"] and len(parts) > 2:
            assert SID.match(parts[2]), r.path
        if r.method == "POST" and r.path.endswith("/Messages"):
            assert r.field("Author") == BOT, r.form
        if r.path.endswith("/Calls.json"):
            assert r.field("From") == CALLER_ID and r.field("Url") == VOICE_URL, r.form
            assert r.field("MachineDetection"), r.form
        if r.path == "/v1/chat/completions":
            assert r.json["model"] == CHAT_MODEL, r.json
            assert r.json["messages"][0] == {"role": "system", "content": SMS_PROMPT}, r.json


def bot_messages(requests: Sequence[RecordedRequest], convo: str) -> list[str]:
    return [
        r.field("Body") or ""
        for r in requests
        if r.method == "POST" and r.path == f"/v1/Conversations/{convo}/Messages"
    ]


def check_effects(env: Env, e: Event, convo: str, requests: Sequence[RecordedRequest]) -> None:
    """What an accepted event's job did, against §7."""
    known = convo in env.one_to_one or convo in env.groups
    body = e.body if e.body is not None else Body("text", "")
    replies = bot_messages(requests, convo)
    calls = [r for r in requests if r.path.endswith("/Calls.json")]
    chats = [r for r in requests if r.path == "/v1/chat/completions"]
    if not known:
        # Unknown to Twilio: adding the bot fails, and nothing else happens.
        assert replies == [] and calls == [] and chats == [], (replies, calls, chats)
        return
    command = body.command
    if command is None:
        return  # text that a parser may or may not take for a command
    if command:
        numbers = list(dict.fromkeys(n.e164 for n in body.numbers if n.e164 is not None))
        unreadable = [n.text for n in body.numbers if n.e164 is None]
        assert chats == [], "a command got an AI reply"
        assert len(replies) == 1, replies  # its confirmation
        if body.kind == "call":
            assert [c.field("To") for c in calls] == numbers, ([c.form for c in calls], numbers)
            for n in numbers + unreadable:
                assert n in replies[0], (n, replies[0])
        else:
            assert calls == []
            created = [r for r in requests if r.method == "POST" and r.path == "/v1/Conversations"]
            author = AUTHOR_NUMBERS.get(e.author or "")
            if author is None and any(ch.isdigit() for ch in e.author or ""):
                return  # random text that may read as a phone number
            if not numbers or author is None:
                # Usage help, or "only from a phone number": no group either way.
                assert created == [], created
                return
            assert len(created) == 1, created
            new = env.twilio.conversations[_created_sid(env, requests)]
            sms = {p.address for p in new.participants if p.address}
            assert sms == {author, *numbers}, (sms, author, numbers)
            assert any(p.projected_address == PROJECTED for p in new.participants)
            # docs/contract.md §7: everyone added before the intro is posted in it.
            assert [m.body for m in new.messages] == [INTRO], new.messages
        return
    assert calls == []
    group = convo in env.groups
    mention = body.mentions_ai
    if group and mention is None:
        return
    if group and not mention:
        assert chats == [] and replies == [], "an AI reply in a group without @ai"
    else:
        assert len(chats) == 1 and replies == [env.twilio.chat_reply], (chats, replies)


def _created_sid(env: Env, requests: Sequence[RecordedRequest]) -> str:
    """The conversation an @group made: participants were added to it, and it is
    none of the preloaded ones (the bot joins those on first contact)."""
    preloaded = {*env.one_to_one, *env.groups, env.warm_up}
    for r in requests:
        parts = r.path.strip("/").split("/")
        new = len(parts) == 4 and parts[3] == "Participants" and parts[2] not in preloaded
        if r.method == "POST" and new:
            return parts[2]
    raise AssertionError("no participant added to a new conversation")


# -- properties --------------------------------------------------------------------------------


@dataclass(frozen=True)
class Bad:
    """How a request fails to be signed: "none" (no header), "garbage", "other_url"
    (signed for the other webhook), "other_form" (signed for different fields)."""

    how: str
    garbage: str = ""


bad_signatures = st.one_of(
    st.builds(Bad, st.sampled_from(["none", "none", "other_url", "other_form"])),
    st.builds(
        Bad,
        st.just("garbage"),
        st.text(st.characters(min_codepoint=32, max_codepoint=126), max_size=40),
    ),
)


def bad_signature(path: str, pairs: Sequence[tuple[str, str]], bad: Bad) -> str | None:
    if bad.how == "none":
        return None
    if bad.how == "garbage":
        return bad.garbage
    if bad.how == "other_url":
        return sign(PATHS[1] if path == PATHS[0] else PATHS[0], pairs)
    return sign(path, [*pairs, ("Extra", "x")])


@settings(FUZZ, max_examples=500)
@given(path=st.sampled_from(PATHS), e=events, bad=bad_signatures)
def test_unsigned_webhooks_are_refused(env: Env, path: str, e: Event, bad: Bad) -> None:
    """docs/contract.md §6/§7: without a valid X-Twilio-Signature, 403; nothing reaches Twilio."""
    env.ensure()
    env.count("unsigned", 1)
    pairs, _ = event_pairs(env, e)
    seen = len(env.twilio.requests)
    signature = bad_signature(path, pairs, bad)
    if bad.how == "garbage" and signature == sign(path, pairs):
        return  # a lucky guess is not a failure of the relay
    r, _ = post(env, path, urllib.parse.urlencode(pairs).encode(), FORM, signature)
    assert r.status == 403, (r.status, r.body)
    assert len(env.twilio.requests) == seen, "an unsigned webhook reached Twilio"


@settings(FUZZ, max_examples=600)
@given(e=events, repeat=st.booleans())
def test_signed_convo_events_follow_the_spec(env: Env, e: Event, repeat: bool) -> None:
    """docs/contract.md §7, event by event: 200 ok within a second; ignored, duplicate, limited or
    accepted as the rules say; an accepted event's job does what its body asks.
    ``repeat`` sends it twice, as Twilio retries: the second is a duplicate."""
    env.ensure()
    env.count("convo", 2 if repeat else 1)
    pairs, _ = event_pairs(env, e)
    for _ in range(2 if repeat else 1):
        before = metrics_text(env.daemon.port)
        seen = len(env.twilio.requests)
        verdict = judge(env, pairs)
        body = urllib.parse.urlencode(pairs).encode()
        r, took = post(env, "/twilio/convo", body, FORM, sign("/twilio/convo", pairs))
        assert r.status in verdict.statuses, (r.status, r.body, verdict)
        if r.status == 200:
            assert r.body == b"ok\n", r.body
            # docs/contract.md §7: the answer within one second; the work comes after it.
            assert took < 1.0, f"answered in {took:.2f} s"
            env.slowest = max(env.slowest, took)
        after_answer = metrics_text(env.daemon.port)
        deltas = _outcome_deltas(before, after_answer)
        assert len(deltas) == 1 and set(deltas) <= verdict.outcomes, (deltas, verdict)
        (outcome,) = deltas
        env.outcomes[outcome] = env.outcomes.get(outcome, 0) + 1
        if outcome == "accepted":
            env.takes[verdict.convo].append(time.monotonic())
            wait_jobs(env.daemon.port)
            new = env.twilio.requests[seen:]
            check_rest(new)
            check_effects(env, e, verdict.convo, new)
        else:
            assert len(env.twilio.requests) == seen, "an event not acted on reached Twilio"


# -- /twilio/voice ---------------------------------------------------------------------------


@dataclass(frozen=True)
class Call:
    direction: str | None
    answered_by: str | None
    extra: tuple[tuple[str, str], ...]


calls = st.builds(
    Call,
    st.sampled_from(["inbound", "outbound-api", "outbound-dial", ""])
    | st.none()
    | st.text(max_size=20),
    st.sampled_from(["human", "machine_start", "machine_end_beep", "fax", "unknown", ""])
    | st.none()
    | st.text(max_size=20),
    st.lists(
        st.tuples(
            st.sampled_from(["CallSid", "AccountSid", "From", "To", "CallStatus"])
            | st.text(max_size=10),
            st.text(max_size=30),
        ),
        max_size=4,
    ).map(tuple),
)


def call_pairs(c: Call) -> list[tuple[str, str]]:
    pairs = [("CallSid", "CA" + os.urandom(16).hex())]
    if c.direction is not None:
        pairs.append(("Direction", c.direction))
    if c.answered_by is not None:
        pairs.append(("AnsweredBy", c.answered_by))
    return pairs + [kv for kv in c.extra if kv[0] not in ("Direction", "AnsweredBy")]


def check_twiml(r: Response, form: dict[str, str], direction: str | None) -> None:
    """``direction`` None: any (an empty Direction may be passed on or read as inbound)."""
    refused = form_verdict(form) or (None if form.get("CallSid") else ("no CallSid", 400))
    if refused is not None:
        assert r.status == refused[1], (r.status, r.body, form)
        return
    assert r.status == 200, (r.status, r.body)
    assert (r.header("content-type") or "").startswith(("text/xml", "application/xml")), r.headers
    root = ET.fromstring(r.body)  # well-formed XML, or Twilio cannot run the call
    assert root.tag == "Response", r.body
    streams = root.findall("./Connect/Stream")
    assert len(streams) == 1, r.body
    # docs/contract.md §6: public_url with https→wss, path /twilio/media/<stream token> (§10).
    url = streams[0].get("url") or ""
    base = "wss://relay.example.com/twilio/media/"
    assert url.startswith(base) and len(url) > len(base) + 40, r.body
    params = {p.get("name"): p.get("value") for p in streams[0].findall("Parameter")}
    if direction is None:
        direction = params.get("direction")
    # Characters XML cannot carry are dropped (relay.edge.twiml.xml_safe); an AnsweredBy,
    # From or To left empty by that is not passed on.
    expected = {"direction": xml_safe(direction or "")}
    for name, field in (("amd", "AnsweredBy"), ("from", "From"), ("to", "To")):
        value = xml_safe(form.get(field) or "")
        if value:
            expected[name] = value
    assert params == expected, (params, expected)


@settings(FUZZ, max_examples=300)
@given(c=calls)
def test_signed_voice_webhooks_answer_twiml(env: Env, c: Call) -> None:
    """docs/contract.md §6: TwiML connecting the call to this relay's stream, with ``direction``
    (Twilio's Direction; inbound if it sent none), ``amd`` (AnsweredBy, if any),
    ``from`` and ``to``; §7's AccountSid and SID checks first."""
    env.ensure()
    env.count("voice", 1)
    pairs = call_pairs(c)
    body = urllib.parse.urlencode(pairs).encode()
    r, _ = post(env, "/twilio/voice", body, FORM, sign("/twilio/voice", pairs))
    direction = None if c.direction == "" else (c.direction or "inbound")
    check_twiml(r, dict(pairs), direction)


# -- bodies that are not what Twilio sends ---------------------------------------------------


@dataclass(frozen=True)
class Odd:
    """A body Twilio would not send. ``encoding``: "repeated" (a key twice), "pct_bytes"
    (percent-encoded bytes that are not UTF-8), "raw_bytes" (not percent-encoded at
    all), "multipart", "json", "text", "no_type". ``signed``: over the pairs the
    request carries (as a multipart parser or a form parser would see them)."""

    encoding: str
    signed: bool
    junk: bytes


odds = st.builds(
    Odd,
    st.sampled_from(["repeated", "pct_bytes", "raw_bytes", "multipart", "json", "text", "no_type"]),
    st.booleans(),
    st.binary(min_size=1, max_size=20),
)


def odd_request(
    pairs: list[tuple[str, str]], odd: Odd
) -> tuple[bytes, str | None, list[tuple[str, str]]]:
    """The body, its content type, and the pairs a form parser finds in it."""
    if odd.encoding == "repeated":
        doubled = [*pairs, *((k, v + "2") for k, v in pairs[:2])]
        return urllib.parse.urlencode(doubled).encode(), FORM, doubled
    if odd.encoding == "pct_bytes":
        extra = "Junk=" + urllib.parse.quote_from_bytes(odd.junk)
        body = (urllib.parse.urlencode(pairs) + "&" + extra).encode()
        return body, FORM, urllib.parse.parse_qsl(body.decode(), keep_blank_values=True)
    if odd.encoding == "raw_bytes":
        return urllib.parse.urlencode(pairs).encode() + b"&Junk=" + odd.junk + b"\xff", FORM, pairs
    if odd.encoding == "multipart":
        boundary = "fuzz" + os.urandom(8).hex()
        parts = [
            f'--{boundary}\r\nContent-Disposition: form-data; name="{k}"\r\n\r\n{v}\r\n'
            for k, v in pairs
            if '"' not in k and "\r" not in k and "\n" not in k
        ]
        kept = [(k, v) for k, v in pairs if '"' not in k and "\r" not in k and "\n" not in k]
        body = ("".join(parts) + f"--{boundary}--\r\n").encode()
        return body, f"multipart/form-data; boundary={boundary}", kept
    if odd.encoding == "json":
        return orjson.dumps(dict(pairs)), "application/json", pairs
    if odd.encoding == "text":
        return urllib.parse.urlencode(pairs).encode(), "text/plain", pairs
    return urllib.parse.urlencode(pairs).encode(), None, pairs


@settings(FUZZ, max_examples=400)
@given(path=st.sampled_from(PATHS), e=events, c=calls, odd=odds)
def test_odd_bodies(env: Env, path: str, e: Event, c: Call, odd: Odd) -> None:
    """Repeated keys, bytes that are not UTF-8, multipart, JSON, no content type:
    signed or not, a 4xx or what a signed form gets; never a 5xx, never a hang."""
    env.ensure()
    env.count("odd_bodies", 1)
    pairs = event_pairs(env, e, oracle=False)[0] if path == "/twilio/convo" else call_pairs(c)
    body, content_type, parsed = odd_request(pairs, odd)
    seen = len(env.twilio.requests)
    signature = sign(path, parsed) if odd.signed else None
    r, _ = post(env, path, body, content_type, signature)
    if not odd.signed:
        assert r.status in (400, 403, 415), (r.status, r.body)
        assert len(env.twilio.requests) == seen, "an unsigned webhook reached Twilio"
        return
    # Signed over what it carries: refused as unreadable, or taken as that form.
    assert r.status in (200, 400, 403, 415), (r.status, r.body)
    # Which of two values counts, the contract does not say: "repeated" is not checked.
    if r.status == 200 and path == "/twilio/voice" and odd.encoding != "repeated":
        form = dict(parsed)
        direction = form.get("Direction")
        check_twiml(r, form, None if direction == "" else direction or "inbound")
    if r.status == 200 and path == "/twilio/convo":
        assert r.body == b"ok\n", r.body
        wait_jobs(env.daemon.port)
        check_rest(env.twilio.requests[seen:])


@settings(FUZZ, max_examples=40)
@given(
    path=st.sampled_from(PATHS),
    signed=st.booleans(),
    chunked=st.booleans(),
    form=st.booleans(),
    size=st.integers(HUGE, HUGE + 4096),
)
def test_huge_bodies(
    env: Env, path: str, signed: bool, chunked: bool, form: bool, size: int
) -> None:
    """1 MiB bodies, with Content-Length or chunked: refused (413, or 403 unsigned),
    answered, not hung on, and the next request on a new connection is served."""
    env.ensure()
    env.count("huge", 1)
    if form:
        pairs = [("EventType", "onMessageAdded"), ("Body", "x" * size)]
        body = urllib.parse.urlencode(pairs).encode()
    else:
        pairs, body = [], os.urandom(size)
    signature = sign(path, pairs) if signed else None
    seen = len(env.twilio.requests)
    r, _ = post(env, path, body, FORM, signature, chunked=chunked)
    assert r.status in (400, 403, 413), (r.status, r.body[:200])
    assert len(env.twilio.requests) == seen
