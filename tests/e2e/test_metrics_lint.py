"""`promtool check metrics` on a live scrape of `relay serve` (docs/contract.md §9): with a
client session and a Twilio call live, then ended, so the labelled series exist. Under CI
(CI=true) a missing promtool fails the test: .ci/run installs Debian's `prometheus`."""

from __future__ import annotations

import subprocess
from typing import Any

import httpx
import pytest
import trio
import trio_websocket

from relay.testing.daemon import TEST_OPENAI_KEY, TEST_TWILIO_TOKEN, running_daemon
from relay.testing.fake_realtime import fake_realtime
from relay.testing.twilio_caller import twilio_call
from tests.conftest import require_tool
from tests.helpers import ORIGIN, token_for, wait_for_sample


def promtool() -> str:
    return require_tool("promtool", "Debian: apt-get install prometheus")


def lint(tool: str, text: str) -> str:
    """promtool's complaints about ``text`` ("" when clean)."""
    done = subprocess.run(
        [tool, "check", "metrics"], input=text.encode(), capture_output=True, timeout=30
    )
    complaints = (done.stdout + done.stderr).decode().strip()
    assert done.returncode == 0 or complaints, done
    return complaints


async def test_live_scrape_passes_promtool() -> None:
    tool = promtool()
    scrapes: list[str] = []
    async with fake_realtime(expected_key=TEST_OPENAI_KEY, echo=True) as fake:
        config: dict[str, dict[str, Any]] = {"openai": {"realtime_url": fake.url}}
        async with running_daemon(config) as d, httpx.AsyncClient(base_url=d.http_url) as http:
            with trio.fail_after(30):
                async with (
                    trio_websocket.open_websocket_url(
                        f"{d.ws_url}/token/{token_for(d)}", extra_headers=ORIGIN
                    ) as ws,
                    twilio_call(
                        f"{d.ws_url}/twilio/media",
                        public_url="ws://localhost:8787/twilio/media",
                        auth_token=TEST_TWILIO_TOKEN,
                    ) as call,
                ):
                    await ws.send_message("hello")
                    assert await ws.get_message() == "hello"
                    await call.start()
                    scrapes.append(
                        await wait_for_sample(http, 'relay_sessions_active{kind="twilio"} 1.0')
                    )
                    await call.stop()
                with pytest.raises(trio_websocket.ConnectionRejected):
                    async with trio_websocket.open_websocket_url(
                        f"{d.ws_url}/token/not-a-token", extra_headers=ORIGIN
                    ):
                        pass
                scrapes.append(
                    await wait_for_sample(http, 'relay_sessions_active{kind="twilio"} 0.0')
                )
    ended = scrapes[-1]
    for name in ("relay_sessions_total{", "relay_messages_total{", "relay_rejected_total{"):
        assert name in ended, name  # the labelled series promtool is to see
    for text in scrapes:
        assert lint(tool, text) == ""


def test_the_gate_can_fail() -> None:
    """The check above is only worth something if promtool complains at all here."""
    tool = promtool()
    assert "_total" in lint(tool, "# HELP jobs Jobs.\n# TYPE jobs counter\njobs 1\n")
    assert lint(tool, "# HELP jobs_total Jobs.\n# TYPE jobs_total counter\njobs_total 1\n") == ""
