"""Settings: ``config.toml`` plus secrets → one frozen, validated object.

This is the only module that reads the environment. It is pure apart from
reading the config file and the credential files: no trio, no sockets.

Every key has a default (docs/contract.md §2). Unknown keys, wrong types and impossible
values raise :class:`ConfigError` with a message that names the key, so the
CLI can print it and exit 2.
"""

from __future__ import annotations

import base64
import binascii
import ipaddress
import json
import math
import os
import re
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from functools import cached_property
from pathlib import Path
from typing import Any, Literal, cast
from urllib.parse import parse_qs, urlsplit

SECRET_NAMES = (
    "OPENAI_API_KEY",
    "ENCRYPTION_KEY",
    "TWILIO_ACCOUNT_SID",
    "TWILIO_AUTH_TOKEN",
    "REDIS_URL",
    "EVENTS_SIGNING_KEY",
)

IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network


class ConfigError(Exception):
    """An operator mistake in the config file or the secrets; the message says what to fix."""


DEFAULT_PROMPTS = {
    "inbound": (
        "You are a friendly phone assistant. The caller rang us. Greet them warmly, "
        "say who you are, and ask how you can help. Keep answers short and spoken-style."
    ),
    "outbound": (
        "You are a friendly phone assistant calling someone on behalf of the people who "
        "asked for this call. Greet them, say why you are calling, and keep it short."
    ),
    "voicemail": (
        "You reached an answering machine. Leave a short, polite voicemail: say who you "
        "are, that you called on behalf of your users, and that they can call back. "
        "Then stop talking."
    ),
    "sms": (
        "You are a helpful assistant in an SMS chat. Answer briefly in plain text, "
        "no markdown, at most a few sentences."
    ),
    "goodbye": (
        "The call is about to reach its time limit. Say a brief, friendly goodbye now "
        "in one sentence."
    ),
}


@dataclass(frozen=True)
class ServerSettings:
    bind: tuple[str, ...] = ("127.0.0.1:8787",)
    public_url: str = "http://localhost:8787"
    trusted_proxies: tuple[str, ...] = ()
    metrics_allow: tuple[str, ...] = ("127.0.0.1/32", "::1/128")
    drain_seconds: float = 10.0
    log_format: Literal["text", "json"] = "text"
    log_level: Literal["debug", "info", "warning", "error"] = "info"

    @cached_property
    def trusted_networks(self) -> tuple[IPNetwork, ...]:
        return tuple(ipaddress.ip_network(p, strict=False) for p in self.trusted_proxies)

    @cached_property
    def metrics_networks(self) -> tuple[IPNetwork, ...]:
        return tuple(ipaddress.ip_network(p, strict=False) for p in self.metrics_allow)


@dataclass(frozen=True)
class AuthSettings:
    allowed_origins: tuple[str, ...] = (
        "https://www.gateframes.com",
        "https://gateframes.com",
        "https://www.ricslist.com",
        "https://ricslist.com",
    )
    allow_localhost: bool = True
    token_max_ttl_seconds: int = 300
    clock_skew_seconds: int = 30
    # Concurrent sessions one client token (its nonce) may hold; 0 = no cap.
    sessions_per_token: int = 1


@dataclass(frozen=True)
class OpenAISettings:
    dialect: Literal["ga", "beta"] = "ga"
    realtime_url: str = "wss://api.openai.com/v1/realtime"
    model: str = "gpt-realtime"
    models: tuple[str, ...] = ("gpt-realtime", "gpt-realtime-mini")
    api_base: str = "https://api.openai.com/v1"
    chat_model: str = "gpt-4o-mini"
    voices: tuple[str, ...] = (
        "alloy",
        "ash",
        "ballad",
        "coral",
        "echo",
        "sage",
        "shimmer",
        "verse",
        "marin",
        "cedar",
    )
    default_voice: str = "ash"
    connect_timeout_seconds: float = 10.0


