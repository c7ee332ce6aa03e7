"""Load processes for ``relay bench``: many simulated Twilio calls (or one browser
client) in one trio loop per process.

A Twilio call here is what Twilio sends: a signed handshake with Twilio's
User-Agent, ``connected``, ``start``, one 160-byte μ-law ``media`` every 20 ms
(each frame stamped with its sequence number and send time, see
``fake.stamp_frame``), every ``mark`` echoed as soon as it arrives, and ``stop``
at the end. Frames go out from one 1 ms ticker per process, calls spread over
the 20 slots of a frame period; how late the ticker runs is the *send lag*, the
generator's own health figure. Calls are opened by trio tasks; once a call is
up, its socket belongs to the process's :class:`wire.Poller` (no trio task, no
trio wake-up per message).
"""

from __future__ import annotations

import base64
import contextlib
import os
import time
from array import array
from dataclasses import dataclass
from multiprocessing.connection import Connection
from typing import Any

import orjson
import trio

from relay.bench import wire
from relay.bench.fake import SLOTS, TICK_NS, read_stamp, stamp_frame

CONNECTED = wire.frame(b'{"event":"connected","protocol":"Call","version":"1.0.0"}', masked=True)
"""Twilio's first message on a stream, as one masked frame."""


def start_body(stream_sid: str, number: int) -> str:
    """The ``"start"`` event's fields (to wrap like any caller message) of an inbound
    call numbered ``number`` on ``stream_sid``."""
    start = {
        "accountSid": "AC" + "0" * 32,
        "streamSid": stream_sid,
        "callSid": f"CA{number:032x}",
        "tracks": ["inbound"],
        "mediaFormat": {"encoding": "audio/x-mulaw", "sampleRate": 8000, "channels": 1},
        "customParameters": {"direction": "inbound"},
    }
    return f'"start","start":{orjson.dumps(start).decode()}'


@dataclass(frozen=True)
class Target:
    host: str
    port: int
    resource: str
    headers: list[tuple[str, str]]


class _Call:
    __slots__ = ("conn", "last", "number", "reader", "seq", "sid", "slot", "sn")

    def __init__(self, conn: wire.Conn, number: int, sid: str) -> None:
        self.conn = conn
        self.number = number
        self.sid = sid
        self.seq = 0  # caller frames sent
        self.sn = 0  # Twilio sequenceNumber
        self.slot = -1
        self.reader = wire.Reader(masked=False)
        self.last = -1  # sequence of the last assistant frame received

    def message(self, body: str) -> bytes:
        self.sn += 1
        return wire.frame(
            f'{{"event":{body},"sequenceNumber":"{self.sn}","streamSid":"{self.sid}"}}'.encode(),
            masked=True,
        )


