"""Playback bookkeeping: unit tests and property tests against a model of Twilio."""

from __future__ import annotations

from dataclasses import dataclass, field

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from relay.sessions.playback import BYTES_PER_MS, Playback, Truncate

# ---------------------------------------------------------------- unit tests


def test_mark_names_are_unique_and_non_empty() -> None:
    pb = Playback()
    names = [pb.on_delta("a", 160, 0.0) for _ in range(50)]
    names += [pb.on_delta("b", 160, 0.0) for _ in range(50)]
    assert all(names)
    assert len(set(names)) == len(names)


def test_nothing_forwarded_means_no_truncate() -> None:
    pb = Playback()
    assert pb.all_played() and not pb.unplayed()
    assert pb.barge_in(1000.0) is None
    assert pb.last_item is None


def test_no_truncate_once_every_mark_returned() -> None:
    pb = Playback()
    m1 = pb.on_delta("a", 800, 0.0)
    m2 = pb.on_delta("a", 800, 0.0)
    pb.on_mark(m1, 100.0)
    assert pb.unplayed() and pb.pending_marks() == 1
    pb.on_mark(m2, 200.0)
    assert pb.all_played()
    assert pb.barge_in(250.0) is None


def test_truncate_interpolates_within_a_chunk() -> None:
    pb = Playback()
    pb.on_delta("a", 8000, 1000.0)  # one second of audio sent at t=1s
    assert pb.barge_in(1000.0 + 370.0) == Truncate("a", 370)


def test_truncate_counts_queued_chunks_back_to_back() -> None:
    pb = Playback()
    pb.on_delta("a", 800, 0.0)  # plays 0..100
    pb.on_delta("a", 800, 10.0)  # queued: plays 100..200
    assert pb.barge_in(150.0) == Truncate("a", 150)


def test_truncate_starts_late_chunk_when_it_is_sent() -> None:
    pb = Playback()
    m1 = pb.on_delta("a", 800, 0.0)  # plays 0..100
    pb.on_mark(m1, 100.0)
    pb.on_delta("a", 800, 300.0)  # Twilio idle: plays 300..400
    assert pb.barge_in(350.0) == Truncate("a", 150)


def test_truncate_never_beyond_forwarded_audio() -> None:
    pb = Playback()
    pb.on_delta("a", 803, 0.0)
    assert pb.barge_in(10_000.0) == Truncate("a", 100)  # 803 // 8


def test_truncate_picks_the_item_being_played() -> None:
    pb = Playback()
    pb.on_delta("a", 800, 0.0)  # 0..100
    pb.on_delta("b", 800, 0.0)  # 100..200
    assert pb.barge_in(50.0) == Truncate("a", 50)
    pb2 = Playback()
    pb2.on_delta("a", 800, 0.0)
    pb2.on_delta("b", 800, 0.0)
    assert pb2.barge_in(120.0) == Truncate("b", 20)


def test_marks_echoed_by_clear_are_ignored() -> None:
    pb = Playback()
    stale = [pb.on_delta("a", 8000, 0.0) for _ in range(3)]
    assert pb.barge_in(100.0) == Truncate("a", 100)
    assert pb.all_played()
    fresh = pb.on_delta("b", 8000, 101.0)
    for name in stale:  # Twilio returns every pending mark after the clear
        pb.on_mark(name, 102.0)
    assert pb.pending_marks() == 1
    assert pb.barge_in(201.0) == Truncate("b", 100)
    pb.on_mark(fresh, 202.0)  # also stale now
    assert pb.all_played()


def test_exactly_one_truncate_per_barge_in() -> None:
    pb = Playback()
    pb.on_delta("a", 8000, 0.0)
    assert pb.barge_in(10.0) is not None
    assert pb.barge_in(11.0) is None


def test_late_deltas_of_a_truncated_item_never_move_its_end_forward() -> None:
    pb = Playback()
    pb.on_delta("a", 800, 0.0)
    assert pb.barge_in(50.0) == Truncate("a", 50)
    assert pb.was_truncated("a") and not pb.was_truncated("b")
    pb.on_delta("a", 800, 60.0)  # in flight when the response was cut
    assert pb.barge_in(100.0) == Truncate("a", 50)