@dataclass(frozen=True)
class TwilioSettings:
    api_base: str = ""
    validate_signatures: bool = True
    bot_identity: str = "gateframes-bot"
    projected_address: str = "+14082605145"
    caller_id: str = "+14082605145"
    voice_url: str = "https://www.gateframes.com/api/twilio/voice"
    intro_message: str = (
        "Hi all! This group was started by a member of the chat. Reply here to talk to "
        "everyone; mention @ai to ask the assistant."
    )
    # Numbers one @call or @group may name; the rest are refused in the reply.
    max_call_targets: int = 5
    # True: a media stream without a stream token (plain /twilio/media) is refused.
    require_stream_token: bool = False


@dataclass(frozen=True)
class PromptSettings:
    inbound: str = DEFAULT_PROMPTS["inbound"]
    outbound: str = DEFAULT_PROMPTS["outbound"]
    voicemail: str = DEFAULT_PROMPTS["voicemail"]
    sms: str = DEFAULT_PROMPTS["sms"]
    goodbye: str = DEFAULT_PROMPTS["goodbye"]


@dataclass(frozen=True)
class LimitSettings:
    session_seconds: float = 600.0
    goodbye_seconds: float = 15.0
    http_per_minute: int = 60
    ws_upgrades_per_minute: int = 10
    convo_events: int = 12
    convo_window_seconds: float = 30.0
    dedupe_seconds: float = 600.0
    max_message_bytes: int = 4 * 1024 * 1024
    # A peer that takes no bytes, or answers no ping, for this long is dead.
    stall_seconds: float = 10.0
    # Concurrent client sessions per client IP (429 before accept).
    sessions_per_ip: int = 20
    # Concurrent sessions, client and Twilio, per process (503 before accept).
    max_sessions: int = 2000
    # Concurrent TCP connections per process; beyond it a new one gets 503 and is closed.
    max_connections: int = 10000
    # IPv6 clients are counted per /ipv6_prefix in per-IP buckets and caps.
    ipv6_prefix: int = 64


@dataclass(frozen=True)
class StoreSettings:
    backend: Literal["memory", "redis"] = "memory"
    redis_url: str = "redis://127.0.0.1:6379/0"


@dataclass(frozen=True)
class HttpToolSettings:
    """One ``[[calls.http_tools]]`` entry: a function the model may call on phone
    calls, answered by POSTing to ``url`` (docs/contract.md §11)."""

    name: str
    url: str
    description: str = ""
    # JSON schema of the arguments; always an object schema.
    parameters: Mapping[str, Any] = field(default_factory=lambda: {"type": "object"})
    timeout_seconds: float = 5.0


@dataclass(frozen=True)
class CallsSettings:
    """``[calls]``: phone calls that act (docs/contract.md §11)."""

    tools: tuple[str, ...] = ("end_call", "transfer_call")
    # name -> E.164 number; transfer_call offers only these names.
    transfer_targets: Mapping[str, str] = field(default_factory=dict)
    dtmf: bool = True
    transcripts: bool = True
    transcription_model: str = "gpt-4o-mini-transcribe"
    events_url: str = ""
    summaries: bool = True
    http_tools: tuple[HttpToolSettings, ...] = ()


@dataclass(frozen=True)
class Secrets:
    """Secrets from the environment or ``$CREDENTIALS_DIRECTORY``; never from the TOML."""

    openai_api_key: str | None = field(default=None, repr=False)
    encryption_key: bytes | None = field(default=None, repr=False)
    twilio_account_sid: str | None = field(default=None, repr=False)
    twilio_auth_token: str | None = field(default=None, repr=False)
    redis_url: str | None = field(default=None, repr=False)
    events_signing_key: str | None = field(default=None, repr=False)

    @property
    def twilio_ready(self) -> bool:
        return bool(self.twilio_account_sid and self.twilio_auth_token)

    def status(self) -> dict[str, bool]:
        return {
            "OPENAI_API_KEY": self.openai_api_key is not None,
            "ENCRYPTION_KEY": self.encryption_key is not None,
            "TWILIO_ACCOUNT_SID": self.twilio_account_sid is not None,
            "TWILIO_AUTH_TOKEN": self.twilio_auth_token is not None,
            "REDIS_URL": self.redis_url is not None,
            "EVENTS_SIGNING_KEY": self.events_signing_key is not None,
        }


