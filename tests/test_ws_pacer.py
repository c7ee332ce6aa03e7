"""relay.ws.pacer: the reactor's tick, on a real timerfd and on the fallback.
Only lower bounds on time are checked (a loaded machine only makes ticks late)."""

from __future__ import annotations

import os
import sys

import pytest
import trio

from relay.ws.pacer import Pacer

INTERVAL = 0.02


@pytest.mark.parametrize("timerfd", [True, False])
async def test_ticks_come_one_interval_apart_while_started(timerfd: bool) -> None:
    pacer = Pacer(INTERVAL, timerfd=timerfd)
    try:
        assert pacer.uses_timerfd is (timerfd and sys.platform.startswith("linux"))
        began = trio.current_time()
        pacer.start()
        for _ in range(3):
            await pacer.tick()
        assert trio.current_time() - began >= 3 * INTERVAL * 0.9
    finally:
        pacer.close()


@pytest.mark.parametrize("timerfd", [True, False])
async def test_a_late_tick_returns_at_once(timerfd: bool) -> None:
    interval = 0.1  # long, so that "less than an interval" is a safe upper bound
    pacer = Pacer(interval, timerfd=timerfd)
    try:
        pacer.start()
        await trio.sleep(1.5 * interval)  # a long pass: a tick was missed
        began = trio.current_time()
        await pacer.tick()
        assert trio.current_time() - began < 0.9 * interval
    finally:
        pacer.close()


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="timerfd is Linux's")
async def test_stopped_timerfd_does_not_tick_and_close_frees_its_fd() -> None:
    fds = len(os.listdir("/proc/self/fd"))
    pacer = Pacer(INTERVAL)
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


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="timerfd is Linux's")
async def test_a_timer_that_cannot_be_set_falls_back_to_trio_sleep(
    caplog: pytest.LogCaptureFixture,
) -> None:
    pacer = Pacer(INTERVAL)
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
