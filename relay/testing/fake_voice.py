"""A voice for the fake Realtime server: it listens, and answers with sound.

``VoiceMode(fake).install()`` turns a :class:`~relay.testing.fake_realtime.FakeRealtime`
into a partner a person (``relay demo`` without an OpenAI key) or a browser
test can talk to, in the session's default audio format, PCM16 24 kHz mono:

- **It hears.** Every ``input_audio_buffer.append`` is measured. Sound above a
  fixed level starts a turn (``input_audio_buffer.speech_started``, which also
  cancels a response in progress, as server VAD does); the session's
  ``silence_duration_ms`` of quiet ends it (``speech_stopped``, ``committed``,
  the input transcription when the session asked for one) and the fake answers.
  Time is counted in samples received, never on the wall clock, so the turns
  are the same however fast the audio arrives.
- **It speaks.** An answer is a melody of 200 ms notes, one per
  ``response.output_audio.delta``, with continuous phase across deltas, so
  audio played gap-free is one unbroken sound and a gap or a cut is audible
  (and measurable). Its transcript says what was heard: how long, at what
  pitch (from zero crossings), so a tone sent by a test can be read back.

What each connection sent is kept in :attr:`VoiceMode.ears` (the first
``journal_seconds`` of its audio, its turns), bounded for long runs.
"""

from __future__ import annotations

import array
import base64
import binascii
import itertools
import math
import sys
from dataclasses import dataclass, field
from typing import Any

from relay.testing.fake_realtime import Event, FakeConnection, FakeRealtime

RATE = 24_000
PCM_BYTES_PER_MS = 2 * RATE // 1000  # 48
NOTE_MS = 200
NOTE_BYTES = NOTE_MS * PCM_BYTES_PER_MS
# A pentatonic phrase; each delta of an answer is the next note.
MELODY_HZ = (523.25, 587.33, 659.25, 783.99, 880.0, 783.99, 659.25, 587.33)
AMPLITUDE = 0.3
FADE_IN_SAMPLES = 72  # 3 ms: the first note starts without a click
# Mean square level (of full scale 1.0) above which an append counts as sound:
# about -34 dBFS, well above a quiet room through a browser's noise suppression.
SPEECH_LEVEL = 0.02**2
DEFAULT_SILENCE_MS = 500


def _note_phase(index: int, samples_per_note: int) -> float:
    """The phase at which note ``index`` starts, so consecutive notes join smoothly."""
    cycles = sum(MELODY_HZ[k % len(MELODY_HZ)] for k in range(index)) * samples_per_note / RATE
    return 2 * math.pi * (cycles % 1.0)


def melody(index: int, size: int) -> bytes:
    """Delta number ``index`` of an answer: ``size`` bytes of PCM16 LE, one note."""
    n = size // 2
    freq = MELODY_HZ[index % len(MELODY_HZ)]
    phase = _note_phase(index, n)
    step = 2 * math.pi * freq / RATE
    scale = AMPLITUDE * 32767
    samples = array.array("h", (round(scale * math.sin(phase + step * i)) for i in range(n)))
    if index == 0:
        for i in range(min(FADE_IN_SAMPLES, n)):
            samples[i] = samples[i] * i // FADE_IN_SAMPLES
    if sys.byteorder != "little":
        samples.byteswap()
    return samples.tobytes() + b"\0" * (size - 2 * n)


def _ulaw_table() -> list[int]:
    table = []
    for byte in range(256):
        u = ~byte & 0xFF
        magnitude = (((u & 0x0F) << 3) + 0x84) << ((u & 0x70) >> 4)
        table.append((0x84 - magnitude) if u & 0x80 else (magnitude - 0x84))
    return table


_ULAW = _ulaw_table()