@dataclass(frozen=True)
class Settings:
    server: ServerSettings = ServerSettings()
    auth: AuthSettings = AuthSettings()
    openai: OpenAISettings = OpenAISettings()
    twilio: TwilioSettings = TwilioSettings()
    prompts: PromptSettings = PromptSettings()
    limits: LimitSettings = LimitSettings()
    store: StoreSettings = StoreSettings()
    calls: CallsSettings = CallsSettings()
    secrets: Secrets = field(default=Secrets(), repr=False)

    def secret_values(self) -> list[str | bytes]:
        """Every secret value in force, for the log redactor: the secrets and the
        password a Redis URL carries, wherever the URL came from."""
        sec = self.secrets
        values = (
            sec.openai_api_key,
            sec.twilio_auth_token,
            sec.twilio_account_sid,
            sec.encryption_key,
            sec.events_signing_key,
            url_password(sec.redis_url),
            url_password(self.store.redis_url),
            # A tool or event receiver may take basic auth in its URL.
            url_password(self.calls.events_url),
            *(url_password(tool.url) for tool in self.calls.http_tools),
        )
        return [v for v in values if v]

    def require_serving_secrets(self) -> None:
        """``serve`` cannot run without the API key and the token key, nor send
        call events or call HTTP tools unsigned (docs/contract.md §2)."""
        if self.secrets.openai_api_key is None:
            raise ConfigError(_missing("OPENAI_API_KEY"))
        if self.secrets.encryption_key is None:
            raise ConfigError(_missing("ENCRYPTION_KEY"))
        calls = self.calls
        if self.secrets.events_signing_key is None and (calls.events_url or calls.http_tools):
            needs = "calls.events_url" if calls.events_url else "calls.http_tools"
            raise ConfigError(
                f"{_missing('EVENTS_SIGNING_KEY')}; {needs} is configured and what relay "
                "sends there is signed with it (any long random string, e.g. `relay keygen`)"
            )


SECTIONS: dict[str, type[Any]] = {
    "server": ServerSettings,
    "auth": AuthSettings,
    "openai": OpenAISettings,
    "twilio": TwilioSettings,
    "prompts": PromptSettings,
    "limits": LimitSettings,
    "store": StoreSettings,
    "calls": CallsSettings,
}

# docs/contract.md §11: the tools relay answers itself; an HTTP tool may not take their names.
BUILTIN_TOOLS = ("end_call", "transfer_call")
# Tool and transfer target names: what the Realtime API accepts as a function name.
_NAME = re.compile(r"[a-zA-Z0-9_-]{1,64}")
# E.164: a plus, then 8 to 15 digits, the first not 0 (ASCII digits only).
_E164 = re.compile(r"\+[1-9][0-9]{7,14}")
# An HTTP tool holds the call's turn while it runs; longer than this is no conversation.
MAX_TOOL_TIMEOUT = 60.0

_CHOICES: dict[str, tuple[str, ...]] = {
    "server.log_format": ("text", "json"),
    "server.log_level": ("debug", "info", "warning", "error"),
    "openai.dialect": ("ga", "beta"),
    "store.backend": ("memory", "redis"),
}


def _missing(name: str) -> str:
    return (
        f"{name} is not set: export {name}=... in the environment, or put it in the file "
        f"$CREDENTIALS_DIRECTORY/{name} (systemd LoadCredential={name}:/path)"
    )


