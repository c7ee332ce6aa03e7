"""Load processes of ``relay soak``: phone calls that behave like Twilio, browser clients
that behave like a page, many of either in one trio loop per process.

A call is what Twilio sends (the handshake, ``connected``, ``start``, a stamped
160-byte μ-law ``media`` every 20 ms, ``stop`` when hanging up) and it *plays*
the relay's audio as Twilio does: in real time, echoing each ``mark`` once the
audio before it has played and, on ``clear``, dropping what is unplayed and
echoing every pending mark at once. Playing rather than echoing marks on
arrival matters here: the relay only truncates when audio is unplayed, and the
fake upstream sends faster than real time, as the real service does, so every
barge-in finds audio to cut.

A browser client sends a stamped ``input_audio_buffer.append`` every 20 ms and
checks the stamped deltas coming back. Both kinds check the sequence of every
stream they receive, keyed by the fake's connection number in each stamp, so the
soak can match every stream end to end.

Frames go out from one 1 ms ticker per process (as in ``relay.bench.load``),
streams spread over the 20 slots of a frame period. The control pipe takes
``open``, ``quiesce`` (no more frames; playback and mark echoes go on),
``collect``, ``hangup`` and ``stop``.
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import os
import time
from collections import deque
from dataclasses import dataclass
from multiprocessing.connection import Connection
from typing import Any

import orjson
import trio

from relay.bench import wire
from relay.bench.fake import SLOTS, read_stamp, stamp_frame, ticks
from relay.bench.load import CONNECTED, start_body
from relay.bench.outbox import Outbox
from relay.sessions.dialect import GA

BYTES_PER_NS = 8e-6  # μ-law at 8 kHz: 8 bytes per ms
LATE_TICK_NS = 5_000_000
MAX_SAMPLES = 50  # problem descriptions kept verbatim; the rest are only counted
OPEN_TIMEOUT_S = 15.0  # connect and upgrade, including the relay's upstream connect


@dataclass(frozen=True)
class Spec:
    """One stream to open: its number (stamped in its frames), kind and handshake."""

    number: int
    kind: str  # "call" | "client"
    resource: str
    headers: tuple[tuple[str, str], ...]


class _Stream:
    def __init__(self, spec: Spec, conn: wire.Conn) -> None:
        self.spec = spec
        self.number = spec.number
        self.call = spec.kind == "call"
        self.conn = conn
        self.out = Outbox(conn)  # the ticker and the receive task both send; neither waits
        self.sid = f"MZ{spec.number:032x}"
        self.seq = 0  # frames sent
        self.sn = 0  # Twilio sequenceNumber
        self.slot = -1
        self.hanging_up = False
        self.done = trio.Event()
        self.fake_conn = -1  # the fake's connection feeding this stream, from the stamps
        self.down_last = -1
        self.last_response = -1  # the fake's response number of the last frame received
        self.last_clear_ns = 0
        self.cleared = False  # a clear came since the current response's audio began
        self.level_ms = 0.0  # audio waiting to play when the latest frame came, ms
        # Playback, in bytes of audio: received so far, played so far (at play_ns).
        self.buf_end = 0
        self.played = 0.0
        self.play_ns = 0
        self.marks: deque[tuple[int, str]] = deque()  # (buf_end when it came, name)

    def twilio(self, body: str) -> bytes:
        self.sn += 1
        return wire.frame(
            f'{{"event":{body},"sequenceNumber":"{self.sn}","streamSid":"{self.sid}"}}'.encode(),
            masked=True,
        )

    def mark_echo(self, name: str) -> bytes:
        return self.twilio(f'"mark","mark":{orjson.dumps({"name": name}).decode()}')

    def advance(self, now: int) -> list[str]:
        """Play up to ``now``; returns the marks whose audio has now played."""
        if self.played < self.buf_end:
            self.played = min(
                float(self.buf_end), self.played + (now - self.play_ns) * BYTES_PER_NS
            )
        self.play_ns = now  # an idle player does not bank time
        names = []
        while self.marks and self.marks[0][0] <= self.played:
            names.append(self.marks.popleft()[1])
        return names

    def send(self, data: bytes) -> None:
        self.out.write(data)


class SoakLoader:
    def __init__(self, host: str, port: int, specs: list[Spec]) -> None:
        self.host = host
        self.port = port
        self.specs = specs
        self.streams: list[_Stream] = []
        self.slots: list[list[_Stream]] = [[] for _ in range(SLOTS)]
        self.next_slot = specs[0].number % SLOTS if specs else 0
        self.sending = True
        self.up_sent: dict[int, int] = {}  # stream number -> frames sent
        self.down_recv: dict[int, int] = {}  # fake connection -> frames received
        self.down_gaps = 0
        self.down_reordered = 0
        self.gap_samples: list[str] = []  # where frames went missing, the first few
        # "<fake connection>:<response>" -> ms of audio left to play when the last frame of
        # that response came, for the responses that ended without a clear
        self.unclear_ends: dict[str, int] = {}
        self.clears_by_conn: dict[int, int] = {}
        self.clears = 0
        self.media_in = 0
        self.marks_in = 0
        self.marks_echoed = 0
        self.opened = 0
        self.failed = 0
        self.dropped = 0  # streams the relay ended before we hung up
        self.violations = 0
        self.samples: list[str] = []
        self.errors_seen = 0  # error events that reached a browser client
        self.other_events: dict[str, int] = {}
        self.hangup_codes: dict[str, int] = {}
        self.not_closed = 0
        self.backlog_peak = 0  # the most bytes ever waiting for the relay to read a socket
        self.ticks = 0
        self.late_ticks = 0
        self.max_lag_ms = 0.0

    def problem(self, text: str) -> None:
        self.violations += 1
        if len(self.samples) < MAX_SAMPLES:
            self.samples.append(text)

    def collect(self) -> dict[str, Any]:
        out = {
            k: v
            for k, v in vars(self).items()
            if k not in ("host", "port", "specs", "streams", "slots")
        }
        out["up"] = sum(1 for s in self.streams if not s.done.is_set())
        out["backlog_peak"] = max([self.backlog_peak, *(s.out.peak for s in self.streams)])
        return out

    # -- opening ------------------------------------------------------------------
    async def open_all(self, nursery: trio.Nursery, rate: float) -> None:
        for spec in self.specs:
            await self._open(nursery, spec)
            await trio.sleep(1.0 / rate)

    async def _open(self, nursery: trio.Nursery, spec: Spec) -> None:
        conn: wire.Conn | None = None
        try:
            with trio.fail_after(OPEN_TIMEOUT_S):
                conn = await wire.connect(self.host, self.port)
                rest = await wire.client_handshake(
                    conn, f"{self.host}:{self.port}", spec.resource, list(spec.headers)
                )
        except (OSError, wire.Closed, trio.TooSlowError) as exc:
            if conn is not None:
                conn.close()
            self.failed += 1
            self.problem(f"{spec.kind} {spec.number}: could not open: {exc!r}")
            return
        stream = _Stream(spec, conn)
        self.opened += 1
        self.streams.append(stream)
        nursery.start_soon(self._receive, stream, rest)
        if stream.call:
            try:
                stream.send(CONNECTED + stream.twilio(start_body(stream.sid, spec.number)))
            except wire.Closed:
                return  # its receive task records the drop
        stream.slot = self.next_slot
        self.next_slot = (self.next_slot + 7) % SLOTS  # spread phases over the period
        self.slots[stream.slot].append(stream)

    # -- sending ------------------------------------------------------------------
    async def ticker(self) -> None:
        """Every 1 ms, the frames (and due mark echoes) of the streams in that slot."""
        async for tick, due, now in ticks():
            self.ticks += 1
            if now - due > LATE_TICK_NS:
                self.late_ticks += 1
                self.max_lag_ms = max(self.max_lag_ms, (now - due) / 1e6)
            for stream in list(self.slots[tick % SLOTS]):
                try:
                    self._tick(stream, time.monotonic_ns())
                except wire.Closed:
                    continue  # its receive task sees the close and records it

    def _tick(self, s: _Stream, now: int) -> None:
        if s.hanging_up:
            return  # nothing may follow our close frame
        data = b""
        if s.call:
            for name in s.advance(now):
                data += s.mark_echo(name)
                self.marks_echoed += 1
        if self.sending:
            audio = base64.b64encode(stamp_frame(s.seq, now, s.number)).decode()
            if s.call:
                data += s.twilio(
                    f'"media","media":{{"track":"inbound","chunk":"{s.seq + 1}",'
                    f'"timestamp":"{s.seq * 20}","payload":"{audio}"}}'
                )
            else:
                data += wire.frame(
                    f'{{"type":"input_audio_buffer.append","audio":"{audio}"}}'.encode(),
                    masked=True,
                )
            s.seq += 1
            self.up_sent[s.number] = s.seq
        if data:
            s.send(data)

    # -- receiving ----------------------------------------------------------------
    async def _receive(self, s: _Stream, data: bytes) -> None:
        code: int | None = None
        try:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(s.out.flusher)
                code = await self._read(s, data)
                nursery.cancel_scope.cancel()
        finally:
            label = "none" if code is None else str(code)
            if s.hanging_up:
                self.hangup_codes[label] = self.hangup_codes.get(label, 0) + 1
            else:
                self.dropped += 1
                self.problem(f"{s.spec.kind} {s.number} ended by the relay: close {label}")
            if s.slot >= 0:
                self.slots[s.slot].remove(s)
                s.slot = -1
            self.backlog_peak = max(self.backlog_peak, s.out.peak)
            s.conn.close()
            s.done.set()

    async def _read(self, s: _Stream, data: bytes) -> int | None:
        """Handle messages until the relay closes; its close code (None: no close frame)."""
        reader = wire.Reader(masked=False)
        messages = reader.messages
        try:
            while True:
                try:
                    controls = reader.feed(data)
                except wire.Closed as broken:  # the relay's frames broke RFC 6455
                    self.problem(f"{s.spec.kind} {s.number}: {broken}")
                    raise
                while messages:
                    message = messages.popleft()
                    if not isinstance(message, str):
                        self.problem(f"{s.spec.kind} {s.number}: a binary message from the relay")
                    elif s.call:
                        self._twilio_message(s, message)
                    else:
                        self._client_message(s, message)
                for opcode, payload in controls:
                    if opcode == wire.OP_CLOSE:
                        if not s.hanging_up:  # answer the relay's close
                            s.send(wire.frame(payload[:2], wire.OP_CLOSE, masked=True))
                        return int.from_bytes(payload[:2], "big") if len(payload) >= 2 else 1005
                    if opcode == wire.OP_PING:
                        s.send(wire.frame(payload, wire.OP_PONG, masked=True))
                data = await s.conn.recv()
        except wire.Closed:
            return None

    def _down_frame(self, s: _Stream, audio_b64: Any) -> int:
        """Check one stamped assistant frame; returns its length in bytes."""
        try:
            audio = base64.b64decode(audio_b64, validate=True)
        except (TypeError, ValueError, binascii.Error):
            self.problem(f"{s.spec.kind} {s.number}: audio that is not base64")
            return 0
        if len(audio) < 16:
            self.problem(f"{s.spec.kind} {s.number}: {len(audio)}-byte audio frame")
            return len(audio)
        seq, _ = read_stamp(audio[:12])
        conn = int.from_bytes(audio[12:16], "big")
        if s.fake_conn != conn:
            if s.fake_conn >= 0:
                self.problem(f"{s.spec.kind} {s.number}: audio of upstream {conn}, "
                             f"not {s.fake_conn}")  # fmt: skip
            s.fake_conn, s.down_last = conn, -1
        self.down_recv[conn] = self.down_recv.get(conn, 0) + 1
        if seq > s.down_last + 1:
            self.down_gaps += seq - s.down_last - 1
            if len(self.gap_samples) < MAX_SAMPLES:
                response = int.from_bytes(audio[16:20], "big")
                since = (time.monotonic_ns() - s.last_clear_ns) / 1e6
                self.gap_samples.append(
                    f"{s.spec.kind} {s.number} (upstream {conn}): frames {s.down_last + 1}.."
                    f"{seq - 1} missing, between responses {s.last_response} and {response}, "
                    f"{since:.0f} ms after the last clear, at {time.monotonic():.3f}"
                )
        elif seq <= s.down_last:
            self.down_reordered += 1
        s.down_last = max(s.down_last, seq)
        s.last_response = int.from_bytes(audio[16:20], "big")
        return len(audio)

    def _twilio_message(self, s: _Stream, payload: str) -> None:
        try:
            event = orjson.loads(payload)
            kind = event["event"]
            sid = event["streamSid"]
        except (orjson.JSONDecodeError, KeyError, TypeError):
            self.problem(f"call {s.number}: not a Twilio message: {payload[:80]!r}")
            return
        if sid != s.sid:
            self.problem(f"call {s.number}: {kind} for streamSid {sid!r}")
        now = time.monotonic_ns()
        names = s.advance(now)
        if kind == "media":
            self.media_in += 1
            level_ms = (s.buf_end - s.played) / 8
            previous = s.last_response
            try:
                s.buf_end += self._down_frame(s, event["media"]["payload"])
            except (KeyError, TypeError):
                self.problem(f"call {s.number}: media without media.payload")
            if s.last_response != previous:
                if previous >= 0 and not s.cleared:
                    # A response whose audio ran out with no clear: how much was left to
                    # play when its last frame came tells whether a barge-in could cut it.
                    self.unclear_ends[f"{s.fake_conn}:{previous}"] = round(s.level_ms)
                s.cleared = False
            s.level_ms = level_ms
        elif kind == "mark":
            self.marks_in += 1
            name = (event.get("mark") or {}).get("name")
            if not isinstance(name, str) or not name:
                self.problem(f"call {s.number}: mark without a name")
            elif s.played >= s.buf_end:
                names.append(name)
            else:
                s.marks.append((s.buf_end, name))
        elif kind == "clear":
            self.clears += 1
            s.last_clear_ns = now
            s.cleared = True
            self.clears_by_conn[s.fake_conn] = self.clears_by_conn.get(s.fake_conn, 0) + 1
            # Twilio drops the unplayed audio and returns every pending mark at once.
            s.played = float(s.buf_end)
            names.extend(name for _, name in s.marks)
            s.marks.clear()
        else:
            self.problem(f"call {s.number}: unexpected Twilio event {kind!r}")
        if names and not s.hanging_up:
            self.marks_echoed += len(names)
            s.send(b"".join(s.mark_echo(n) for n in names))

    def _client_message(self, s: _Stream, payload: str) -> None:
        try:
            event = orjson.loads(payload)
            kind = event["type"]
        except (orjson.JSONDecodeError, KeyError, TypeError):
            self.problem(f"client {s.number}: not a Realtime event: {payload[:80]!r}")
            return
        if kind == GA.audio_delta:
            self._down_frame(s, event.get("delta"))
            return
        if kind == "error":
            self.errors_seen += 1
            self.problem(f"client {s.number}: error event {str(event.get('error'))[:200]}")
        self.other_events[kind] = self.other_events.get(kind, 0) + 1

    # -- hanging up -----------------------------------------------------------------
    async def hangup(self, timeout: float) -> None:
        """End every stream as its peer would, and wait for the relay to close each."""
        for s in self.streams:
            if s.done.is_set():
                continue
            s.hanging_up = True
            data = b""
            if s.call:
                data = s.twilio(f'"stop","stop":{{"accountSid":"AC","callSid":"CA{s.number}"}}')
            with contextlib.suppress(wire.Closed):  # its receive task records how it ended
                s.send(data + wire.frame(b"\x03\xe8", wire.OP_CLOSE, masked=True))
        with trio.move_on_after(timeout):
            for s in self.streams:
                await s.done.wait()
        for s in self.streams:
            if not s.done.is_set():
                self.not_closed += 1
                self.problem(f"{s.spec.kind} {s.number}: not closed {timeout:.0f} s after hang-up")
                s.conn.close()


async def _main(ctrl: Connection, host: str, port: int, specs: list[Spec]) -> None:
    loader = SoakLoader(host, port, specs)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(loader.ticker)
        while True:
            cmd = await trio.to_thread.run_sync(ctrl.recv, abandon_on_cancel=True)
            if cmd[0] == "open":
                await loader.open_all(nursery, cmd[1])
                ctrl.send(("ready", loader.opened, loader.failed))
            elif cmd[0] == "quiesce":
                loader.sending = False
                ctrl.send(("ok",))
            elif cmd[0] == "collect":
                ctrl.send(loader.collect())
            elif cmd[0] == "hangup":
                await loader.hangup(cmd[1])
                ctrl.send(loader.collect())
            elif cmd[0] == "stop":
                nursery.cancel_scope.cancel()
                return


def process_main(
    ctrl: Connection, host: str, port: int, specs: list[Spec], cpus: set[int] | None
) -> None:
    """Entry point of a load process; obeys ``ctrl`` until told to stop."""
    if cpus:
        os.sched_setaffinity(0, cpus)
    trio.run(_main, ctrl, host, port, specs)
