"""Risky settings are named, one line each (docs/contract.md §10 "Risky settings")."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from relay.config import load_secrets, load_settings, parse_settings
from relay.ops.risky import is_loopback_host, risky_settings
from relay.testing.daemon import daemon_env, toml_dumps


def risks(**sections: dict[str, Any]) -> list[str]:
    return risky_settings(parse_settings(sections))


@pytest.mark.parametrize(
    "host",
    [
        "127.0.0.1",
        "127.8.9.1",
        "::1",
        "[::1]",
        "localhost",
        "LOCALHOST.",
        "api.localhost",
        "::ffff:127.0.0.1",
        "[::ffff:127.0.0.1]",
    ],
)
def test_loopback_hosts(host: str) -> None:
    assert is_loopback_host(host)


@pytest.mark.parametrize(
    "host",
    [
        "0.0.0.0",
        "::",
        "[::]",
        "",
        "10.0.0.1",
        "::ffff:10.0.0.1",
        "relay.example.com",
        "localhost.example.com",
        "192.168.1.1",
    ],
)
def test_not_loopback_hosts(host: str) -> None:
    assert not is_loopback_host(host)


def test_the_defaults_and_the_shipped_config_are_quiet() -> None:
    assert risks() == []
    shipped = Path(__file__).resolve().parents[2] / "config.toml"
    assert risky_settings(load_settings(shipped, env={})) == []


def test_unsigned_twilio_on_a_public_bind() -> None:
    off = {"validate_signatures": False}
    assert risks(twilio=off) == []  # loopback only: a test rig
    [line] = risks(twilio=off, server={"bind": ["127.0.0.1:8787", "0.0.0.0:8787"]})
    assert line.startswith(
        "twilio.validate_signatures = false on a non-loopback bind (0.0.0.0:8787)"
    )
    assert risks(server={"bind": ["0.0.0.0:8787"]}) == []


def test_clear_text_bases_to_remote_hosts() -> None:
    remote = {
        "openai": {
            "realtime_url": "ws://10.1.2.3:9000/v1/realtime",
            "api_base": "http://u:api-pw@openai-proxy.internal/v1",
        },
        "twilio": {"api_base": "http://twilio-mock.example"},
    }
    lines = risks(**remote)
    assert [line.split(" ", 1)[0] for line in lines] == [
        "openai.realtime_url",
        "openai.api_base",
        "twilio.api_base",
    ]
    assert "OpenAI API key would travel in clear" in lines[0]
    assert "Twilio credentials would travel in clear" in lines[2]
    assert "api-pw" not in lines[1] and "u:***@openai-proxy.internal" in lines[1]
    # Encrypted, or on this host: nothing to say.
    local = {
        "openai": {"realtime_url": "ws://127.0.0.1:9000/rt", "api_base": "http://[::1]:9/v1"},
        "twilio": {"api_base": "http://localhost:9100"},
    }
    assert risks(**local) == []
    assert risks(openai={"realtime_url": "wss://10.1.2.3/rt"}) == []


def test_clear_text_call_receivers_to_remote_hosts() -> None:
    tool = {"name": "lookup", "url": "http://u:tool-pw@tools.internal/lookup"}
    key = load_secrets({"EVENTS_SIGNING_KEY": "k" * 32})
    lines = risky_settings(
        parse_settings(
            {"calls": {"events_url": "http://hooks.example/e", "http_tools": [tool]}}, key
        )
    )
    assert [line.split(" ", 1)[0] for line in lines] == [
        "calls.events_url",
        "calls.http_tools[0].url",
    ]
    assert "each call's transcript would travel in clear" in lines[0]
    assert "tool-pw" not in lines[1] and "u:***@tools.internal" in lines[1]
    local = {
        "events_url": "http://127.0.0.1:9/e",
        "http_tools": [{**tool, "url": "https://tools.internal/lookup"}],
    }
    assert risky_settings(parse_settings({"calls": local}, key)) == []


def test_short_signing_key_in_use() -> None:
    hook = {"calls": {"events_url": "https://hooks.example/e"}}
    short = load_secrets({"EVENTS_SIGNING_KEY": "k" * 15})
    [line] = risky_settings(parse_settings(hook, short))
    assert line.startswith("EVENTS_SIGNING_KEY is shorter than 16 characters")
    assert "k" * 15 not in line
    assert risky_settings(parse_settings({}, short)) == []  # set but unused
    assert (
        risky_settings(parse_settings(hook, load_secrets({"EVENTS_SIGNING_KEY": "k" * 16}))) == []
    )


def test_https_public_url_behind_a_local_proxy_without_trusted_proxies() -> None:
    https = {"public_url": "https://relay.example.com"}
    [line] = risks(server=https)
    assert line.startswith("server.public_url is https on a loopback bind (127.0.0.1:8787)")
    assert risks(server={**https, "trusted_proxies": ["127.0.0.1"]}) == []
    assert risks(server={**https, "bind": ["0.0.0.0:443"]}) == []


def test_every_risk_at_once_gives_one_line_each() -> None:
    lines = risks(
        server={"bind": ["127.0.0.1:8787", "[::]:8787"], "public_url": "https://r.example"},
        twilio={"validate_signatures": False, "api_base": "http://t.example"},
        openai={"realtime_url": "ws://o.example/rt", "api_base": "http://o.example/v1"},
    )
    assert len(lines) == 5
    assert all("\n" not in line for line in lines)


def test_check_config_prints_them(tmp_path: Path) -> None:
    config = tmp_path / "config.toml"
    config.write_text(
        toml_dumps({"twilio": {"validate_signatures": False}, "server": {"bind": ["0.0.0.0:8787"]}})
    )
    out = subprocess.run(
        [sys.executable, "-m", "relay", "check-config", "--config", str(config)],
        capture_output=True,
        text=True,
        env=daemon_env(),
        timeout=60,
        check=False,
    )
    assert out.returncode == 0, out.stderr
    assert "relay: warning: twilio.validate_signatures = false" in out.stderr