def _coerce(key: str, value: Any, default: Any) -> Any:
    """Check ``value`` against the type of the default; lists become tuples."""
    if isinstance(default, bool):
        if not isinstance(value, bool):
            raise ConfigError(f"{key}: expected true or false, got {value!r}")
        return value
    if type(default) is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{key}: expected an integer, got {value!r}")
        return value
    if isinstance(default, float):
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise ConfigError(f"{key}: expected a number, got {value!r}")
        return float(value)
    if isinstance(default, str):
        if not isinstance(value, str):
            raise ConfigError(f"{key}: expected a string, got {value!r}")
        return value
    if isinstance(default, tuple):
        if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
            raise ConfigError(f"{key}: expected a list of strings, got {value!r}")
        return tuple(value)
    raise ConfigError(f"{key}: unsupported value {value!r}")  # pragma: no cover


def _section(name: str, cls: type[Any], raw: Any) -> Any:
    if not isinstance(raw, dict):
        raise ConfigError(f"[{name}]: expected a table, got {raw!r}")
    defaults = cls()
    known = {f.name for f in fields(cls)}
    kwargs: dict[str, Any] = {}
    for key, value in raw.items():
        full = f"{name}.{key}"
        if key not in known:
            raise ConfigError(f"{full}: unknown key (secrets go in the environment, not here)")
        coerced = _coerce(full, value, getattr(defaults, key))
        if full in _CHOICES and coerced not in _CHOICES[full]:
            choices = ", ".join(f'"{c}"' for c in _CHOICES[full])
            raise ConfigError(f"{full}: must be one of {choices}, got {coerced!r}")
        kwargs[key] = coerced
    return cls(**kwargs)


def _calls_section(raw: Any) -> CallsSettings:
    """``[calls]``: its plain keys as any section's, plus the two tables."""
    if not isinstance(raw, dict):
        raise ConfigError(f"[calls]: expected a table, got {raw!r}")
    tables = ("transfer_targets", "http_tools")
    plain = {k: v for k, v in raw.items() if k not in tables}
    calls: CallsSettings = _section("calls", CallsSettings, plain)
    targets: dict[str, str] = {}
    raw_targets = raw.get("transfer_targets", {})
    if not isinstance(raw_targets, dict):
        raise ConfigError(
            f"calls.transfer_targets: expected a table of name = number, got {raw_targets!r}"
        )
    for name, number in raw_targets.items():
        if not isinstance(number, str):
            raise ConfigError(
                f"calls.transfer_targets.{name}: expected a string (an E.164 number), "
                f"got {number!r}"
            )
        targets[name] = number
    raw_tools = raw.get("http_tools", [])
    if not isinstance(raw_tools, list):
        raise ConfigError(
            "calls.http_tools: expected an array of tables ([[calls.http_tools]]), "
            f"got {raw_tools!r}"
        )
    tools = tuple(_http_tool(f"calls.http_tools[{i}]", t) for i, t in enumerate(raw_tools))
    return CallsSettings(
        **{f.name: getattr(calls, f.name) for f in fields(calls) if f.name not in tables},
        transfer_targets=targets,
        http_tools=tools,
    )


def _http_tool(key: str, raw: Any) -> HttpToolSettings:
    """One ``[[calls.http_tools]]`` entry; ``key`` is ``calls.http_tools[<index>]``."""
    if not isinstance(raw, dict):
        raise ConfigError(f"{key}: expected a table, got {raw!r}")
    scalars: dict[str, Any] = {"name": "", "url": "", "description": "", "timeout_seconds": 5.0}
    kwargs: dict[str, Any] = {}
    for k, value in raw.items():
        if k == "parameters":
            if not isinstance(value, dict):
                raise ConfigError(f"{key}.parameters: expected a table (a JSON schema)")
            _check_json(f"{key}.parameters", value)
            kwargs[k] = value
        elif k in scalars:
            kwargs[k] = _coerce(f"{key}.{k}", value, scalars[k])
        else:
            raise ConfigError(f"{key}.{k}: unknown key")
    for required in ("name", "url"):
        if required not in kwargs:
            raise ConfigError(f"{key}.{required}: required")
    return HttpToolSettings(**kwargs)


