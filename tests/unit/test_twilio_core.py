"""relay.sessions.twilio_core on its own: random event sequences, no sockets, no trio.

Each example drives a TwilioCore the way either driver does (messages fed in
batches, each batch ended by ``flush``) and checks the call's guarantees on
what the core asked to send.
"""

from __future__ import annotations

import base64
from dataclasses import dataclass, field
from typing import Any

import orjson
from hypothesis import given, settings
from hypothesis import strategies as st

from relay.config import Settings
from relay.sessions.closing import Ending
from relay.sessions.twilio_core import TwilioCore
from relay.ws.errors import Disconnected, UpstreamClosed
from tests.core_wire import Tally, Wire

SID = "MZ00000000000000000000000000000000"
CALL = "CA00000000000000000000000000000000"


def core(token_call: str | None = None) -> tuple[TwilioCore, Wire, Tally]:
    wire, tally = Wire(), Tally()
    return TwilioCore(Settings(), wire.out(), tally, token_call=token_call), wire, tally


def start(amd: str = "", call: str = CALL) -> bytes:
    params = {"amd": amd} if amd else {}
    return orjson.dumps(
        {
            "event": "start",
            "streamSid": SID,
            "start": {"streamSid": SID, "callSid": call, "customParameters": params},
        }
    )


def media(audio: bytes) -> bytes:
    return orjson.dumps({"event": "media", "media": {"payload": base64.b64encode(audio).decode()}})


def mark(name: str) -> bytes:
    return orjson.dumps({"event": "mark", "mark": {"name": name}})


def delta(item: str, audio: bytes) -> bytes:
    return orjson.dumps(
        {
            "type": "response.output_audio.delta",
            "item_id": item,
            "delta": base64.b64encode(audio).decode(),
        }
    )


SPEECH = b'{"type":"input_audio_buffer.speech_started"}'

# One step of a call: what arrives, or time passing.
steps = st.one_of(
    st.tuples(st.just("media"), st.binary(min_size=1, max_size=200)),
    st.tuples(
        st.just("junk"),
        st.sampled_from(
            [
                b"{",
                b"[]",
                b'{"event":"media"}',
                b'{"event":"media","media":{"payload":"A="}}',
                b'{"event":"dtmf"}',
            ]
        ),
    ),
    st.tuples(st.just("flush"), st.none()),
    st.tuples(st.just("mark"), st.integers(0, 30)),  # echo the n-th mark sent (or an unknown one)
    st.tuples(
        st.just("delta"),
        st.tuples(st.sampled_from(["i1", "i2", "i3"]), st.binary(min_size=1, max_size=1600)),
    ),
    st.tuples(st.just("speech"), st.none()),
    st.tuples(st.just("created"), st.sampled_from(["r1", "r2", "r3"])),
    st.tuples(st.just("done"), st.sampled_from(["r1", "r2", "r3"])),
    st.tuples(st.just("time"), st.floats(0, 500)),
    st.tuples(st.just("goodbye"), st.none()),
    st.tuples(st.just("drain"), st.sampled_from([1.0, 5.0])),
)
endings = st.sampled_from(
    ["none", "stop", "twilio_gone", "upstream_gone", "drain_expired", "time_limit"]
)


@dataclass
class Run:
    """A call played to the core, and what the test knows independently of it."""

    core: TwilioCore
    wire: Wire
    tally: Tally
    fed_audio: bytearray = field(default_factory=bytearray)  # audio fed while it should go up
    sends_at_end: int | None = None
    media_items: list[str] = field(default_factory=list)  # the item of each media sent
    now: float = 0.0

    def note_end(self) -> None:
        if self.core.ending is not None and self.sends_at_end is None:
            self.sends_at_end = len(self.wire.sent)


