"""Hostile input on the Twilio bridge (docs/contract.md §6), fuzzed with hypothesis against one
``relay serve`` for the whole module.

Twilio frames of every wrong shape, before and after ``start``, and upstream
events that are malformed or out of order. After each example the call it hit
must still relay audio both ways (unless the example ended it, in which case it
must have ended with the right code), nothing the relay sent may break Twilio's
or OpenAI's rules, and after each property the daemon is back to its baseline
(:class:`relay.testing.fuzz.Watch`) and a call opened before the property still
works.
"""

from __future__ import annotations

import base64
import secrets
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any

import orjson
import pytest
import trio
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from relay.testing.daemon import TEST_TWILIO_TOKEN, Daemon, running_daemon
from relay.testing.fake_realtime import FakeConnection, FakeRealtime, fake_realtime
from relay.testing.fuzz import Watch
from relay.testing.portal import Held, Portal, trio_portal
from relay.testing.twilio_caller import TwilioCall, twilio_call

# Both drivers of the session core: the reactor's fast path, and the pumps alone.
pytestmark = pytest.mark.usefixtures("fast_path")

PUBLIC = "https://relay.example.com"
STREAM_URL = "wss://relay.example.com/twilio/media"
LIMIT = 32 * 1024  # max_message_bytes: small, so frames around it are cheap to send

FUZZ = settings(
    deadline=None,
    database=None,  # CI runs fresh examples every time; failures print their input
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)

# -- strategies -------------------------------------------------------------------

json_scalar = (
    st.none()
    | st.booleans()
    | st.integers(-(2**63), 2**64 - 1)
    | st.floats(allow_nan=False)
    | st.text(max_size=12)
)
json_value = st.recursive(
    json_scalar,
    lambda inner: (
        st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=8), inner, max_size=3)
    ),
    max_leaves=6,
)
valid_b64 = st.binary(max_size=480).map(lambda b: base64.b64encode(b).decode())
# Not base64: stray characters, bad padding, a length that is not a multiple of 4.
invalid_b64 = st.one_of(
    st.text(min_size=1, max_size=40).filter(lambda s: not _is_b64(s)),
    valid_b64.map(lambda s: s + "A"),
    st.just("===="),
    st.just("AB=C"),
)
huge_b64 = st.integers(LIMIT - 64, LIMIT + 64).map(lambda n: base64.b64encode(b"\x7f" * n).decode())
payload = st.one_of(valid_b64, invalid_b64, json_value, huge_b64)


def _is_b64(s: str) -> bool:
    try:
        base64.b64decode(s, validate=True)
    except ValueError:
        return False
    return True


def _obj(**fields: st.SearchStrategy[Any]) -> st.SearchStrategy[dict[str, Any]]:
    """Objects where each field may be missing (``optional``)."""
    return st.fixed_dictionaries({}, optional=fields)


sid = st.one_of(st.text(max_size=40), json_value, st.just("MZ" + "0" * 32))
media_event = _obj(
    event=st.just("media"),
    streamSid=sid,
    media=st.one_of(json_value, _obj(payload=payload, track=json_value, timestamp=json_value)),
)
start_event = _obj(
    event=st.just("start"),
    streamSid=sid,
    start=st.one_of(
        json_value,
        _obj(
            streamSid=sid,
            callSid=json_value,
            customParameters=st.one_of(
                json_value,
                _obj(
                    direction=json_value,
                    amd=st.sampled_from(["machine_start", "fax", "human"]),
                    voice=json_value,
                ),
            ),
        ),
    ),
)
other_event = _obj(
    event=st.one_of(
        st.sampled_from(["connected", "mark", "dtmf", "clear", "MEDIA", "", "stop "]), json_value
    ),
    streamSid=sid,
    mark=json_value,
    dtmf=json_value,
    sequenceNumber=json_value,
)
json_frame = st.one_of(media_event, start_event, other_event, json_value).map(
    lambda v: orjson.dumps(v).decode()
)
text_frame = st.one_of(json_frame, st.text(max_size=200), st.just(""), st.just("{"), st.just("[]"))
twilio_frame = st.one_of(text_frame, st.binary(max_size=300))


def _valid_start(raw: str | bytes) -> bool:
    """Would the relay take ``raw`` as the call's ``start`` (twilio_session._on_start)?"""
    try:
        event = orjson.loads(raw)
        start = event["start"]
        sid = event.get("streamSid") or start.get("streamSid")
    except (orjson.JSONDecodeError, TypeError, KeyError, AttributeError):
        return False
    return event.get("event") == "start" and isinstance(sid, str) and bool(sid)


def _is_stop(raw: str | bytes) -> bool:
    try:
        return bool(orjson.loads(raw)["event"] == "stop")
    except (orjson.JSONDecodeError, TypeError, KeyError):
        return False


def _size(raw: str | bytes) -> int:
    return len(raw.encode()) if isinstance(raw, str) else len(raw)