def _check_json(key: str, value: Any) -> None:
    """``value`` goes to OpenAI as JSON: TOML dates and times, inf and nan cannot."""
    if isinstance(value, dict):
        for k, v in value.items():
            _check_json(f"{key}.{k}", v)
    elif isinstance(value, list):
        for i, v in enumerate(value):
            _check_json(f"{key}[{i}]", v)
    elif isinstance(value, float):
        if not math.isfinite(value):
            raise ConfigError(f"{key}: {value!r} has no JSON form")
    elif not isinstance(value, str | int | bool):
        raise ConfigError(f"{key}: a TOML {type(value).__name__} has no JSON form")


def _check_bind(addr: str) -> None:
    host, sep, port = addr.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 <= int(port) <= 65535:
        raise ConfigError(f"server.bind: {addr!r} is not host:port")
    if host.startswith("[") != host.endswith("]"):
        raise ConfigError(f"server.bind: {addr!r} is not host:port")


def _check_networks(key: str, values: tuple[str, ...]) -> None:
    for v in values:
        try:
            ipaddress.ip_network(v, strict=False)
        except ValueError:
            raise ConfigError(f"{key}: {v!r} is not an IP address or CIDR") from None


def _check_url(key: str, url: str, schemes: tuple[str, ...], *, allow_empty: bool = False) -> None:
    if allow_empty and url == "":
        return
    scheme, sep, rest = url.partition("://")
    if not sep or scheme not in schemes or not rest or rest.startswith("/"):
        raise ConfigError(f"{key}: {url!r} is not a {'/'.join(schemes)} URL")


def _check_http_url(key: str, url: str) -> None:
    """An http(s) URL relay will POST to: a host, a port that parses, nothing blank."""
    # The message shows the URL with its password masked: it may go to a shared log.
    refused = ConfigError(f"{key}: {mask_password(url)!r} is not an http/https URL")
    try:
        parts = urlsplit(url)
        _ = parts.port  # raises ValueError for a port that is not a number in range
    except ValueError:
        raise refused from None
    if (
        parts.scheme not in ("http", "https")
        or not parts.hostname
        or any(c.isspace() or not c.isprintable() for c in url)
    ):
        raise refused


def _validate_calls(c: CallsSettings) -> None:
    for i, builtin in enumerate(c.tools):
        if builtin not in BUILTIN_TOOLS:
            choices = ", ".join(f'"{b}"' for b in BUILTIN_TOOLS)
            raise ConfigError(
                f"calls.tools: {builtin!r} is not a built-in tool (one of {choices}; "
                "operator tools go in [[calls.http_tools]])"
            )
        if builtin in c.tools[:i]:
            raise ConfigError(f"calls.tools: {builtin!r} is listed twice")
    for name, number in c.transfer_targets.items():
        if not _NAME.fullmatch(name):
            raise ConfigError(
                f"calls.transfer_targets: the name {name!r} must be 1 to 64 of a-z A-Z 0-9 _ -"
            )
        if not _E164.fullmatch(number):
            raise ConfigError(
                f"calls.transfer_targets.{name}: {number!r} is not an E.164 number "
                '(+ then 8 to 15 digits, the first not 0, e.g. "+14155550100")'
            )
    if not c.transcription_model.strip():
        raise ConfigError("calls.transcription_model: must not be empty")
    if c.events_url:
        _check_http_url("calls.events_url", c.events_url)
    seen: set[str] = set()
    for i, tool in enumerate(c.http_tools):
        key = f"calls.http_tools[{i}]"
        if not _NAME.fullmatch(tool.name):
            raise ConfigError(f"{key}.name: {tool.name!r} must be 1 to 64 of a-z A-Z 0-9 _ -")
        if tool.name in BUILTIN_TOOLS:
            raise ConfigError(f"{key}.name: {tool.name!r} is a built-in tool's name")
        if tool.name in seen:
            raise ConfigError(f"{key}.name: {tool.name!r} is already another tool's name")
        seen.add(tool.name)
        _check_http_url(f"{key}.url", tool.url)
        if not 0 < tool.timeout_seconds <= MAX_TOOL_TIMEOUT:
            raise ConfigError(
                f"{key}.timeout_seconds: must be greater than 0 and at most "
                f"{MAX_TOOL_TIMEOUT:g}, got {tool.timeout_seconds!r}"
            )
        schema = tool.parameters
        if schema.get("type") != "object":
            raise ConfigError(
                f'{key}.parameters: must be a JSON schema with type = "object", '
                f"got type = {schema.get('type')!r}"
            )
        properties = schema.get("properties", {})
        if not isinstance(properties, dict) or not all(
            isinstance(p, dict) for p in properties.values()
        ):
            raise ConfigError(f"{key}.parameters.properties: must be a table of tables")
        required = schema.get("required", [])
        if not isinstance(required, list) or not all(isinstance(r, str) for r in required):
            raise ConfigError(f"{key}.parameters.required: must be a list of strings")


