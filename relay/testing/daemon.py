"""Run ``relay serve`` as a real subprocess for end-to-end tests and benchmarks.

    async with running_daemon({"limits": {"http_per_minute": 5}}, env=...) as d:
        httpx.get(d.http_url + "/healthz")

The daemon binds port 0; its "listening on" log line tells the real port.
Its whole log is kept in a file so tests can grep it (e.g. for secrets).
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import tempfile
from collections.abc import AsyncIterator, Mapping
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import trio

from relay.admission.tokens import new_key

TEST_OPENAI_KEY = "sk-test-relay-openai-key-0123456789"
TEST_TWILIO_SID = "AC" + "0" * 31 + "1"
TEST_TWILIO_TOKEN = "twilio-auth-token-for-tests-0123"


def toml_dumps(data: Mapping[str, Mapping[str, Any]]) -> str:
    """Enough TOML for relay configs: tables of strings, numbers, bools, lists and
    inline tables (``http_tools = [{...}]`` is an array of tables)."""

    def value(v: Any) -> str:
        if isinstance(v, bool):
            return "true" if v else "false"
        if isinstance(v, int | float):
            return repr(v)
        if isinstance(v, list | tuple):
            return "[" + ", ".join(value(x) for x in v) + "]"
        if isinstance(v, Mapping):
            return "{" + ", ".join(f"{value(k)} = {value(x)}" for k, x in v.items()) + "}"
        s = str(v).replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")
        return f'"{s}"'

    out = []
    for section, values in data.items():
        out.append(f"[{section}]")
        out.extend(f"{k} = {value(v)}" for k, v in values.items())
        out.append("")
    return "\n".join(out)


def daemon_config(
    overrides: Mapping[str, Mapping[str, Any]] | None = None,
) -> dict[str, dict[str, Any]]:
    """A config for tests: port 0, generous limits, short drain; ``overrides`` win per key.

    Tests and benchmarks open many sessions from 127.0.0.1 with one token, so
    the session caps are off or far away unless a test sets them.
    """
    base: dict[str, dict[str, Any]] = {
        "server": {"bind": ["127.0.0.1:0"], "drain_seconds": 2, "log_level": "info"},
        "limits": {
            "http_per_minute": 100000,
            "ws_upgrades_per_minute": 100000,
            "sessions_per_ip": 100000,
            "max_sessions": 100000,
        },
        "auth": {"sessions_per_token": 0},
        "openai": {"connect_timeout_seconds": 3},
    }
    for section, values in (overrides or {}).items():
        base.setdefault(section, {}).update(values)
    return base


def daemon_env(**extra: str) -> dict[str, str]:
    env = {
        k: v
        for k, v in os.environ.items()
        if k
        not in (
            "OPENAI_API_KEY",
            "ENCRYPTION_KEY",
            "TWILIO_ACCOUNT_SID",
            "TWILIO_AUTH_TOKEN",
            "CREDENTIALS_DIRECTORY",
            "NOTIFY_SOCKET",
        )
    }
    env.update(
        OPENAI_API_KEY=TEST_OPENAI_KEY,
        ENCRYPTION_KEY=new_key(),
        TWILIO_ACCOUNT_SID=TEST_TWILIO_SID,
        TWILIO_AUTH_TOKEN=TEST_TWILIO_TOKEN,
        PYTHONUNBUFFERED="1",
    )
    env.update(extra)
    return env


@dataclass
class Daemon:
    proc: trio.Process
    port: int
    log_path: Path
    env: dict[str, str]
    config_path: Path

    @property
    def http_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def ws_url(self) -> str:
        return f"ws://127.0.0.1:{self.port}"

    @property
    def pid(self) -> int:
        return self.proc.pid

    def log_text(self) -> str:
        return self.log_path.read_text(errors="replace")

    def fd_count(self) -> int:
        return len(os.listdir(f"/proc/{self.pid}/fd"))

    def rss_kib(self) -> int:
        for line in Path(f"/proc/{self.pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
        raise RuntimeError("no VmRSS")

    def signal(self, sig: int = signal.SIGTERM) -> None:
        self.proc.send_signal(sig)

    async def wait(self, timeout: float = 30) -> int:
        with trio.fail_after(timeout):
            return await self.proc.wait()


_LISTENING = re.compile(r"listening on http://[^\s\"]+:(\d+)")


async def _wait_for_port(proc: trio.Process, log_path: Path, timeout: float) -> int:
    """The port from the daemon's "listening on" line (text or JSON log format)."""
    with trio.fail_after(timeout):
        while True:
            text = log_path.read_text(errors="replace")
            found = _LISTENING.search(text)
            if found:
                return int(found.group(1))
            if proc.returncode is not None:
                raise RuntimeError(f"relay serve exited with {proc.returncode}:\n{text}")
            await trio.sleep(0.02)


@asynccontextmanager
async def running_daemon(
    overrides: Mapping[str, Mapping[str, Any]] | None = None,
    *,
    env: Mapping[str, str] | None = None,
    log_dir: Path | None = None,
    startup_timeout: float = 20,
) -> AsyncIterator[Daemon]:
    """Start ``relay serve``; on exit SIGTERM it and wait (SIGKILL if it hangs)."""
    workdir = Path(tempfile.mkdtemp(prefix="relay-test-", dir=log_dir))
    config_path = workdir / "config.toml"
    config_path.write_text(toml_dumps(daemon_config(overrides)))
    log_path = workdir / "relay.log"
    env_map = dict(env) if env is not None else daemon_env()
    with open(log_path, "wb") as log_file:
        proc = await trio.lowlevel.open_process(
            [sys.executable, "-m", "relay", "serve", "--config", str(config_path)],
            stdout=log_file,
            stderr=subprocess.STDOUT,
            env=env_map,
        )
    try:
        port = await _wait_for_port(proc, log_path, startup_timeout)
        yield Daemon(proc, port, log_path, env_map, config_path)
    finally:
        with trio.CancelScope(shield=True):
            if proc.returncode is None:
                proc.send_signal(signal.SIGTERM)
                with trio.move_on_after(15):
                    await proc.wait()
                if proc.returncode is None:
                    proc.kill()
                    await proc.wait()
