"""relay.edge.asgi_ws against the ASGI interface itself (the socket Hypercorn hands over
for an upgrade on a keep-alive connection; its refusals are tested end to end
in tests/unit/test_router.py)."""

from __future__ import annotations

from collections.abc import MutableMapping
from typing import Any

from hypercorn.protocol.ws_stream import FrameTooLargeError
from hypothesis import given, settings
from hypothesis import strategies as st
from wsproto import ConnectionType
from wsproto.connection import Connection
from wsproto.events import BytesMessage
from wsproto.frame_protocol import FrameProtocol

from relay.edge.asgi_ws import AsgiWebSocket, head_size
from relay.edge.hypercorn_fix import BoundedWebsocketBuffer
from relay.ws.frames import FRAGMENT_COST


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


@settings(max_examples=200, deadline=None)
@given(
    st.integers(1, 3000),
    st.lists(st.integers(0, 3000), min_size=1, max_size=40),
    st.integers(1, 5000),
)
def test_hypercorn_buffer_fragment_budget_is_exact(
    limit: int, sizes: list[int], chunk: int
) -> None:
    """The Hypercorn path counts a message as relay.ws.frames does: payload plus
    FRAGMENT_COST per frame after the first, however wsproto splits the frames
    into events as their bytes arrive."""
    client = FrameProtocol(client=True, extensions=[])
    wire = b"".join(
        client.send_data(b"x" * n, fin=i == len(sizes) - 1) for i, n in enumerate(sizes)
    )
    server = Connection(ConnectionType.SERVER)
    buffer = BoundedWebsocketBuffer(limit)
    cost = sum(sizes) + FRAGMENT_COST * (len(sizes) - 1)
    finished = False
    try:
        for i in range(0, len(wire), chunk):
            server.receive_data(wire[i : i + chunk])
            for event in server.events():
                assert isinstance(event, BytesMessage)
                buffer.extend(event)
                finished = event.message_finished
    except FrameTooLargeError:
        assert cost > limit
        return
    assert cost <= limit and finished
    assert buffer.to_message()["bytes"] == b"x" * sum(sizes)


def test_head_size_is_what_the_wire_carried() -> None:
    head = b"GET /token/t/realtime?a=b HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\n\r\n"
    scope = {
        "raw_path": b"/token/t/realtime",
        "query_string": b"a=b",
        "headers": [(b"host", b"x"), (b"upgrade", b"websocket")],
    }
    assert head_size(scope) == len(head)
