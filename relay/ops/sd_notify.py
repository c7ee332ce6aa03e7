"""systemd's notification protocol without a dependency: one datagram to $NOTIFY_SOCKET.

See sd_notify(3). The daemon sends ``READY=1`` once it listens, ``STATUS=``
lines with live session counts, ``WATCHDOG=1`` every half ``WATCHDOG_USEC``
and ``STOPPING=1`` when it starts draining. Outside systemd (no
``NOTIFY_SOCKET``) every call is a no-op.
"""

from __future__ import annotations

import contextlib
import os
import socket
from collections.abc import Mapping


class Notifier:
    """Sends READY/STATUS/WATCHDOG/STOPPING; every call is a no-op without NOTIFY_SOCKET."""

    def __init__(self, env: Mapping[str, str] | None = None) -> None:
        env = os.environ if env is None else env
        address = env.get("NOTIFY_SOCKET", "")
        if address.startswith("@"):  # abstract namespace: '@' stands for a leading NUL
            address = "\0" + address[1:]
        elif address and not address.startswith("/"):
            address = ""  # e.g. vsock:... (VMs); not ours to speak, so stay silent
        self._address = address
        self._sock: socket.socket | None = None
        if address:
            self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
            # Never block the event loop: if systemd's queue is full, drop the datagram.
            self._sock.setblocking(False)
        self.watchdog_interval = _watchdog_interval(env) if self._sock is not None else None

    @property
    def enabled(self) -> bool:
        return self._sock is not None

    def send(self, *fields: str) -> None:
        """One datagram of ``KEY=value`` lines (a line must not contain a newline)."""
        if self._sock is None:
            return
        # systemd gone or its queue full: nothing useful to do about it.
        with contextlib.suppress(OSError):
            self._sock.sendto("\n".join(fields).encode(), self._address)

    def close(self) -> None:
        if self._sock is not None:
            self._sock.close()
            self._sock = None


def _watchdog_interval(env: Mapping[str, str]) -> float | None:
    """Seconds between pings, or None when systemd does not watch this process.

    WATCHDOG_PID names the process systemd expects pings from; a child that
    inherited the environment must not ping on its parent's behalf.
    """
    usec, pid = env.get("WATCHDOG_USEC", ""), env.get("WATCHDOG_PID", "")
    if not usec.isdigit() or int(usec) == 0:
        return None
    if pid and pid != str(os.getpid()):
        return None
    # systemd wants a ping at least every WATCHDOG_USEC; half of it leaves slack
    # for a busy loop, as sd_watchdog_enabled(3) recommends.
    return int(usec) / 2e6