# Upstream (OpenAI → relay) events: malformed, or well-formed but out of order.
item_id = st.one_of(st.sampled_from(["item_a", "item_b", "item_c"]), json_value)
up_event = st.one_of(
    _obj(
        type=st.just("response.output_audio.delta"),
        item_id=item_id,
        delta=payload,
        response_id=json_value,
    ),
    _obj(
        type=st.just("input_audio_buffer.speech_started"),
        item_id=json_value,
        audio_start_ms=json_value,
    ),
    _obj(type=st.sampled_from(["response.done", "response.created"]), response=json_value),
    _obj(type=st.just("error"), error=json_value),
    _obj(type=st.one_of(st.text(max_size=30), json_value)),
    json_value,
)
up_message = st.one_of(
    up_event.map(lambda v: orjson.dumps(v).decode()), st.text(max_size=100), st.binary(max_size=100)
)

# -- the module's daemon ----------------------------------------------------------


@dataclass
class Call:
    held: Held[TwilioCall]
    conn: FakeConnection
    probes: int = 0

    @property
    def call(self) -> TwilioCall:
        return self.held.value


@dataclass(repr=False)  # hypothesis prints the arguments of a failing example
class Env:
    portal: Portal
    fake: FakeRealtime
    daemon: Daemon
    watch: Watch
    canary: Call | None = None
    current: Call | None = None
    cases: int = 0
    registered: dict[int, set[str]] = field(default_factory=dict)

    async def open_call(self, *, start: bool = True) -> Call:
        index = len(self.fake.connections)
        held = await self.portal.hold(
            lambda: twilio_call(
                f"{self.daemon.ws_url}/twilio/media",
                public_url=STREAM_URL,
                auth_token=TEST_TWILIO_TOKEN,
                custom_parameters={"direction": "inbound"},
                send_audio=False,
            )
        )
        call = Call(held, await self.fake.wait_connection(index))
        if start:
            await call.call.start()
            await call.conn.wait_for("response.create")
        return call

    async def fuzz_call(self) -> Call:
        """The call examples hit; a new one if the last example ended it."""
        if self.current is not None and self.current.call.closed.is_set():
            await self.end_current()
        if self.current is None:
            self.current = await self.open_call()
        return self.current

    async def end_current(self) -> None:
        if self.current is not None:
            current, self.current = self.current, None
            await current.held.release()
            with trio.fail_after(10):
                await current.conn.closed.wait()

    async def probe(self, c: Call, timeout: float = 5) -> None:
        """Caller audio reaches upstream unchanged, and assistant audio reaches the caller."""
        c.probes += 1
        audio = secrets.token_bytes(160)
        await c.call.send_media(audio)
        with trio.move_on_after(timeout):
            while c.conn.input_audio[-160:] != audio:
                await trio.sleep(0.001)
        assert c.conn.input_audio[-160:] == audio, ("caller audio lost", c.conn.received[-4:])
        item, reply = f"item_probe_{c.probes}", secrets.token_bytes(160)
        # Registered with the fake before it is sent, as the fake does for its own
        # audio: a truncate of this item is then judged like a real one.
        c.conn.item_audio[item] = len(reply)
        delta = {
            "type": "response.output_audio.delta",
            "response_id": "resp_probe",
            "item_id": item,
            "output_index": 0,
            "content_index": 0,
            "delta": base64.b64encode(reply).decode(),
        }
        await c.conn.send_event(delta)
        # The fake's own greeting may still be speaking: its chunks can come after ours.
        with trio.move_on_after(timeout):
            while reply not in c.call.received_media[-8:]:
                await trio.sleep(0.001)
        assert reply in c.call.received_media[-8:], (
            "assistant audio lost",
            c.call.received_events[-4:],
            c.conn.sent[-4:],
            c.call.closed.is_set(),
            c.conn.closed.is_set(),
        )

    def assert_clean(self, c: Call) -> None:
        assert c.call.protocol_errors == [], c.call.protocol_errors
        # With the errors, the last messages the relay sent upstream: the culprit is there.
        assert c.conn.errors == [], (c.conn.errors, [m[:200] for m in c.conn.received[-6:]])


@asynccontextmanager
async def _daemon() -> AsyncIterator[tuple[FakeRealtime, Daemon]]:
    async with fake_realtime() as fake:
        fake.response_chunks = 3
        fake.chunk_interval = 0
        overrides: dict[str, dict[str, Any]] = {
            "openai": {"realtime_url": f"ws://127.0.0.1:{fake.port}/v1/realtime"},
            "server": {"public_url": PUBLIC},
            "limits": {"max_message_bytes": LIMIT},
        }
        async with running_daemon(overrides) as d:
            yield fake, d


