"""RFC 6455 framing: an incremental parser and the encoder, no I/O.

Why our own and not wsproto: on the media path every frame crosses this code
twice, and wsproto's generator-based parser, event objects and per-frame
bookkeeping were a seventh of the relay's CPU in the profile (see the README's
Capacity section). This parser handles a whole ``recv`` worth of frames in one
loop, unmasks in C (see :func:`unmask`), and yields plain ``str``/``bytes``.

What it enforces (a violation raises :class:`ProtocolError` with the close code
RFC 6455 names): no reserved bits (no extension is ever negotiated), masking by
the client and only by the client, control frames unfragmented and ≤ 125 bytes,
continuation only inside a fragmented message, text valid UTF-8 (1007), a
message no larger than ``max_message`` (1009, detected from the header, before
its payload is buffered), valid close codes and reasons.

Budgets against hostile peers (docs/contract.md §10), plain int arithmetic:
every frame of a message after the first costs ``FRAGMENT_COST`` bytes on top
of its payload, so a run of tiny or empty fragments ends in 1009 after at most
``max_message / FRAGMENT_COST`` frames, holding no more than its payload; more
than ``CONTROL_BUDGET`` control frames (ping, pong) within ``CONTROL_WINDOW``
seconds close with 1008.
"""

from __future__ import annotations

import os
import struct
import time
from array import array
from collections import deque
from collections.abc import Callable

try:
    # The C XOR of the `websockets` package: 0.14 µs for a 300-byte media
    # frame against 1.3 µs for the big-integer XOR below, and 8% of the relay's
    # CPU at 50 calls in alternating bench runs (README, Capacity). Only this
    # one function of that package is used; it is at this name from 12.0 (the
    # lowest version pyproject allows) to 17.4, with wheels for CPython on
    # Linux x86_64 and aarch64, and tests/unit/test_ws_frames.py fails if it stops
    # loading.
    from websockets.speedups import apply_mask as _c_mask
except ImportError:  # pragma: no cover - a platform without its wheel and no compiler
    _c_mask = None  # type: ignore[assignment]

CONT, TEXT, BINARY, CLOSE, PING, PONG = 0x0, 0x1, 0x2, 0x8, 0x9, 0xA

# What each frame of a message after the first costs against max_message on top
# of its payload (docs/contract.md §10): about what it costs us to parse one.
FRAGMENT_COST = 16
# More than this many control frames from one peer within CONTROL_WINDOW seconds
# close the connection with 1008 (docs/contract.md §10).
CONTROL_BUDGET = 1000
CONTROL_WINDOW = 10.0

_U16 = struct.Struct("!H")
_U64 = struct.Struct("!Q")


class ProtocolError(Exception):
    """The peer broke RFC 6455 (or a budget); ``code`` is what to close with.

    ``skip``: the input is still framed: the offending frame's bytes still to
    pass over from where it began (0 when it was whole); None when framing
    itself is broken. :meth:`FrameParser.skim_for_close` uses it."""

    def __init__(self, code: int, reason: str, skip: int | None = 0) -> None:
        super().__init__(code, reason)
        self.code = code
        self.reason = reason
        self.skip = skip


def unmask_py(payload: bytes | bytearray, key: bytes) -> bytes:
    """XOR with the 4-byte key, as one big-integer operation: the pure-Python
    fallback for :func:`unmask`, and the tests' reference for it."""
    n = len(payload)
    if n == 0:
        return b""
    stream = key * ((n >> 2) + 1)
    value = int.from_bytes(payload, "little") ^ int.from_bytes(stream[:n], "little")
    return value.to_bytes(n, "little")


# XOR with a 4-byte masking key (RFC 6455 §5.3): masking and unmasking alike.
unmask: Callable[[bytes | bytearray, bytes], bytes] = _c_mask if _c_mask is not None else unmask_py


def encode(opcode: int, payload: bytes, *, mask: bool) -> bytes:
    """One final frame. Clients mask (RFC 6455 §5.3); servers never do."""
    n = len(payload)
    first = 0x80 | opcode
    bit = 0x80 if mask else 0
    if n < 126:
        head = bytes((first, bit | n))
    elif n < 65536:
        head = bytes((first, bit | 126)) + _U16.pack(n)
    else:
        head = bytes((first, bit | 127)) + _U64.pack(n)
    if not mask:
        return head + payload
    key = _mask_key()
    return head + key + unmask(payload, key)


