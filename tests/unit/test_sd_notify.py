"""sd_notify: the Notifier against sockets the test binds, and `relay serve` against a fake
NOTIFY_SOCKET: READY=1, STATUS= with live counts, WATCHDOG=1 pings, STOPPING=1, in order."""

from __future__ import annotations

import itertools
import os
import signal
import socket
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
import trio
import trio_websocket

from relay.admission.tokens import mint
from relay.config import decode_encryption_key
from relay.ops.sd_notify import Notifier
from relay.testing.daemon import TEST_OPENAI_KEY, daemon_env, running_daemon
from relay.testing.fake_realtime import fake_realtime


@pytest.fixture
def receiver(tmp_path: Path) -> Iterator[tuple[socket.socket, str]]:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    path = str(tmp_path / "notify")
    sock.bind(path)
    sock.settimeout(5)
    yield sock, path
    sock.close()


def test_sends_one_datagram_of_lines_to_a_path_socket(
    receiver: tuple[socket.socket, str],
) -> None:
    sock, path = receiver
    notifier = Notifier({"NOTIFY_SOCKET": path})
    assert notifier.enabled
    notifier.send("READY=1", "STATUS=serving")
    assert sock.recv(4096) == b"READY=1\nSTATUS=serving"
    notifier.close()
    notifier.send("STOPPING=1")  # after close: a no-op, not an error
    assert not notifier.enabled


def test_abstract_socket_name_starts_with_at() -> None:
    name = f"relay-test-{uuid.uuid4().hex}"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.bind("\0" + name)
        sock.settimeout(5)
        notifier = Notifier({"NOTIFY_SOCKET": "@" + name})
        notifier.send("WATCHDOG=1")
        assert sock.recv(4096) == b"WATCHDOG=1"
        notifier.close()


@pytest.mark.parametrize("address", ["", "vsock:2:1234"])
def test_no_usable_socket_means_silent_no_ops(address: str) -> None:
    notifier = Notifier({"NOTIFY_SOCKET": address, "WATCHDOG_USEC": "200000"})
    assert not notifier.enabled
    # Nothing to ping, so no watchdog task either.
    assert notifier.watchdog_interval is None
    notifier.send("READY=1")
    notifier.close()


