"""``relay demo``: a first conversation in a browser, with one command.

    relay demo [--config config.toml] [--port 8788]

It runs the relay exactly as ``serve`` does (``relay.daemon.server.main``), and beside
it, on a second loopback port, the page from ``examples/browser`` with a
backend that mints a token per session (``relay.demo.web``). What it changes
in the settings, and why:

- binds: loopback only — a demo has no business on a public interface, so a
  non-loopback ``server.bind`` is refused (exit 2); port 0 becomes a free port,
  because the page must be told where the relay is;
- ``http://localhost:<port>`` of the page is added to ``allowed_origins``
  (``allow_localhost`` may be off in the given config);
- no ``ENCRYPTION_KEY``: one is made for this run (its tokens die with it);
- no ``OPENAI_API_KEY``: the upstream is ``relay.testing``'s fake Realtime
  server in its voice mode (``relay.testing.fake_voice``), and the page says so.
"""

from __future__ import annotations

import dataclasses
import ipaddress
import secrets
import socket
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import Any

import trio

from relay.config import ConfigError, Settings
from relay.demo.web import Site, serve_connection
from relay.ops.sd_notify import Notifier

DEFAULT_PAGE_PORT = 8788
FAKE_API_KEY = "sk-relay-demo-fake-upstream"
# Connections the fake keeps a record of (older ones are dropped as new ones come):
# each holds what the fake sent it, up to session_seconds of answers.
FAKE_KEEP = 4


def find_page_dir(given: str | None) -> Path:
    """``--page-dir``, else ``examples/browser`` of the source tree relay runs from,
    else of the current directory (a clone installed with ``pip install .``)."""
    candidates = (
        [Path(given)]
        if given
        else [
            Path(__file__).resolve().parent.parent / "examples" / "browser",
            Path.cwd() / "examples" / "browser",
        ]
    )
    for path in candidates:
        if (path / "index.html").is_file() and (path / "relay-voice.js").is_file():
            return path
    where = " or ".join(str(p) for p in candidates)
    raise ConfigError(f"the demo page is not in {where}: run from the clone, or pass --page-dir")


def _loopback_host(bind: str) -> str:
    host = bind.rpartition(":")[0].strip("[]")
    if host == "localhost":
        return "127.0.0.1"
    try:
        if ipaddress.ip_address(host).is_loopback:
            return host
    except ValueError:
        pass
    raise ConfigError(
        f"server.bind: relay demo listens on loopback only, not {bind!r} "
        '(use "127.0.0.1:8787"; `relay serve` is the way to expose it)'
    )


def _free_port(host: str) -> int:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        port: int = s.getsockname()[1]
        return port


def demo_settings(settings: Settings, page_port: int) -> tuple[Settings, str, int, list[str]]:
    """The settings the demo's relay runs with, its host and port, and notes for the user."""
    binds = settings.server.bind
    host = _loopback_host(binds[0])
    for bind in binds[1:]:
        _loopback_host(bind)
    port = int(binds[0].rpartition(":")[2]) or _free_port(host)
    notes: list[str] = []
    sec = settings.secrets
    if sec.encryption_key is None:
        sec = dataclasses.replace(sec, encryption_key=secrets.token_bytes(32))
        notes.append("no ENCRYPTION_KEY: tokens are signed with a key made for this run")
    origin = f"http://localhost:{page_port}"
    origins = settings.auth.allowed_origins
    auth = dataclasses.replace(
        settings.auth,
        allowed_origins=origins if origin in origins else (*origins, origin),
    )
    shown = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
    server = dataclasses.replace(settings.server, bind=(shown, *binds[1:]))
    return dataclasses.replace(settings, server=server, auth=auth, secrets=sec), host, port, notes


class _ReadyNotifier(Notifier):
    """Tells the demo when the relay listens (the READY=1 it would send systemd)."""

    def __init__(self) -> None:
        super().__init__({})
        self.ready = trio.Event()

    def send(self, *fields: str) -> None:
        if "READY=1" in fields:
            self.ready.set()


async def run(
    settings: Settings, page_port: int, page_dir: Path, *, say: Callable[[str], None]
) -> None:
    """Serve relay, the page and (without a key) the fake until relay stops (SIGINT/SIGTERM)."""
    from relay.daemon.server import main as serve_relay

    listeners = await trio.open_tcp_listeners(page_port, host="127.0.0.1")
    page_port = listeners[0].socket.getsockname()[1]
    settings, host, port, notes = demo_settings(settings, page_port)
    async with trio.open_nursery() as nursery:
        sessions: Callable[[], Any] | None = None
        fake = settings.secrets.openai_api_key is None
        if fake:
            url, sessions = await nursery.start(_run_fake, settings.openai.dialect)
            openai = dataclasses.replace(settings.openai, realtime_url=url)
            sec = dataclasses.replace(settings.secrets, openai_api_key=FAKE_API_KEY)
            settings = dataclasses.replace(settings, openai=openai, secrets=sec)
            notes.append(
                "no OPENAI_API_KEY: the model is relay.testing's fake Realtime server "
                "(it answers any sound with a short melody)"
            )
        site = Site(settings, page_dir, host, port, page_port, fake, sessions)
        notifier = _ReadyNotifier()

        async def relay_then_stop() -> None:
            await serve_relay(settings, notifier=notifier)
            nursery.cancel_scope.cancel()  # relay drained on a signal: the demo ends too

        nursery.start_soon(relay_then_stop)
        await notifier.ready.wait()
        nursery.start_soon(
            partial(trio.serve_listeners, partial(serve_connection, site), listeners)
        )
        for note in notes:
            say(f"relay demo: {note}")
        say(f"relay demo: relay listens on {site.relay_url} (loopback only)")
        say(f"relay demo: open http://localhost:{page_port}/ in a browser (Ctrl-C stops)")


async def _run_fake(dialect: str, *, task_status: Any = trio.TASK_STATUS_IGNORED) -> None:
    from relay.testing.fake_realtime import fake_realtime
    from relay.testing.fake_voice import VoiceMode, fake_sessions

    async with fake_realtime(dialect) as fake:
        fake.record = False  # a long demo must not keep every append
        mode = VoiceMode(fake, keep_connections=FAKE_KEEP).install()
        task_status.started((fake.url, partial(fake_sessions, mode)))
        await trio.sleep_forever()


def say(line: str) -> None:
    print(line, flush=True)


def main(settings: Settings, page_port: int, page_dir: str | None) -> int:
    """``relay demo``: 0 after a clean stop; ConfigError (exit 2) for a public bind."""
    from relay.ops.logs import setup_logging

    for bind in settings.server.bind:
        _loopback_host(bind)  # refused before anything starts
    if not 0 <= page_port <= 65535:
        raise ConfigError(f"--port: {page_port} is not a port")
    folder = find_page_dir(page_dir)
    setup_logging(settings.server.log_format, settings.server.log_level, settings.secret_values())
    trio.run(partial(run, settings, page_port, folder, say=say))
    return 0
