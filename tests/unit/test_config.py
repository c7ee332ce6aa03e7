from __future__ import annotations

import base64
import subprocess
import sys
import tomllib
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
from relay.testing.daemon import daemon_env, toml_dumps

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


# -- [calls] (docs/contract.md §2, §11) ---------------------------------------

TOOL = {
    "name": "lookup_order",
    "description": "Look up an order by its number",
    "parameters": {
        "type": "object",
        "properties": {"order": {"type": "string"}},
        "required": ["order"],
    },
    "url": "https://backend.example.com/tools/lookup_order",
    "timeout_seconds": 5,
}


def tool(**changes: object) -> dict[str, object]:
    return {**TOOL, **changes}


def calls(**keys: object) -> dict[str, object]:
    return {"calls": keys}


def test_calls_section_parses() -> None:
    s = parse_settings(
        calls(
            tools=["end_call"],
            transfer_targets={"front_desk": "+14155550100", "night-line_2": "+442071234567"},
            dtmf=False,
            events_url="https://hooks.example.com/relay",
            http_tools=[TOOL, tool(name="book", url="http://127.0.0.1:9/book")],
        )
    )
    c = s.calls
    assert c.tools == ("end_call",)
    assert dict(c.transfer_targets) == {
        "front_desk": "+14155550100",
        "night-line_2": "+442071234567",
    }
    assert c.dtmf is False and c.transcripts is True
    assert [t.name for t in c.http_tools] == ["lookup_order", "book"]
    first = c.http_tools[0]
    assert first.timeout_seconds == 5.0 and isinstance(first.timeout_seconds, float)
    assert first.parameters["required"] == ["order"]
    # A minimal entry takes the defaults for the rest.
    [minimal] = parse_settings(
        calls(http_tools=[{"name": "a", "url": "https://x"}])
    ).calls.http_tools
    assert minimal.parameters == {"type": "object"} and minimal.timeout_seconds == 5.0
    assert parse_settings(calls(tools=[], http_tools=[])).calls.tools == ()