@pytest.fixture(scope="module")
def env() -> Iterator[Env]:
    with trio_portal(_daemon) as (portal, (fake, d)):
        e = Env(portal, fake, d, Watch(d))
        print(f"\ntwilio fuzz: daemon log {d.log_path}")
        e.canary = portal.run(e.open_call)
        portal.run(e.probe, e.canary)
        e.watch.baseline()
        yield e
        print(f"\ntwilio fuzz: {e.cases} cases; " + "; ".join(e.watch.history))
        # Hang up the canary before the daemon stops: a call still open would hold
        # its drain for drain_seconds (10 s of every run, for nothing).
        if e.canary is not None:
            portal.run(e.canary.held.release)


@pytest.fixture(autouse=True)
def after_property(env: Env, request: pytest.FixtureRequest) -> Iterator[None]:
    yield
    env.portal.run(env.end_current)
    assert env.canary is not None
    env.portal.run(env.probe, env.canary)
    env.assert_clean(env.canary)
    env.watch.check(request.node.name)


# -- properties -------------------------------------------------------------------


async def _send_frames(env: Env, frames: list[str | bytes]) -> None:
    c = await env.fuzz_call()
    for raw in frames:
        env.cases += 1
        await c.call.send_raw(raw)
        if _size(raw) > LIMIT:
            # Over max_message_bytes: the call ends with 1009, the upstream with 1000.
            with trio.fail_after(10):
                await c.call.closed.wait()
            assert c.call.close_code == 1009, c.call.close_code
            await env.end_current()
            assert c.conn.close_code == 1000, c.conn.close_code
            return
        if _is_stop(raw):
            with trio.fail_after(10):
                await c.call.closed.wait()
            assert c.call.close_code == 1000
            return
    await env.probe(c)
    env.assert_clean(c)


# Oversize frames of both types: binary then text once crashed Hypercorn (see
# relay/edge/hypercorn_fix.py).
oversize = st.sampled_from(["x" * (LIMIT + 1), b"x" * (LIMIT + 1)])


@settings(FUZZ, max_examples=1000)
@given(frames=st.lists(twilio_frame | oversize, min_size=1, max_size=4))
def test_hostile_frames_on_a_live_call(env: Env, frames: list[str | bytes]) -> None:
    env.portal.run(_send_frames, env, frames)


async def _before_start(env: Env, frames: list[str | bytes]) -> None:
    await env.end_current()
    c = env.current = await env.open_call(start=False)
    for raw in frames:
        env.cases += 1
        await c.call.send_raw(raw)
    # Nothing before a valid start may reach upstream or start the call.
    await c.call.start()
    await c.conn.wait_for("response.create")
    updates = [e for e in c.conn.events if e.get("type") == "session.update"]
    assert len(updates) == 1 and c.conn.input_audio == b""
    await env.probe(c)
    env.assert_clean(c)
    await env.end_current()


@settings(FUZZ, max_examples=150)
@given(
    frames=st.lists(
        twilio_frame.filter(
            lambda f: not _valid_start(f) and not _is_stop(f) and _size(f) <= LIMIT
        ),
        min_size=1,
        max_size=6,
    )
)
def test_hostile_frames_before_start(env: Env, frames: list[str | bytes]) -> None:
    env.portal.run(_before_start, env, frames)


async def _upstream_events(env: Env, messages: list[str | bytes]) -> None:
    c = await env.fuzz_call()
    for raw in messages:
        env.cases += 1
        # An injected delta for a real-looking item: let the fake know it sent that
        # audio, so that the relay's truncate of it is judged as OpenAI would.
        try:
            event = orjson.loads(raw)
            # Audio with no item_id is dropped by the relay, so it never counts.
            item, delta = event.get("item_id") or "", event["delta"]
            if isinstance(item, str) and isinstance(delta, str) and _is_b64(delta):
                c.conn.item_audio[item] = c.conn.item_audio.get(item, 0) + len(
                    base64.b64decode(delta)
                )
        except (orjson.JSONDecodeError, TypeError, KeyError, AttributeError):
            pass
        await c.conn.send_raw(raw)
    await env.probe(c)
    env.assert_clean(c)


@settings(FUZZ, max_examples=1000)
@given(messages=st.lists(up_message, min_size=1, max_size=5))
def test_hostile_upstream_events(env: Env, messages: list[str | bytes]) -> None:
    env.portal.run(_upstream_events, env, messages)


def test_daemon_survived_with_no_call_left(env: Env) -> None:
    """The last word of the module: the canary call ends cleanly with a ``stop``."""
    assert env.canary is not None

    async def stop_canary() -> None:
        assert env.canary is not None
        await env.canary.call.stop()
        with trio.fail_after(10):
            await env.canary.call.closed.wait()
            await env.canary.conn.closed.wait()
        assert env.canary.call.close_code == 1000
        assert env.canary.conn.close_code == 1000
        await env.canary.held.release()

    env.portal.run(stop_canary)
    new = env.portal.run(env.open_call)
    env.canary = new  # the after-property check probes the fresh one
