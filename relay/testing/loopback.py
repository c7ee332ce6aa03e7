"""Serve an ASGI app on a local port for the length of an ``async with`` block:
the way every HTTP fake in :mod:`relay.testing` listens."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import trio
from hypercorn.config import Config
from hypercorn.trio import serve


@asynccontextmanager
async def serving(app: Any, *, host: str = "127.0.0.1", port: int = 0) -> AsyncIterator[str]:
    """Yields the base URL (``http://host:port``); port 0 takes any free one."""
    config = Config()
    config.bind = [f"{host}:{port}"]
    config.loglevel = "WARNING"  # a fake's requests are the test's business, not the log's
    config.accesslog = None
    async with trio.open_nursery() as nursery:
        binds: list[str] = await nursery.start(serve, app, config)
        try:
            yield binds[0]
        finally:
            nursery.cancel_scope.cancel()
