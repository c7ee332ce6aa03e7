"""The `relay` command's contract (docs/contract.md §1): output, exit codes, no tracebacks."""

from __future__ import annotations

import signal
import socket
import subprocess
import sys
from pathlib import Path

import trio
import trio_websocket

from relay.admission.tokens import b64url_decode, mint, verify
from relay.config import decode_encryption_key
from relay.testing.daemon import TEST_OPENAI_KEY, daemon_env, running_daemon
from relay.testing.fake_realtime import fake_realtime

ROOT = Path(__file__).resolve().parents[2]
CONFIG = str(ROOT / "config.toml")


def relay(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "relay", *args],
        capture_output=True,
        text=True,
        env=env if env is not None else daemon_env(),
        timeout=60,
    )


def test_check_config_ok_shows_secrets_only_as_set() -> None:
    env = daemon_env()
    out = relay("check-config", "--config", CONFIG, env=env)
    assert out.returncode == 0, out.stderr
    assert "OPENAI_API_KEY set" in out.stdout
    assert "ENCRYPTION_KEY set" in out.stdout
    for secret in (TEST_OPENAI_KEY, env["ENCRYPTION_KEY"], env["TWILIO_AUTH_TOKEN"]):
        assert secret not in out.stdout + out.stderr
    assert 'bind = ["127.0.0.1:8787"]' in out.stdout


def test_check_config_names_missing_openai_key() -> None:
    env = daemon_env()
    del env["OPENAI_API_KEY"]
    out = relay("check-config", "--config", CONFIG, env=env)
    assert out.returncode == 2
    assert "OPENAI_API_KEY" in out.stderr
    assert "Traceback" not in out.stderr
    assert "OPENAI_API_KEY unset" in out.stdout


def test_credentials_directory(tmp_path: Path) -> None:
    env = daemon_env()
    (tmp_path / "OPENAI_API_KEY").write_text("sk-from-credentials\n")
    del env["OPENAI_API_KEY"]
    env["CREDENTIALS_DIRECTORY"] = str(tmp_path)
    out = relay("check-config", "--config", CONFIG, env=env)
    assert out.returncode == 0
    assert "OPENAI_API_KEY set" in out.stdout


def test_bad_config_and_missing_file(tmp_path: Path) -> None:
    bad = tmp_path / "bad.toml"
    bad.write_text('[limits]\nhttp_per_minute = "lots"\n')
    for args in (
        ["check-config", "--config", str(bad)],
        ["serve", "--config", str(bad)],
        ["serve", "--config", str(tmp_path / "nope.toml")],
    ):
        out = relay(*args)
        assert out.returncode == 2, args
        assert "Traceback" not in out.stderr
    assert "limits.http_per_minute" in relay("check-config", "--config", str(bad)).stderr


def test_serve_refuses_malformed_or_missing_secrets() -> None:
    env = daemon_env(ENCRYPTION_KEY="not base64!")
    out = relay("serve", "--config", CONFIG, env=env)
    assert out.returncode == 2
    assert "ENCRYPTION_KEY" in out.stderr and "Traceback" not in out.stderr
    env = daemon_env()
    del env["ENCRYPTION_KEY"]
    out = relay("serve", "--config", CONFIG, env=env)
    assert out.returncode == 2 and "ENCRYPTION_KEY" in out.stderr


def test_keygen_and_token() -> None:
    key = relay("keygen").stdout.strip()
    assert len(b64url_decode(key)) == 32 and "=" not in key
    env = daemon_env(ENCRYPTION_KEY=key)
    token = relay("token", "--ttl", "120", env=env).stdout.strip()
    assert verify(decode_encryption_key(key), token, max_ttl_seconds=300, skew_seconds=30) is None
    assert relay("token", "--ttl", "100000", env=env).returncode == 2
    env.pop("ENCRYPTION_KEY")
    out = relay("token", env=env)
    assert out.returncode == 2 and "ENCRYPTION_KEY" in out.stderr


def test_help_lists_commands() -> None:
    out = relay("--help")
    assert out.returncode == 0
    for command in ("serve", "check-config", "token", "keygen"):
        assert command in out.stdout


def test_bind_in_use_exits_1_without_traceback(tmp_path: Path) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        config = tmp_path / "c.toml"
        config.write_text(f'[server]\nbind = ["127.0.0.1:{port}"]\n')
        out = relay("serve", "--config", str(config))
    assert out.returncode == 1
    assert "Traceback" not in out.stderr


async def test_second_signal_stops_at_once() -> None:
    async with fake_realtime() as fake:
        fake.echo = True
        overrides: dict[str, dict[str, object]] = {
            "server": {"drain_seconds": 30},
            "openai": {"realtime_url": f"ws://127.0.0.1:{fake.port}/v1/realtime"},
        }
        async with running_daemon(overrides) as d:
            token = mint(decode_encryption_key(d.env["ENCRYPTION_KEY"]), 60)
            async with trio_websocket.open_websocket_url(
                f"{d.ws_url}/token/{token}", extra_headers=[(b"Origin", b"http://localhost:3000")]
            ) as ws:
                d.signal(signal.SIGINT)
                await trio.sleep(0.5)
                assert d.proc.returncode is None  # draining: the live session may go on
                start = trio.current_time()
                d.signal(signal.SIGINT)
                with trio.fail_after(5):
                    try:
                        await ws.get_message()
                    except trio_websocket.ConnectionClosed as closed:
                        assert closed.reason is not None and closed.reason.code == 1001
                assert await d.wait(10) == 0
                assert trio.current_time() - start < 5