def test_mark_anchor_skips_the_network_round_trip() -> None:
    # Twilio 20 ms away each way: the echo of chunk 1 arrives 40 ms after the
    # estimated end; that delay must not be read as a pause in playback.
    pb = Playback()
    m1 = pb.on_delta("a", 800, 0.0)  # true end 120 on Twilio's clock, 100 on ours
    m2 = pb.on_delta("a", 800, 1.0)
    m3 = pb.on_delta("a", 800, 2.0)
    pb.on_mark(m1, 140.0)
    pb.on_mark(m2, 240.0)
    del m3
    assert pb.barge_in(250.0) == Truncate("a", 250)


def test_mark_anchor_follows_a_stall() -> None:
    # Twilio paused 50 ms before finishing chunk 2: the estimate must follow the
    # echo, not the schedule the send times alone would give.
    pb = Playback()
    m1 = pb.on_delta("a", 800, 0.0)
    m2 = pb.on_delta("a", 800, 0.0)
    pb.on_delta("a", 800, 0.0)
    pb.on_mark(m1, 100.0)  # no network delay
    pb.on_mark(m2, 250.0)  # due at 200
    assert pb.barge_in(300.0) == Truncate("a", 250)


def test_negative_bytes_rejected() -> None:
    with pytest.raises(ValueError):
        Playback().on_delta("a", -1, 0.0)


# ------------------------------------------------------- a model of Twilio


@dataclass
class _Played:
    item: str
    offset: int
    nbytes: int
    start: float
    end: float


@dataclass
class TwilioModel:
    """Twilio as documented: plays in real time, echoes marks, clear returns them all.

    Messages from the relay land ``l1`` ms after they are sent; echoes reach the
    relay ``l2`` ms after Twilio sends them.
    """

    l1: int
    l2: int
    chunks: list[_Played] = field(default_factory=list)
    play_end: float = 0.0
    echoes: list[tuple[float, str]] = field(default_factory=list)  # (arrives at relay, name)
    pending: list[tuple[float, str]] = field(default_factory=list)  # (due, name)

    def media(self, sent: float, item: str, offset: int, nbytes: int) -> None:
        arrive = sent + self.l1
        self._echo_due(arrive)
        start = max(arrive, self.play_end)
        self.play_end = start + nbytes / BYTES_PER_MS
        self.chunks.append(_Played(item, offset, nbytes, start, self.play_end))

    def mark(self, sent: float, name: str) -> None:
        arrive = sent + self.l1
        self._echo_due(arrive)
        self.pending.append((max(arrive, self.play_end), name))

    def clear(self, sent: float) -> tuple[bool, tuple[str, int] | None]:
        """Apply a clear. Return whether audio was unplayed when it landed, and
        the (item, bytes of it played) position then, None if nothing was sent."""
        arrive = sent + self.l1
        self._echo_due(arrive)
        truth = self.unplayed(arrive), self.position(arrive)
        for _, name in self.pending:
            self.echoes.append((arrive + self.l2, name))
        self.pending = []
        self.chunks = []
        self.play_end = arrive
        return truth

    def unplayed(self, at: float) -> bool:
        return at < self.play_end or any(c.nbytes and c.end > at for c in self.chunks)

    def position(self, at: float) -> tuple[str, int] | None:
        """Same rule as Playback: a chunk played to its end counts as the next one's start."""
        if not self.chunks:
            return None
        for c in self.chunks:
            played = int((at - c.start) * BYTES_PER_MS) if at > c.start else 0
            if played < c.nbytes:
                return c.item, c.offset + played
        last = self.chunks[-1]
        return last.item, last.offset + last.nbytes

    def _echo_due(self, now: float) -> None:
        while self.pending and self.pending[0][0] <= now:
            due, name = self.pending.pop(0)
            self.echoes.append((due + self.l2, name))

    def echoes_until(self, now: float) -> list[tuple[float, str]]:
        """Echoes that reach the relay by ``now``, in arrival order."""
        self._echo_due(now - self.l2)
        ready = sorted((e for e in self.echoes if e[0] <= now), key=lambda e: e[0])
        self.echoes = [e for e in self.echoes if e[0] > now]
        return ready


