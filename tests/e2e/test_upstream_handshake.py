"""An upstream whose 101 picks an extension or subprotocol the relay never offered: the
client's upgrade is refused with 502 before accept, as for any failed upstream
(docs/contract.md §5). Against a raw local server, `relay serve` as a subprocess."""

from __future__ import annotations

import pytest
import trio
import trio_websocket

from relay.testing.daemon import running_daemon
from tests.helpers import client, raw_upstream


@pytest.mark.parametrize(
    "answer",
    [
        b"Sec-WebSocket-Extensions: permessage-deflate\r\n",
        b"Sec-WebSocket-Protocol: realtime\r\n",
    ],
)
async def test_unrequested_extension_or_subprotocol_is_502(answer: bytes) -> None:
    async with raw_upstream(answer) as port:
        config = {"openai": {"realtime_url": f"ws://127.0.0.1:{port}/v1/realtime"}}
        async with running_daemon(config) as d:
            with trio.fail_after(10), pytest.raises(trio_websocket.ConnectionRejected) as refused:
                async with client(d):
                    pass
            assert refused.value.status_code == 502
            assert refused.value.body is not None
            assert b"upstream handshake failed" in refused.value.body