def test_environment_is_read_by_default(
    receiver: tuple[socket.socket, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    sock, path = receiver
    monkeypatch.setenv("NOTIFY_SOCKET", path)
    monkeypatch.setenv("WATCHDOG_USEC", "3000000")
    monkeypatch.delenv("WATCHDOG_PID", raising=False)
    notifier = Notifier()
    assert notifier.watchdog_interval == 1.5
    notifier.send("READY=1")
    assert sock.recv(4096) == b"READY=1"
    notifier.close()


@pytest.mark.parametrize(
    ("usec", "pid", "interval"),
    [
        ("200000", None, 0.1),  # systemd sets no WATCHDOG_PID for the main process
        ("200000", "self", 0.1),
        ("200000", "other", None),  # the pings are another process's job
        ("0", None, None),
        ("", None, None),
        ("soon", None, None),
        ("-5", None, None),
    ],
)
def test_watchdog_interval_is_half_of_watchdog_usec_for_our_pid(
    receiver: tuple[socket.socket, str], usec: str, pid: str | None, interval: float | None
) -> None:
    env = {"NOTIFY_SOCKET": receiver[1], "WATCHDOG_USEC": usec}
    if pid is not None:
        env["WATCHDOG_PID"] = str(os.getpid() if pid == "self" else os.getpid() + 1)
    notifier = Notifier(env)
    assert notifier.watchdog_interval == interval
    notifier.close()


def test_a_gone_or_full_receiver_never_raises_or_blocks(tmp_path: Path) -> None:
    path = str(tmp_path / "notify")
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.bind(path)
        notifier = Notifier({"NOTIFY_SOCKET": path})
        # Never read: the receive queue fills (a few hundred datagrams at most) and a
        # blocking send would hang this test instead of dropping the datagram.
        for _ in range(5000):
            notifier.send("WATCHDOG=1")
    os.unlink(path)
    notifier.send("WATCHDOG=1")  # nobody there: ECONNREFUSED/ENOENT swallowed
    notifier.close()


# -- end to end ----------------------------------------------------------------


async def test_daemon_notifies_ready_status_watchdog_stopping_in_order(tmp_path: Path) -> None:
    path = str(tmp_path / "notify")
    sock = trio.socket.socket(trio.socket.AF_UNIX, trio.socket.SOCK_DGRAM)
    await sock.bind(path)
    datagrams: list[str] = []
    times: list[float] = []
    arrived = trio.Event()

    async def collect() -> None:
        nonlocal arrived
        while True:
            datagrams.append((await sock.recv(65536)).decode())
            times.append(trio.current_time())
            arrived.set()
            arrived = trio.Event()

    async def until(predicate: str, count: int = 1, timeout: float = 10) -> None:
        with trio.fail_after(timeout):
            while sum(predicate in d for d in datagrams) < count:
                await arrived.wait()

    # 200 ms watchdog: a ping every 100 ms.
    env = daemon_env(NOTIFY_SOCKET=path, WATCHDOG_USEC="200000")
    async with (
        fake_realtime(expected_key=TEST_OPENAI_KEY, echo=True) as fake,
        trio.open_nursery() as nursery,
    ):
        nursery.start_soon(collect)
        config = {"openai": {"realtime_url": fake.url}}
        async with running_daemon(config, env=env) as d:
            await until("READY=1")
            ready_at = next(i for i, m in enumerate(datagrams) if "READY=1" in m)
            assert "STATUS=serving: 0 client, 0 twilio sessions" in datagrams[ready_at]

            # A live session shows in STATUS=, and its end too.
            token = mint(decode_encryption_key(d.env["ENCRYPTION_KEY"]), 60)
            async with trio_websocket.open_websocket_url(
                f"{d.ws_url}/token/{token}", extra_headers=[(b"Origin", b"http://localhost:1")]
            ) as ws:
                await ws.send_message("ping")
                assert await ws.get_message() == "ping"
                await until("STATUS=serving: 1 client")
            await until("STATUS=serving: 0 client", count=2)

            watchdogs_before = sum("WATCHDOG=1" in m for m in datagrams)
            await until("WATCHDOG=1", count=watchdogs_before + 5, timeout=5)
            d.signal(signal.SIGTERM)
            assert await d.wait() == 0
        await trio.sleep(0.1)  # let the last datagrams in
        nursery.cancel_scope.cancel()
    sock.close()

    kinds = [_kind(m) for m in datagrams]
    print("sd_notify datagrams:", kinds)
    ready = kinds.index("READY")
    stopping = kinds.index("STOPPING")
    assert kinds.count("READY") == 1 and kinds.count("STOPPING") == 1
    assert ready < stopping
    # Pings keep coming between READY and STOPPING (the loop was alive) ...
    assert kinds[ready:stopping].count("WATCHDOG") >= 3
    # ... and STOPPING=1 says why in the same datagram.
    assert "STATUS=draining" in datagrams[stopping]
    # Half of WATCHDOG_USEC apart (the median shrugs off a stall on a busy machine).
    pings = [t for t, k in zip(times, kinds, strict=True) if k == "WATCHDOG"]
    gaps = sorted(b - a for a, b in itertools.pairwise(pings))
    assert 0.08 <= gaps[len(gaps) // 2] <= 0.3, gaps


def _kind(datagram: str) -> str:
    first = datagram.split("\n", 1)[0]
    return {"READY=1": "READY", "WATCHDOG=1": "WATCHDOG", "STOPPING=1": "STOPPING"}.get(
        first, first.split("=", 1)[0]
    )
