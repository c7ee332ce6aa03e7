"""The load profile's upstream: a lean fake OpenAI Realtime server in its own process.

``twilio`` profile: after ``response.create`` each connection gets one endless
assistant response, a 160-byte μ-law delta every 20 ms (phases spread over the
20 ms so calls do not tick in lockstep). Every delta's audio starts with its
sequence number and its ``time.monotonic_ns()`` send time, and every caller
frame carries the same, so latency is measured per frame both ways (the
monotonic clock is shared by all processes on the host).

``client`` profile: each connection is sent assistant deltas as fast as the
socket takes them, and every message received is counted.

Connections are accepted and upgraded by trio tasks; in the ``twilio`` profile a
connection then belongs to the process's :class:`wire.Poller` (no trio wake-up
per message), as do the delta ticks.

It is not the protocol-checking fake of ``relay.testing.fake_realtime``: that
one costs too much per message to sit beside the load generator on one core.
"""

from __future__ import annotations

import base64
import os
import socket
import time
from array import array
from collections.abc import AsyncIterator
from multiprocessing.connection import Connection
from typing import Any

import orjson
import trio

from relay.bench import wire

FRAME_BYTES = 160
TICK_NS = 1_000_000
SLOTS = 20  # 20 ticks of 1 ms: one frame period
ITEM = "item_bench0000000001"


def stamp_frame(seq: int, sent_ns: int, call: int) -> bytes:
    """A 160-byte frame: sequence, send time and call number, then filler."""
    return (
        seq.to_bytes(4, "big")
        + sent_ns.to_bytes(8, "big")
        + call.to_bytes(4, "big")
        + bytes(FRAME_BYTES - 16)
    )


def read_stamp(head: bytes) -> tuple[int, int]:
    """(sequence, send time ns) from a frame's first 12 bytes."""
    return int.from_bytes(head[:4], "big"), int.from_bytes(head[4:12], "big")


async def ticks() -> AsyncIterator[tuple[int, int, int]]:
    """``(tick, due, now)`` every ``TICK_NS`` on the monotonic clock (ns), for the
    soak's Trio-based generators (``soak_fake``, ``soak_load``; the bench's run
    on ``relay.bench.wire.Poller`` and keep their own schedule). A tick that is
    already late still passes through the scheduler, so a generator behind
    schedule never starves its readers."""
    start = time.monotonic_ns()
    tick = 0
    while True:
        due = start + tick * TICK_NS
        now = time.monotonic_ns()
        if due > now:
            await trio.sleep((due - now) / 1e9)
            now = time.monotonic_ns()
        else:
            await trio.lowlevel.checkpoint()
        yield tick, due, now
        tick += 1


class Window:
    """The measurement window, in ``time.monotonic_ns()``; frames are counted by send time."""

    __slots__ = ("t0", "t1")

    def __init__(self) -> None:
        self.t0 = 1 << 62
        self.t1 = 1 << 62

    def __contains__(self, sent_ns: int) -> bool:
        return self.t0 <= sent_ns < self.t1


class Fake:
    def __init__(self, profile: str) -> None:
        self.profile = profile
        self.window = Window()
        self.slots: list[list[_Up]] = [[] for _ in range(SLOTS)]
        self.next_slot = 0
        self.up_lat = array("d")  # ms, per caller frame received in the window
        self.up_recv = 0
        self.up_arrived = 0  # caller frames that arrived in the window, whenever sent
        self.down_sent = 0
        self.reordered = 0
        self.connections = 0
        self.msgs_in = 0  # client profile, in the window
        self.msgs_out = 0
        self.poller = wire.Poller()
        self.delta_prefix = (
            '{"type":"response.output_audio.delta","response_id":"resp_bench",'
            f'"item_id":"{ITEM}","output_index":0,"content_index":0,"delta":"'
        ).encode()

    def collect(self) -> dict[str, Any]:
        result = {
            "up_lat": self.up_lat.tobytes(),
            "up_recv": self.up_recv,
            "up_arrived": self.up_arrived,
            "down_sent": self.down_sent,
            "reordered": self.reordered,
            "connections": self.connections,
            "msgs_in": self.msgs_in,
            "msgs_out": self.msgs_out,
        }
        self.up_lat = array("d")
        self.up_recv = self.up_arrived = self.down_sent = self.reordered = self.msgs_in = (
            self.msgs_out
        ) = 0
        return result

    def tick(self, tick: int, due: int, now: int) -> None:
        """One delta to each streaming connection in this tick's slot."""
        prefix, window = self.delta_prefix, self.window
        for up in list(self.slots[tick % SLOTS]):
            sent = time.monotonic_ns()
            audio = base64.b64encode(stamp_frame(up.seq, sent, up.number))
            up.seq += 1
            try:
                up.conn.send_nowait(wire.frame(prefix + audio + b'"}'))
            except wire.Closed:
                up.close()
                continue
            if sent in window:
                self.down_sent += 1

    async def serve(self, listener: socket.socket) -> None:
        async with trio.open_nursery() as nursery:
            if self.profile == "twilio":
                nursery.start_soon(self.poller.run, self.tick, TICK_NS)
            async for sock in wire.accepted(listener):
                self.connections += 1
                nursery.start_soon(_Up(self, wire.Conn(sock), self.connections).run)