@dataclass
class Ear:
    """What the fake heard on one connection."""

    journal_bytes: int
    journal: bytearray = field(default_factory=bytearray)  # the first PCM16 received
    samples: int = 0  # every sample received, the clock of the turns
    speaking_item: str | None = None
    turn_start: int = 0
    quiet: int = 0
    loud_samples: int = 0
    crossings: int = 0
    last: int = 0  # the previous append's last sample
    turns: list[dict[str, Any]] = field(default_factory=list)  # one per ended turn

    def note(self, pcm: array.array[int]) -> None:
        if len(self.journal) < self.journal_bytes:
            raw = pcm.tobytes() if sys.byteorder == "little" else _swapped(pcm)
            self.journal += raw[: self.journal_bytes - len(self.journal)]
        self.samples += len(pcm)


def _swapped(pcm: array.array[int]) -> bytes:
    copy = array.array("h", pcm)
    copy.byteswap()
    return copy.tobytes()


class VoiceMode:
    """Installs itself on a fake; one :class:`Ear` per connection."""

    def __init__(
        self,
        fake: FakeRealtime,
        *,
        notes: int = 10,
        note_interval: float = 0.05,
        journal_seconds: float = 4.0,
        keep_connections: int | None = None,
    ) -> None:
        self.fake = fake
        self.notes = notes
        self.note_interval = note_interval  # faster than real time, as OpenAI sends
        self.journal_bytes = int(journal_seconds * RATE) * 2
        self.keep_connections = keep_connections  # None: keep every connection's record
        self.ears: dict[FakeConnection, Ear] = {}

    def install(self) -> VoiceMode:
        fake = self.fake
        fake.bytes_per_ms = PCM_BYTES_PER_MS
        fake.synthesize = melody
        fake.response_chunks = self.notes
        fake.chunk_bytes = NOTE_BYTES
        fake.chunk_interval = self.note_interval
        fake.on_event = self.on_event
        return self

    def ear(self, conn: FakeConnection) -> Ear:
        ear = self.ears.get(conn)
        if ear is None:
            ear = self.ears[conn] = Ear(self.journal_bytes)
            if self.keep_connections is not None:
                self._prune(self.keep_connections)
        return ear

    def _prune(self, keep: int) -> None:
        old = self.fake.connections[:-keep]
        del self.fake.connections[:-keep]
        for conn in old:
            self.ears.pop(conn, None)

    async def on_event(self, conn: FakeConnection, event: Event) -> None:
        if event.get("type") != "input_audio_buffer.append":
            return
        pcm = _decode(conn, event.get("audio"))
        if pcm is None:
            return  # the fake has already answered with its error event
        ear = self.ear(conn)
        start = ear.samples
        ear.note(pcm)
        vad = _turn_detection(conn.session)
        if not isinstance(vad, dict) or not pcm:
            return
        level = sum(x * x for x in pcm) / len(pcm) / 32768**2
        loud = level > SPEECH_LEVEL
        if ear.speaking_item is None:
            if not loud:
                return
            ear.turn_start, ear.quiet, ear.loud_samples, ear.crossings = start, 0, 0, 0
            ear.speaking_item = await conn.emit_speech_started(start * 1000 // RATE)
        if loud:
            ear.quiet = 0
            ear.loud_samples += len(pcm)
            # Counted from the last sample of the previous append: none is missed.
            ear.crossings += sum(
                1 for a, b in itertools.pairwise((ear.last, *pcm)) if (a < 0) != (b < 0)
            )
        else:
            ear.quiet += len(pcm)
        ear.last = pcm[-1]
        silence = vad.get("silence_duration_ms", DEFAULT_SILENCE_MS)
        if not isinstance(silence, int) or ear.quiet * 1000 < silence * RATE:
            return
        await self._end_turn(conn, ear)

    async def _end_turn(self, conn: FakeConnection, ear: Ear) -> None:
        item_id, ear.speaking_item = ear.speaking_item, None
        end_ms = ear.samples * 1000 // RATE
        seconds = ear.loud_samples / RATE
        hz = ear.crossings / 2 / seconds if seconds else 0.0
        heard = f"a sound of {seconds:.1f} s at about {hz:.0f} Hz"
        ear.turns.append({"item_id": item_id, "seconds": seconds, "hz": hz})
        await conn.send_event(
            {
                "type": "input_audio_buffer.speech_stopped",
                "audio_end_ms": end_ms,
                "item_id": item_id,
            }
        )
        await conn.send_event(
            {"type": "input_audio_buffer.committed", "previous_item_id": None, "item_id": item_id}
        )
        if _transcribes(conn.session):
            await conn.send_event(
                {
                    "type": "conversation.item.input_audio_transcription.completed",
                    "item_id": item_id,
                    "content_index": 0,
                    "transcript": f"({heard})",
                }
            )
        if not conn.responding:
            conn.respond(text=f"This is the fake Realtime server. I heard {heard}.")


def _decode(conn: FakeConnection, audio: Any) -> array.array[int] | None:
    """The append's audio as signed 16-bit samples (μ-law is widened)."""
    if not isinstance(audio, str):
        return None
    try:
        raw = base64.b64decode(audio, validate=True)
    except (binascii.Error, ValueError):
        return None
    if _input_format(conn.session) in ("audio/pcmu", "g711_ulaw"):
        return array.array("h", (_ULAW[b] for b in raw))
    pcm = array.array("h", raw[: len(raw) // 2 * 2])
    if sys.byteorder != "little":
        pcm.byteswap()
    return pcm


def _input_format(session: Event) -> str | None:
    if "input_audio_format" in session:
        fmt: Any = session["input_audio_format"]
    else:
        fmt = session.get("audio", {}).get("input", {}).get("format")
    fmt = fmt.get("type") if isinstance(fmt, dict) else fmt
    return fmt if isinstance(fmt, str) else None


def _input_rate(session: Event) -> int | None:
    """The declared sample rate (GA ``audio/pcm`` carries one; beta pcm16 is 24 kHz)."""
    if session.get("input_audio_format") == "pcm16":
        return RATE
    fmt = session.get("audio", {}).get("input", {}).get("format")
    rate = fmt.get("rate") if isinstance(fmt, dict) else None
    return rate if isinstance(rate, int) else None


def _turn_detection(session: Event) -> Any:
    if "turn_detection" in session:
        return session["turn_detection"]
    return session.get("audio", {}).get("input", {}).get("turn_detection")


def _transcribes(session: Event) -> bool:
    if "input_audio_transcription" in session:
        return bool(session["input_audio_transcription"])
    return bool(session.get("audio", {}).get("input", {}).get("transcription"))


def fake_sessions(mode: VoiceMode) -> list[dict[str, Any]]:
    """What each recorded connection sent and was sent, as JSON-able data (for the
    demo's ``/fake/sessions``, which the browser test reads)."""
    d = mode.fake.dialect
    out = []
    for conn in mode.fake.connections:
        ear = mode.ears.get(conn) or Ear(0)
        deltas = [
            {"event_id": e["event_id"], "item_id": e["item_id"],
             "bytes": len(base64.b64decode(e["delta"]))}
            for e in conn.sent if e.get("type") == d.audio_delta
        ]  # fmt: skip
        started = [
            {"event_id": e["event_id"], "item_id": e["item_id"],
             "audio_start_ms": e["audio_start_ms"]}
            for e in conn.sent if e.get("type") == d.speech_started
        ]  # fmt: skip
        out.append(
            {
                "input_format": _input_format(conn.session),
                "input_rate": _input_rate(conn.session),
                "input_samples": ear.samples,
                "input_audio": base64.b64encode(ear.journal).decode(),
                "turns": ear.turns,
                "deltas": deltas,
                "speech_started": started,
                "truncations": [list(t) for t in conn.truncations],
                "errors": conn.errors,
                "close": [conn.close_code, conn.close_reason],
                "server_close": conn.server_close,
            }
        )
    return out
