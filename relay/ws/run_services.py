"""One service object per Trio run, its ``run()`` a system task (the liveness
sweeper, the reactor): created on first use, gone with the run."""

from __future__ import annotations

from collections.abc import Callable
from typing import Protocol, TypeVar

import trio


class Service(Protocol):
    async def run(self) -> None: ...


S = TypeVar("S", bound=Service)


def service(var: trio.lowlevel.RunVar[S], make: Callable[[], S], name: str) -> S:
    """This run's ``var``, made and started as a system task named ``name`` on
    first use. The daemon asks before it listens, so each task is part of the
    baseline task count."""
    try:
        return var.get()
    except LookupError:
        found = make()
        var.set(found)
        trio.lowlevel.spawn_system_task(found.run, name=name)
        return found