class _MaskKeys:
    """Masking keys from the OS CSPRNG, a thousand per ``getrandom`` call: one call
    per frame was the relay's most frequent syscall after send and recv."""

    __slots__ = ("_buf", "_pos")

    def __init__(self) -> None:
        self._buf = b""
        self._pos = 0

    def __call__(self) -> bytes:
        pos = self._pos
        if pos >= len(self._buf):
            self._buf, pos = os.urandom(4096), 0
        self._pos = pos + 4
        return self._buf[pos : pos + 4]

    def forget(self) -> None:
        self._buf, self._pos = b"", 0


_mask_key = _MaskKeys()
# A forked child must never reuse its parent's upcoming keys.
os.register_at_fork(after_in_child=_mask_key.forget)


def close_payload(code: int | None, reason: str = "") -> bytes:
    if code is None:
        return b""
    return _U16.pack(code) + reason.encode("utf-8")[:123]


def valid_close_code(code: int) -> bool:
    """Codes a peer may send (RFC 6455 §7.4): not 1004-1006, 1015, nor unassigned ones."""
    if code in (1004, 1005, 1006, 1015):
        return False
    return 1000 <= code <= 1014 or 3000 <= code <= 4999


class ControlBudget:
    """More than CONTROL_BUDGET control frames within CONTROL_WINDOW seconds, exactly
    (a sliding window): the arrival times of the last CONTROL_BUDGET, in a ring
    made on the first one (most peers never send any)."""

    __slots__ = ("_clock", "_next", "_times")

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self._clock = clock
        self._times: array[float] | None = None
        self._next = 0  # the oldest of the ring

    def spend(self) -> bool:
        """A ping or pong arrived: True if it is one too many (the one
        CONTROL_BUDGET before it came less than CONTROL_WINDOW seconds ago)."""
        now = self._clock()
        times = self._times
        if times is None:
            times = self._times = array("d", [float("-inf")]) * CONTROL_BUDGET
        i = self._next
        if now - times[i] < CONTROL_WINDOW:
            return True
        times[i] = now
        i += 1
        self._next = 0 if i == CONTROL_BUDGET else i
        return False


