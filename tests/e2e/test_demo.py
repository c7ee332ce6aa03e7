"""`relay demo` without a browser: its loopback rule, its settings, its backend, the
token server example, and the fake's voice mode (the browser test is
tests/e2e/test_browser_demo.py)."""

from __future__ import annotations

import array
import base64
import itertools
import math
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import httpx
import orjson
import pytest
import trio
import trio_websocket

from relay.admission.tokens import new_key, verify
from relay.config import ConfigError, parse_settings
from relay.demo.command import _loopback_host, demo_settings
from relay.testing.daemon import daemon_env, toml_dumps
from relay.testing.fake_realtime import fake_realtime
from relay.testing.fake_voice import NOTE_BYTES, RATE, VoiceMode

ROOT = Path(__file__).resolve().parents[2]


def run_relay(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "relay", *args],
        capture_output=True,
        text=True,
        env=env or daemon_env(),
        timeout=30,
    )


@pytest.mark.parametrize(
    "bind", ["0.0.0.0:8787", "[::]:8787", "192.168.1.5:8787", "example.com:80"]
)
def test_demo_refuses_a_public_bind(tmp_path: Path, bind: str) -> None:
    config = tmp_path / "config.toml"
    config.write_text(toml_dumps({"server": {"bind": ["127.0.0.1:0", bind]}}))
    done = run_relay("demo", "--config", str(config), "--port", "0")
    assert done.returncode == 2
    assert "loopback only" in done.stderr and bind in done.stderr
    assert "Traceback" not in done.stderr


@pytest.mark.parametrize("bind", ["127.0.0.1:1", "localhost:1", "[::1]:1", "127.9.9.9:1"])
def test_loopback_binds_are_accepted(bind: str) -> None:
    assert _loopback_host(bind)


def test_demo_settings() -> None:
    settings = parse_settings(
        {"server": {"bind": ["127.0.0.1:0"]}, "auth": {"allow_localhost": False}}
    )
    changed, host, port, notes = demo_settings(settings, 4321)
    assert host == "127.0.0.1" and port > 0
    assert changed.server.bind == (f"127.0.0.1:{port}",)
    assert "http://localhost:4321" in changed.auth.allowed_origins
    assert changed.secrets.encryption_key is not None and len(changed.secrets.encryption_key) == 32
    assert any("ENCRYPTION_KEY" in n for n in notes)
    with pytest.raises(ConfigError):
        demo_settings(parse_settings({"server": {"bind": ["10.0.0.1:80"]}}), 1)


async def test_demo_backend(tmp_path: Path) -> None:
    """Tokens relay accepts (a fresh one each time), the explainer, the Host rule."""
    env = daemon_env()
    del env["OPENAI_API_KEY"]
    key = env["ENCRYPTION_KEY"]
    config = tmp_path / "config.toml"
    config.write_text(toml_dumps({"server": {"bind": ["127.0.0.1:0"], "drain_seconds": 1}}))
    log_path = tmp_path / "demo.log"
    with trio.fail_after(30):
        with open(log_path, "wb") as log:
            proc = await trio.lowlevel.open_process(
                [sys.executable, "-m", "relay", "demo", "--config", str(config), "--port", "0"],
                stdout=log,
                stderr=subprocess.STDOUT,
                env=env,
            )
        try:
            while not (found := re.search(r"open (http://localhost:(\d+)/)", log_path.read_text())):
                assert proc.returncode is None, log_path.read_text()
                await trio.sleep(0.05)
            url, port = found.group(1), int(found.group(2))
            relay = re.search(r"relay listens on (ws://\S+)", log_path.read_text())
            assert relay is not None
            async with httpx.AsyncClient() as http:
                assert (await http.get(url)).text.startswith("<!doctype html>")
                js = await http.get(url + "relay-voice.js")
                assert js.headers["content-type"].startswith("text/javascript")
                assert "export class RelayVoice" in js.text
                conf = (await http.get(url + "config.json")).json()
                assert conf["fake"] is True and conf["relayUrl"] == relay.group(1)
                t1, t2 = [(await http.get(url + "token")).json()["token"] for _ in range(2)]
                assert t1 != t2
                from relay.config import decode_encryption_key

                k = decode_encryption_key(key)
                assert verify(k, t1, max_ttl_seconds=300, skew_seconds=0) is None
                assert (await http.get(url + "../../etc/passwd")).status_code == 404
                rebound = await http.get(url + "token", headers={"Host": f"evil.example:{port}"})
                assert rebound.status_code == 421

                async def explain(token: str, origin: str) -> Any:
                    body = orjson.dumps({"token": token, "query": "?voice=marin"})
                    answer = await http.post(
                        url + "diagnose", content=body, headers={"Origin": origin}
                    )
                    return answer.json()

                ok_origin = f"http://localhost:{port}"
                assert await explain("x" * 40, ok_origin) == {
                    "status": 401,
                    "reason": "token does not decrypt",
                }
                assert await explain(t2, f"http://127.0.0.1:{port}") == {
                    "status": 403,
                    "reason": "origin not allowed",
                }
                accepted = await explain(t2, ok_origin)
                assert accepted["status"] == 0 and "accepts" in accepted["reason"]
        finally:
            proc.terminate()
            with trio.move_on_after(10):
                await proc.wait()
            if proc.returncode is None:
                proc.kill()


