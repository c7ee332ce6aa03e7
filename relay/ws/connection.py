"""One open WebSocket, either side, after its handshake: the relay's hot path.

Model: no reader task. Whoever calls :meth:`WebSocket.receive` reads the socket,
parses every frame that arrived, answers pings and the peer's close, and gets
the next message; a session has exactly one reader per socket (its pump), so a
frame costs one wake-up instead of a hop through a reader task and a channel.
Sends from several tasks (a pump, a barge-in, a timer) are safe: a frame the
kernel takes at once is done without a checkpoint; otherwise the sender waits
until its bytes are in the kernel, one task draining at a time, so memory per
connection stays bounded by one message per waiting sender.

Liveness (``stall_seconds``, watched by ``relay.ws.liveness``): a peer that
takes none of our bytes for that long while we have some for it, or that sends
nothing for that long and then does not answer a ping within that long again,
is dead: the connection is aborted and :class:`Disconnected` with
``stalled=True`` is raised.

Errors are :class:`Disconnected` (``relay.ws.errors``): the peer's close code,
1006 for a connection lost without a close, or ``local=True`` with the code we
owe the peer (1002, 1007, 1008, 1009) when it broke the protocol; the session then
chooses what close to send (the contract says which).
"""

from __future__ import annotations

import contextlib
import logging
import socket
from collections import deque
from collections.abc import Callable

import trio

from relay.ws import liveness
from relay.ws.errors import Disconnected, UpstreamClosed
from relay.ws.frames import (
    BINARY,
    CLOSE,
    PING,
    PONG,
    TEXT,
    FrameParser,
    ProtocolError,
    close_payload,
    encode,
    parse_close,
)
from relay.ws.transport import Broken, Transport

CLOSE_TIMEOUT = 2.0

log = logging.getLogger(__name__)


def _frame(message: str | bytes, mask: bool) -> bytes:
    if isinstance(message, str):
        return encode(TEXT, message.encode("utf-8"), mask=mask)
    return encode(BINARY, message, mask=mask)


def _text_frames(texts: tuple[bytes, ...], mask: bool) -> bytes:
    """Text messages already encoded as UTF-8, as the bytes of one write."""
    if len(texts) == 1:  # the append upstream: no list for one frame
        return encode(TEXT, texts[0], mask=mask)
    return b"".join([encode(TEXT, t, mask=mask) for t in texts])


def _frames(messages: tuple[str | bytes, ...], mask: bool) -> bytes:
    """Several messages as the bytes of one write."""
    if len(messages) == 1:
        return _frame(messages[0], mask)
    return b"".join(_frame(m, mask) for m in messages)