@pytest.mark.parametrize(
    ("keys", "needle"),
    [
        ({"colour": "red"}, "calls.colour"),
        ({"dtmf": "yes"}, "calls.dtmf"),
        ({"tools": "end_call"}, "calls.tools"),
        ({"tools": ["end_call", "hang_up"]}, "calls.tools: 'hang_up' is not a built-in"),
        ({"tools": ["lookup_order"], "http_tools": [TOOL]}, "calls.tools"),
        ({"tools": ["end_call", "end_call"]}, "calls.tools: 'end_call' is listed twice"),
        ({"transfer_targets": ["+14155550100"]}, "calls.transfer_targets"),
        ({"transfer_targets": {"desk": 14155550100}}, "calls.transfer_targets.desk"),
        ({"transfer_targets": {"desk": "4155550100"}}, "calls.transfer_targets.desk"),
        ({"transfer_targets": {"desk": "+04155550100"}}, "calls.transfer_targets.desk"),
        ({"transfer_targets": {"desk": "+1234567"}}, "calls.transfer_targets.desk"),
        ({"transfer_targets": {"desk": "+1234567890123456"}}, "calls.transfer_targets.desk"),
        ({"transfer_targets": {"desk": "+1415555010\n"}}, "calls.transfer_targets.desk"),
        ({"transfer_targets": {"desk": "+1415 555 0100"}}, "calls.transfer_targets.desk"),
        # Unicode digits are digits to \d, not to Twilio.
        (
            {"transfer_targets": {"desk": "+1415555\u09e6\u09e7\u09e6\u09e6"}},
            "calls.transfer_targets.desk",
        ),
        ({"transfer_targets": {"front desk": "+14155550100"}}, "calls.transfer_targets"),
        ({"transfer_targets": {"": "+14155550100"}}, "calls.transfer_targets"),
        ({"transfer_targets": {"d" * 65: "+14155550100"}}, "calls.transfer_targets"),
        ({"transcription_model": ""}, "calls.transcription_model"),
        ({"transcription_model": "  "}, "calls.transcription_model"),
        ({"events_url": "ftp://hooks.example.com"}, "calls.events_url"),
        ({"events_url": "hooks.example.com/relay"}, "calls.events_url"),
        ({"events_url": "https://"}, "calls.events_url"),
        ({"events_url": "https://hooks.example.com:99999/"}, "calls.events_url"),
        ({"events_url": "https://hooks.example.com/a b"}, "calls.events_url"),
        ({"events_url": 3}, "calls.events_url"),
        ({"http_tools": TOOL}, "calls.http_tools"),
        ({"http_tools": ["lookup_order"]}, "calls.http_tools[0]"),
        ({"http_tools": [TOOL, tool(name="b", colour="red")]}, "calls.http_tools[1].colour"),
        ({"http_tools": [tool(OPENAI_API_KEY="x")]}, "calls.http_tools[0].OPENAI_API_KEY"),
        ({"http_tools": [{"url": "https://x"}]}, "calls.http_tools[0].name: required"),
        ({"http_tools": [{"name": "a"}]}, "calls.http_tools[0].url: required"),
        ({"http_tools": [tool(name=3)]}, "calls.http_tools[0].name"),
        ({"http_tools": [tool(name="")]}, "calls.http_tools[0].name"),
        ({"http_tools": [tool(name="look up")]}, "calls.http_tools[0].name"),
        ({"http_tools": [tool(name="x" * 65)]}, "calls.http_tools[0].name"),
        ({"http_tools": [tool(name="lookup\n")]}, "calls.http_tools[0].name"),
        ({"http_tools": [tool(name="end_call")]}, "calls.http_tools[0].name: 'end_call' is a"),
        ({"http_tools": [tool(name="transfer_call")]}, "calls.http_tools[0].name"),
        ({"http_tools": [TOOL, TOOL]}, "calls.http_tools[1].name: 'lookup_order' is already"),
        ({"http_tools": [tool(description=["x"])]}, "calls.http_tools[0].description"),
        ({"http_tools": [tool(url="ftp://x/y")]}, "calls.http_tools[0].url"),
        ({"http_tools": [tool(url="wss://x/y")]}, "calls.http_tools[0].url"),
        ({"http_tools": [tool(url="/tools/x")]}, "calls.http_tools[0].url"),
        ({"http_tools": [tool(timeout_seconds=0)]}, "calls.http_tools[0].timeout_seconds"),
        ({"http_tools": [tool(timeout_seconds=-1)]}, "calls.http_tools[0].timeout_seconds"),
        ({"http_tools": [tool(timeout_seconds=61)]}, "calls.http_tools[0].timeout_seconds"),
        ({"http_tools": [tool(timeout_seconds=float("nan"))]}, "http_tools[0].timeout_seconds"),
        ({"http_tools": [tool(timeout_seconds=float("inf"))]}, "http_tools[0].timeout_seconds"),
        ({"http_tools": [tool(timeout_seconds="5")]}, "calls.http_tools[0].timeout_seconds"),
        ({"http_tools": [tool(timeout_seconds=True)]}, "calls.http_tools[0].timeout_seconds"),
        ({"http_tools": [tool(parameters="object")]}, "calls.http_tools[0].parameters"),
        ({"http_tools": [tool(parameters={})]}, "calls.http_tools[0].parameters"),
        ({"http_tools": [tool(parameters={"type": "array"})]}, "calls.http_tools[0].parameters"),
        (
            {"http_tools": [tool(parameters={"type": "object", "properties": ["order"]})]},
            "calls.http_tools[0].parameters.properties",
        ),
        (
            {"http_tools": [tool(parameters={"type": "object", "properties": {"o": "string"}})]},
            "calls.http_tools[0].parameters.properties",
        ),
        (
            {"http_tools": [tool(parameters={"type": "object", "required": "order"})]},
            "calls.http_tools[0].parameters.required",
        ),
        (
            {"http_tools": [tool(parameters={"type": "object", "maximum": float("inf")})]},
            "calls.http_tools[0].parameters.maximum",
        ),
        ({"http_tools": [TOOL, tool(name="b", parameters=[1])]}, "calls.http_tools[1].parameters"),
        ({"http_tools": "lookup_order"}, "calls.http_tools"),
    ],
)
def test_bad_calls_config_names_the_key(keys: dict[str, object], needle: str) -> None:
    with pytest.raises(ConfigError) as err:
        parse_settings(calls(**keys))
    assert needle in str(err.value)


def test_a_refused_url_is_shown_without_its_password() -> None:
    for keys in (
        {"events_url": "ftp://u:hook-pw@hooks.example.com/e"},
        {"http_tools": [tool(url="https://u:tool-pw@tools.example.com:http/x")]},
    ):
        with pytest.raises(ConfigError) as err:
            parse_settings(calls(**keys))
        assert "-pw" not in str(err.value) and "u:***@" in str(err.value)


