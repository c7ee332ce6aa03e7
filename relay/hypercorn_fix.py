"""A fix for Hypercorn's WebSocket message buffer (seen in 0.17 to 0.18), applied at import.

Hypercorn closes a peer that sends an oversized message with 1009, but keeps the
refused message's buffer: the next message of the other type (text after binary
or the reverse) raises ``TypeError`` inside Hypercorn's connection task, which
takes down the whole server; and the application is never told, so the session
behind the socket lingers until the TCP connection goes. Here the rest of a
refused message is dropped and the application gets a ``websocket.disconnect``
with code 1009 when that message ends (or the usual disconnect when the peer
answers the close first).

Hypercorn builds the buffer from the module global ``WebsocketBuffer``; replacing
that global is the only hook it offers. Remove this module once Hypercorn resets
the buffer itself (tests/test_e2e_client.py::test_oversize_then_other_type holds
the behaviour either way).
"""

from __future__ import annotations

from typing import Any

from hypercorn.protocol import ws_stream

_Original = ws_stream.WebsocketBuffer


class BoundedWebsocketBuffer(_Original):
    _refused = False

    def extend(self, event: Any) -> None:
        if self._refused:
            return
        try:
            super().extend(event)
        except ws_stream.FrameTooLargeError:
            self._refused = True
            self.value = None
            raise

    def to_message(self) -> dict[str, Any]:
        if self._refused:
            return {"type": "websocket.disconnect", "code": 1009}
        message: dict[str, Any] = super().to_message()
        return message


def apply() -> None:
    """Install the fixed buffer (idempotent)."""
    ws_stream.WebsocketBuffer = BoundedWebsocketBuffer  # type: ignore[misc]