def play(amd: str, events: list[tuple[str, Any]], end: str) -> Run:
    c, wire, tally = core()
    run = Run(c, wire, tally)
    feed_twilio, flush = c.twilio, c.flush

    def twilio(raw: bytes, now: float) -> None:
        wire.from_twilio = True
        feed_twilio(raw, now)
        wire.from_twilio = False

    def flushed() -> None:
        wire.from_twilio = True
        flush()
        wire.from_twilio = False

    twilio(start(amd), run.now)
    flushed()
    for kind, arg in events:
        taking = c.ending is None and not c.voicemail and not c.closing
        if kind == "media":
            if taking:
                run.fed_audio += arg
            twilio(media(arg), run.now)
        elif kind == "junk":
            twilio(arg, run.now)
        elif kind == "flush":
            flushed()
        elif kind == "mark":
            sent = [e["mark"]["name"] for e in wire.twilio("mark")]
            twilio(mark(sent[arg] if arg < len(sent) else f"x{arg}"), run.now)
        elif kind == "delta":
            before = len(wire.sent)
            c.upstream(delta(*arg), run.now)
            if len(wire.sent) > before:
                run.media_items.append(arg[0])
        elif kind == "speech":
            c.upstream(SPEECH, run.now)
        elif kind == "created":
            c.upstream(orjson.dumps({"type": "response.created", "response": {"id": arg}}), run.now)
        elif kind == "done":
            c.upstream(orjson.dumps({"type": "response.done", "response": {"id": arg}}), run.now)
        elif kind == "time":
            run.now += arg
        elif kind == "goodbye":
            c.goodbye_due()
        elif kind == "drain":
            c.drain_started(arg)
        run.note_end()
    flushed()
    if end == "stop":
        twilio(b'{"event":"stop"}', run.now)
    elif end == "twilio_gone":
        c.twilio_gone(Disconnected(1006, "lost"))
    elif end == "upstream_gone":
        c.upstream_gone(UpstreamClosed(1000, "bye"))
    elif end == "drain_expired":
        c.drain_expired()
    elif end == "time_limit":
        c.time_limit()
    run.note_end()
    if c.ending is None:
        return run
    # Whatever still arrives once the call is over.
    twilio(media(b"late"), run.now)
    flushed()
    c.upstream(delta("i1", b"late"), run.now)
    c.upstream(SPEECH, run.now)
    c.goodbye_due()
    return run


def appended(wire: Wire) -> bytes:
    return b"".join(base64.b64decode(e["audio"]) for e in wire.up("input_audio_buffer.append"))


@settings(max_examples=300, deadline=None)
@given(st.lists(steps, max_size=60), endings)
def test_caller_audio_goes_up_byte_identical_and_in_order(events: list[Any], end: str) -> None:
    run = play("", events, end)
    assert appended(run.wire) == bytes(run.fed_audio)
    assert run.tally.up >= len(run.wire.up("input_audio_buffer.append"))


@settings(max_examples=200, deadline=None)
@given(
    st.sampled_from(["machine_start", "machine_end_beep", "fax"]),
    st.lists(steps, max_size=60),
    endings,
)
def test_voicemail_never_forwards_caller_audio_nor_barges_in(
    amd: str, events: list[Any], end: str
) -> None:
    run = play(amd, events, end)
    assert run.wire.up("input_audio_buffer.append") == []
    assert run.wire.twilio("clear") == [] and run.wire.up("conversation.item.truncate") == []
    update = run.wire.up("session.update")[0]
    assert update["session"]["audio"]["input"]["turn_detection"] is None


@settings(max_examples=300, deadline=None)
@given(st.lists(steps, max_size=60), endings)
def test_exactly_one_truncate_per_barge_in_right_after_its_clear(
    events: list[Any], end: str
) -> None:
    run = play("", events, end)
    sent = run.wire.sent
    clears = [i for i, (side, e) in enumerate(sent) if side == "twilio" and e["event"] == "clear"]
    truncates = [
        i
        for i, (side, e) in enumerate(sent)
        if side == "up" and e["type"] == "conversation.item.truncate"
    ]
    assert [i + 1 for i in clears] == truncates
    assert len(truncates) == run.core.bargeins


@settings(max_examples=300, deadline=None)
@given(st.lists(steps, max_size=60), endings)
def test_audio_end_ms_never_more_than_received(events: list[Any], end: str) -> None:
    run = play("", events, end)
    media_items = iter(run.media_items)
    played: dict[str, int] = {}  # bytes of each item sent to Twilio so far
    for side, e in run.wire.sent:
        if side == "twilio" and e["event"] == "media":
            item = next(media_items)
            played[item] = played.get(item, 0) + len(base64.b64decode(e["media"]["payload"]))
        if side == "up" and e["type"] == "conversation.item.truncate":
            assert 0 <= e["audio_end_ms"] * 8 <= played[e["item_id"]]


@settings(max_examples=300, deadline=None)
@given(st.lists(steps, max_size=60), endings)
def test_nothing_is_sent_after_the_end(events: list[Any], end: str) -> None:
    run = play("", events, end)
    if end != "none":
        assert run.core.ending is not None
    if run.sends_at_end is not None:
        assert len(run.wire.sent) == run.sends_at_end