class _Up:
    """One relay-side upstream connection."""

    def __init__(self, fake: Fake, conn: wire.Conn, number: int) -> None:
        self.fake = fake
        self.conn = conn
        self.number = number
        self.seq = 0
        self.slot: int | None = None
        self.last_seen: dict[int, int] = {}  # caller number -> last caller sequence
        self.reader = wire.Reader(masked=True)
        self.closed = False

    def close(self) -> None:
        """No more deltas, and the socket closed (the poller forgets it if it had it)."""
        if self.closed:
            return
        self.closed = True
        if self.slot is not None:
            self.fake.slots[self.slot].remove(self)
            self.slot = None
        self.fake.poller.remove(self.conn)
        self.conn.close()

    async def run(self) -> None:
        try:
            _, rest = await wire.server_handshake(self.conn)
            created = wire.frame(b'{"type":"session.created","session":{}}')
            if self.fake.profile == "twilio":
                # From here on nothing waits: the poller's handlers and ticks own it.
                self.conn.send_nowait(created)
                self.fake.poller.add(self.conn, self._input, self.close)
                self._input(rest)
                return
            await self.conn.send(created)
            async with trio.open_nursery() as nursery:
                nursery.start_soon(self._firehose)
                await self._receive(rest)
                nursery.cancel_scope.cancel()
        except wire.Closed:
            pass
        self.close()

    def _input(self, data: bytes) -> None:
        """Twilio profile: what arrived, handled without waiting."""
        reader = self.reader
        try:
            controls = reader.feed(data)
            messages = reader.messages
            while messages:
                self._message(messages.popleft())
            for opcode, payload in controls:
                if opcode == wire.OP_CLOSE:
                    self.conn.send_nowait(wire.frame(payload[:2], wire.OP_CLOSE))
                    self.close()
                    return
                elif opcode == wire.OP_PING:
                    self.conn.send_nowait(wire.frame(payload, wire.OP_PONG))
        except wire.Closed:
            self.close()

    async def _receive(self, data: bytes) -> None:
        """Client profile: count messages, answer pings and the close."""
        reader = wire.Reader(masked=True)
        fake = self.fake
        try:
            while True:
                controls = reader.feed(data)
                if time.monotonic_ns() in fake.window:
                    fake.msgs_in += len(reader.messages)
                reader.messages.clear()
                for opcode, payload in controls:
                    if opcode == wire.OP_CLOSE:
                        await self.conn.send(wire.frame(payload[:2], wire.OP_CLOSE))
                        return
                    elif opcode == wire.OP_PING:
                        await self.conn.send(wire.frame(payload, wire.OP_PONG))
                data = await self.conn.recv()
        except wire.Closed:
            return

    def _message(self, payload: str | bytes) -> None:
        fake = self.fake
        event = orjson.loads(payload)
        kind = event.get("type")
        if kind == "input_audio_buffer.append":
            audio = base64.b64decode(event["audio"])
            now = time.monotonic_ns()
            window = fake.window
            if now in window:
                fake.up_arrived += len(audio) // FRAME_BYTES
            # The relay may join frames that were already waiting: walk them all.
            for off in range(0, len(audio) - 15, FRAME_BYTES):
                seq, sent = read_stamp(audio[off : off + 12])
                call = int.from_bytes(audio[off + 12 : off + 16], "big")
                last = self.last_seen.get(call, -1)
                if seq != last + 1:
                    fake.reordered += 1
                self.last_seen[call] = seq
                if sent in window:
                    fake.up_recv += 1
                    fake.up_lat.append((now - sent) / 1e6)
        elif kind == "response.create" and self.slot is None and not self.closed:
            self.conn.send_nowait(
                wire.frame(b'{"type":"response.created","response":{"id":"resp_bench"}}')
            )
            self.slot = fake.next_slot
            fake.next_slot = (fake.next_slot + 7) % SLOTS  # spread phases over the period
            fake.slots[self.slot].append(self)

    async def _firehose(self) -> None:
        """Client profile: deltas as fast as the socket takes them, 32 per write."""
        audio = base64.b64encode(bytes(FRAME_BYTES))
        one = wire.frame(self.fake.delta_prefix + audio + b'"}')
        batch = one * 32
        fake = self.fake
        try:
            while True:
                await self.conn.send(batch)
                if time.monotonic_ns() in fake.window:
                    fake.msgs_out += 32
                await trio.lowlevel.checkpoint()
        except wire.Closed:
            return


async def _control(ctrl: Connection, fake: Fake, cancel: trio.CancelScope) -> None:
    while True:
        cmd = await trio.to_thread.run_sync(ctrl.recv, abandon_on_cancel=True)
        if cmd[0] == "window":
            fake.collect()
            fake.window.t0, fake.window.t1 = cmd[1], cmd[2]
        elif cmd[0] == "collect":
            ctrl.send(fake.collect())
        elif cmd[0] == "stop":
            cancel.cancel()
            return


async def _main(ctrl: Connection, profile: str, port: int) -> None:
    listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    listener.bind(("127.0.0.1", port))
    listener.listen(4096)
    listener.setblocking(False)
    fake = Fake(profile)
    ctrl.send(listener.getsockname()[1])
    async with trio.open_nursery() as nursery:
        nursery.start_soon(fake.serve, listener)
        nursery.start_soon(_control, ctrl, fake, nursery.cancel_scope)


def process_main(ctrl: Connection, profile: str, cpus: set[int] | None, port: int = 0) -> None:
    """Entry point of the fake's process; reports its port, then obeys ``ctrl``."""
    if cpus:
        os.sched_setaffinity(0, cpus)
    trio.run(_main, ctrl, profile, port)
