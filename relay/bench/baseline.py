"""A deliberately naive Twilio ⇄ Realtime relay on our stack, for `relay bench --baseline`.

Hypercorn + a Quart-Trio ``websocket`` route + a trio-websocket upstream, one
``json.loads`` per message and ``json.dumps`` for what it sends: what someone
would write in an afternoon. No signature check, no marks bookkeeping, no
barge-in, no metrics, no logs. It exists only so that every bench report
carries the ratio to it, measured in the same run on the same machine.

    python -m relay.bench.baseline --upstream ws://127.0.0.1:PORT/v1/realtime
"""

from __future__ import annotations

import argparse
import json
import logging
from typing import Any

import hypercorn.trio
import trio
import trio_websocket
from hypercorn.config import Config
from quart import websocket
from quart_trio import QuartTrio


def create_app(upstream: str) -> Any:
    app = QuartTrio(__name__)

    @app.websocket("/twilio/media")
    async def media() -> None:
        await websocket.accept()
        async with trio_websocket.open_websocket_url(upstream + "?model=gpt-realtime") as up:
            state: dict[str, Any] = {"sid": None, "n": 0}

            async def from_twilio() -> None:
                while True:
                    event = json.loads(await websocket.receive())
                    kind = event["event"]
                    if kind == "media":
                        await up.send_message(
                            json.dumps(
                                {
                                    "type": "input_audio_buffer.append",
                                    "audio": event["media"]["payload"],
                                }
                            )
                        )
                    elif kind == "start":
                        state["sid"] = event["start"]["streamSid"]
                        await up.send_message(
                            json.dumps({"type": "session.update", "session": {"type": "realtime"}})
                        )
                        await up.send_message(json.dumps({"type": "response.create"}))
                    elif kind == "stop":
                        nursery.cancel_scope.cancel()
                        return

            async def to_twilio() -> None:
                while True:
                    event = json.loads(await up.get_message())
                    if event["type"] == "response.output_audio.delta":
                        state["n"] += 1
                        sid = state["sid"]
                        await websocket.send(
                            json.dumps(
                                {
                                    "event": "media",
                                    "streamSid": sid,
                                    "media": {"payload": event["delta"]},
                                }
                            )
                        )
                        await websocket.send(
                            json.dumps(
                                {
                                    "event": "mark",
                                    "streamSid": sid,
                                    "mark": {"name": str(state["n"])},
                                }
                            )
                        )

            async with trio.open_nursery() as nursery:
                nursery.start_soon(from_twilio)
                nursery.start_soon(to_twilio)

    return app


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Naive same-stack relay (bench baseline).")
    parser.add_argument("--upstream", required=True, help="ws://host:port/v1/realtime")
    parser.add_argument("--port", type=int, default=0)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    config = Config()
    config.bind = [f"127.0.0.1:{args.port}"]
    config.accesslog = None
    config.errorlog = logging.getLogger("hypercorn.error")

    async def serve() -> None:
        async with trio.open_nursery() as nursery:
            binds = await nursery.start(hypercorn.trio.serve, create_app(args.upstream), config)
            for bind in binds:
                print(f"listening on {bind}", flush=True)

    trio.run(serve)


if __name__ == "__main__":
    main()