def test_calls_table_from_toml_dates_is_refused(tmp_path: Path) -> None:
    """A TOML date inside a schema has no JSON form: refused at load, not at the first call."""
    config = tmp_path / "c.toml"
    config.write_text(
        "[[calls.http_tools]]\n"
        'name = "a"\n'
        'url = "https://x.example/a"\n'
        'parameters = { type = "object", properties = { d = { type = "string", '
        "default = 1979-05-27 } } }\n"
    )
    with pytest.raises(ConfigError, match=r"calls\.http_tools\[0\]\.parameters\.properties\.d"):
        load_settings(config, env={})


def test_calls_need_the_signing_key() -> None:
    ready = {"OPENAI_API_KEY": "sk-x", "ENCRYPTION_KEY": base64.b64encode(b"k" * 32).decode()}
    for keys, needle in (
        ({"events_url": "https://hooks.example.com/e"}, "calls.events_url"),
        ({"http_tools": [TOOL]}, "calls.http_tools"),
    ):
        s = parse_settings(calls(**keys), load_secrets(ready))
        with pytest.raises(ConfigError, match="EVENTS_SIGNING_KEY") as err:
            s.require_serving_secrets()
        assert needle in str(err.value)
        signed = parse_settings(
            calls(**keys), load_secrets({**ready, "EVENTS_SIGNING_KEY": "a-long-signing-key"})
        )
        signed.require_serving_secrets()
    # Neither configured: no key needed.
    parse_settings({}, load_secrets(ready)).require_serving_secrets()


def test_describe_shows_calls_as_toml_with_passwords_masked() -> None:
    s = parse_settings(
        calls(
            transfer_targets={"front_desk": "+14155550100"},
            events_url="https://hook:ev-pass@hooks.example.com/e",
            http_tools=[TOOL, tool(name="b", url="https://u:tool-pass@t.example/b")],
        ),
        load_secrets({"EVENTS_SIGNING_KEY": "signing-key-value"}),
    )
    text = describe(s)
    for secret in ("ev-pass", "tool-pass", "signing-key-value"):
        assert secret not in text
    assert "EVENTS_SIGNING_KEY set" in text
    assert "ev-pass" in s.secret_values() and "tool-pass" in s.secret_values()
    # Everything from [calls] on (but the secrets' lines) reads back as the same TOML.
    calls_text = text[text.index("[calls]") : text.index("# secrets")]
    back = tomllib.loads(calls_text)["calls"]
    assert back["transfer_targets"] == {"front_desk": "+14155550100"}
    assert back["events_url"] == "https://hook:***@hooks.example.com/e"
    assert [t["name"] for t in back["http_tools"]] == ["lookup_order", "b"]
    assert back["http_tools"][0]["parameters"] == TOOL["parameters"]
    assert back["http_tools"][1]["url"] == "https://u:***@t.example/b"


def test_shipped_http_tool_example_is_valid() -> None:
    """The commented [[calls.http_tools]] example in config.toml parses as it stands."""
    text = (ROOT / "config.toml").read_text()
    example = text[text.index("# [[calls.http_tools]]") :]
    uncommented = "\n".join(line.removeprefix("# ") for line in example.splitlines())
    [entry] = parse_settings(tomllib.loads(uncommented)).calls.http_tools
    assert entry.name == "lookup_order" and entry.timeout_seconds == 5.0


@pytest.mark.parametrize(
    "keys",
    [
        {"events_url": "https://hooks.example.com/e"},
        {"http_tools": [TOOL]},
    ],
)
def test_serve_and_check_config_exit_2_without_the_signing_key(
    tmp_path: Path, keys: dict[str, object]
) -> None:
    config = tmp_path / "c.toml"
    config.write_text(toml_dumps({"calls": keys}))
    env = daemon_env()
    env.pop("EVENTS_SIGNING_KEY", None)
    for command in ("serve", "check-config"):
        out = subprocess.run(
            [sys.executable, "-m", "relay", command, "--config", str(config)],
            capture_output=True,
            text=True,
            env=env,
            timeout=60,
            check=False,
        )
        assert out.returncode == 2, (command, out.stderr)
        assert "EVENTS_SIGNING_KEY" in out.stderr and "Traceback" not in out.stderr
    # check-config still shows the effective config, the secret as unset.
    assert "EVENTS_SIGNING_KEY unset" in out.stdout and "[calls]" in out.stdout
    signed = {**env, "EVENTS_SIGNING_KEY": "k" * 32}
    out = subprocess.run(
        [sys.executable, "-m", "relay", "check-config", "--config", str(config)],
        capture_output=True,
        text=True,
        env=signed,
        timeout=60,
        check=False,
    )
    assert out.returncode == 0, out.stderr
    assert "k" * 32 not in out.stdout + out.stderr
