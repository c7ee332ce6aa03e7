"""The upstream of ``relay soak``: a fake OpenAI Realtime server in its own process that
checks what the relay sends it, lean enough to sit beside the load generator on one core.

Why neither existing fake: ``relay.testing.fake_realtime`` checks the protocol but
costs tens of microseconds per message in wsproto, too much for a soak's thousands
of messages a second on the generator's core; ``relay.bench.fake`` is cheap but
streams one endless response and checks nothing. This one speaks raw frames
(``relay.bench.wire``) and borrows the session rules of ``fake_realtime``.

What kind of peer a connection serves is read from the model the relay asked for:
``CLIENT_MODEL`` is only ever requested by the soak's browser clients, so every
other connection is a phone call.

Phone call: the relay must send one valid ``session.update``, then
``response.create``. Each response starts with a burst of ``PREBUFFER`` deltas, then
one 160-byte delta every 20 ms, like the real service, which sends audio faster
than real time, so the caller always has some unplayed. After a random 2-5 s
(``barge_min``/``barge_max``), and only while at least ``MIN_UNPLAYED_MS`` is surely
unplayed, the fake barges in as server VAD does: ``input_audio_buffer.speech_started``
(in one write with a delta), the response cancelled, and after a pause
``speech_stopped``, ``committed`` and the next response. Each barge-in must be
answered with exactly one valid ``conversation.item.truncate`` for the item cut (the
soak also checks the Twilio ``clear``; misses are reported with the response, so the
soak can tell a caller that had run out of audio, when no truncate is due).

Browser client: the fake sends ``response.created`` and then a delta every 20 ms,
and takes whatever valid client events the browser sends (stamped appends).

Every delta carries this connection's number and sequence, every caller or client
frame its sender's number and sequence (``fake.stamp_frame``), so the soak matches
each stream end to end. What the real service would refuse is answered with its
``error`` event and counted; other breaches of the contract (wrong handshake,
extra truncates, corrupt audio, an unexpected close) are counted as violations. The
control pipe takes ``quiesce`` (whether to stop audio and barge-ins), ``expect_close``
(whether the soak is hanging up now), ``collect`` (cumulative figures) and ``stop``.
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import os
import random
import socket
import time
import urllib.parse
from collections.abc import Callable
from dataclasses import dataclass
from multiprocessing.connection import Connection
from typing import Any, ClassVar

import orjson
import trio

from relay.bench import wire
from relay.bench.fake import FRAME_BYTES, SLOTS, read_stamp, stamp_frame, ticks
from relay.bench.outbox import Outbox
from relay.sessions.dialect import GA
from relay.testing.daemon import TEST_OPENAI_KEY
from relay.testing.fake_realtime import _session_problem, truncate_problem

CLIENT_MODEL = "gpt-realtime-mini"
PREBUFFER = 15  # deltas sent at once when a response starts: 300 ms ahead of the caller
# A barge-in waits until at least this much of the response is surely unplayed (see
# _Peer.unplayed_floor_ms): when the generator falls behind, the caller's buffer runs
# dry, and a relay that then sends no truncate is right, not at fault.
MIN_UNPLAYED_MS = 200
PAUSE_S = (0.3, 0.6)  # the caller's speech, between a barge-in and the next response
TRUNCATE_GRACE_NS = 2_000_000_000  # a barge-in with no truncate after this is a miss
LATE_TICK_NS = 5_000_000
MAX_SAMPLES = 50  # violation messages kept verbatim; the rest are only counted
FILLER = bytes(FRAME_BYTES - 16)
Event = dict[str, Any]


@dataclass
class _Barge:
    conn: int
    response: int
    item_id: str
    at_ns: int
    truncates: int = 0

    @property
    def key(self) -> str:
        """Names the barge-in as the caller's figures do: connection and response."""
        return f"{self.conn}:{self.response}"