def _validate(s: Settings) -> None:
    if not s.server.bind:
        raise ConfigError("server.bind: needs at least one host:port")
    for b in s.server.bind:
        _check_bind(b)
    _check_url("server.public_url", s.server.public_url, ("http", "https"))
    _check_networks("server.trusted_proxies", s.server.trusted_proxies)
    _check_networks("server.metrics_allow", s.server.metrics_allow)
    for o in s.auth.allowed_origins:
        _check_url("auth.allowed_origins", o, ("http", "https"))
    _check_url("openai.realtime_url", s.openai.realtime_url, ("ws", "wss"))
    _check_url("openai.api_base", s.openai.api_base, ("http", "https"))
    _check_url("twilio.api_base", s.twilio.api_base, ("http", "https"), allow_empty=True)
    if not s.openai.models:
        raise ConfigError("openai.models: needs at least one model")
    if s.openai.model not in s.openai.models:
        raise ConfigError(f"openai.model: {s.openai.model!r} is not in openai.models")
    if not s.openai.voices:
        raise ConfigError("openai.voices: needs at least one voice")
    if s.openai.default_voice not in s.openai.voices:
        raise ConfigError(
            f"openai.default_voice: {s.openai.default_voice!r} is not in openai.voices"
        )
    positive = {
        "server.drain_seconds": s.server.drain_seconds,
        "auth.token_max_ttl_seconds": s.auth.token_max_ttl_seconds,
        "openai.connect_timeout_seconds": s.openai.connect_timeout_seconds,
        "limits.session_seconds": s.limits.session_seconds,
        "limits.http_per_minute": s.limits.http_per_minute,
        "limits.ws_upgrades_per_minute": s.limits.ws_upgrades_per_minute,
        "limits.convo_events": s.limits.convo_events,
        "limits.convo_window_seconds": s.limits.convo_window_seconds,
        "limits.dedupe_seconds": s.limits.dedupe_seconds,
        "limits.max_message_bytes": s.limits.max_message_bytes,
        "limits.stall_seconds": s.limits.stall_seconds,
        "limits.sessions_per_ip": s.limits.sessions_per_ip,
        "limits.max_sessions": s.limits.max_sessions,
        "limits.max_connections": s.limits.max_connections,
        "twilio.max_call_targets": s.twilio.max_call_targets,
    }
    for key, value in positive.items():
        if value <= 0:
            raise ConfigError(f"{key}: must be greater than 0, got {value!r}")
    if s.auth.clock_skew_seconds < 0:
        raise ConfigError("auth.clock_skew_seconds: must not be negative")
    if s.auth.sessions_per_token < 0:
        raise ConfigError("auth.sessions_per_token: must not be negative (0 = no cap)")
    if not 1 <= s.limits.ipv6_prefix <= 128:
        raise ConfigError(
            f"limits.ipv6_prefix: must be from 1 to 128, got {s.limits.ipv6_prefix!r}"
        )
    if s.limits.goodbye_seconds < 0 or s.limits.goodbye_seconds >= s.limits.session_seconds:
        raise ConfigError("limits.goodbye_seconds: must be at least 0 and below session_seconds")
    _validate_calls(s.calls)


