"""A Trio event loop in a background thread, for synchronous tests that drive async fakes.

Hypothesis runs ``@given`` examples synchronously, while the fakes, the simulated
Twilio caller and ``running_daemon`` are Trio code. Running them in one Trio loop
on a background thread lets a module-scoped fixture keep one daemon (and the
sessions a property must not disturb) alive across thousands of examples, each
example being a short ``portal.run(some_async_fn, ...)``.

    with trio_portal(lambda: running_daemon(cfg)) as (portal, daemon):
        portal.run(check, daemon)

The thread, the loop and the calls into it are anyio's ``BlockingPortal`` on the
trio backend. Async context managers that own a nursery (``twilio_call``,
``open_websocket``) must be entered and exited by the same task; :meth:`Portal.hold`
runs each in a task of its own that lives until :meth:`Held.release`.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from contextlib import AbstractAsyncContextManager, asynccontextmanager, contextmanager
from dataclasses import dataclass, field
from typing import Any, Generic, TypeVar

import trio
from anyio.from_thread import BlockingPortal, start_blocking_portal

T = TypeVar("T")
R = TypeVar("R")


@dataclass
class Held(Generic[T]):
    """A resource whose context is held open by a task in the portal's nursery."""

    value: T
    _release: trio.Event = field(default_factory=trio.Event)
    _done: trio.Event = field(default_factory=trio.Event)
    error: BaseException | None = None

    async def release(self) -> None:
        """Exit the context (in its own task) and wait until it has."""
        self._release.set()
        await self._done.wait()
        if self.error is not None:
            raise self.error


class Portal:
    def __init__(self, portal: BlockingPortal, nursery: trio.Nursery) -> None:
        self.portal = portal
        self.nursery = nursery  # for tasks started from the loop; cancelled on exit

    def run(self, afn: Callable[..., Awaitable[R]], *args: Any, timeout: float = 30) -> R:
        """Run ``afn(*args)`` in the loop, from the test's thread; bounded, so a hang
        in the daemon fails the example instead of freezing the suite."""

        async def bounded() -> R:
            with trio.fail_after(timeout):
                return await afn(*args)

        return self.portal.call(bounded)

    async def hold(self, factory: Callable[[], AbstractAsyncContextManager[T]]) -> Held[T]:
        """Enter ``factory()`` in a new task of the portal's nursery (call from the loop)."""

        async def holder(task_status: trio.TaskStatus[Held[T]]) -> None:
            held: Held[T] | None = None
            try:
                async with factory() as value:
                    held = Held(value)
                    task_status.started(held)
                    await held._release.wait()
            except Exception as exc:  # reported to whoever releases it
                if held is None:
                    raise
                held.error = exc
            finally:
                if held is not None:
                    held._done.set()

        result: Held[T] = await self.nursery.start(holder)
        return result


@asynccontextmanager
async def _cancelled_on_exit() -> AsyncIterator[trio.Nursery]:
    async with trio.open_nursery() as nursery:
        yield nursery
        nursery.cancel_scope.cancel()


@contextmanager
def trio_portal(
    setup: Callable[[], AbstractAsyncContextManager[T]],
) -> Iterator[tuple[Portal, T]]:
    """Run ``setup()`` in a Trio loop on a new thread; yield a portal and its value.

    On exit every held resource is cancelled, the context exits and the thread
    ends; an exception from the loop is re-raised here."""
    with (
        start_blocking_portal("trio") as portal,
        portal.wrap_async_context_manager(setup()) as value,
        portal.wrap_async_context_manager(_cancelled_on_exit()) as nursery,
    ):
        yield Portal(portal, nursery), value
