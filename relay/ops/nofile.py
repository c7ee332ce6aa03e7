"""File descriptors: the daemon's own open-files limit, and what happens when it runs out.

Every TCP connection is a file descriptor, so the open-files limit bounds how
many clients can be served at once. ``serve`` raises its soft limit to the hard
one at start (docs/contract.md §10); the operator sets the hard limit
(``LimitNOFILE=`` in the unit).

When the process is out of descriptors anyway, Trio's accept loop logs an error
with a traceback every 0.1 s until one is free again (the kernel keeps the new
connections in the listen backlog meanwhile). :class:`AcceptErrors` turns each
such burst into one warning line; connections already served go on, and the
keep-alive and head timeouts free descriptors within seconds.
"""

from __future__ import annotations

import errno
import logging
import resource
import time
from collections.abc import Callable

log = logging.getLogger("relay.server")

# Descriptors the daemon needs besides client connections (listeners, the log,
# Redis, epoll, timers); each live session's upstream socket comes on top.
RESERVE = 64
# Errors closer together than this belong to one burst (Trio retries every 0.1 s).
BURST_GAP = 5.0


def raise_nofile(max_connections: int) -> int:
    """Raise the soft RLIMIT_NOFILE to the hard limit, log the figure, return it."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    # An unlimited hard limit still stops at the kernel's fs.nr_open for descriptors.
    target = hard if hard != resource.RLIM_INFINITY else _nr_open()
    if soft != resource.RLIM_INFINITY and soft < target:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
        except (ValueError, OSError) as exc:
            log.warning("open files limit stays %d: cannot raise it (%s)", soft, exc)
        else:
            log.info("open files limit raised from %d to %d", soft, target)
            soft = target
    else:
        log.info("open files limit: %d", soft)
    if soft != resource.RLIM_INFINITY and soft < max_connections + RESERVE:
        log.warning(
            "open files limit %d cannot hold limits.max_connections = %d: new connections "
            "will wait for a free descriptor before that cap is reached "
            "(raise LimitNOFILE or lower max_connections)",
            soft,
            max_connections,
        )
    return soft


def _nr_open() -> int:
    try:
        with open("/proc/sys/fs/nr_open") as f:
            return int(f.read())
    except (OSError, ValueError):
        return 1024 * 1024  # Linux's default fs.nr_open


class AcceptErrors(logging.Filter):
    """One warning line, no traceback, per burst of accept errors (EMFILE and kin).

    Installed on the ``trio.serve_listeners`` logger, whose only records are
    "accept returned ..." errors of the listeners' accept loop.
    """

    def __init__(self, gap: float = BURST_GAP, clock: Callable[[], float] = time.monotonic) -> None:
        super().__init__()
        self._gap = gap
        self._clock = clock
        self._last: float | None = None

    def filter(self, record: logging.LogRecord) -> bool:
        now = self._clock()
        in_burst = self._last is not None and now - self._last < self._gap
        self._last = now
        if in_burst:
            return False
        exc = record.exc_info[1] if record.exc_info else None
        code = getattr(exc, "errno", None)
        name = errno.errorcode.get(code, str(code)) if isinstance(code, int) else "error"
        record.msg = "accept failed (%s): new connections wait in the listen backlog meanwhile"
        record.args = (name,)
        record.exc_info = None
        record.exc_text = None
        record.levelno = logging.WARNING
        record.levelname = "WARNING"
        return True


def quiet_accept_errors() -> None:
    """Install :class:`AcceptErrors` once."""
    logger = logging.getLogger("trio.serve_listeners")
    if not any(isinstance(f, AcceptErrors) for f in logger.filters):
        logger.addFilter(AcceptErrors())