def decode_encryption_key(text: str) -> bytes:
    """Accept base64 or base64url, padded or not; the key must be 16, 24 or 32 bytes."""
    cleaned = text.strip().replace("-", "+").replace("_", "/").rstrip("=")
    try:
        key = base64.b64decode(cleaned + "=" * (-len(cleaned) % 4), validate=True)
    except (binascii.Error, ValueError):
        raise ConfigError(
            "ENCRYPTION_KEY is malformed: expected base64 or base64url "
            "(make one with `relay keygen`)"
        ) from None
    if len(key) not in (16, 24, 32):
        raise ConfigError(
            f"ENCRYPTION_KEY is {len(key)} bytes; it must be 16, 24 or 32 "
            "(make one with `relay keygen`)"
        )
    return key


def read_secret(name: str, env: Mapping[str, str]) -> str | None:
    """The environment wins; else ``$CREDENTIALS_DIRECTORY/<name>``, one trailing newline off."""
    value = env.get(name)
    if value:
        return value
    cred_dir = env.get("CREDENTIALS_DIRECTORY")
    if not cred_dir:
        return None
    path = Path(cred_dir) / name
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        return None
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{name}: cannot read {path}: {exc.__class__.__name__}") from None
    if text.endswith("\n"):
        text = text[:-1]
        if text.endswith("\r"):
            text = text[:-1]
    return text or None


def load_secrets(env: Mapping[str, str] | None = None) -> Secrets:
    env = os.environ if env is None else env
    raw_key = read_secret("ENCRYPTION_KEY", env)
    return Secrets(
        openai_api_key=read_secret("OPENAI_API_KEY", env),
        encryption_key=decode_encryption_key(raw_key) if raw_key is not None else None,
        twilio_account_sid=read_secret("TWILIO_ACCOUNT_SID", env),
        twilio_auth_token=read_secret("TWILIO_AUTH_TOKEN", env),
        redis_url=read_secret("REDIS_URL", env),
        events_signing_key=read_secret("EVENTS_SIGNING_KEY", env),
    )


def parse_settings(data: Mapping[str, Any], secrets: Secrets | None = None) -> Settings:
    """Build settings from a parsed TOML document; raises ConfigError naming the key."""
    kwargs: dict[str, Any] = {}
    for name, raw in data.items():
        if name not in SECTIONS:
            raise ConfigError(f"[{name}]: unknown section")
        if name == "calls":
            kwargs[name] = _calls_section(raw)
        else:
            kwargs[name] = _section(name, SECTIONS[name], raw)
    settings = Settings(**kwargs, secrets=secrets or Secrets())
    _validate(settings)
    return settings