class Figures:
    """Everything the fake counted since it started (never reset: the soak diffs)."""

    def __init__(self) -> None:
        self.connections = 0
        self.open_calls = 0
        self.open_clients = 0
        self.down_sent: dict[int, int] = {}  # connection number -> deltas sent
        self.kind: dict[int, str] = {}  # connection number -> "call" | "client"
        self.up_recv: dict[int, int] = {}  # sender number -> stamped frames received
        self.up_last: dict[int, int] = {}  # sender number -> last sequence seen
        self.up_gaps = 0  # frames skipped in a sender's sequence
        self.up_reordered = 0  # frames at or below a sequence already seen
        self.up_corrupt = 0  # frames whose bytes are not what the sender stamped
        self.gap_samples: list[str] = []  # where frames went missing, the first few
        self.bargeins = 0
        self.bargeins_by_conn: dict[int, int] = {}
        self.truncates = 0  # accepted truncates that answered a barge-in
        self.missed: list[str] = []  # _Barge.key of every barge-in that drew no truncate
        self.extra_truncates = 0
        self.unplayed_ms: list[int] = []  # audio sent minus audio_end_ms, per truncate
        self.errors: dict[str, int] = {}  # error code -> error events sent
        self.violations = 0
        self.samples: list[str] = []
        self.closed_early = 0  # connections the relay ended before the soak hung up
        self.close_codes: dict[str, int] = {}  # how connections ended after expect_close
        self.ticks = 0
        self.late_ticks = 0
        self.max_lag_ms = 0.0
        self.backlog_peak = 0  # the most bytes ever waiting for the relay to read a socket

    def violation(self, text: str) -> None:
        self.violations += 1
        if len(self.samples) < MAX_SAMPLES:
            self.samples.append(text)


class SoakFake:
    def __init__(self, barge_min: float, barge_max: float, seed: int) -> None:
        self.barge_min = barge_min
        self.barge_max = barge_max
        self.rng = random.Random(seed)
        self.fig = Figures()
        self.slots: list[list[_Peer]] = [[] for _ in range(SLOTS)]
        self.peers: set[_Peer] = set()
        self.next_slot = 0
        self.quiet = False  # quiesced: no more audio, no more barge-ins
        self.closing = False  # the soak is hanging up: closes are expected from now on

    def collect(self) -> dict[str, Any]:
        f = self.fig
        now = time.monotonic_ns()
        # Barge-ins still waiting for their truncate count as missed once past the grace.
        pending = [
            p.barge.key
            for p in self.peers
            if p.barge is not None
            and p.barge.truncates == 0
            and now - p.barge.at_ns > TRUNCATE_GRACE_NS
        ]
        out = {k: v for k, v in vars(f).items() if not k.startswith("_")}
        out["missed"] = f.missed + pending
        out["open"] = len(self.peers)
        out["backlog_peak"] = max([f.backlog_peak, *(p.out.peak for p in self.peers)])
        out["error_total"] = sum(f.errors.values())
        return out

    async def ticker(self) -> None:
        """Every 1 ms, serve the peers of that slot (one frame period is 20 slots)."""
        fig = self.fig
        async for tick, due, now in ticks():
            fig.ticks += 1
            lag = now - due
            if lag > LATE_TICK_NS:
                fig.late_ticks += 1
                fig.max_lag_ms = max(fig.max_lag_ms, lag / 1e6)
            if not self.quiet:
                for peer in list(self.slots[tick % SLOTS]):
                    try:
                        peer.tick(now)
                    except wire.Closed:
                        continue  # its receive task sees the close and records it

    async def serve(self, listener: socket.socket) -> None:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(self.ticker)
            async for sock in wire.accepted(listener):
                self.fig.connections += 1
                peer = _Peer(self, wire.Conn(sock), self.fig.connections)
                nursery.start_soon(peer.run)