class WebSocket:
    __slots__ = (
        "_close_sent",
        "_controls",
        "_gone",
        "_kind",
        "_lot",
        "_mask",
        "_messages",
        "_parser",
        "_pending",
        "_sending",
        "fast_path",
        "finished",
        "reading",
        "rx_count",
        "stall_seconds",
        "transport",
    )

    def __init__(
        self,
        transport: Transport,
        *,
        client: bool,
        max_message: int,
        stall_seconds: float | None,
        buffered: bytes = b"",
    ) -> None:
        self.transport = transport
        self._mask = client  # clients mask what they send, and receive unmasked frames
        self._parser = FrameParser(masked=not client, max_message=max_message)
        self._messages = self._parser.messages
        self.stall_seconds = stall_seconds
        self.rx_count = 0  # reads so far: the liveness sweeper watches it change
        # True while a task waits for input: silence only counts then (a pump that
        # is blocked sending elsewhere is not listening, and the peer is not silent).
        self.reading = False
        self._gone: Disconnected | None = None  # why receiving is over, once it is
        self._kind: type[Disconnected] = UpstreamClosed if client else Disconnected
        self._close_sent = False
        self._sending = False  # one task is waiting for the kernel to take queued bytes
        self._lot = trio.lowlevel.ParkingLot()
        self._pending: bytes = buffered  # bytes read with the handshake
        self._controls: list[tuple[int, bytes]] = []  # control frames read, not yet acted on
        # Set by a session: called by the reactor with the queue of arrived messages
        # while the reader is parked; it pops from the left those it has handled
        # completely (without waiting) and leaves the rest to the reader, in order.
        # What it raises is raised by the reader's receive(), not by the reactor.
        self.fast_path: Callable[[deque[str | bytes]], None] | None = None
        # Set once nothing more will be exchanged: the peer closed, the connection
        # was lost or aborted, or our close completed. (Not on a protocol error by
        # the peer: the session still owes it a close frame.)
        self.finished = trio.Event()
        if stall_seconds is not None:
            liveness.watch(self, stall_seconds)
        transport.watch()

    @property
    def buffered_bytes(self) -> int:
        """Memory held for this connection right now: partial input and unsent output."""
        return self._parser.buffered + len(self.transport.out)

    # -- receiving --------------------------------------------------------------
    async def receive(self) -> str | bytes:
        """The next message (text as str, binary as bytes, empty ones too)."""
        messages = self._messages
        while not messages:
            if self._gone is not None:
                raise self._gone.again()
            await self._read()
        return messages.popleft()

    def receive_nowait(self) -> str | bytes | None:
        """A message that has already arrived, else None; never waits, never reads."""
        if self._messages:
            return self._messages.popleft()
        if self._gone is not None:
            raise self._gone.again()
        return None

    async def _read(self) -> None:
        if not self._pending and not self._controls:
            t = self.transport
            self.reading = True
            # While parked here the reactor runs the fast path (if any) on new input,
            # and wakes us only for what it leaves: then there is nothing to read.
            t.input_hook = self._on_input if self.fast_path is not None else None
            try:
                await t.wait_input()
            except trio.ClosedResourceError:
                self._lost("connection lost")
                return
            finally:
                t.input_hook = None
                self.reading = False
            if self._messages or self._gone is not None:
                return
        self._take_input()
        controls, self._controls = self._controls, []
        for opcode, payload in controls:
            await self._control(opcode, payload)

    def _take_input(self) -> None:
        """Read what the socket has (and what the handshake left) and parse it:
        messages to the queue, control frames to ``_controls``, the end to ``_gone``."""
        if self._pending:
            data, self._pending = self._pending, b""
        else:
            try:
                read = self.transport.read_nowait()
            except Broken:
                self._lost("connection lost")
                return
            if read is None:
                return
            if not read:
                self._lost("closed without a close frame")
                return
            data = read
        self.rx_count += 1
        try:
            self._controls += self._parser.feed(data)
        except ProtocolError as err:
            self._gone = self._kind(err.code, err.reason, local=True)

    def _on_input(self) -> None:
        """Run by the reactor when input arrives while the reader is parked: read,
        let the fast path take what it can, wake the reader for the rest."""
        self._take_input()
        messages = self._messages
        fast = self.fast_path
        if messages and fast is not None and not self._controls and self._gone is None:
            try:
                fast(messages)
            except Exception as exc:
                # Not the reactor's to handle: the reader (the session's pump) raises
                # it, inside the session's nursery; nothing is relayed fast any more.
                self.fast_path = None
                self.transport.wake_reader(exc)
                return
        # Also when more input may be waiting (a full read, or a hangup still to be
        # read): no new edge would announce it.
        if messages or self._controls or self._gone is not None or self.transport.ready:
            self.transport.wake_reader()

    async def _control(self, opcode: int, payload: bytes) -> None:
        if opcode == PING:
            if not self._close_sent:
                await self._write(encode(PONG, payload, mask=self._mask))
        elif opcode == CLOSE:
            try:
                code, reason = parse_close(payload)
            except ProtocolError as err:
                self._gone = self._kind(err.code, err.reason, local=True)
                return
            self._gone = self._kind(code, reason)
            self.finished.set()
            if not self._close_sent:
                # Echo the close (RFC 6455 §5.5.1); a peer that left meanwhile is no matter.
                self._close_sent = True
                echo = close_payload(None if code == 1005 else code)
                try:
                    with trio.move_on_after(CLOSE_TIMEOUT):
                        await self._write(encode(CLOSE, echo, mask=self._mask), closing=True)
                except Disconnected:
                    pass
        # PONG: any frame already proved the peer alive.

    def _lost(self, why: str) -> None:
        if self._gone is None:
            self._gone = self._kind(1006, why)
        self.finished.set()
        self.transport.close()

    # -- liveness (called by relay.ws.liveness) ----------------------------------
    def ping_nowait(self) -> None:
        if self._close_sent or self.transport.closed:
            return
        self._push_now(encode(PING, b"relay", mask=self._mask))

    def stalled(self) -> None:
        """Abort a stalled peer at once (an RST: a close frame could never be read).
        Whatever task waits on the socket wakes and raises ``stalled``."""
        if self._gone is None or not self._gone.stalled:
            self._gone = self._kind(1006, "stalled", stalled=True)
        self.finished.set()
        self.transport.close(reset=True)

    # -- sending ----------------------------------------------------------------
    async def send(self, data: str | bytes) -> None:
        await self._write(_frame(data, self._mask))

    async def send_texts(self, texts: tuple[bytes, ...]) -> None:
        """Text messages already encoded as UTF-8 (JSON the caller built itself), in
        one write: one syscall, and no decode and re-encode on the way."""
        await self._write(_text_frames(texts, self._mask))

    # Non-waiting sends, for fast paths: check can_send_now(), then send_now().
    def can_send_now(self) -> bool:
        """True when a frame can be handed to the kernel without waiting for anyone."""
        t = self.transport
        return not (t.out or self._sending or t.closed or self._close_sent)

    def send_now(self, *messages: str | bytes) -> None:
        """Messages (text as str, binary as bytes), in one write, without waiting
        (after :meth:`can_send_now`). Bytes the kernel does not take at once are
        pushed by the reactor as room appears, and make :meth:`can_send_now` false
        until then. A broken socket is marked lost (its reader learns it), never
        raised here."""
        self._push_now(_frames(messages, self._mask))

    def send_text_now(self, *texts: bytes) -> None:
        """:meth:`send_now` for text already encoded as UTF-8, as :meth:`send_texts`."""
        self._push_now(_text_frames(texts, self._mask))

    def _push_now(self, frame: bytes) -> None:
        """Hand ``frame`` to the transport without waiting; a broken socket is lost."""
        try:
            self.transport.write(frame)
        except Broken:
            self._lost("connection lost")

    async def _write(self, frame: bytes, *, closing: bool = False) -> None:
        t = self.transport
        if t.closed or (self._close_sent and not closing):
            raise (self._gone or self._kind(1006, "connection closed")).again()
        try:
            if t.write(frame) and not self._sending:
                return  # the kernel took it (and everything queued before it)
            while self._sending:
                await self._lot.park()
            if t.out:
                self._sending = True
                try:
                    await t.drain(None)  # a drain that never moves is the sweeper's
                finally:
                    self._sending = False
                    self._lot.unpark_all()
        except (Broken, trio.ClosedResourceError):
            self._lost("connection lost")
            raise (self._gone or self._kind(1006, "connection lost")).again() from None

    # -- closing ----------------------------------------------------------------
    async def close(self, code: int = 1000, reason: str = "") -> None:
        """Send a close (once), wait briefly for the peer's, never hang; the owner
        of the transport closes the socket afterwards."""
        self.fast_path = None  # nothing is relayed any more, whatever still arrives
        if self._close_sent or self.transport.closed:
            return
        self._close_sent = True
        with trio.CancelScope(shield=True), trio.move_on_after(CLOSE_TIMEOUT):
            try:
                frame = encode(CLOSE, close_payload(code, reason), mask=self._mask)
                await self._write(frame, closing=True)
                if self._gone is not None and self._gone.local:
                    # Its messages are no longer taken. Half-close so the close frame
                    # is followed by FIN, and read what is still coming until its
                    # close (or its FIN, if its frames cannot even be framed): a
                    # socket closed with unread input sends an RST, which can destroy
                    # the close frame before the peer reads it.
                    await self._discard_input()
                # The peer's answering close (any data before it is dropped).
                while self._gone is None:
                    self._messages.clear()
                    await self._read()
            except (Disconnected, trio.BusyResourceError, OSError):
                pass
        self.finished.set()

    async def _discard_input(self) -> None:
        t = self.transport
        t.sock.shutdown(socket.SHUT_WR)
        skim = self._parser.skim_for_close
        data, self._pending = self._pending, b""
        with contextlib.suppress(Broken):
            # The peer's close completes the handshake: close at once (RFC 6455
            # §7.1.1, the server closes the TCP connection first) rather than wait
            # out CLOSE_TIMEOUT for a client that waits for our FIN to be answered.
            while not skim(data):
                data = await t.read()
                if not data:
                    break

    @property
    def closed(self) -> bool:
        return self._close_sent or self._gone is not None or self.transport.closed
