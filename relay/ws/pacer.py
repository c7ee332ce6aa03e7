"""The reactor's pacing clock: a periodic Linux ``timerfd`` that Trio waits on.

Why not ``trio.sleep_until``: each Trio sleep makes a cancel scope, registers a
deadline and ends by raising ``Cancelled`` through the sleeping task's frames
and catching it again. A loop of empty passes measured 160 µs of CPU per pass
that way on the 2-vCPU VM, against 100 µs waiting on a periodic timerfd (and
55 µs for a bare ``epoll_wait``: the wake-up itself is dear on this VM). Also,
the sleep's deadline is rounded up to whole milliseconds by ``epoll_wait``, so
"1 ms" passes came every ~1.8 ms; the timerfd keeps the interval it is given.
A timerfd armed once while the reactor is busy just becomes readable every
interval: a tick is one ``wait_readable`` and one ``read``.

From Python 3.13 the timer is ``os.timerfd_create``/``os.timerfd_settime_ns``;
before, the same two calls go through ctypes to libc. Where neither is available
(not Linux), ticks fall back to ``trio.sleep_until``: same pacing, more CPU.
"""

from __future__ import annotations

import contextlib
import ctypes
import logging
import os
import time
from typing import Literal, Protocol

import trio

log = logging.getLogger(__name__)

_TFD_NONBLOCK = os.O_NONBLOCK
_TFD_CLOEXEC = os.O_CLOEXEC  # timerfd's flags share the values of these open(2) flags


class _Timespec(ctypes.Structure):
    _fields_ = [("tv_sec", ctypes.c_long), ("tv_nsec", ctypes.c_long)]


class _Itimerspec(ctypes.Structure):
    _fields_ = [("it_interval", _Timespec), ("it_value", _Timespec)]


class _Timer(Protocol):
    fd: int

    def set(self, interval_ns: int) -> None:
        """Tick every ``interval_ns`` from one interval from now (0: disarm); OSError if refused."""


class _OsTimer:
    """Python >= 3.13's own timerfd calls."""

    def __init__(self) -> None:
        self.fd = os.timerfd_create(  # type: ignore[attr-defined,unused-ignore]
            time.CLOCK_MONOTONIC,
            flags=os.TFD_NONBLOCK | os.TFD_CLOEXEC,  # type: ignore[attr-defined,unused-ignore]
        )

    def set(self, interval_ns: int) -> None:
        os.timerfd_settime_ns(  # type: ignore[attr-defined,unused-ignore]
            self.fd, initial=interval_ns, interval=interval_ns
        )


class _CtypesTimer:
    """The same two calls through ctypes to libc, for Python < 3.13."""

    def __init__(self) -> None:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.timerfd_create.argtypes = [ctypes.c_int, ctypes.c_int]
        libc.timerfd_settime.argtypes = [
            ctypes.c_int,
            ctypes.c_int,
            ctypes.POINTER(_Itimerspec),
            ctypes.c_void_p,
        ]
        self._libc = libc
        self._specs: dict[int, _Itimerspec] = {}  # by interval: made once, not per call
        self.fd = libc.timerfd_create(time.CLOCK_MONOTONIC, _TFD_NONBLOCK | _TFD_CLOEXEC)
        if self.fd < 0:
            raise OSError(ctypes.get_errno(), os.strerror(ctypes.get_errno()))

    def set(self, interval_ns: int) -> None:
        spec = self._specs.get(interval_ns)
        if spec is None:
            every = _Timespec(interval_ns // 1_000_000_000, interval_ns % 1_000_000_000)
            spec = self._specs[interval_ns] = _Itimerspec(every, every)
        if self._libc.timerfd_settime(self.fd, 0, ctypes.byref(spec), None) != 0:
            raise OSError(ctypes.get_errno(), os.strerror(ctypes.get_errno()))


Backend = Literal["os", "ctypes"]
OS_TIMERFD = hasattr(os, "timerfd_create")  # Python >= 3.13 on Linux


def _timer(backend: Backend | None) -> _Timer | None:
    """The timer of ``backend`` (None: the best there is), or None where it is missing."""
    try:
        if backend == "os" or (backend is None and OS_TIMERFD):
            return _OsTimer()
        return _CtypesTimer()
    except (OSError, AttributeError):  # not Linux: no libc timerfd, no os.timerfd_create
        return None


class Pacer:
    """Ticks every ``interval`` seconds between :meth:`start` and :meth:`stop`."""

    def __init__(
        self, interval: float, *, timerfd: bool = True, backend: Backend | None = None
    ) -> None:
        """``backend`` picks the timerfd calls (tests); by default ``os`` where it exists."""
        self.interval = interval
        self._timer = _timer(backend) if timerfd else None
        self._fd = self._timer.fd if self._timer is not None else -1
        self._ns = round(interval * 1e9)
        self._armed = False
        self._next = 0.0  # the fallback's next tick

    @property
    def uses_timerfd(self) -> bool:
        return self._fd >= 0

    def start(self) -> None:
        """Tick from now on, the first tick one interval from now."""
        if self._armed:
            return
        self._armed = True
        self._next = trio.current_time() + self.interval
        if self._fd >= 0:
            self._settime(self._ns)

    def stop(self) -> None:
        """No more ticks until the next :meth:`start` (a tick already due is dropped)."""
        if not self._armed:
            return
        self._armed = False
        if self._fd >= 0 and self._settime(0):
            self._clear()

    async def tick(self) -> None:
        """Wait for the next tick (return at once, after a checkpoint, if one is
        already due). Other tasks run meanwhile."""
        if self._fd < 0:
            await trio.sleep_until(self._next)
            self._next = max(self._next + self.interval, trio.current_time())
            return
        await trio.lowlevel.wait_readable(self._fd)
        self._clear()

    def close(self) -> None:
        if self._fd >= 0:
            fd, self._fd = self._fd, -1
            trio.lowlevel.notify_closing(fd)
            with contextlib.suppress(OSError):
                os.close(fd)

    def _settime(self, interval_ns: int) -> bool:
        """Arm (or with 0 disarm) the timer; if it cannot be set (never seen; a sandbox
        might refuse it), pace on Trio's clock from now on rather than stop the reactor."""
        assert self._timer is not None
        try:
            self._timer.set(interval_ns)
        except OSError as exc:
            log.warning("timerfd_settime failed (%s); pacing with trio.sleep_until", exc.strerror)
            self.close()
            return False
        return True

    def _clear(self) -> None:
        # The expiry count is of no interest: a late pass simply runs at once.
        with contextlib.suppress(BlockingIOError):
            os.read(self._fd, 8)
