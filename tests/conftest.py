from __future__ import annotations

import os
import shutil
from collections.abc import AsyncIterator, Callable
from contextlib import AbstractAsyncContextManager
from typing import Any

import pytest

from relay.testing.daemon import Daemon, running_daemon

DaemonFactory = Callable[..., AbstractAsyncContextManager[Daemon]]


@pytest.fixture(params=["fast_path", "pumps_only"])
def fast_path(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> bool:
    """Run a test against a daemon with the reactor's fast path on, then off
    (``RELAY_FAST_PATH=0``): both drivers of the session cores must carry every
    behaviour. Apply with ``pytestmark = pytest.mark.usefixtures("fast_path")``."""
    on: bool = request.param == "fast_path"
    monkeypatch.setenv("RELAY_FAST_PATH", "1" if on else "0")
    return on


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


def require_tool(name: str, install: str) -> str:
    """The path of a command-line tool a test drives. Missing: under CI (CI=true,
    as .ci/run runs the suite, after installing it) the test fails; elsewhere it
    skips and says how to install it."""
    path = shutil.which(name)
    if path is not None:
        return path
    message = f"{name} is not installed ({install})"
    if os.environ.get("CI") == "true":
        pytest.fail(message + ": .ci/run installs it")
    pytest.skip(message)


@pytest.fixture
def redis_server_installed() -> str:
    return require_tool("redis-server", "Debian: apt-get install redis-server")


@pytest.fixture
def systemd_analyze() -> str:
    return require_tool("systemd-analyze", "Debian: apt-get install systemd")


# Markers for tests that drive these tools (fail under CI when missing, else skip).
needs_redis = pytest.mark.usefixtures("redis_server_installed")
needs_analyze = pytest.mark.usefixtures("systemd_analyze")