def load_settings(path: str | Path | None, env: Mapping[str, str] | None = None) -> Settings:
    """Read the TOML file (None = all defaults) and the secrets."""
    data: dict[str, Any] = {}
    if path is not None:
        p = Path(path)
        try:
            data = tomllib.loads(p.read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise ConfigError(f"config file {p} does not exist") from None
        except (OSError, UnicodeDecodeError) as exc:
            raise ConfigError(
                f"config file {p}: cannot read it ({exc.__class__.__name__})"
            ) from None
        except tomllib.TOMLDecodeError as exc:
            raise ConfigError(f"config file {p}: not valid TOML ({exc})") from None
    return parse_settings(data, load_secrets(env))


def describe(settings: Settings) -> str:
    """The effective config as TOML-ish text, each secret shown only as set/unset.

    ``store.redis_url`` is the URL the store will use (the REDIS_URL secret wins
    over the file's) with any password masked (docs/contract.md §10 "Secrets").
    """
    lines: list[str] = []
    for name in SECTIONS:
        section = getattr(settings, name)
        lines.append(f"[{name}]")
        for f in fields(section):
            value = getattr(section, f.name)
            if name == "store" and f.name == "redis_url":
                secret = settings.secrets.redis_url
                note = "  # from REDIS_URL, which wins over the config file" if secret else ""
                lines.append(f"redis_url = {_toml_value(mask_password(secret or value))}{note}")
                continue
            if name == "calls" and f.name == "http_tools":
                continue  # after the section's plain keys, as TOML wants them
            if name == "calls" and f.name == "events_url":
                value = mask_password(value)
            lines.append(f"{f.name} = {_toml_value(value)}")
        lines.append("")
        if name == "calls":
            for tool in settings.calls.http_tools:
                lines.append("[[calls.http_tools]]")
                for f in fields(tool):
                    value = getattr(tool, f.name)
                    value = mask_password(value) if f.name == "url" else value
                    lines.append(f"{f.name} = {_toml_value(value)}")
                lines.append("")
    lines.append("# secrets (environment or $CREDENTIALS_DIRECTORY)")
    for secret, present in settings.secrets.status().items():
        lines.append(f"{secret} {'set' if present else 'unset'}")
    return "\n".join(lines)


_BARE_KEY = re.compile(r"[A-Za-z0-9_-]+")


def _toml_value(value: object) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return repr(value)
    if isinstance(value, tuple | list):
        return "[" + ", ".join(_toml_value(v) for v in cast(list[object], value)) + "]"
    if isinstance(value, Mapping):
        items = cast(Mapping[str, object], value).items()
        if not items:
            return "{}"
        pairs = (
            f"{k if _BARE_KEY.fullmatch(k) else _toml_value(k)} = {_toml_value(v)}"
            for k, v in items
        )
        return "{ " + ", ".join(pairs) + " }"
    # A JSON string is a TOML basic string, but for DEL, which TOML wants escaped.
    return json.dumps(str(value), ensure_ascii=False).replace("\x7f", "\\u007f")


_QUERY_PASSWORD = re.compile(r"(^|&)(password=)[^&]*")


def mask_password(url: str) -> str:
    """``url`` with the password of its userinfo (and a ``password=`` query value)
    shown as ``***``: ``redis://:s3cret@host:6379/0`` → ``redis://:***@host:6379/0``.

    Userinfo without a colon is masked whole: some write a bare password there.
    A URL too broken to take apart is not shown at all.
    """
    try:
        parts = urlsplit(url)
    except ValueError:
        return "(not shown: not a URL)"
    masked = url
    userinfo, at, hostport = parts.netloc.rpartition("@")
    if at:
        user, colon, _ = userinfo.partition(":")
        netloc = f"{user}:***@{hostport}" if colon else f"***@{hostport}"
        masked = masked.replace("//" + parts.netloc, "//" + netloc, 1)
    if parts.query:
        query = _QUERY_PASSWORD.sub(r"\1\2***", parts.query)
        masked = masked.replace("?" + parts.query, "?" + query, 1)
    return masked


def url_password(url: str | None) -> str | None:
    """The password a Redis URL carries, for the log redactor; None if none."""
    if not url:
        return None
    try:
        parts = urlsplit(url)
    except ValueError:
        return None
    userinfo, at, _ = parts.netloc.rpartition("@")
    if at:
        user, colon, password = userinfo.partition(":")
        return (password if colon else user) or None
    return next(iter(parse_qs(parts.query).get("password", [])), None)