_ops = st.lists(
    st.one_of(
        st.tuples(st.just("delta"), st.integers(0, 3200)),
        st.tuples(st.just("wait"), st.integers(0, 600)),
        st.tuples(st.just("next_item"), st.just(0)),
        st.tuples(st.just("barge"), st.just(0)),
    ),
    max_size=80,
)


@settings(max_examples=400, deadline=None)
@given(ops=_ops, l1=st.integers(0, 60), l2=st.integers(0, 60))
def test_truncate_matches_what_twilio_played(ops: list[tuple[str, int]], l1: int, l2: int) -> None:
    """With a constant network delay the truncate point is exact, whatever the history."""
    pb = Playback()
    twilio = TwilioModel(l1, l2)
    forwarded: dict[str, int] = {}
    item_no, now = 0, 0.0
    item = "item0"

    def deliver(until: float) -> None:
        for at, name in twilio.echoes_until(until):
            pb.on_mark(name, at)

    for op, arg in ops:
        if op == "delta":
            offset = forwarded.get(item, 0)
            forwarded[item] = offset + arg
            name = pb.on_delta(item, arg, now)
            twilio.media(now, item, offset, arg)
            twilio.mark(now, name)
        elif op == "wait":
            deliver(now + arg)
            now += arg
        else:  # next_item, barge: the next audio belongs to a new response
            if op == "barge":
                deliver(now)
                had_pending = pb.unplayed()
                got = pb.barge_in(now)
                unplayed, truth = twilio.clear(now)
                # Twilio had audio unplayed: its marks cannot have come back, so a
                # truncate is due. The converse fails only for echoes in flight.
                if unplayed:
                    assert got is not None
                assert (got is not None) == had_pending
                if got is not None:
                    assert truth is not None
                    assert got.item_id == truth[0]
                    assert got.audio_end_ms == truth[1] // BYTES_PER_MS
                    assert got.audio_end_ms * BYTES_PER_MS <= forwarded[got.item_id]
                    assert pb.all_played()
            item_no += 1
            item = f"item{item_no}"


_chaos = st.lists(
    st.one_of(
        st.tuples(st.just("delta"), st.sampled_from("abc"), st.integers(0, 4000)),
        st.tuples(st.just("mark"), st.just(""), st.integers(0, 200)),
        st.tuples(st.just("wait"), st.just(""), st.integers(0, 1000)),
        st.tuples(st.just("barge"), st.just(""), st.just(0)),
    ),
    max_size=100,
)


@settings(max_examples=400, deadline=None)
@given(ops=_chaos)
def test_safety_under_any_interleaving(ops: list[tuple[str, str, int]]) -> None:
    """Items interleaved, marks echoed at arbitrary times or invented: still safe."""
    pb = Playback()
    forwarded: dict[str, int] = {}
    sent: list[str] = []  # every name ever sent, in order
    cleared: set[str] = set()
    confirmed: set[str] = set()
    truncated: dict[str, int] = {}
    now = 0.0
    for op, item, arg in ops:
        if op == "delta":
            forwarded[item] = forwarded.get(item, 0) + arg
            sent.append(pb.on_delta(item, arg, now))
        elif op == "mark":
            name = sent[arg] if arg < len(sent) else f"bogus{arg}"
            before = pb.pending_marks()
            pb.on_mark(name, now)
            if name in cleared or name in confirmed or name not in sent:
                assert pb.pending_marks() == before  # stale echoes change nothing
            else:
                confirmed.update(sent[: sent.index(name) + 1])
                confirmed -= cleared
        elif op == "wait":
            now += arg
        else:
            unplayed = pb.unplayed()
            got = pb.barge_in(now)
            assert (got is not None) == unplayed
            if got is not None:
                assert got.audio_end_ms >= 0
                assert got.audio_end_ms * BYTES_PER_MS <= forwarded[got.item_id]
                if got.item_id in truncated:
                    assert got.audio_end_ms <= truncated[got.item_id]
                truncated[got.item_id] = got.audio_end_ms
            cleared.update(n for n in sent if n not in confirmed)
            assert pb.all_played() and pb.barge_in(now) is None
