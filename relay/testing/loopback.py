"""Serve an ASGI app on a local port for the length of an ``async with`` block:
the way every HTTP fake in :mod:`relay.testing` listens. The app sees only
``http`` scopes: the server's lifespan messages are answered here."""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from typing import Any

import trio
from hypercorn.config import Config
from hypercorn.trio import serve

Receive = Callable[[], Awaitable[Any]]
Send = Callable[[Any], Awaitable[None]]


@asynccontextmanager
async def serving(app: Any, *, host: str = "127.0.0.1", port: int = 0) -> AsyncIterator[str]:
    """Yields the base URL (``http://host:port``); port 0 takes any free one."""

    async def http_only(scope: Any, receive: Receive, send: Send) -> None:
        if scope["type"] == "lifespan":
            while True:
                event = await receive()
                if event["type"] == "lifespan.startup":
                    await send({"type": "lifespan.startup.complete"})
                elif event["type"] == "lifespan.shutdown":
                    await send({"type": "lifespan.shutdown.complete"})
                    return
        if scope["type"] == "http":
            await app(scope, receive, send)

    config = Config()
    config.bind = [f"{host}:{port}"]
    config.loglevel = "WARNING"  # a fake's requests are the test's business, not the log's
    config.accesslog = None
    async with trio.open_nursery() as nursery:
        binds: list[str] = await nursery.start(serve, http_only, config)
        try:
            yield binds[0]
        finally:
            nursery.cancel_scope.cancel()
