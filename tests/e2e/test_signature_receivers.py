"""The README's ``X-Relay-Signature`` receivers (docs/contract.md §11), run exactly as
written, each as a real HTTP server on 127.0.0.1, against requests signed by
``relay.calls.signing``: what they accept and what they refuse. And the README's
event example kept in step with what the relay sends."""

from __future__ import annotations

import os
import re
import socket
import subprocess
import sys
import time
import tomllib
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from dataclasses import fields
from pathlib import Path

import httpx
import orjson
import pytest
import trio

from relay.calls.report import EVENT_OUTCOMES, CallReport
from relay.calls.signing import signature_header
from relay.config import CallsSettings, HttpToolSettings, parse_settings
from tests.conftest import require_tool

ROOT = Path(__file__).resolve().parents[2]
KEY = "k3y-" + os.urandom(16).hex()


def readme_block(marker: str) -> str:
    text = (ROOT / "README.md").read_text()
    block = re.search(rf"<!-- {marker} -->\s*```\w+\n(.*?)```\s*<!-- /{marker} -->", text, re.S)
    assert block is not None, marker
    return block.group(1)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


@asynccontextmanager
async def receiver(cmd: Sequence[str], tmp_path: Path) -> AsyncIterator[tuple[str, Path]]:
    """Run a receiver; yield its URL and the file its output goes to."""
    port = free_port()
    out = tmp_path / "receiver.out"
    env = {"PATH": os.environ["PATH"], "EVENTS_SIGNING_KEY": KEY, "PORT": str(port)}
    with open(out, "wb") as sink:
        proc = await trio.lowlevel.open_process(
            list(cmd), env=env, stdout=sink, stderr=subprocess.STDOUT
        )
    try:
        with trio.fail_after(10):
            while True:
                assert proc.returncode is None, out.read_text()
                try:
                    stream = await trio.open_tcp_stream("127.0.0.1", port)
                except OSError:
                    await trio.sleep(0.05)
                    continue
                await stream.aclose()
                break
        yield f"http://127.0.0.1:{port}/relay/events", out
    finally:
        with trio.CancelScope(shield=True):
            proc.kill()
            await proc.wait()


def event_body() -> bytes:
    report = CallReport(
        call_sid="CA" + "0" * 32,
        stream_sid="MZ" + "1" * 32,
        direction="inbound",
        answered_by=None,
        caller="+14155550123",
        callee="+14082605145",
        started_at=time.time() - 60,
        ended_at=time.time(),
        outcome="transferred",
        transfer_target="billing",
        tools=[("transfer_call", True)],
        transcript=[("caller", 'Put me through, "billing" please \u00e9\u2713')],
    )
    return orjson.dumps(report.event())


async def check_receiver(url: str, out: Path) -> None:
    body = event_body()
    now = time.time()
    cases: list[tuple[str, bytes, dict[str, str], int]] = [
        ("good", body, {"X-Relay-Signature": signature_header(KEY, body)}, 204),
        (
            "tampered body",
            body.replace(b"transferred", b"assistant_ended"),
            {"X-Relay-Signature": signature_header(KEY, body)},
            401,
        ),
        ("old t", body, {"X-Relay-Signature": signature_header(KEY, body, now - 360)}, 401),
        ("future t", body, {"X-Relay-Signature": signature_header(KEY, body, now + 360)}, 401),
        ("wrong key", body, {"X-Relay-Signature": signature_header(KEY + "x", body)}, 401),
        ("no header", body, {}, 401),
        ("not a header", body, {"X-Relay-Signature": "v1=,t="}, 401),
        (
            "huge header",
            body,
            {"X-Relay-Signature": signature_header(KEY, body) + ",v0=" + "0" * 5000},
            401,
        ),
        (
            "two t",
            body,
            {"X-Relay-Signature": signature_header(KEY, body) + f",t={int(now) - 1000}"},
            401,
        ),
        (
            "rotated key: any v1 may match",
            body,
            {
                "X-Relay-Signature": signature_header(KEY, body)
                + ","
                + signature_header("old", body).split(",")[1]
            },
            204,
        ),
        ("a minute old", body, {"X-Relay-Signature": signature_header(KEY, body, now - 60)}, 204),
    ]
    async with httpx.AsyncClient(timeout=5, headers={"Connection": "close"}) as http:
        for name, content, headers, want in cases:
            headers = {"Content-Type": "application/json", **headers}
            answer = await http.post(url, content=content, headers=headers)
            assert answer.status_code == want, (name, answer.status_code, out.read_text())
    # What was accepted was the event itself, read after the check.
    lines = out.read_text().splitlines()
    accepted = [line for line in lines if line.startswith("call.ended ")]
    assert accepted == [f"call.ended CA{'0' * 32} transferred"] * 3, lines


async def test_python_receiver_in_the_readme(tmp_path: Path) -> None:
    script = tmp_path / "receiver.py"
    script.write_text(readme_block("python-receiver"))
    with trio.fail_after(30):
        async with receiver([sys.executable, str(script)], tmp_path) as (url, out):
            await check_receiver(url, out)


async def test_node_receiver_in_the_readme(tmp_path: Path) -> None:
    node = require_tool("node", "Debian: apt-get install nodejs")
    script = tmp_path / "receiver.js"
    script.write_text(readme_block("node-receiver"))
    with trio.fail_after(30):
        async with receiver([node, str(script)], tmp_path) as (url, out):
            await check_receiver(url, out)


def json_blocks() -> list[object]:
    section = (ROOT / "README.md").read_text().split("## Phone calls that act")[1]
    section = section.split("\n## ")[0]
    return [orjson.loads(b) for b in re.findall(r"```json\n(.*?)```", section, re.S)]


def test_readme_event_example_has_the_fields_the_relay_sends() -> None:
    (example,) = [b for b in json_blocks() if isinstance(b, dict) and b.get("type") == "call.ended"]
    assert isinstance(example, dict)
    sent = orjson.loads(event_body())
    assert list(example) == list(sent)
    assert list(example["usage"]) == list(sent["usage"])
    section = (ROOT / "README.md").read_text().split("## Phone calls that act")[1]
    outcomes = set(re.findall(r"^\| `([a-z_]+)` \|", section, re.M))
    assert outcomes == set(EVENT_OUTCOMES.values())


@pytest.mark.parametrize("field", ["tool", "call_id", "arguments", "call_sid", "stream_sid"])
def test_readme_tool_request_example_has_each_field(field: str) -> None:
    (example,) = [b for b in json_blocks() if isinstance(b, dict) and "tool" in b]
    assert isinstance(example, dict)
    assert field in example
    assert isinstance(example["arguments"], dict)


def test_readme_calls_example_is_a_valid_and_complete_calls_section() -> None:
    section = (ROOT / "README.md").read_text().split("## Phone calls that act")[1]
    example = re.search(r"```toml\n(.*?)```", section, re.S)
    assert example is not None
    data = tomllib.loads(example.group(1))
    # Every [calls] key is shown, and nothing that is not one.
    assert set(data["calls"]) == {f.name for f in fields(CallsSettings)}
    for tool in data["calls"]["http_tools"]:
        assert set(tool) == {f.name for f in fields(HttpToolSettings)}
    calls = parse_settings(data).calls  # the daemon's own checks
    assert len(calls.http_tools) == 2
    assert calls.transfer_targets and calls.events_url.startswith("https://")