@settings(max_examples=200, deadline=None)
@given(
    st.lists(st.integers(1, 1600), min_size=1, max_size=8),
    st.floats(0, 2000),
    st.lists(st.integers(0, 7), max_size=8),
)
def test_marks_sent_before_a_clear_never_count(
    sizes: list[int], barge_at: float, echoes: list[int]
) -> None:
    c, wire, _ = core()
    c.twilio(start(), 0.0)
    for n in sizes:
        c.upstream(delta("i1", b"\x00" * n), 0.0)
    before = [e["mark"]["name"] for e in wire.twilio("mark")]
    c.upstream(SPEECH, barge_at)
    assert len(wire.twilio("clear")) == 1
    c.upstream(delta("i2", b"\x00" * 800), barge_at + 1)  # a new answer after the barge-in
    for k in echoes:  # Twilio echoes the cleared marks, in any order, any number of times
        c.twilio(mark(before[k % len(before)]), barge_at + 2)
    assert c.playback.pending_marks() == 1
    assert not c.playback.all_played()


def test_start_sends_exactly_one_update_and_one_response_create() -> None:
    c, wire, _ = core()
    c.twilio(start(), 0.0)
    c.twilio(start(), 0.0)  # a second start is noise
    assert [e["type"] for _, e in wire.sent] == ["session.update", "response.create"]


def test_a_start_for_another_call_than_the_token_names_ends_1008_with_nothing_sent() -> None:
    c, wire, _ = core(token_call="CAffffffffffffffffffffffffffffffff")
    c.twilio(start(), 0.0)
    c.twilio(media(b"\x01" * 160), 0.0)
    c.flush()
    assert c.ending == Ending("stream_token", 1008, "call does not match stream token", 1000)
    assert wire.sent == []


def test_frames_fed_in_one_batch_go_up_as_one_append_ended_by_the_next_event() -> None:
    c, wire, _ = core()
    c.twilio(start(), 0.0)
    for i in range(3):
        c.twilio(media(bytes([i]) * 160), 0.0)
    c.twilio(mark("nothing"), 0.0)  # another event ends the join, before it is handled
    c.twilio(media(b"\x09" * 160), 0.0)
    c.flush()
    appends = wire.up("input_audio_buffer.append")
    assert [len(base64.b64decode(a["audio"])) for a in appends] == [480, 160]


def test_media_and_mark_of_a_delta_go_out_in_one_write() -> None:
    c, wire, tally = core()
    c.twilio(start(), 0.0)
    c.upstream(delta("i1", b"\x00" * 160), 0.0)
    assert wire.writes_to_twilio == [2] and tally.down == 1
    assert [e["event"] for _, e in wire.sent if _ == "twilio"] == ["media", "mark"]


def test_voicemail_ends_once_its_final_response_has_played() -> None:
    c, wire, _ = core()
    c.twilio(start("machine_end_beep"), 0.0)
    c.upstream(b'{"type":"response.created","response":{"id":"r1"}}', 0.0)
    c.upstream(delta("i1", b"\x00" * 160), 0.0)
    c.upstream(b'{"type":"response.done","response":{"id":"r1"}}', 0.0)
    assert c.ending is None  # Twilio has not played it yet
    c.twilio(mark(wire.twilio("mark")[0]["mark"]["name"]), 30.0)
    assert c.ending == Ending("voicemail", 1000, "", 1000)


def test_goodbye_cancels_an_active_response_then_asks_for_the_goodbye() -> None:
    c, wire, _ = core()
    c.twilio(start(), 0.0)
    c.upstream(b'{"type":"response.created","response":{"id":"r1"}}', 0.0)
    c.goodbye_due()
    c.goodbye_due()  # once only
    kinds = [e["type"] for _, e in wire.sent]
    assert kinds == ["session.update", "response.create", "response.cancel", "response.create"]
    c.twilio(media(b"\x01" * 160), 0.0)
    c.flush()
    assert wire.up("input_audio_buffer.append") == []  # no caller audio in goodbye


def test_an_upstream_that_cannot_be_opened_ends_the_call_1011() -> None:
    c, wire, _ = core()
    c.upstream_unavailable()
    c.twilio(start(), 0.0)
    assert c.ending == Ending("upstream_failed", 1011, "upstream unavailable", None)
    assert wire.sent == []
