"""What assistant audio Twilio has played, and where a barge-in truncates it.

Pure bookkeeping: no I/O and no clock of its own. Every method that needs the
time takes ``now_ms`` from the caller, which must be one monotonic millisecond
clock for the whole session (``trio.current_time() * 1000`` in the relay), so
tests can replay any history deterministically.

The relay forwards each upstream audio delta as one Twilio ``media`` followed by
one ``mark`` named by :meth:`Playback.on_delta`. Twilio echoes a mark once the
audio before it has played, and on ``clear`` it drops unplayed audio and echoes
every pending mark at once; those echoes mean nothing, and :meth:`barge_in`
forgets their names before they can arrive.

Marks alone only tell the play position at chunk boundaries, and a delta can be
hundreds of milliseconds long. So the position is estimated the way Twilio
plays: in real time, each chunk starting when it is sent if Twilio is idle, else
when the previous one ends; every confirmed mark re-anchors that schedule. With
a constant network delay the estimate is exact (see :meth:`Playback.on_mark`).
"""

from __future__ import annotations

import math
from collections import deque
from dataclasses import dataclass

BYTES_PER_MS = 8
"""G.711 μ-law at 8 kHz: one byte per sample."""


@dataclass(frozen=True, slots=True)
class Truncate:
    """Truncate ``item_id`` (content index 0) at ``audio_end_ms``."""

    item_id: str
    audio_end_ms: int


@dataclass(frozen=True, slots=True)
class _Chunk:
    mark: str
    item_id: str
    offset: int  # bytes of this item forwarded before this chunk
    nbytes: int
    sent_ms: float


class Playback:
    """Forwarded versus played assistant audio of one Twilio stream.

    Guarantees:

    - mark names are non-empty and never repeat within a ``Playback``;
    - a mark that is unknown, already confirmed, or was pending when a barge-in
      happened never counts as played audio;
    - :meth:`barge_in` returns a truncate only while some forwarded audio is
      unconfirmed, and its ``audio_end_ms`` never exceeds the audio forwarded
      for that item, nor an earlier truncate point of the same item.
    """

    def __init__(self) -> None:
        self._marks_sent = 0
        self._pending: deque[_Chunk] = deque()  # forwarded, unconfirmed, in send order
        self._pending_names: set[str] = set()
        self._forwarded: dict[str, int] = {}  # bytes per item, over the whole session
        self._truncated: dict[str, int] = {}  # item -> audio_end_ms already sent upstream
        self._last_item: str | None = None
        # Time from which Twilio is ready to play the first pending chunk, in our clock.
        self._ready_ms = -math.inf
        # Smallest observed (mark arrival - estimated end of its chunk): the round
        # trip. Stalls in Twilio only make a sample larger, so the minimum is the
        # pure network delay.
        self._lag_ms = math.inf

    def on_delta(self, item_id: str, nbytes: int, now_ms: float) -> str:
        """Record ``nbytes`` of ``item_id`` forwarded now; return the mark name to send after it."""
        if nbytes < 0:
            raise ValueError(f"nbytes must be >= 0, got {nbytes}")
        self._marks_sent += 1
        name = str(self._marks_sent)
        offset = self._forwarded.get(item_id, 0)
        self._forwarded[item_id] = offset + nbytes
        self._pending.append(_Chunk(name, item_id, offset, nbytes, now_ms))
        self._pending_names.add(name)
        self._last_item = item_id
        return name

    def on_mark(self, name: str, now_ms: float) -> None:
        """Twilio echoed mark ``name`` now: its chunk and all before it have played.

        Names that are not pending (stale, unknown, repeated) are ignored.
        """
        if name not in self._pending_names:
            return
        ready = self._ready_ms
        while True:
            chunk = self._pending.popleft()
            self._pending_names.discard(chunk.mark)
            ready = max(ready, chunk.sent_ms) + chunk.nbytes / BYTES_PER_MS
            if chunk.mark == name:
                break
        # The echo left Twilio one network delay after the chunk ended; re-anchor
        # at the end that delay implies rather than at the arrival, or every
        # estimate after a queued chunk would lag by a whole round trip.
        self._lag_ms = min(self._lag_ms, max(now_ms - ready, 0.0))
        self._ready_ms = now_ms - self._lag_ms

    def barge_in(self, now_ms: float) -> Truncate | None:
        """The caller started speaking: where to truncate, if anything is unplayed.

        Returns ``None`` when every forwarded chunk is confirmed. Otherwise
        returns the truncate for the item Twilio is estimated to be playing,
        and forgets all pending chunks: the relay sends ``clear`` now, so their
        marks will come back without having played.
        """
        if not self._pending:
            return None
        chunk, into = self._position(now_ms)
        end_bytes = min(chunk.offset + into, self._forwarded[chunk.item_id])
        end_ms = end_bytes // BYTES_PER_MS
        end_ms = min(end_ms, self._truncated.get(chunk.item_id, end_ms))
        self._truncated[chunk.item_id] = end_ms
        self._pending.clear()
        self._pending_names.clear()
        self._ready_ms = now_ms  # Twilio's buffer is empty once the clear lands
        return Truncate(chunk.item_id, end_ms)

    def all_played(self) -> bool:
        """Has Twilio confirmed every mark sent (and not cleared) so far?"""
        return not self._pending

    def unplayed(self) -> bool:
        """Is some forwarded assistant audio not yet confirmed played?"""
        return bool(self._pending)

    def pending_marks(self) -> int:
        """Marks sent and neither confirmed nor cleared."""
        return len(self._pending)

    def was_truncated(self, item_id: str) -> bool:
        """Has a barge-in truncated ``item_id``? Its further deltas were cut upstream."""
        return item_id in self._truncated

    @property
    def last_item(self) -> str | None:
        """The item of the most recent delta, or ``None`` before any audio."""
        return self._last_item

    def _position(self, now_ms: float) -> tuple[_Chunk, int]:
        """The pending chunk playing at ``now_ms`` and how many of its bytes have played.

        A chunk played to its very end counts as the start of the next one; past
        the last chunk, the last chunk counts as fully played.
        """
        ready = self._ready_ms
        for chunk in self._pending:
            start = max(ready, chunk.sent_ms)
            played = math.floor((now_ms - start) * BYTES_PER_MS)
            if played < chunk.nbytes:
                return chunk, max(played, 0)
            ready = start + chunk.nbytes / BYTES_PER_MS
        last = self._pending[-1]
        return last, last.nbytes
