"""Blocking probes of a running daemon, for hypothesis properties (tests/test_fuzz_*.py).

Each fuzz module runs one ``relay serve`` for all its properties; after every
property :class:`Watch` proves the daemon unharmed: it still answers
``/healthz``, its open fds and live Trio tasks are back to what they were before
the property, and its log has no traceback. Blocking sockets, not httpx: a fuzz
request is arbitrary bytes, which no HTTP client will send.
"""

from __future__ import annotations

import socket
import time
from dataclasses import dataclass, field

from relay.testing.daemon import Daemon

MAX_HEAD = 64 * 1024


def raw_exchange(port: int, data: bytes, *, timeout: float = 10) -> int | None:
    """Send ``data`` on a fresh connection, half-close, and return the status of the
    first response (None if the server closed without one, which is a fair answer
    to bytes that are not HTTP). Raises ``TimeoutError`` if no answer comes."""
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as sock:
        try:
            sock.sendall(data)
            sock.shutdown(socket.SHUT_WR)
        except (BrokenPipeError, ConnectionResetError):
            pass  # refused before it read everything; what it answered is below
        head = b""
        try:
            while b"\r\n" not in head and len(head) < MAX_HEAD:
                chunk = sock.recv(65536)
                if not chunk:
                    break
                head += chunk
        except ConnectionResetError:
            pass
    if not head:
        return None
    line = head.split(b"\r\n", 1)[0].split()
    if len(line) < 2 or not line[0].startswith(b"HTTP/1.") or not line[1].isdigit():
        raise AssertionError(f"not an HTTP response: {head[:200]!r}")
    return int(line[1])


def http_get(port: int, path: str, *, timeout: float = 10) -> tuple[int, str]:
    """A plain GET (Connection: close); the status and the body."""
    request = f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n".encode()
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as sock:
        sock.sendall(request)
        data = b""
        while chunk := sock.recv(65536):
            data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    return int(head.split()[1]), body.decode("utf-8", "replace")


def scrape(port: int, name: str) -> float:
    """The value of the first sample of metric ``name`` (with or without labels)."""
    status, text = http_get(port, "/metrics")
    assert status == 200, status
    for line in text.splitlines():
        if line.startswith((name + " ", name + "{")):
            return float(line.rsplit(" ", 1)[1])
    raise AssertionError(f"{name} not in /metrics")


def samples(port: int, name: str) -> dict[str, float]:
    """Every sample of ``name``, keyed by its label text (``""`` when it has none)."""
    status, text = http_get(port, "/metrics")
    assert status == 200, status
    out: dict[str, float] = {}
    for line in text.splitlines():
        if line.startswith((name + " ", name + "{")):
            key, value = line.rsplit(" ", 1)
            out[key[len(name) :]] = float(value)
    return out


@dataclass
class Watch:
    """Baseline of one daemon, and the check run after every property."""

    daemon: Daemon
    fds: int = 0
    tasks: float = 0
    log_offset: int = 0
    expected_tracebacks: int = 0
    history: list[str] = field(default_factory=list)

    def settled(self) -> tuple[int, float]:
        """(fds, tasks), the least of a few scrapes: each scrape's own connection
        adds a task and an fd that end a moment later, which is noise, not a leak."""
        fds, tasks = [], []
        for _ in range(3):
            tasks.append(scrape(self.daemon.port, "relay_trio_tasks"))
            fds.append(self.daemon.fd_count())
            time.sleep(0.05)
        return min(fds), min(tasks)

    def baseline(self) -> None:
        self.fds, self.tasks = self.settled()
        self.log_offset = len(self.daemon.log_text())

    def check(self, label: str, *, timeout: float = 15) -> None:
        """Assert the daemon is back to its baseline (waiting up to ``timeout`` for
        sessions the property ended to finish closing)."""
        status, _ = http_get(self.daemon.port, "/healthz")
        assert status == 200, f"{label}: /healthz answered {status}"
        deadline = time.monotonic() + timeout
        while True:
            fds, tasks = self.settled()
            if (fds <= self.fds and tasks <= self.tasks) or time.monotonic() > deadline:
                break
            time.sleep(0.2)
        self.history.append(f"{label}: fds {self.fds}->{fds}, tasks {self.tasks:.0f}->{tasks:.0f}")
        assert fds <= self.fds, f"{label}: open fds {fds} > baseline {self.fds}"
        assert tasks <= self.tasks, f"{label}: trio tasks {tasks} > baseline {self.tasks}"
        log = self.daemon.log_text()
        assert "Traceback" not in log, f"{label}: traceback in the daemon log:\n{log[-4000:]}"
