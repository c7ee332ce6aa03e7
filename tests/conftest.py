from __future__ import annotations

import os
from collections.abc import AsyncIterator, Callable
from contextlib import AbstractAsyncContextManager
from typing import Any

import pytest

from relay.testing.daemon import Daemon, running_daemon

DaemonFactory = Callable[..., AbstractAsyncContextManager[Daemon]]


@pytest.fixture
def start_daemon() -> DaemonFactory:
    """``async with start_daemon({"limits": {...}}) as d:`` runs ``relay serve`` as a subprocess."""
    return running_daemon


@pytest.fixture
async def daemon() -> AsyncIterator[Daemon]:
    async with running_daemon() as d:
        yield d


def open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


def pytest_report_header(config: Any) -> str:
    return "relay: end-to-end tests start `relay serve` as a subprocess on 127.0.0.1"
