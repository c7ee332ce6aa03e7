"""relay.ws.pacer: the reactor's tick, on a real timerfd (through ``os`` on Python >= 3.13,
through ctypes before) and on the fallback. The ``os`` cases run only on Python >= 3.13
and are skipped, saying so, before. Only lower bounds on time are checked (a loaded
machine only makes ticks late)."""

from __future__ import annotations

import os
import sys

import pytest
import trio

from relay.ws.pacer import OS_TIMERFD, Backend, Pacer

INTERVAL = 0.02
LINUX = sys.platform.startswith("linux")
BACKENDS = [
    pytest.param(
        "os", marks=pytest.mark.skipif(not OS_TIMERFD, reason="os.timerfd_* is Python >= 3.13's")
    ),
    pytest.param("ctypes", marks=pytest.mark.skipif(not LINUX, reason="timerfd is Linux's")),
]


async def test_the_default_is_os_where_it_exists() -> None:
    pacer = Pacer(INTERVAL)
    try:
        assert type(pacer._timer).__name__ == ("_OsTimer" if OS_TIMERFD else "_CtypesTimer")
    finally:
        pacer.close()


@pytest.mark.parametrize("backend", [*BACKENDS, None])
async def test_ticks_come_one_interval_apart_while_started(backend: Backend | None) -> None:
    pacer = Pacer(INTERVAL, timerfd=backend is not None, backend=backend)
    try:
        assert pacer.uses_timerfd is (backend is not None)
        began = trio.current_time()
        pacer.start()
        for _ in range(3):
            await pacer.tick()
        assert trio.current_time() - began >= 3 * INTERVAL * 0.9
    finally:
        pacer.close()


@pytest.mark.parametrize("backend", [*BACKENDS, None])
async def test_a_late_tick_returns_at_once(backend: Backend | None) -> None:
    interval = 0.1  # long, so that "less than an interval" is a safe upper bound
    pacer = Pacer(interval, timerfd=backend is not None, backend=backend)
    try:
        pacer.start()
        await trio.sleep(1.5 * interval)  # a long pass: a tick was missed
        began = trio.current_time()
        await pacer.tick()
        assert trio.current_time() - began < 0.9 * interval
    finally:
        pacer.close()


@pytest.mark.parametrize("backend", BACKENDS)
async def test_stopped_timerfd_does_not_tick_and_close_frees_its_fd(backend: Backend) -> None:
    fds = len(os.listdir("/proc/self/fd"))
    pacer = Pacer(INTERVAL, backend=backend)
    assert pacer.uses_timerfd
    assert len(os.listdir("/proc/self/fd")) == fds + 1
    pacer.start()
    await pacer.tick()
    await trio.sleep(2 * INTERVAL)  # a tick is due, and stop drops it
    pacer.stop()
    with trio.move_on_after(4 * INTERVAL) as waited:
        await pacer.tick()
    assert waited.cancelled_caught
    pacer.start()  # and it starts again
    await pacer.tick()
    pacer.close()
    assert len(os.listdir("/proc/self/fd")) == fds


@pytest.mark.parametrize("backend", BACKENDS)
async def test_a_timer_that_cannot_be_set_falls_back_to_trio_sleep(
    caplog: pytest.LogCaptureFixture, backend: Backend
) -> None:
    pacer = Pacer(INTERVAL, backend=backend)
    read_end, write_end = os.pipe()
    try:
        # Fault injection: the pacer's fd replaced by one timerfd_settime refuses.
        os.dup2(read_end, pacer._fd)
        began = trio.current_time()  # ticks count from start()
        pacer.start()
        assert not pacer.uses_timerfd
        assert "timerfd_settime failed" in caplog.text
        await pacer.tick()
        await pacer.tick()
        assert trio.current_time() - began >= 2 * INTERVAL * 0.9
    finally:
        pacer.close()
        os.close(read_end)
        os.close(write_end)