class _Peer:
    """One upstream connection the relay opened."""

    def __init__(self, fake: SoakFake, conn: wire.Conn, number: int) -> None:
        self.fake = fake
        self.conn = conn
        self.number = number
        self.out = Outbox(conn)  # the ticker and the receive task both send; neither waits
        self.kind = "call"
        self.slot = -1
        self.seq = 0  # deltas sent on this connection
        self.state = "idle"  # idle | speaking | paused (clients never pause)
        self.session_updates = 0
        self.responses = 0
        self.response_id = ""
        self.item_id = ""
        self.prefix = b""
        self.item_bytes: dict[str, int] = {}  # assistant item -> audio bytes sent
        self.truncated_ms: dict[str, int] = {}
        self.input_frames = 0
        self.barge: _Barge | None = None
        self.barge_at = 0  # ns; when speaking, the next barge-in
        self.response_ns = 0  # when the response's first delta went out
        self.resume_at = 0  # ns; when paused, the next response
        self.user_item = ""
        self.event_no = 0

    # -- sending ---------------------------------------------------------------
    def send(self, data: bytes) -> None:
        self.out.write(data)

    def event(self, event_type: str, **fields: Any) -> bytes:
        """One server event, framed (an ``event_id`` added)."""
        self.event_no += 1
        event = {"type": event_type, "event_id": f"event_{self.number}_{self.event_no}", **fields}
        return wire.frame(orjson.dumps(event))

    def emit(self, event_type: str, **fields: Any) -> None:
        self.send(self.event(event_type, **fields))

    def error(self, code: str, message: str, param: str | None, cause: Event | None) -> None:
        fig = self.fake.fig
        fig.errors[code] = fig.errors.get(code, 0) + 1
        cause_id = (cause or {}).get("event_id")
        err = dict(type="invalid_request_error", code=code, message=message, param=param,
                   event_id=cause_id)  # fmt: skip
        self.emit("error", error=err)

    def _delta(self, now: int) -> bytes:
        """The next audio delta of the response in progress, counted as sent."""
        # Bytes 16-20 name the response, so a gap seen by the caller can be placed.
        frame = stamp_frame(self.seq, now, self.number)
        audio = base64.b64encode(frame[:16] + self.responses.to_bytes(4, "big") + frame[20:])
        self.seq += 1
        self.item_bytes[self.item_id] += FRAME_BYTES
        fig = self.fake.fig
        fig.down_sent[self.number] = fig.down_sent.get(self.number, 0) + 1
        return wire.frame(self.prefix + audio + b'"}')

    # -- responses and barge-ins (phone calls) --------------------------------------
    def _start_response(self, now: int) -> None:
        # Synchronous on purpose: a barge-in between the events and the burst would leave
        # audio of the cut item after speech_started, which the relay rightly never plays.
        f = self.fake
        self.barge_at = now + int(f.rng.uniform(f.barge_min, f.barge_max) * 1e9)
        self.responses += 1
        self.response_id = f"resp_{self.number:05d}_{self.responses:06d}"
        self.item_id = f"item_{self.number:05d}_{self.responses:06d}"
        self.item_bytes[self.item_id] = 0
        self.prefix = (
            f'{{"type":"{GA.audio_delta}","response_id":"{self.response_id}",'
            f'"item_id":"{self.item_id}","output_index":0,"content_index":0,"delta":"'
        ).encode()
        response = dict(id=self.response_id, object="realtime.response", status="in_progress",
                        output=[])  # fmt: skip
        item = dict(id=self.item_id, object="realtime.item", type="message", role="assistant",
                    status="in_progress", content=[])  # fmt: skip
        self.emit("response.created", response=response)
        self.emit("response.output_item.added", response_id=self.response_id,
                        output_index=0, item=item)  # fmt: skip
        if self.kind == "call":
            self.response_ns = time.monotonic_ns()
            self.send(b"".join(self._delta(self.response_ns) for _ in range(PREBUFFER)))
        self.state = "speaking"

    def _barge_in(self, now: int) -> None:
        fake, fig = self.fake, self.fake.fig
        if self.barge is not None and self.barge.truncates == 0:
            fig.missed.append(self.barge.key)
        self.barge = _Barge(self.number, self.responses, self.item_id, now)
        fig.bargeins += 1
        fig.bargeins_by_conn[self.number] = fig.bargeins_by_conn.get(self.number, 0) + 1
        self.user_item = f"item_user_{self.number:05d}_{self.responses:06d}"
        # As server VAD does: speech_started, then the response in progress is cancelled.
        # Written with this tick's delta, in one write: the relay then reads the barge-in
        # right behind audio the caller cannot have played yet, so unplayed audio is
        # certain even when the relay's own process is descheduled for a while (on a busy
        # host it was, for hundreds of ms, between two messages arriving 20 ms apart).
        output = [{"id": self.item_id, "type": "message", "role": "assistant"}]
        self.send(
            self._delta(now)
            + self.event(GA.speech_started, audio_start_ms=self.input_frames * 20,
                         item_id=self.user_item)
            + self.event(GA.response_done, response=dict(
                id=self.response_id, object="realtime.response", status="cancelled",
                output=output))
        )  # fmt: skip
        self.state = "paused"
        self.resume_at = now + int(fake.rng.uniform(*PAUSE_S) * 1e9)

    def _resume(self, now: int) -> None:
        self.emit("input_audio_buffer.speech_stopped", audio_end_ms=self.input_frames * 20,
                        item_id=self.user_item)  # fmt: skip
        self.emit("input_audio_buffer.committed", previous_item_id=self.item_id,
                        item_id=self.user_item)  # fmt: skip
        self._start_response(now)

    def unplayed_floor_ms(self, now: int) -> float:
        """The least audio of the response the caller can still have to play: Twilio plays
        no faster than real time, from the first delta on. When the relay handles the
        speech_started sent now, it has forwarded all of it, so at least this much is
        unconfirmed, less however long the relay takes to get to it."""
        return self.item_bytes[self.item_id] / 8 - (now - self.response_ns) / 1e6

    def tick(self, now: int) -> None:
        if self.state == "speaking":
            if (
                self.kind == "call"
                and now >= self.barge_at
                and self.unplayed_floor_ms(now) >= MIN_UNPLAYED_MS
            ):
                self._barge_in(now)
            else:
                self.send(self._delta(now))
        elif self.state == "paused" and now >= self.resume_at:
            self._resume(now)

    # -- receiving -------------------------------------------------------------
    async def run(self) -> None:
        fake, fig = self.fake, self.fake.fig
        code: int | None = None
        registered = False  # counted among the open calls or clients
        try:
            target, headers, rest = await wire.server_handshake_headers(self.conn)
            self._check_handshake(target, headers)
            fig.kind[self.number] = self.kind
            if self.kind == "call":
                fig.open_calls += 1
            else:
                fig.open_clients += 1
            registered = True
            fake.peers.add(self)
            async with trio.open_nursery() as nursery:
                nursery.start_soon(self.out.flusher)
                with contextlib.suppress(wire.Closed):
                    self.emit("session.created", session={"id": f"sess_{self.number}"})
                    self.slot = fake.next_slot
                    fake.next_slot = (fake.next_slot + 7) % SLOTS  # spread phases over the period
                    fake.slots[self.slot].append(self)
                    if self.kind == "client":
                        self._start_response(time.monotonic_ns())
                    code = await self._receive(rest)
                nursery.cancel_scope.cancel()
        except wire.Closed:
            pass
        finally:
            if self.slot >= 0:
                fake.slots[self.slot].remove(self)
            fake.peers.discard(self)
            fig.backlog_peak = max(fig.backlog_peak, self.out.peak)
            barge = self.barge
            # Hung up before it could answer: only a miss if it had the time.
            if (
                fake.closing
                and barge is not None
                and barge.truncates == 0
                and time.monotonic_ns() - barge.at_ns > TRUNCATE_GRACE_NS
            ):
                fig.missed.append(barge.key)
            if registered:
                if self.kind == "call":
                    fig.open_calls -= 1
                else:
                    fig.open_clients -= 1
                label = "none" if code is None else str(code)
                if fake.closing:
                    fig.close_codes[label] = fig.close_codes.get(label, 0) + 1
                else:
                    fig.closed_early += 1
                    fig.violation(f"conn {self.number} ({self.kind}) ended early: close {label}")
            self.conn.close()

    def _check_handshake(self, target: str, headers: dict[str, str]) -> None:
        parts = urllib.parse.urlsplit(target)
        query = urllib.parse.parse_qsl(parts.query, keep_blank_values=True)
        fig = self.fake.fig
        if parts.path != "/v1/realtime" or len(query) != 1 or query[0][0] != "model":
            fig.violation(f"conn {self.number}: upstream URL {target!r} is not realtime_url?model=")
        if query and query[0][1] == CLIENT_MODEL:
            self.kind = "client"
        if headers.get("authorization") != f"Bearer {TEST_OPENAI_KEY}":
            fig.violation(f"conn {self.number}: missing or wrong Authorization header")
        if "openai-beta" in headers:
            fig.violation(f"conn {self.number}: OpenAI-Beta header in the GA dialect")

    async def _receive(self, data: bytes) -> int | None:
        """Handle messages until the relay closes; returns its close code (None: no frame)."""
        reader = wire.Reader(masked=True)
        messages = reader.messages
        while True:
            try:
                controls = reader.feed(data)
            except wire.Closed as broken:  # the relay's frames broke RFC 6455
                self.fake.fig.violation(f"conn {self.number}: {broken}")
                return None
            while messages:
                message = messages.popleft()
                if isinstance(message, str):
                    self._message(message)
                else:
                    self.error("invalid_value", "Binary messages are not supported.",
                                     None, None)  # fmt: skip
            for opcode, payload in controls:
                if opcode == wire.OP_CLOSE:
                    code = int.from_bytes(payload[:2], "big") if len(payload) >= 2 else 1005
                    self.send(wire.frame(payload[:2], wire.OP_CLOSE))
                    return code
                elif opcode == wire.OP_PING:
                    self.send(wire.frame(payload, wire.OP_PONG))
            try:
                data = await self.conn.recv()
            except wire.Closed:
                return None

    def _message(self, payload: str) -> None:
        try:
            event = orjson.loads(payload)
        except orjson.JSONDecodeError:
            self.error("invalid_json", "The server could not parse the event as JSON.",
                             None, None)  # fmt: skip
            return
        if not isinstance(event, dict) or not isinstance(event.get("type"), str):
            self.error("invalid_value", "Expected an object with a 'type'.", "type", None)
            return
        handler = self._handlers.get(event["type"])
        if handler is None:
            self.error("unknown_event", f"Unknown event type: '{event['type']}'.",
                             "type", event)  # fmt: skip
            return
        handler(self, event)

    def _on_append(self, event: Event) -> None:
        audio_b64 = event.get("audio")
        try:
            if not isinstance(audio_b64, str):
                raise ValueError
            audio = base64.b64decode(audio_b64, validate=True)
        except (ValueError, binascii.Error):
            self.error("invalid_value", "Invalid 'audio'. Expected base64-encoded audio "
                             "bytes.", "audio", event)  # fmt: skip
            return
        fig = self.fake.fig
        if len(audio) % FRAME_BYTES:
            fig.violation(f"conn {self.number}: append of {len(audio)} bytes, not whole frames")
        # The relay may join frames that were already waiting: walk them all.
        for off in range(0, len(audio) - FRAME_BYTES + 1, FRAME_BYTES):
            seq, _ = read_stamp(audio[off : off + 12])
            sender = int.from_bytes(audio[off + 12 : off + 16], "big")
            if audio[off + 16 : off + FRAME_BYTES] != FILLER:
                fig.up_corrupt += 1
            fig.up_recv[sender] = fig.up_recv.get(sender, 0) + 1
            last = fig.up_last.get(sender, -1)
            if seq > last + 1:
                fig.up_gaps += seq - last - 1
                if len(fig.gap_samples) < MAX_SAMPLES:
                    fig.gap_samples.append(
                        f"sender {sender} (upstream {self.number}): frames {last + 1}..{seq - 1} "
                        f"missing, at {time.monotonic():.3f}"
                    )
            elif seq <= last:
                fig.up_reordered += 1
            fig.up_last[sender] = max(last, seq)
            self.input_frames += 1

    def _on_session_update(self, event: Event) -> None:
        session = event.get("session")
        if not isinstance(session, dict):
            self.error("invalid_type", "Expected an object.", "session", event)
            return
        problem = _session_problem(GA, session)
        if problem is not None:
            self.error(problem[0], problem[2], problem[1], event)
            return
        self.session_updates += 1
        if self.kind == "call":
            self._check_phone_session(session)
        self.emit("session.updated", session=session)

    def _check_phone_session(self, session: Event) -> None:
        """docs/contract.md §6: one update, μ-law both ways, server VAD, before the first
        response."""
        fig = self.fake.fig
        audio = session.get("audio") or {}
        inp, out = audio.get("input") or {}, audio.get("output") or {}
        wanted = {"type": "audio/pcmu"}
        if self.session_updates > 1:
            fig.violation(f"conn {self.number}: session.update number {self.session_updates}")
        if inp.get("format") != wanted or out.get("format") != wanted:
            fig.violation(f"conn {self.number}: session.update audio is not audio/pcmu both ways")
        if (inp.get("turn_detection") or {}).get("type") != "server_vad":
            fig.violation(f"conn {self.number}: session.update without server VAD")

    def _on_response_create(self, event: Event) -> None:
        if self.state == "speaking":
            message = (f"Conversation already has an active response in progress: "
                       f"{self.response_id}. Wait until the response is finished "
                       "before creating a new one.")  # fmt: skip
            self.error("conversation_already_has_active_response", message, None, event)
            return
        if self.kind == "call" and (self.session_updates != 1 or self.responses):
            self.fake.fig.violation(
                f"conn {self.number}: response.create after {self.session_updates} "
                f"session.update(s) and {self.responses} response(s)"
            )
        if self.state == "idle":
            self._start_response(time.monotonic_ns())

    def _on_truncate(self, event: Event) -> None:
        fig = self.fake.fig
        item_id, end_ms = event.get("item_id"), event.get("audio_end_ms")
        problem = truncate_problem(event, self.item_bytes, self.truncated_ms)
        if problem is not None:
            self.error("invalid_value", problem[1], problem[0], event)
            return
        assert isinstance(item_id, str) and isinstance(end_ms, int)
        self.truncated_ms[item_id] = end_ms
        barge = self.barge
        if barge is None or barge.truncates:
            fig.extra_truncates += 1
            fig.violation(f"conn {self.number}: truncate of {item_id} with no barge-in to answer")
        elif item_id != barge.item_id:
            fig.extra_truncates += 1
            fig.violation(f"conn {self.number}: truncate of {item_id}, barge-in cut "
                          f"{barge.item_id}")  # fmt: skip
        else:
            barge.truncates += 1
            fig.truncates += 1
            fig.unplayed_ms.append(self.item_bytes[item_id] // 8 - end_ms)
        self.emit("conversation.item.truncated", item_id=item_id, content_index=0,
                        audio_end_ms=end_ms)  # fmt: skip

    def _on_other(self, event: Event) -> None:
        # Valid client events the soak's peers never send: accepted, but the relay
        # has no business sending them on a phone call.
        if self.kind == "call":
            self.fake.fig.violation(f"conn {self.number}: unexpected {event['type']} on a call")

    _handlers: ClassVar[dict[str, Callable[[_Peer, Event], None]]] = {
        "input_audio_buffer.append": _on_append,
        "session.update": _on_session_update,
        "response.create": _on_response_create,
        "conversation.item.truncate": _on_truncate,
        "response.cancel": _on_other,
        "input_audio_buffer.commit": _on_other,
        "input_audio_buffer.clear": _on_other,
        "conversation.item.create": _on_other,
        "conversation.item.retrieve": _on_other,
        "conversation.item.delete": _on_other,
    }


async def _control(ctrl: Connection, fake: SoakFake, cancel: trio.CancelScope) -> None:
    while True:
        cmd = await trio.to_thread.run_sync(ctrl.recv, abandon_on_cancel=True)
        if cmd[0] == "collect":
            ctrl.send(fake.collect())
        elif cmd[0] == "quiesce":
            fake.quiet = cmd[1]
            ctrl.send(("ok",))
        elif cmd[0] == "expect_close":
            fake.closing = cmd[1]
            ctrl.send(("ok",))
        elif cmd[0] == "stop":
            cancel.cancel()
            return


async def _main(ctrl: Connection, port: int, barge: tuple[float, float], seed: int) -> None:
    listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    listener.bind(("127.0.0.1", port))
    listener.listen(4096)
    listener.setblocking(False)
    fake = SoakFake(barge[0], barge[1], seed)
    ctrl.send(listener.getsockname()[1])
    async with trio.open_nursery() as nursery:
        nursery.start_soon(fake.serve, listener)
        nursery.start_soon(_control, ctrl, fake, nursery.cancel_scope)


def process_main(
    ctrl: Connection, cpus: set[int] | None, port: int, barge: tuple[float, float], seed: int
) -> None:
    """Entry point of the fake's process; reports its port, then obeys ``ctrl``."""
    if cpus:
        os.sched_setaffinity(0, cpus)
    trio.run(_main, ctrl, port, barge, seed)
