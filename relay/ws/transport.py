"""Bytes in and out of one socket, plain or TLS, on Trio's low-level waits.

Why not ``trio.SocketStream``: its ``receive_some``/``send_all`` try the
syscall, then wait, then always pass through the scheduler once more; on this
path that was half of all CPU (a bare byte forwarder measured 54 µs per frame
with streams against 30 µs with ``wait_readable`` + a non-blocking call). Here a
read waits for readability first and then reads everything there is, and a
write that the kernel takes at once never touches the scheduler.

TLS (the ``wss://`` upstream) runs through an ``ssl.SSLObject`` over memory
BIOs, so both kinds share one code path above this module.
"""

from __future__ import annotations

import contextlib
import socket
import ssl
import struct
from collections.abc import Callable

import outcome
import trio

from relay.ws import reactor as _reactor

RECV_SIZE = 65536
_LINGER_RESET = struct.pack("ii", 1, 0)  # on, 0 s: close() sends an RST


class Broken(Exception):
    """The socket failed (reset, or any other OS error): the peer is gone."""


class Transport:
    __slots__ = (
        "_in",
        "_out_bio",
        "_reactor",
        "_reader",
        "_tls",
        "closed",
        "hangup",
        "input_hook",
        "out",
        "ready",
        "sock",
        "writable",
    )

    def __init__(self, sock: socket.socket) -> None:
        sock.setblocking(False)
        self.sock = sock
        self._tls: ssl.SSLObject | None = None
        self._in: ssl.MemoryBIO | None = None
        self._out_bio: ssl.MemoryBIO | None = None
        self.out = bytearray()  # bytes the kernel has not taken yet, in order
        # Times a wait for room in the kernel ended: the liveness sweeper's measure of
        # progress. Not bytes: a peer with a closed window can still take a byte or
        # two per window probe, which is no reader at all.
        self.writable = 0
        self.closed = False
        # Reactor state (``watch``): input may be waiting (an edge was seen and no
        # read has drained the socket since); the task parked in wait_input; and
        # what the reactor runs instead of waking that task, if anything.
        self._reactor: _reactor.Reactor | None = None
        self.ready = False
        # The peer's FIN (or an error) was reported: the end of input is there to be
        # read after any data, and no further edge will ever announce it.
        self.hangup = False
        self._reader: trio.lowlevel.Task | None = None
        self.input_hook: Callable[[], None] | None = None

    @classmethod
    def adopt(
        cls,
        trio_sock: trio.socket.SocketType,
        *,
        tls: ssl.SSLContext | None = None,
        server_hostname: str | None = None,
    ) -> Transport:
        """Take over a Trio socket (a listener's or ``open_tcp_stream``'s); with
        ``tls``, as a TLS client (call :meth:`tls_handshake` next)."""
        family, kind, proto = trio_sock.family, trio_sock.type, trio_sock.proto
        sock = socket.socket(family, kind, proto, fileno=trio_sock.detach())
        if tls is None:
            return cls(sock)
        transport = cls(sock)
        incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
        transport._tls = tls.wrap_bio(incoming, outgoing, server_hostname=server_hostname)
        transport._in, transport._out_bio = incoming, outgoing
        return transport

    async def tls_handshake(self) -> None:
        assert self._tls is not None
        while True:
            try:
                self._tls.do_handshake()
            except ssl.SSLWantReadError:
                await self._flush_tls()
                data = await self._recv_raw()
                if not data:
                    raise Broken("closed during the TLS handshake") from None
                assert self._in is not None
                self._in.write(data)
                continue
            await self._flush_tls()
            return

    async def _flush_tls(self) -> None:
        self._queue_tls_output()
        await self.drain(None)

    def _queue_tls_output(self) -> None:
        assert self._out_bio is not None
        pending = self._out_bio.read()
        if pending:
            self._push(pending)

    async def _recv_raw(self) -> bytes:
        while True:
            await trio.lowlevel.wait_readable(self.sock)
            try:
                return self.sock.recv(RECV_SIZE)
            except BlockingIOError:
                continue
            except OSError as exc:
                raise Broken(str(exc)) from None

    # -- reading --------------------------------------------------------------
    def read_nowait(self) -> bytes | None:
        """What the socket has now: bytes, ``b""`` at end of stream, None if nothing."""
        data: bytes | None
        try:
            data = self.sock.recv(RECV_SIZE)
        except (BlockingIOError, InterruptedError):
            self.ready = self.hangup
            data = None
        except OSError as exc:
            raise Broken(str(exc)) from None
        else:
            # A short read drained the socket (new input raises a new edge); a full
            # one may have left more; after a hangup the end is still to be read.
            if 0 < len(data) < RECV_SIZE and not self.hangup:
                self.ready = False
        if self._tls is None:
            return data
        return self._decrypt(data)

    def _decrypt(self, data: bytes | None) -> bytes | None:
        assert self._tls is not None and self._in is not None
        if data is None:
            return None
        if not data:
            self._in.write_eof()
        else:
            self._in.write(data)
        chunks: list[bytes] = []
        eof = False
        while True:
            try:
                chunk = self._tls.read(RECV_SIZE)
            except ssl.SSLWantReadError:
                break
            except ssl.SSLZeroReturnError:
                eof = True
                break
            except ssl.SSLError as exc:
                raise Broken(f"TLS: {exc.reason}") from None
            if not chunk:
                eof = True
                break
            chunks.append(chunk)
        # Reading can make TLS want to write (key updates); never wait for it here.
        self._queue_tls_output()
        if chunks:
            return b"".join(chunks)
        return b"" if eof or not data else None

    async def read(self) -> bytes:
        """Wait for input: the bytes that arrived, ``b""`` at end of stream.
        Waits for readability first: on a relay's sockets input is rarely already
        there, and a failed ``recv`` would cost a syscall for nothing."""
        while True:
            await trio.lowlevel.wait_readable(self.sock)
            data = self.read_nowait()
            if data is not None:
                return data

    # -- the reactor ----------------------------------------------------------------
    def watch(self) -> None:
        """Hand this socket's readiness to the run's reactor: from now on wait for
        input with :meth:`wait_input`, and queued output is pushed as room appears."""
        if self._reactor is None and not self.closed:
            self._reactor = _reactor.reactor()
            self._reactor.add(self)
            self.ready = True  # whatever arrived before the registration

    async def wait_input(self) -> None:
        """Return once input may be there (or raise ``trio.ClosedResourceError``).
        Always a checkpoint; parks until the reactor sees input."""
        if self.closed:
            raise trio.ClosedResourceError("transport closed")
        if self.ready:
            await trio.lowlevel.checkpoint()
            return
        self._reader = trio.lowlevel.current_task()

        def abort(_: object) -> trio.lowlevel.Abort:
            self._reader = None
            return trio.lowlevel.Abort.SUCCEEDED

        await trio.lowlevel.wait_task_rescheduled(abort)

    def wake_reader(self, error: BaseException | None = None) -> None:
        task, self._reader = self._reader, None
        if task is not None:
            result = outcome.Value(None) if error is None else outcome.Error(error)
            trio.lowlevel.reschedule(task, result)

    def on_events(self, events: int) -> None:
        """Called by the reactor with this socket's epoll events."""
        if events & _reactor.INPUT:
            self.ready = True
            if events & _reactor.HANGUP:
                self.hangup = True
            if self._reader is not None:
                hook = self.input_hook
                if hook is None:
                    self.wake_reader()
                else:
                    hook()
        if events & _reactor.OUTPUT and self.out and not self.closed:
            self.writable += 1
            with contextlib.suppress(Broken):  # the next read or write reports it
                self.flush_nowait()

    # -- writing --------------------------------------------------------------
    def write(self, data: bytes) -> bool:
        """Queue ``data`` and push what the kernel takes now; True if nothing is left."""
        if self._tls is not None:
            try:
                self._tls.write(data)
            except ssl.SSLError as exc:
                raise Broken(f"TLS: {exc.reason}") from None
            assert self._out_bio is not None
            data = self._out_bio.read()
        return self._push(data)

    def _push(self, data: bytes) -> bool:
        if self.out:
            self.out += data
            return self.flush_nowait()
        try:
            sent = self.sock.send(data)
        except (BlockingIOError, InterruptedError):
            sent = 0
        except OSError as exc:
            raise Broken(str(exc)) from None
        if sent < len(data):
            self.out += memoryview(data)[sent:]
            return False
        return True

    def flush_nowait(self) -> bool:
        """Push queued bytes without waiting; True once none are left."""
        out = self.out
        while out:
            try:
                sent = self.sock.send(out)
            except (BlockingIOError, InterruptedError):
                return False
            except OSError as exc:
                raise Broken(str(exc)) from None
            del out[:sent]
        return True

    async def drain(self, stall_seconds: float | None) -> None:
        """Wait until every queued byte is in the kernel. Raises ``trio.TooSlowError``
        when the peer takes nothing for ``stall_seconds`` (a stalled reader)."""
        while not self.flush_nowait():
            # Each wait is timed on its own: any progress restarts the stall clock.
            if stall_seconds is None:
                await trio.lowlevel.wait_writable(self.sock)
            else:
                with trio.fail_after(stall_seconds):
                    await trio.lowlevel.wait_writable(self.sock)
            self.writable += 1

    # -- closing --------------------------------------------------------------
    def close(self, *, reset: bool = False) -> None:
        """Close the socket now (with an RST when ``reset``); safe to call twice."""
        if self.closed:
            return
        self.closed = True
        if reset:
            with contextlib.suppress(OSError):
                self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, _LINGER_RESET)
        # Trio and the reactor must forget the fd before it is closed (a waiting task
        # gets ClosedResourceError instead of a wait on a reused fd).
        if self._reactor is not None:
            self._reactor.discard(self, self.sock.fileno())
            self.input_hook = None
            self.wake_reader(trio.ClosedResourceError("transport closed"))
        trio.lowlevel.notify_closing(self.sock)
        self.sock.close()