class Loader:
    def __init__(self, target: Target, index: int) -> None:
        self.target = target
        self.index = index
        self.calls: list[_Call] = []
        self.slots: list[list[_Call]] = [[] for _ in range(SLOTS)]
        self.next_slot = index * 3
        self.opened = 0
        self.t0 = self.t1 = 1 << 62
        self.poller = wire.Poller()
        self.reset()

    def reset(self) -> None:
        self.down_lat = array("d")
        self.lag = array("d")  # ms, per tick in the window
        self.up_sent = 0
        self.down_recv = 0
        self.down_arrived = 0  # assistant frames that arrived in the window, whenever sent
        self.reordered = 0
        self.failed = 0
        self.dropped = 0  # calls the relay closed on us
        self.clears = 0
        self.msgs_out = 0  # client mode
        self.msgs_in = 0

    def collect(self) -> dict[str, Any]:
        result = {
            "down_lat": self.down_lat.tobytes(),
            "lag": self.lag.tobytes(),
            "up_sent": self.up_sent,
            "down_recv": self.down_recv,
            "down_arrived": self.down_arrived,
            "reordered": self.reordered,
            "failed": self.failed,
            "dropped": self.dropped,
            "clears": self.clears,
            "calls": len(self.calls),
            "msgs_out": self.msgs_out,
            "msgs_in": self.msgs_in,
        }
        self.reset()
        return result

    # -- calls ----------------------------------------------------------------
    async def open_call(self) -> None:
        t = self.target
        number = self.index * 1_000_000 + self.opened
        self.opened += 1
        try:
            conn = await wire.connect(t.host, t.port)
        except OSError:
            self.failed += 1
            return
        try:
            rest = await wire.client_handshake(conn, f"{t.host}:{t.port}", t.resource, t.headers)
        except wire.Closed:
            conn.close()
            self.failed += 1
            return
        call = _Call(conn, number, f"MZ{number:032x}")
        # From here on nothing waits: the poller's handlers and ticks own the socket.
        try:
            conn.send_nowait(CONNECTED + call.message(start_body(call.sid, number)))
        except wire.Closed:
            conn.close()
            self.failed += 1
            return
        self.calls.append(call)
        call.slot = self.next_slot
        self.next_slot = (self.next_slot + 7) % SLOTS
        self.slots[call.slot].append(call)
        self.poller.add(conn, lambda data: self._input(call, data), lambda: self._drop(call))
        if rest:
            self._input(call, rest)

    def _forget(self, call: _Call) -> bool:
        """Take ``call`` out of the schedule and the poller; False if it already was."""
        if call not in self.calls:
            return False
        self.calls.remove(call)
        self.slots[call.slot].remove(call)
        self.poller.remove(call.conn)
        return True

    def _drop(self, call: _Call) -> None:
        """The relay closed ``call`` on us."""
        if self._forget(call):
            self.dropped += 1
            call.conn.close()

    async def close_call(self, call: _Call) -> None:
        if not self._forget(call):
            return
        stop = '"stop","stop":{"accountSid":"AC","callSid":"CA"}'
        with contextlib.suppress(wire.Closed):
            await call.conn.send(call.message(stop))
            await call.conn.send(wire.frame(b"\x03\xe8", wire.OP_CLOSE, masked=True))
        call.conn.close()

    def _input(self, call: _Call, data: bytes) -> None:
        reader = call.reader
        try:
            controls = reader.feed(data)
            messages = reader.messages
            while messages:
                payload = messages.popleft()
                if payload.__class__ is not str:
                    continue
                event = orjson.loads(payload)
                kind = event["event"]
                if kind == "media":
                    now = time.monotonic_ns()
                    seq, sent = read_stamp(base64.b64decode(event["media"]["payload"][:16]))
                    if seq != call.last + 1:
                        self.reordered += 1
                    call.last = seq
                    if self.t0 <= now < self.t1:
                        self.down_arrived += 1
                    if self.t0 <= sent < self.t1:
                        self.down_recv += 1
                        self.down_lat.append((now - sent) / 1e6)
                elif kind == "mark":
                    name = event["mark"]["name"]
                    call.conn.send_nowait(call.message(f'"mark","mark":{{"name":"{name}"}}'))
                elif kind == "clear":
                    self.clears += 1
            if controls and controls[-1][0] == wire.OP_CLOSE:  # a close comes last
                raise wire.Closed("close frame")
        except wire.Closed:
            self._drop(call)

    def tick(self, tick: int, due: int, now: int) -> None:
        """One caller frame from each call in this tick's slot."""
        if self.t0 <= now < self.t1:
            self.lag.append((now - due) / 1e6)
        for call in list(self.slots[tick % SLOTS]):
            sent = time.monotonic_ns()
            payload = base64.b64encode(stamp_frame(call.seq, sent, call.number)).decode()
            media = (
                f'"media","media":{{"track":"inbound","chunk":"{call.seq + 1}",'
                f'"timestamp":"{call.seq * 20}","payload":"{payload}"}}'
            )
            call.seq += 1
            try:
                call.conn.send_nowait(call.message(media))
            except wire.Closed:
                self._drop(call)
                continue
            if self.t0 <= sent < self.t1:
                self.up_sent += 1

    async def set_calls(self, n: int, rate: float) -> None:
        """Open or close calls until ``n`` are up; opens at most ``rate`` per second."""
        while len(self.calls) > n:
            await self.close_call(self.calls[-1])
        gap = 1.0 / rate
        while len(self.calls) < n:
            failed = self.failed
            await self.open_call()
            if self.failed > failed + 20:
                return
            await trio.sleep(gap)

    # -- client mode ----------------------------------------------------------
    async def client(self, nursery: trio.Nursery) -> None:
        """One browser session: send as fast as the socket takes, count what comes back."""
        t = self.target
        conn = await wire.connect(t.host, t.port)
        rest = await wire.client_handshake(conn, f"{t.host}:{t.port}", t.resource, t.headers)
        audio = base64.b64encode(bytes(160)).decode()
        one = wire.frame(
            f'{{"type":"input_audio_buffer.append","audio":"{audio}"}}'.encode(), masked=True
        )
        batch = one * 32

        async def send() -> None:
            try:
                while True:
                    await conn.send(batch)
                    if self.t0 <= time.monotonic_ns() < self.t1:
                        self.msgs_out += 32
                    await trio.lowlevel.checkpoint()
            except wire.Closed:
                self.dropped += 1

        async def receive(data: bytes) -> None:
            reader = wire.Reader(masked=False)
            try:
                while True:
                    reader.feed(data)
                    if self.t0 <= time.monotonic_ns() < self.t1:
                        self.msgs_in += len(reader.messages)
                    reader.messages.clear()
                    data = await conn.recv()
            except wire.Closed:
                self.dropped += 1

        nursery.start_soon(send)
        nursery.start_soon(receive, rest)


async def _main(ctrl: Connection, target: Target, index: int, mode: str) -> None:
    loader = Loader(target, index)
    try:
        async with trio.open_nursery() as nursery:
            if mode == "twilio":
                nursery.start_soon(loader.poller.run, loader.tick, TICK_NS)
            while True:
                cmd = await trio.to_thread.run_sync(ctrl.recv, abandon_on_cancel=True)
                if cmd[0] == "set":
                    await loader.set_calls(cmd[1], cmd[2])
                    ctrl.send(("ready", len(loader.calls), loader.failed))
                elif cmd[0] == "client":
                    try:
                        await loader.client(nursery)
                        ctrl.send(("ready", 1, 0))
                    except (OSError, wire.Closed) as exc:
                        ctrl.send(("error", str(exc)))
                elif cmd[0] == "window":
                    loader.reset()
                    loader.t0, loader.t1 = cmd[1], cmd[2]
                elif cmd[0] == "collect":
                    ctrl.send(loader.collect())
                elif cmd[0] == "stop":
                    nursery.cancel_scope.cancel()
                    return
    except wire.Closed:
        return


def process_main(
    ctrl: Connection, target: Target, index: int, mode: str, cpus: set[int] | None
) -> None:
    """Entry point of a load process; obeys ``ctrl`` until told to stop."""
    if cpus:
        os.sched_setaffinity(0, cpus)
    trio.run(_main, ctrl, target, index, mode)
