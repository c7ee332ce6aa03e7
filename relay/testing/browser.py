"""A real browser for tests: headless Chromium driven over the DevTools protocol.

    async with headless_chromium(fake_microphone=wav_path) as browser:
        page = await browser.open("http://localhost:8788/")
        await page.evaluate("document.querySelector('#start').click()", gesture=True)

No WebDriver, no downloaded browser: Debian's ``chromium`` and a DevTools
WebSocket spoken with trio-websocket. The microphone is Chromium's fake device
playing a WAV file in a loop, and media permission prompts are answered yes.
Chromium runs in its own process group, which is killed (by its id) when the
block exits, whatever happened inside it.
"""

from __future__ import annotations

import contextlib
import itertools
import os
import re
import shutil
import signal
import subprocess
import tempfile
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import orjson
import trio
import trio_websocket

_DEVTOOLS = re.compile(rb"DevTools listening on (ws://\S+)")


class BrowserError(Exception):
    """Chromium is missing, did not start, or a DevTools call failed."""


def chromium_path() -> str:
    found = shutil.which("chromium") or shutil.which("chromium-browser")
    if found is None:
        raise BrowserError(
            "chromium is not installed: `apt-get install -y chromium` (.ci/run does it)"
        )
    return found


@dataclass
class Page:
    browser: Browser
    session_id: str

    async def call(self, method: str, **params: Any) -> Any:
        return await self.browser.call(method, session_id=self.session_id, **params)

    async def evaluate(self, expression: str, *, gesture: bool = False) -> Any:
        """The value of ``expression`` (promises awaited), as JSON-able data."""
        result = await self.call(
            "Runtime.evaluate",
            expression=expression,
            awaitPromise=True,
            returnByValue=True,
            userGesture=gesture,
        )
        if "exceptionDetails" in result:
            raise BrowserError(f"page threw: {result['exceptionDetails']}")
        return result["result"].get("value")

    async def goto(self, url: str, *, ready: str = "document.readyState === 'complete'") -> None:
        """Navigate, then wait until ``ready`` is truthy in the new document."""
        await self.call("Page.navigate", url=url)
        await self.wait_for(f"location.href === {orjson.dumps(url).decode()} && ({ready})")

    async def wait_for(self, expression: str, *, interval: float = 0.05) -> Any:
        """Evaluate ``expression`` until it is truthy (bound it with trio.fail_after)."""
        while True:
            value = await self.evaluate(expression)
            if value:
                return value
            await trio.sleep(interval)


class Browser:
    def __init__(self, ws: trio_websocket.WebSocketConnection) -> None:
        self._ws = ws
        self._ids = itertools.count(1)
        self._lock = trio.Lock()

    async def call(self, method: str, *, session_id: str | None = None, **params: Any) -> Any:
        """One DevTools command; events that arrive meanwhile are not needed and dropped."""
        async with self._lock:
            ident = next(self._ids)
            message: dict[str, Any] = {"id": ident, "method": method, "params": params}
            if session_id is not None:
                message["sessionId"] = session_id
            await self._ws.send_message(orjson.dumps(message).decode())
            while True:
                answer = orjson.loads(await self._ws.get_message())
                if answer.get("id") == ident:
                    break
        if "error" in answer:
            raise BrowserError(f"{method}: {answer['error']}")
        return answer.get("result", {})

    async def open(self, url: str, *, ready: str = "document.readyState === 'complete'") -> Page:
        """A new tab at ``url``, loaded (``ready`` as for :meth:`Page.goto`)."""
        target = await self.call("Target.createTarget", url="about:blank")
        attached = await self.call(
            "Target.attachToTarget", targetId=target["targetId"], flatten=True
        )
        page = Page(self, attached["sessionId"])
        await page.call("Page.enable")
        await page.goto(url, ready=ready)
        return page


@asynccontextmanager
async def headless_chromium(
    *, fake_microphone: Path | None = None, start_timeout: float = 20
) -> AsyncIterator[Browser]:
    """Start headless Chromium (its own process group) and connect to its DevTools."""
    binary = chromium_path()
    profile = tempfile.mkdtemp(prefix="relay-chromium-")
    args = [
        binary,
        "--headless=new",
        "--remote-debugging-port=0",
        f"--user-data-dir={profile}",
        "--no-first-run",
        "--no-default-browser-check",
        "--disable-gpu",
        "--disable-extensions",
        "--disable-background-networking",
        "--autoplay-policy=no-user-gesture-required",
        "--use-fake-ui-for-media-stream",
        "--use-fake-device-for-media-stream",
    ]
    if fake_microphone is not None:
        args.append(f"--use-file-for-fake-audio-capture={fake_microphone}")
    if os.geteuid() == 0:
        args.append("--no-sandbox")  # Chromium refuses to run as root with its sandbox
    args.append("about:blank")
    # Its log goes to a file: a pipe nobody reads would fill and stall Chromium.
    log_path = Path(profile) / "chromium.log"
    with open(log_path, "wb") as log:
        proc = await trio.lowlevel.open_process(
            args, stdout=subprocess.DEVNULL, stderr=log, start_new_session=True
        )
    try:
        url = await _devtools_url(proc, log_path, start_timeout)
        async with trio_websocket.open_websocket_url(url, max_message_size=64 * 2**20) as ws:
            yield Browser(ws)
    finally:
        with trio.CancelScope(shield=True):
            if proc.returncode is None:
                with contextlib.suppress(ProcessLookupError):  # already gone
                    os.killpg(proc.pid, signal.SIGKILL)
                await proc.wait()
            shutil.rmtree(profile, ignore_errors=True)


async def _devtools_url(proc: trio.Process, log_path: Path, timeout: float) -> str:
    with trio.move_on_after(timeout):
        while proc.returncode is None:
            found = _DEVTOOLS.search(log_path.read_bytes())
            if found:
                return found.group(1).decode()
            await trio.sleep(0.05)
    tail = log_path.read_bytes()[-2000:].decode(errors="replace")
    raise BrowserError(f"chromium printed no DevTools address; its log:\n{tail}")