class FrameParser:
    """Feed it bytes; complete messages land in ``messages``; control frames are
    returned by :meth:`feed` as ``(opcode, payload)`` for the connection to act on."""

    __slots__ = (
        "_buf",
        "_control_budget",
        "_frag",
        "_frag_cost",
        "_frag_op",
        "_masked",
        "_skip",
        "max_message",
        "messages",
    )

    def __init__(
        self,
        *,
        masked: bool,
        max_message: int,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._masked = masked  # frames from the peer must be masked (we are the server)
        self.max_message = max_message
        # Bytes of an incomplete frame; a bytearray so that a large frame arriving in
        # many reads is accumulated in amortised linear time, not copied per read.
        self._buf = bytearray()
        # The payload of a fragmented message so far, in one buffer: memory is its
        # length, not an object per fragment.
        self._frag = bytearray()
        # What the fragmented message being reassembled counts against max_message:
        # its payload so far plus FRAGMENT_COST for each frame after the first,
        # including the next one (a message that is not finished has one more
        # frame to come), so a frame's header check needs no condition; 0 if none.
        self._frag_cost = 0
        self._frag_op = 0  # opcode of the message being reassembled, 0 if none
        self.messages: deque[str | bytes] = deque()
        self._control_budget = ControlBudget(clock)
        self._skip: int | None = None  # set by an error: see skim_for_close

    @property
    def buffered(self) -> int:
        """Bytes held for an incomplete frame or message (bounded by max_message)."""
        return len(self._buf) + len(self._frag)

    def feed(self, data: bytes | bytearray) -> list[tuple[int, bytes]]:
        if self._buf:
            self._buf += data
            data = self._buf
        controls: list[tuple[int, bytes]] = []
        pos = 0
        size = len(data)
        masked = self._masked
        try:
            while size - pos >= 2:
                b0 = data[pos]
                b1 = data[pos + 1]
                if b0 & 0x70:
                    raise ProtocolError(1002, "reserved bits set", None)
                if bool(b1 & 0x80) is not masked:
                    raise ProtocolError(1002, "frame masking is wrong for this side", None)
                opcode = b0 & 0x0F
                length = b1 & 0x7F
                head = pos + 2
                if length == 126:
                    if size - head < 2:
                        break
                    length = _U16.unpack_from(data, head)[0]
                    head += 2
                elif length == 127:
                    if size - head < 8:
                        break
                    length = _U64.unpack_from(data, head)[0]
                    head += 8
                    if length >> 63:
                        raise ProtocolError(1002, "frame length out of range", None)
                if opcode >= 8:
                    if not b0 & 0x80 or length > 125:
                        raise ProtocolError(1002, "control frame fragmented or too long", None)
                elif length + self._frag_cost > self.max_message:
                    # Known from the header alone: the payload is never buffered.
                    frame = head - pos + (4 if masked else 0) + length
                    raise ProtocolError(1009, "message too big", frame)
                if masked:
                    if size - head < 4:
                        break
                    head += 4
                end = head + length
                if end > size:
                    break
                if masked:
                    payload = unmask(data[head:end], bytes(data[head - 4 : head]))
                else:
                    payload = bytes(data[head:end])  # no copy when data is bytes
                pos = end
                if opcode >= 8:
                    if opcode == CLOSE:
                        controls.append((opcode, payload))
                        pos = size  # nothing after a close counts
                        break
                    if opcode not in (PING, PONG):
                        raise ProtocolError(1002, "unknown control opcode")
                    if self._control_budget.spend():
                        raise ProtocolError(1008, "too many control frames")
                    controls.append((opcode, payload))
                    continue
                self._data_frame(opcode, bool(b0 & 0x80), payload)
        except ProtocolError as err:
            # Kept so that the peer's close frame can still be found after ours.
            self._skip = err.skip
            self._buf = bytearray(data[pos:]) if err.skip is not None else bytearray()
            raise
        if pos >= size:
            if data is self._buf:
                self._buf = bytearray()
        elif pos or data is not self._buf:
            self._buf = bytearray(data[pos:])
        return controls

    def skim_for_close(self, data: bytes) -> bool | None:
        """After a :class:`ProtocolError` (once we sent our close): whether the
        peer's close frame is in what arrived so far, passing over every other
        frame without keeping its payload; None if its input cannot be framed.

        Why: once the peer has answered our close, the closing handshake is
        complete and we close the TCP connection first (RFC 6455 §7.1.1);
        waiting for its FIN instead costs a peer that waits for ours (a
        client, as §7.1.1 tells it to) up to the close timeout."""
        skip = self._skip
        if skip is None:
            return None
        buf = self._buf
        buf += data
        pos = min(skip, len(buf))
        skip -= pos
        found = False
        while not skip and len(buf) - pos >= 2:
            b1 = buf[pos + 1]
            length, head = b1 & 0x7F, pos + 2
            if length == 126:
                if len(buf) - head < 2:
                    break
                length, head = _U16.unpack_from(buf, head)[0], head + 2
            elif length == 127:
                if len(buf) - head < 8:
                    break
                length, head = _U64.unpack_from(buf, head)[0], head + 8
            if buf[pos] & 0x0F == CLOSE:
                found = True
                break
            end = head + (4 if b1 & 0x80 else 0) + length
            pos = min(end, len(buf))
            skip = end - pos
        del buf[:pos]  # at most a frame header is kept between reads
        self._skip = skip
        return found

    def _data_frame(self, opcode: int, fin: bool, payload: bytes) -> None:
        if opcode == CONT:
            if not self._frag_op:
                raise ProtocolError(1002, "continuation without a message")
            self._frag += payload
            if not fin:
                self._frag_cost += len(payload) + FRAGMENT_COST  # and the next frame's
                return
            opcode = self._frag_op
            whole = self._frag
            self._frag, self._frag_cost, self._frag_op = bytearray(), 0, 0
            if opcode == TEXT:
                try:
                    self.messages.append(whole.decode("utf-8"))
                except UnicodeDecodeError:
                    raise ProtocolError(1007, "text is not valid UTF-8") from None
            else:
                self.messages.append(bytes(whole))
            return
        if opcode in (TEXT, BINARY):
            if self._frag_op:
                raise ProtocolError(1002, "new message inside a fragmented one")
            if not fin:
                self._frag_op = opcode
                self._frag += payload
                self._frag_cost = len(payload) + FRAGMENT_COST
                return
        else:
            raise ProtocolError(1002, "unknown data opcode")
        if opcode == TEXT:
            try:
                self.messages.append(payload.decode("utf-8"))
            except UnicodeDecodeError:
                raise ProtocolError(1007, "text is not valid UTF-8") from None
        else:
            self.messages.append(payload)


def parse_close(payload: bytes) -> tuple[int, str]:
    """(code, reason) of a close frame's payload; 1005 when it has none."""
    if not payload:
        return 1005, ""
    if len(payload) == 1:
        raise ProtocolError(1002, "close frame of one byte")
    code = _U16.unpack_from(payload)[0]
    if not valid_close_code(code):
        raise ProtocolError(1002, "invalid close code")
    try:
        return code, payload[2:].decode("utf-8")
    except UnicodeDecodeError:
        raise ProtocolError(1007, "close reason is not valid UTF-8") from None
