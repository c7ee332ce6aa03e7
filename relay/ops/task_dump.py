"""The daemon's live Trio tasks: counted for ``/metrics`` (``relay_trio_tasks``),
listed in the log on SIGUSR1 with where each one waits.

Why a listing: a task count that grows says there is a leak, not whose; the
listing names it without a debugger on a production host.
"""

from __future__ import annotations

import logging
import os
import signal
from collections.abc import Iterator

import trio

log = logging.getLogger("relay.tasks")

_TRIO_DIR = os.path.dirname(trio.__file__)


def walk() -> Iterator[trio.lowlevel.Task]:
    """Every live task of this run, system tasks included."""
    stack = [trio.lowlevel.current_root_task()]
    while stack:
        task = stack.pop()
        if task is None:
            continue
        yield task
        for nursery in task.child_nurseries:
            stack.extend(nursery.child_tasks)


def count() -> int:
    return sum(1 for _ in walk())


def describe(task: trio.lowlevel.Task) -> str:
    """``name  waits in file:line function`` (innermost frames outside Trio, up to 3)."""
    frames = [
        f"{os.path.basename(frame.f_code.co_filename)}:{lineno} {frame.f_code.co_name}"
        for frame, lineno in task.iter_await_frames()
        if not frame.f_code.co_filename.startswith(_TRIO_DIR)
    ]
    return f"{task.name}  waits in {' < '.join(reversed(frames[-3:])) or '?'}"


async def dump_on_signal() -> None:
    """Log every live task each time SIGUSR1 arrives."""
    with trio.open_signal_receiver(signal.SIGUSR1) as signals:
        async for _ in signals:
            lines = sorted(describe(task) for task in walk())
            log.info("task dump: %d live tasks", len(lines))
            for line in lines:
                log.info("task: %s", line)
