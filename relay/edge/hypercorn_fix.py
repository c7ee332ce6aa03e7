"""A fix for Hypercorn's WebSocket message buffer (seen in 0.17 to 0.18), applied at import.

Hypercorn closes a peer that sends an oversized message with 1009, but keeps the
refused message's buffer: the next message of the other type (text after binary
or the reverse) raises ``TypeError`` inside Hypercorn's connection task, which
takes down the whole server; and the application is never told, so the session
behind the socket lingers until the TCP connection goes. Here the rest of a
refused message is dropped and the application gets a ``websocket.disconnect``
with code 1009 when that message ends (or the usual disconnect when the peer
answers the close first).

The same buffer counts each frame of a message after the first as
``FRAGMENT_COST`` bytes on top of its payload, and a stream subclass closes a
peer that sends more than ``CONTROL_BUDGET`` pings/pongs in ``CONTROL_WINDOW``
seconds with 1008: the budgets of ``relay.ws.frames`` (docs/contract.md §10),
held on this path too (an upgrade on a keep-alive connection lands here).

Hypercorn builds the buffer from the module global ``WebsocketBuffer`` and the
stream from ``WSStream`` as imported by its HTTP/1.1 protocol; replacing those
globals is the only hook it offers. Remove this module once Hypercorn resets
the buffer itself (tests/e2e/test_client.py::test_oversize_then_other_type holds
the behaviour either way).
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

from hypercorn.protocol import h11 as hypercorn_h11
from hypercorn.protocol import ws_stream
from wsproto.events import CloseConnection, Event, Ping, Pong

from relay.ws.frames import FRAGMENT_COST, ControlBudget

_Original = ws_stream.WebsocketBuffer


class BoundedWebsocketBuffer(_Original):
    _refused = False
    _frame_done = False  # the last event ended a frame of the message being built

    def extend(self, event: Any) -> None:
        if self._refused:
            return
        if self._frame_done:  # wsproto gives a frame in pieces as it arrives
            self.length += FRAGMENT_COST
        self._frame_done = event.frame_finished
        try:
            super().extend(event)
        except ws_stream.FrameTooLargeError:
            self._refused = True
            self.value = None
            raise

    def clear(self) -> None:
        super().clear()
        self._frame_done = False

    def to_message(self) -> dict[str, Any]:
        if self._refused:
            return {"type": "websocket.disconnect", "code": 1009}
        message: dict[str, Any] = super().to_message()
        return message


class BudgetedWSStream(ws_stream.WSStream):
    """Hypercorn's WebSocket stream with the control-frame budget, and the
    application told at once when a budget closes the connection (a message
    refused as too big may never end: a run of fragments)."""

    _budget: ControlBudget | None = None
    _over = False  # the control budget is spent
    _told = False  # the application has its disconnect: nothing more goes to it

    async def _handle_events(self) -> None:
        connection = self.connection
        events = connection.events
        connection.events = self._budgeted(events)  # type: ignore[method-assign]
        try:
            await super()._handle_events()
        finally:
            connection.events = events  # type: ignore[method-assign]
        refused = isinstance(self.buffer, BoundedWebsocketBuffer) and self.buffer._refused
        if (self._over or refused) and not self._told and self.app_put is not None:
            self._told = True
            if self._over:
                await self._send_wsproto_event(
                    CloseConnection(code=1008, reason="too many control frames")
                )
            await self.app_put(
                {"type": "websocket.disconnect", "code": 1008 if self._over else 1009}
            )

    def _budgeted(self, events: Any) -> Any:
        def gen() -> Iterator[Event]:
            for event in events():
                if self._over or self._told:
                    if isinstance(event, CloseConnection):
                        yield event  # the peer's answer to our close
                    continue
                if isinstance(event, (Ping, Pong)):
                    if self._budget is None:
                        self._budget = ControlBudget()
                    if self._budget.spend():
                        self._over = True
                        continue
                yield event

        return gen


def apply() -> None:
    """Install the fixed buffer and stream (idempotent)."""
    ws_stream.WebsocketBuffer = BoundedWebsocketBuffer  # type: ignore[misc]
    setattr(hypercorn_h11, "WSStream", BudgetedWSStream)  # noqa: B010