async def test_token_server_example(tmp_path: Path) -> None:
    readme = (ROOT / "README.md").read_text()
    recipe = readme.split("<!-- python-recipe -->")[1].split("def mint_relay_token")[1]
    function = "def mint_relay_token" + recipe.split("\n\n")[0]
    example = ROOT / "examples" / "token_server.py"
    assert function in example.read_text(), "examples/token_server.py left the README recipe"
    key = new_key()
    env = {**daemon_env(), "ENCRYPTION_KEY": key}
    with trio.fail_after(20):
        proc = await trio.lowlevel.open_process(
            [sys.executable, str(example), "--port", "0"], stdout=subprocess.PIPE, env=env
        )
        try:
            assert proc.stdout is not None
            line = b""
            while b"\n" not in line:
                line += await proc.stdout.receive_some(200)
            url = line.decode().split()[1]
            async with httpx.AsyncClient() as http:
                token = (await http.get(url + "token")).json()["token"]
                from relay.config import decode_encryption_key

                k = decode_encryption_key(key)
                assert verify(k, token, max_ttl_seconds=300, skew_seconds=0) is None
                assert "RelayVoice" in (await http.get(url + "relay-voice.js")).text
        finally:
            proc.kill()
            await proc.wait()


def _tone(hz: float, seconds: float, amplitude: float) -> bytes:
    n = int(seconds * RATE)
    return array.array(
        "h", (round(amplitude * 32767 * math.sin(2 * math.pi * hz * i / RATE)) for i in range(n))
    ).tobytes()


async def test_fake_voice_mode_hears_and_answers() -> None:
    """A turn of 440 Hz, then silence: VAD events, the transcript names the pitch,
    a melody answer in PCM16; truncates are checked in PCM milliseconds."""
    with trio.fail_after(10):
        async with fake_realtime() as fake:
            VoiceMode(fake).install()
            async with trio_websocket.open_websocket_url(fake.url) as ws:
                assert orjson.loads(await ws.get_message())["type"] == "session.created"

                async def send(event: dict[str, Any]) -> None:
                    await ws.send_message(orjson.dumps(event).decode())

                update = {"type": "realtime", "audio": {"input": {"transcription": {"model": "m"}}}}
                await ws.send_message(
                    orjson.dumps({"type": "session.update", "session": update}).decode()
                )
                audio = _tone(440, 0.6, 0.5) + bytes(2 * RATE // 2)
                for i in range(0, len(audio), 1920):
                    chunk = base64.b64encode(audio[i : i + 1920]).decode()
                    await ws.send_message(
                        orjson.dumps({"type": "input_audio_buffer.append", "audio": chunk}).decode()
                    )
                seen: list[dict[str, Any]] = []
                while not seen or seen[-1]["type"] != "response.done":
                    seen.append(orjson.loads(await ws.get_message()))
                types = [e["type"] for e in seen]
                for expected in (
                    "input_audio_buffer.speech_started",
                    "input_audio_buffer.speech_stopped",
                    "input_audio_buffer.committed",
                    "conversation.item.input_audio_transcription.completed",
                ):
                    assert expected in types
                [heard] = [e for e in seen if e["type"].endswith("transcription.completed")]
                said = re.fullmatch(r"\(a sound of 0\.6 s at about (\d+) Hz\)", heard["transcript"])
                assert said is not None and abs(int(said.group(1)) - 440) <= 3, heard
                deltas = [e for e in seen if e["type"] == "response.output_audio.delta"]
                assert len(deltas) == 10
                first = array.array("h", base64.b64decode(deltas[0]["delta"]))
                assert len(first) * 2 == NOTE_BYTES
                crossings = sum(1 for a, b in itertools.pairwise(first) if (a < 0) != (b < 0))
                assert abs(crossings / 2 / 0.2 - 523.25) < 10
                item = deltas[0]["item_id"]

                async def truncate(ms: int) -> dict[str, Any]:
                    event = {"type": "conversation.item.truncate", "item_id": item,
                             "content_index": 0, "audio_end_ms": ms}  # fmt: skip
                    await ws.send_message(orjson.dumps(event).decode())
                    answer: dict[str, Any] = orjson.loads(await ws.get_message())
                    return answer

                assert (await truncate(2001))["type"] == "error"  # 2 s were sent: 48 bytes/ms
                assert (await truncate(1500))["type"] == "conversation.item.truncated"
