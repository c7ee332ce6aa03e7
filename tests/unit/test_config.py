from __future__ import annotations

import base64
from pathlib import Path

import pytest

from relay.config import (
    ConfigError,
    Settings,
    decode_encryption_key,
    describe,
    load_secrets,
    load_settings,
    parse_settings,
)

ROOT = Path(__file__).resolve().parents[2]


def test_shipped_config_equals_defaults() -> None:
    shipped = load_settings(ROOT / "config.toml", env={})
    assert shipped == Settings()


def test_defaults_without_file() -> None:
    s = load_settings(None, env={})
    assert s.server.bind == ("127.0.0.1:8787",)
    assert s.limits.max_message_bytes == 4194304
    assert s.openai.dialect == "ga"


@pytest.mark.parametrize(
    ("doc", "needle"),
    [
        ({"server": {"bogus": 1}}, "server.bogus"),
        ({"nope": {}}, "[nope]"),
        ({"server": {"OPENAI_API_KEY": "x"}}, "server.OPENAI_API_KEY"),
        ({"limits": {"http_per_minute": "60"}}, "limits.http_per_minute"),
        ({"limits": {"http_per_minute": 1.5}}, "limits.http_per_minute"),
        ({"limits": {"http_per_minute": -1}}, "limits.http_per_minute"),
        ({"limits": {"max_message_bytes": 0}}, "limits.max_message_bytes"),
        ({"limits": {"session_seconds": -3}}, "limits.session_seconds"),
        ({"limits": {"goodbye_seconds": 700}}, "limits.goodbye_seconds"),
        ({"server": {"bind": ["localhost"]}}, "server.bind"),
        ({"server": {"bind": ["host:99999"]}}, "server.bind"),
        ({"server": {"bind": "127.0.0.1:1"}}, "server.bind"),
        ({"server": {"bind": []}}, "server.bind"),
        ({"server": {"log_format": "xml"}}, "server.log_format"),
        ({"server": {"trusted_proxies": ["not-an-ip"]}}, "server.trusted_proxies"),
        ({"server": {"public_url": "ftp://x"}}, "server.public_url"),
        ({"openai": {"dialect": "gamma"}}, "openai.dialect"),
        ({"openai": {"default_voice": "robot"}}, "openai.default_voice"),
        ({"openai": {"model": "gpt-x"}}, "openai.model"),
        ({"openai": {"realtime_url": "https://api.openai.com"}}, "openai.realtime_url"),
        ({"auth": {"allow_localhost": "yes"}}, "auth.allow_localhost"),
        ({"store": {"backend": "etcd"}}, "store.backend"),
        ({"server": 3}, "[server]"),
    ],
)
def test_bad_config_names_the_key(doc: dict[str, object], needle: str) -> None:
    with pytest.raises(ConfigError) as err:
        parse_settings(doc)
    assert needle in str(err.value)


def test_ints_accepted_for_float_keys() -> None:
    s = parse_settings({"limits": {"session_seconds": 6, "goodbye_seconds": 3}})
    assert s.limits.session_seconds == 6.0


def test_bad_toml_and_missing_file(tmp_path: Path) -> None:
    bad = tmp_path / "c.toml"
    bad.write_text("[server\n")
    with pytest.raises(ConfigError, match="not valid TOML"):
        load_settings(bad, env={})
    with pytest.raises(ConfigError, match="does not exist"):
        load_settings(tmp_path / "missing.toml", env={})


@pytest.mark.parametrize("size", [16, 24, 32])
@pytest.mark.parametrize("alphabet", ["std", "url"])
@pytest.mark.parametrize("padded", [True, False])
def test_encryption_key_forms(size: int, alphabet: str, padded: bool) -> None:
    raw = bytes(range(250, 256)) * 6
    raw = raw[:size]
    enc = base64.b64encode(raw) if alphabet == "std" else base64.urlsafe_b64encode(raw)
    text = enc.decode()
    if not padded:
        text = text.rstrip("=")
    assert decode_encryption_key(text) == raw


@pytest.mark.parametrize("bad", ["", "!!!!", base64.b64encode(b"x" * 20).decode(), "a" * 5])
def test_malformed_encryption_key(bad: str) -> None:
    with pytest.raises(ConfigError, match="ENCRYPTION_KEY"):
        decode_encryption_key(bad)


def test_secrets_env_wins_and_credentials_dir(tmp_path: Path) -> None:
    (tmp_path / "OPENAI_API_KEY").write_text("from-file\n")
    (tmp_path / "TWILIO_AUTH_TOKEN").write_text("tok\n")
    env = {"CREDENTIALS_DIRECTORY": str(tmp_path), "TWILIO_AUTH_TOKEN": "from-env"}
    secrets = load_secrets(env)
    assert secrets.openai_api_key == "from-file"
    assert secrets.twilio_auth_token == "from-env"
    assert secrets.twilio_account_sid is None


def test_serve_requires_key_and_describe_hides_values() -> None:
    s = parse_settings({}, load_secrets({"OPENAI_API_KEY": "sk-secret-value"}))
    with pytest.raises(ConfigError, match="ENCRYPTION_KEY"):
        s.require_serving_secrets()
    text = describe(s)
    assert "sk-secret-value" not in text
    assert "OPENAI_API_KEY set" in text
    assert "ENCRYPTION_KEY unset" in text
    assert "sk-secret-value" not in repr(s)
