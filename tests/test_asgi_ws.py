"""relay.asgi_ws against the ASGI interface itself (the socket Hypercorn hands over
for an upgrade on a keep-alive connection; its refusals are tested end to end
in tests/test_listener.py)."""

from __future__ import annotations

from collections.abc import MutableMapping
from typing import Any

from relay.asgi_ws import AsgiWebSocket


async def test_send_texts_hands_asgi_one_text_message_each_in_order() -> None:
    sent: list[dict[str, Any]] = []

    async def send(message: MutableMapping[str, Any]) -> None:
        sent.append(dict(message))

    async def receive() -> MutableMapping[str, Any]:
        raise AssertionError("nothing is received here")

    ws = AsgiWebSocket({"type": "websocket", "headers": []}, receive, send)
    # What a Twilio call sends on its slow path: media and mark, pre-encoded JSON.
    await ws.send_texts((b'{"event":"media"}', '{"mark":"é"}'.encode()))
    assert sent == [
        {"type": "websocket.send", "text": '{"event":"media"}'},
        {"type": "websocket.send", "text": '{"mark":"é"}'},
    ]
