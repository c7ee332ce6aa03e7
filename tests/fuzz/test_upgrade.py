"""WebSocket upgrades with hostile tokens and headers (docs/contract.md §3, §4, §5, §6), fuzzed with
hypothesis against ``relay serve`` subprocesses that live for the whole module.

Every request is written to a plain TCP socket. A well-formed upgrade gets the
answer the contract's checks give it, in their order (rate limit 429, Origin 403,
token 401, model/voice 400, else a correct 101 handshake with the upstream
opened exactly as §5 says; a Twilio connection 403 unless signed); a refusal
carries a one-line reason and opens no upstream. Mangled bytes get a 4xx, a
correct handshake or a closed connection: never a 5xx, never a hang, never a
dead daemon. No token or signature ever reaches the daemon's log.

After each property the daemon is back to its baseline
(:class:`relay.testing.fuzz.Watch`) and a client session opened before the
property still relays both ways.
"""

from __future__ import annotations

import base64
import itertools
import os
import socket
import time
import urllib.parse
from collections import Counter
from collections.abc import AsyncIterator, Callable, Iterator, Sequence
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from dataclasses import dataclass, replace
from typing import Any, TypeVar

import orjson
import pytest
import trio
import trio_websocket
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from twilio.request_validator import RequestValidator

from relay.testing.daemon import TEST_OPENAI_KEY, TEST_TWILIO_TOKEN, Daemon, running_daemon
from relay.testing.fake_realtime import FakeRealtime, fake_realtime
from relay.testing.fuzz import (
    DaemonKeeper,
    FuzzEnv,
    Response,
    Watch,
    client_session,
    echo_probe,
    exchange,
    leaked,
    read_response,
    ws_accept,
    ws_key,
)
from relay.testing.portal import Held, Portal, trio_portal

PUBLIC = "https://relay.example.com"
PUBLIC_WS = "wss://relay.example.com"
MODELS = ("gpt-realtime", "gpt-realtime-mini")
VOICES = ("alloy", "ash", "ballad", "coral", "echo", "sage", "shimmer", "verse", "marin", "cedar")
ALLOWED = {
    ("https", host, 443)
    for host in ("www.gateframes.com", "gateframes.com", "www.ricslist.com", "ricslist.com")
}
RATE = 3  # ws_upgrades_per_minute of the rate-limit daemon
# Statuses of a refusal the relay itself decides (docs/contract.md §5, §6): each has a reason line.
RELAY_REFUSALS = frozenset({400, 401, 403, 429})

FUZZ = settings(
    deadline=None,
    database=None,  # CI runs fresh examples every time; failures print their input
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)

# -- tokens (docs/contract.md §4), built at run time: the key is the daemon's, "now" is now


def spec_token(key: bytes, plaintext: bytes) -> str:
    """base64url_nopad(nonce[12] || AESGCM(key).encrypt(nonce, plaintext, None))."""
    nonce = os.urandom(12)
    raw = nonce + AESGCM(key).encrypt(nonce, plaintext, None)
    return base64.urlsafe_b64encode(raw).rstrip(b"=").decode()


def daemon_key(d: Daemon) -> bytes:
    text = d.env["ENCRYPTION_KEY"]
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


# name -> (claims as a function of now, valid?). Every validity is at least 5 s from
# its boundary, so the time between minting and checking cannot flip it.
CLAIMS: dict[str, tuple[Any, bool]] = {
    "valid": (lambda now: {"origin": "client", "exp": now + 60}, True),
    "valid_extra_fields": (lambda now: {"origin": "client", "exp": now + 60, "x": [1]}, True),
    "ttl_within_skew": (lambda now: {"origin": "client", "exp": now + 325}, True),
    "ttl_too_long": (lambda now: {"origin": "client", "exp": now + 340}, False),
    "expired_within_skew": (lambda now: {"origin": "client", "exp": now - 25}, True),
    "expired": (lambda now: {"origin": "client", "exp": now - 40}, False),
    "origin_server": (lambda now: {"origin": "server", "exp": now + 60}, False),
    "no_origin": (lambda now: {"exp": now + 60}, False),
    "no_exp": (lambda now: {"origin": "client"}, False),
    "exp_string": (lambda now: {"origin": "client", "exp": str(now + 60)}, False),
    "exp_float": (lambda now: {"origin": "client", "exp": now + 60.5}, False),
    "exp_bool": (lambda now: {"origin": "client", "exp": True}, False),
    "array": (lambda now: ["client", now + 60], False),
    "not_json": (lambda now: b"\xff{origin", False),
}


@dataclass(frozen=True)
class TokenRecipe:
    """How to make one token: claims encrypted with the daemon's key (``claims``),
    with another key, a valid token mangled at ``at``, or ``raw`` text."""

    kind: str  # "claims" | "other_key" | "mangled" | "truncated" | "raw"
    claims: str = "valid"
    raw: str = ""
    at: int = 0

    @property
    def valid(self) -> bool:
        return self.kind == "claims" and CLAIMS[self.claims][1]

    def build(self, key: bytes) -> str:
        if self.kind == "raw":
            return self.raw
        make = CLAIMS[self.claims if self.kind == "claims" else "valid"][0]
        claims = make(int(time.time()))
        plaintext = claims if isinstance(claims, bytes) else orjson.dumps(claims)
        if self.kind == "other_key":
            return spec_token(os.urandom(32), plaintext)
        token = spec_token(key, plaintext)
        if self.kind == "claims":
            return token
        if self.kind == "truncated":
            return token[: self.at % len(token)]
        # "mangled": one character of the ciphertext changed (not among the last
        # three, whose low bits may be padding that decodes to the same bytes).
        i = 16 + self.at % (len(token) - 19)
        return token[:i] + ("A" if token[i] != "A" else "B") + token[i + 1 :]


T = TypeVar("T")


# Strategies made once: building one per draw (validation, labels) costs more than
# the draw itself, and hypothesis's generation was the bulk of this module's time.
_SAMPLED: dict[int, st.SearchStrategy[Any]] = {}
_DICE = {n: st.integers(0, n - 1) for n in range(2, 11)}


def _one_of(values: Sequence[T]) -> st.SearchStrategy[T]:
    """``st.sampled_from(values)``, made once per (module-level) list."""
    strategy = _SAMPLED.get(id(values))
    if strategy is None:
        strategy = _SAMPLED[id(values)] = st.sampled_from(values)
    return strategy


def pick(draw: st.DrawFn, common: Sequence[T], rare: st.SearchStrategy[T], rare_in: int = 5) -> T:
    """One of ``common`` (one cheap draw), or once in ``rare_in`` a draw from ``rare``.
    ``common`` must be a module-level constant. Shrinking moves toward ``common[0]``,
    the plainest value."""
    if draw(_DICE[rare_in]) == rare_in - 1:
        return draw(rare)
    value: T = draw(_one_of(common))
    return value


_B64URL = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_"
_COMMON_TOKENS = [
    TokenRecipe("claims", "valid"),
    *(TokenRecipe("claims", name) for name in sorted(CLAIMS)),
    *(TokenRecipe(kind, at=at) for kind in ("other_key", "mangled", "truncated") for at in (7, 50)),
    *(TokenRecipe("raw", raw=raw) for raw in ("", "null", "A" * 5000, "%00", "..", "a/b", "a?b")),
]
_RARE_TOKENS = st.builds(
    TokenRecipe,
    st.just("raw"),
    raw=st.text(max_size=60) | st.text(_B64URL, min_size=20, max_size=120),
)


# -- header values -------------------------------------------------------------------

# What HTTP allows in a header value: visible ASCII, space, tab and obs-text bytes.
_FIELD_BYTES = bytes([9, *range(0x20, 0x7F), *range(0x80, 0x100)])
field_bytes = st.binary(max_size=60).map(
    lambda b: bytes(_FIELD_BYTES[c % len(_FIELD_BYTES)] for c in b).strip(b" \t")
)
# RFC 9110 token characters (subprotocol names and the like).
_TCHARS = "!#$%&'*+-.^_`|~0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz"
token_text = st.text(_TCHARS, min_size=1, max_size=20)


@dataclass(frozen=True)
class OriginRecipe:
    value: bytes | None  # None: no Origin header
    allowed: bool | None  # None: the contract leaves it open


def _origin(scheme: str, host: str, port: int | str | None, suffix: str) -> OriginRecipe:
    text = f"{scheme}://{host}" if scheme else host
    if port is not None:
        text += f":{port}"
    text += suffix
    s, h = scheme.lower(), host.lower()
    if s not in ("http", "https") or not h:
        return OriginRecipe(text.encode(), False)
    if isinstance(port, str) or suffix not in ("",):
        # An empty or non-numeric port, a path, query or fragment: no browser sends
        # these, and "exactly equal (scheme, host, port)" does not say.
        return OriginRecipe(text.encode(), None)
    number = port if port is not None else (443 if s == "https" else 80)
    ok = (s, h, number) in ALLOWED or (s == "http" and h == "localhost")
    return OriginRecipe(text.encode(), ok)


_HOSTS = ["gateframes.com", "www.gateframes.com", "ricslist.com", "localhost", "LocalHost",
          "GATEFRAMES.COM", "evil.com", "gateframes.com.evil.com", "evilgateframes.com",
          "127.0.0.1", "[::1]", ""]  # fmt: skip
_ALLOWED_ORIGINS = [
    _origin("https", "www.gateframes.com", None, ""),
    _origin("https", "ricslist.com", None, ""),
    _origin("http", "localhost", 5173, ""),
    _origin("HTTPS", "GATEFRAMES.COM", 443, ""),
    _origin("http", "localhost", None, ""),
]
_ORIGIN_TABLE = [
    *(
        _origin(scheme, host, port, suffix)
        for scheme in ("https", "http", "ws")
        for host in _HOSTS
        for port in (None, 443, 5173, "")
        for suffix in ("", "/")
    ),
    OriginRecipe(None, False),
    OriginRecipe(b"null", False),
]
_RARE_ORIGINS = st.one_of(
    st.builds(
        _origin,
        st.sampled_from(["https", "http", "Http", "wss", "ftp", ""]),
        st.text("abcdefghijklmnopqrstuvwxyz0123456789.-", max_size=20),
        st.sampled_from([None, 443, 80, 65535, 1, "x", "99999"]),
        st.sampled_from(["", "/x", "?a=1", "#f"]),
    ),
    # Random bytes: refused, unless they happen to name an allowed host.
    field_bytes.map(
        lambda b: OriginRecipe(
            b,
            None
            if any(h.encode() in b.lower() for h in ("gateframes", "ricslist", "localhost"))
            else False,
        )
    ),
)


# -- one upgrade request ------------------------------------------------------------------


@dataclass(frozen=True)
class Upgrade:
    """A well-formed upgrade request (or one whose only fault is in a header the
    transport may refuse with 400); what it carries decides the contract's answer."""

    path_kind: str  # "token" | "auth" | "plain" | "twilio_media"
    path_token: TokenRecipe | None
    path_suffix: str
    plain_path: str
    query_token: TokenRecipe | None
    model: str | None
    voice: str | None
    mode: str | None
    extra_query: tuple[tuple[str, str], ...]
    query_order: int
    origin: OriginRecipe
    user_agent: bytes | None
    signature: str | None  # None: no header; "valid": computed for the URL; else sent as is
    forwarded_for: bytes | None
    host: bytes | None  # None: 127.0.0.1:port
    key: bytes | None  # None: a fresh valid key
    version: bytes
    subprotocols: bytes | None
    connection: bytes
    extensions: bytes | None
    extra_headers: tuple[tuple[bytes, bytes], ...]


@dataclass
class Built:
    """An :class:`Upgrade` made concrete for one daemon: the bytes and the oracle."""

    data: bytes
    key: bytes
    path: str  # decoded, as the relay must see it
    raw_query: str
    expect: frozenset[int]
    twilio: bool
    model: str
    voice: str | None
    offered: list[str]
    secrets: list[str]


def _query(u: Upgrade, key: bytes) -> tuple[str, TokenRecipe | None, str | None]:
    pairs: list[tuple[str, str]] = []
    qtoken: str | None = None
    if u.query_token is not None:
        qtoken = u.query_token.build(key)
        pairs.append(("auth", qtoken))
    for name, value in (("model", u.model), ("voice", u.voice), ("mode", u.mode)):
        if value is not None:
            pairs.append((name, value))
    pairs.extend(u.extra_query)
    if pairs:  # a deterministic shuffle: order must not matter
        k = u.query_order % len(pairs)
        pairs = pairs[k:] + pairs[:k]
    return urllib.parse.urlencode(pairs, quote_via=urllib.parse.quote), u.query_token, qtoken


def build(u: Upgrade, d: Daemon) -> Built:
    key = daemon_key(d)
    secrets: list[str] = []
    raw_query, query_recipe, qtoken = _query(u, key)
    if qtoken is not None:
        secrets.append(qtoken)
    ptoken: str | None = None
    if u.path_kind in ("token", "auth"):
        assert u.path_token is not None
        ptoken = u.path_token.build(key)
        secrets.append(ptoken)
        raw_path = f"/{u.path_kind}/{urllib.parse.quote(ptoken, safe='')}{u.path_suffix}"
    elif u.path_kind == "twilio_media":
        raw_path = "/twilio/media"
    else:
        raw_path = u.plain_path
    path = urllib.parse.unquote(raw_path)
    target = raw_path + (f"?{raw_query}" if raw_query else "")

    ws_key_value = u.key if u.key is not None else ws_key().encode()
    headers: list[tuple[bytes, bytes]] = [
        (b"Host", u.host if u.host is not None else f"127.0.0.1:{d.port}".encode()),
        (b"Upgrade", b"websocket"),
        (b"Connection", u.connection),
        (b"Sec-WebSocket-Key", ws_key_value),
        (b"Sec-WebSocket-Version", u.version),
    ]
    if u.origin.value is not None:
        headers.append((b"Origin", u.origin.value))
    if u.user_agent is not None:
        headers.append((b"User-Agent", u.user_agent))
    signature: str | None = None
    if u.signature == "valid":
        url = PUBLIC_WS + path + (f"?{raw_query}" if raw_query else "")
        signature = RequestValidator(TEST_TWILIO_TOKEN).compute_signature(url, {})
        secrets.append(signature)
    elif u.signature is not None:
        signature = u.signature
    if signature is not None:
        headers.append((b"X-Twilio-Signature", signature.encode("latin-1", "replace")))
    if u.forwarded_for is not None:
        headers.append((b"X-Forwarded-For", u.forwarded_for))
    if u.subprotocols is not None:
        headers.append((b"Sec-WebSocket-Protocol", u.subprotocols))
    if u.extensions is not None:
        headers.append((b"Sec-WebSocket-Extensions", u.extensions))
    headers.extend(u.extra_headers)
    head = b"GET " + target.encode() + b" HTTP/1.1\r\n"
    data = head + b"".join(k + b": " + v + b"\r\n" for k, v in headers) + b"\r\n"

    query = dict(urllib.parse.parse_qsl(raw_query, keep_blank_values=True))
    ua = (u.user_agent or b"").decode("latin-1")
    twilio = (
        path == "/twilio/media"
        or path.startswith("/twilio/media/")
        or query.get("mode") == "twilio"
        or signature is not None
        or ua.startswith("Twilio.")
    )
    offered = [p.strip() for p in (u.subprotocols or b"").decode("latin-1").split(",") if p.strip()]
    segments = path.strip("/").split("/")
    path_recipe: TokenRecipe | None
    if (
        u.path_kind not in ("token", "auth")
        and len(segments) >= 2
        and segments[0] in ("token", "auth")
    ):
        # A random plain path that reads as /token/<t>: a token that cannot be valid.
        ptoken, path_recipe = segments[1], TokenRecipe("raw", raw=segments[1])
    else:
        path_recipe = u.path_token if u.path_kind in ("token", "auth") else None
    expect = _expect(
        u,
        twilio,
        raw_path != path,
        path_recipe if ptoken else None,
        query_recipe,
        stream_token=path.startswith("/twilio/media/"),
    )
    return Built(
        data,
        ws_key_value,
        path,
        raw_query,
        expect,
        twilio,
        u.model if u.model is not None else MODELS[0],
        u.voice,
        offered,
        secrets,
    )


def _is_token(b: bytes) -> bool:
    return bool(b) and all(chr(c) in _TCHARS for c in b)


def _transport_may_refuse(u: Upgrade) -> bool:
    """Is there something a strict WebSocket server may answer 400 to, before the
    relay's own checks? (RFC 6455 §4.2.1: the key must be 16 bytes in base64;
    malformed list headers; a Host that is not a host.)"""
    key_ok = True
    if u.key is not None:
        try:
            key_ok = len(base64.b64decode(u.key, validate=True)) == 16
        except ValueError:
            key_ok = False
    lists_ok = all(
        all(_is_token(p.strip()) for p in value.split(b","))
        for value in (u.subprotocols, u.extensions)
        if value is not None
    ) and all(_is_token(p.strip()) for p in u.connection.split(b",") if p.strip())
    host_ok = u.host is None or u.host == b"relay.example.com"
    return not (key_ok and lists_ok and host_ok)


def _expect(
    u: Upgrade,
    twilio: bool,
    escaped_path: bool,
    path_recipe: TokenRecipe | None,
    query_recipe: TokenRecipe | None,
    *,
    stream_token: bool = False,
) -> frozenset[int]:
    """The statuses the contract allows for ``u`` on a daemon with no rate limit in reach.
    ``stream_token``: the path is /twilio/media/<stream token> (§10), here never a
    valid one (none is minted for these upgrades)."""
    if u.version != b"13":
        # No WebSocket version this server speaks: refused, or (not being an upgrade
        # it can take) answered as plain HTTP: 200 on /token/…, else 426 (docs/contract.md §3).
        return frozenset({200, 400, 426})
    extra = {400} if _transport_may_refuse(u) else set()
    if twilio:
        if u.signature != "valid" or stream_token:
            return frozenset({403} | extra)
        # The signature is over the path as requested; whether the relay rebuilds the
        # URL from the raw or the decoded path, the contract does not say.
        return frozenset(({101, 403} if escaped_path else {101}) | extra)
    # Which token counts: the path's if it has one, else the query's. With both, the
    # The contract names no precedence: either answer is fine.
    candidates: list[bool] = []
    if path_recipe is not None:
        candidates.append(path_recipe.valid)
        if query_recipe is not None:
            candidates.append(query_recipe.valid)
    elif query_recipe is not None:
        candidates.append(query_recipe.valid)
    else:
        candidates.append(False)
    origin_options = [True, False] if u.origin.allowed is None else [u.origin.allowed]
    out: set[int] = set(extra)
    for origin_ok in origin_options:
        for token_ok in candidates:
            if not origin_ok:
                out.add(403)
            elif not token_ok:
                out.add(401)
            elif (u.model is not None and u.model not in MODELS) or (
                u.voice is not None and u.voice not in VOICES
            ):
                out.add(400)
            else:
                out.add(101)
    return frozenset(out)


_PLAIN_PATHS = [
    "/",
    "/realtime",
    "/v1/realtime",
    "/token",
    "/auth",
    "/tokenx/abc",
    "/twilio/media/",
]
_SAFE_PATH = "abcdefghijklmnopqrstuvwxyz0123456789-._~!$&'()*+,;=:@/"
_RARE_PATH = st.text(max_size=30).map(lambda t: "/" + urllib.parse.quote(t, safe=_SAFE_PATH))
_RARE_QUERY = st.text(max_size=20)
_CONNECTIONS = [b"Upgrade", b"upgrade", b"keep-alive, Upgrade", b"Upgrade, keep-alive"]
_PROTOCOLS = [None, b"realtime", b"realtime, openai-beta.realtime-v1", b"chat, superchat", b"x"]
_RARE_PROTOCOLS = st.lists(token_text, min_size=1, max_size=3).map(
    lambda ps: ", ".join(ps).encode()
)
_EXTENSIONS = [None, b"permessage-deflate", b"permessage-deflate; client_max_window_bits"]
_HOSTILE_EXTENSIONS = st.sampled_from(
    [
        b"permessage-deflate; client_max_window_bits=abc",
        b"permessage-deflate; server_max_window_bits=99",
    ]
)
_FORWARDED = [None, b"203.0.113.9", b"127.0.0.1", b"::1, 10.0.0.1", b"unknown, 198.51.100.7"]
_SIGNATURES: list[str | None] = ["valid", "", "AAAA", base64.b64encode(b"x" * 20).decode()]
_RARE_SIGNATURES = field_bytes.map(lambda b: b.decode("latin-1"))
_MODELS = [None, None, None, *MODELS, "GPT-REALTIME", "gpt-4o", ""]
_VOICES = [None, None, None, "ash", "marin", "cedar", "alloy", "Ash", "robot", ""]
_KEYS = [None] * 12 + [b"", b"abc", b"dGhlIHNhbXBsZSBub25jZQ"]  # None: a fresh valid key
_NO_EXTRA: list[tuple[Any, ...]] = [()]
_EXTRA_QUERY = st.lists(
    st.tuples(
        st.text(max_size=8).filter(lambda k: k not in ("auth", "model", "voice", "mode")),
        _RARE_QUERY,
    ),
    min_size=1,
    max_size=3,
).map(tuple)
_EXTRA_HEADERS = st.lists(
    st.tuples(token_text.map(lambda t: ("X-" + t).encode()), field_bytes), min_size=1, max_size=3
).map(tuple)
_PATH_KINDS = ["token", "token", "auth", "plain", "twilio_media"]
_SUFFIXES = ["", "", "/realtime", "/", "/a/b"]
_VERSIONS = [b"13"] * 30 + [b"8", b"14", b"", b"13, 8"]
_UAS = [None, b"Mozilla/5.0 (X11)", b"Twilio.TmeWs/1.0", b"twilio.x"]


_SIGNATURES_SOMETIMES: list[str | None] = [None, None, None, None, *_SIGNATURES]
_MODES = [None, None, None, "twilio", "TWILIO", "client", ""]
_HOSTS_HDR = [None, None, b"relay.example.com"]
_TOKEN_RECIPES = st.composite(lambda draw: pick(draw, _COMMON_TOKENS, _RARE_TOKENS))()
_HOSTILE_CONNECTION = field_bytes.map(lambda b: b"Upgrade, " + b)


@st.composite
def upgrades(draw: st.DrawFn, *, hostile: bool = True, twilio: bool | None = None) -> Upgrade:
    """Upgrade requests; ``hostile`` adds header values a transport may refuse (or
    choke on); ``twilio`` forces the connection to be (True) or not be (False) Twilio's."""
    path_kind = draw(_one_of(_PATH_KINDS))
    if twilio is None:
        signature = pick(draw, _SIGNATURES_SOMETIMES, _RARE_SIGNATURES)
        user_agent = pick(draw, _UAS, field_bytes)
        mode = pick(draw, _MODES, _RARE_QUERY)
    elif twilio:
        path_kind = draw(st.sampled_from(["twilio_media", path_kind]))
        signature = pick(draw, _SIGNATURES, _RARE_SIGNATURES)
        user_agent = draw(st.sampled_from([None, b"Twilio.TmeWs/1.0"]))
        mode = draw(st.sampled_from([None, "twilio"]))
    else:
        path_kind = "token" if path_kind == "twilio_media" else path_kind
        signature, user_agent = None, draw(st.sampled_from([None, b"Mozilla/5.0 (X11)"]))
        mode = draw(st.sampled_from([None, "client", "TWILIO"]))
    if hostile:
        host = pick(draw, _HOSTS_HDR, field_bytes, 8)
        key = pick(draw, _KEYS, field_bytes, 10)
        protocols = pick(draw, _PROTOCOLS, _RARE_PROTOCOLS | field_bytes)
        connection = pick(draw, _CONNECTIONS, _HOSTILE_CONNECTION, 6)
        extensions = pick(draw, _EXTENSIONS, _HOSTILE_EXTENSIONS | field_bytes, 6)
    else:
        host = None
        key = draw(_one_of(_KEYS))
        protocols = pick(draw, _PROTOCOLS, _RARE_PROTOCOLS)
        connection = draw(_one_of(_CONNECTIONS))
        extensions = draw(_one_of(_EXTENSIONS))
    return Upgrade(
        path_kind=path_kind,
        path_token=draw(_TOKEN_RECIPES),
        path_suffix=draw(_one_of(_SUFFIXES)),
        plain_path=pick(draw, _PLAIN_PATHS, _RARE_PATH, 3) if path_kind == "plain" else "/",
        query_token=draw(_TOKEN_RECIPES) if draw(_DICE[4]) == 3 else None,
        model=pick(draw, _MODELS, _RARE_QUERY, 10),
        voice=pick(draw, _VOICES, _RARE_QUERY, 10),
        mode=mode,
        extra_query=pick(draw, _NO_EXTRA, _EXTRA_QUERY),
        query_order=draw(_DICE[8]),
        # Half allowed: past the Origin check is where the other checks are.
        origin=draw(_one_of(_ALLOWED_ORIGINS))
        if draw(_DICE[2])
        else pick(draw, _ORIGIN_TABLE, _RARE_ORIGINS, 6),
        user_agent=user_agent,
        signature=signature,
        forwarded_for=pick(draw, _FORWARDED, field_bytes),
        host=host,
        key=key,
        version=draw(_one_of(_VERSIONS)),
        subprotocols=protocols,
        connection=connection,
        extensions=extensions,
        extra_headers=pick(draw, _NO_EXTRA, _EXTRA_HEADERS),
    )


# -- the module's daemons --------------------------------------------------------------


@dataclass
class Node:
    """One daemon of the module, its watch, and its canary session."""

    name: str
    keeper: DaemonKeeper
    watch: Watch | None = None
    canary: Held[trio_websocket.WebSocketConnection] | None = None
    restarts: int = 0

    @property
    def daemon(self) -> Daemon:
        return self.keeper.daemon


class Env(FuzzEnv):
    """The module's fake, daemons and tallies (a plain class, not a dataclass:
    hypothesis prints every argument of a failing example, dataclass fields too)."""

    def __init__(self, portal: Portal, fake: FakeRealtime, main: Node, limited: Node) -> None:
        super().__init__()
        self.portal = portal
        self.fake = fake
        self.main = main
        self.limited = limited
        self.secrets: list[str] = []  # tokens and signatures sent during this property
        self.statuses: Counter[int | None] = Counter()
        self.ips = itertools.count(1)
        self.io_seconds = 0.0  # spent on sockets, as against generating examples

    def open(self, node: Node) -> None:
        """(Re)start the node's canary and baseline on its current daemon."""
        d = node.daemon
        node.canary = self.portal.run(self.portal.hold, lambda: client_session(d))
        self.portal.run(echo_probe, node.canary.value)
        node.watch = Watch(d)
        node.watch.baseline()

    def ensure(self, node: Node) -> None:
        """A live daemon for the next example (see DaemonKeeper)."""
        if node.keeper.ensure():
            node.restarts += 1
            self.open(node)

    def alive(self, node: Node, what: str) -> None:
        node.keeper.check_alive(what)

    def check(self, node: Node, label: str) -> None:
        """After a property: the canary still relays, and the daemon is at baseline."""
        self.alive(node, label)
        assert node.canary is not None and node.watch is not None
        self.portal.run(echo_probe, node.canary.value)
        node.watch.check(label)


def _config(fake: FakeRealtime, **limits: int) -> dict[str, dict[str, Any]]:
    return {
        "openai": {"realtime_url": fake.url},
        "server": {"public_url": PUBLIC, "trusted_proxies": ["127.0.0.1/32"]},
        "limits": dict(limits),
    }


@asynccontextmanager
async def _fake() -> AsyncIterator[FakeRealtime]:
    async with fake_realtime(echo=True, expected_key=TEST_OPENAI_KEY) as fake:
        yield fake


def _daemon(fake: FakeRealtime, **limits: int) -> Callable[[], AbstractAsyncContextManager[Daemon]]:
    def factory() -> AbstractAsyncContextManager[Daemon]:
        return running_daemon(_config(fake, **limits))

    return factory


@pytest.fixture(scope="module")
def env() -> Iterator[Env]:
    with trio_portal(_fake) as (portal, fake):
        main = Node("main", DaemonKeeper(portal, _daemon(fake)))
        limited = Node("limited", DaemonKeeper(portal, _daemon(fake, ws_upgrades_per_minute=RATE)))
        e = Env(portal, fake, main, limited)
        for node in (main, limited):
            node.keeper.start()
            e.open(node)
        print(f"\nupgrade fuzz: daemon logs {main.daemon.log_path}, {limited.daemon.log_path}")
        try:
            yield e
        finally:
            for node in (main, limited):
                if node.canary is not None:
                    portal.run(node.canary.release)
                node.keeper.stop()
            print(f"\nupgrade fuzz: {e.tally()}")
            print(f"upgrade fuzz: answers {dict(sorted(e.statuses.items(), key=str))}")
            print(f"upgrade fuzz: {e.io_seconds:.1f} s in requests")
            for node in (main, limited):
                if node.watch is not None:
                    print(f"upgrade fuzz [{node.name}]: " + "; ".join(node.watch.history))
                for death in node.keeper.deaths:
                    print(f"upgrade fuzz [{node.name}] daemon died: {death[-3000:]}")


@pytest.fixture(autouse=True)
def after_property(env: Env, request: pytest.FixtureRequest) -> Iterator[None]:
    for node in (env.main, env.limited):
        env.ensure(node)
    env.secrets = []
    yield
    for node in (env.main, env.limited):
        env.check(node, f"{request.node.name}[{node.name}]")
        # docs/contract.md §3: no log line ever holds a token or a signature.
        found = leaked(node.daemon.log_text(), env.secrets)
        assert not found, f"secrets in the {node.name} daemon's log: {found[:3]}"


# -- checking one answer ------------------------------------------------------------------


async def _upstream_opened(env: Env, index: int, b: Built) -> None:
    """The upstream of an accepted upgrade, opened exactly as §5/§6 say."""
    with trio.fail_after(10):
        conn = await env.fake.wait_connection(index)
        model = MODELS[0] if b.twilio else b.model
        assert conn.path == f"/v1/realtime?model={model}", conn.path
        assert conn.header("Authorization") == f"Bearer {TEST_OPENAI_KEY}"
        assert conn.header("OpenAI-Beta") is None  # the GA dialect
        if b.voice is not None and not b.twilio:
            # docs/contract.md §5: the voice's session.update went up before the client
            # was accepted.
            while not conn.received:
                await trio.sleep(0.001)
            first = orjson.loads(conn.received[0])
            assert first == {
                "type": "session.update",
                "session": {"type": "realtime", "audio": {"output": {"voice": b.voice}}},
            }, first


async def _upstream_closed(env: Env, index: int, b: Built) -> None:
    """Once the client's socket is gone, so is its upstream (client: close 1000)."""
    conn = env.fake.connections[index]
    with trio.fail_after(10):
        await conn.closed.wait()
    assert len(env.fake.connections) == index + 1, "one upgrade opened two upstreams"
    if not b.twilio:
        assert conn.close_code == 1000, conn.close_code
        if b.voice is None:
            assert conn.received == [], conn.received  # nothing of its own without a voice


def check_answer(b: Built, r: Response | None, expect: frozenset[int]) -> None:
    assert r is not None, "the connection closed without an answer"
    assert r.status in expect, (r.status, r.body[:200], sorted(expect))
    if r.status == 101:
        assert r.header("sec-websocket-accept") == ws_accept(b.key), r.headers
        assert (r.header("upgrade") or "").lower() == "websocket", r.headers
        assert "upgrade" in (r.header("connection") or "").lower(), r.headers
        chosen = r.header("sec-websocket-protocol")
        assert chosen is None or chosen in b.offered, (chosen, b.offered)
        return
    # A refusal: one line of reason (empty only for a transport's own 400).
    assert b"\n" not in r.body.rstrip(b"\n"), r.body[:300]
    if r.status in RELAY_REFUSALS - {400}:
        assert r.body.strip(), f"{r.status} without a reason"
    if r.status == 429:
        retry = r.header("retry-after") or ""
        assert retry.isdigit() and int(retry) >= 1, r.headers


def send(env: Env, node: Node, b: Built, expect: frozenset[int]) -> Response:
    """Send one upgrade, check the answer; after a 101, check its upstream and hang up."""
    index = len(env.fake.connections)
    with socket.create_connection(("127.0.0.1", node.daemon.port), timeout=10) as sock:
        sock.sendall(b.data)
        r = read_response(sock)
        if r is not None and r.status == 101 and r.status in expect:
            # Held open until the upstream is there: a Twilio stream opens it only
            # after the accept, and a client gone at once need not get one.
            env.portal.run(_upstream_opened, env, index, b)
    env.alive(node, "this request")
    env.statuses[r.status if r is not None else None] += 1
    check_answer(b, r, expect)
    assert r is not None
    if r.status == 101:
        env.portal.run(_upstream_closed, env, index, b)
    else:
        assert len(env.fake.connections) == index, "a refused upgrade opened an upstream"
    return r


# -- properties ---------------------------------------------------------------------------


def _one(env: Env, prop: str, u: Upgrade) -> None:
    start = time.perf_counter()
    env.ensure(env.main)
    b = build(u, env.main.daemon)
    env.secrets.extend(b.secrets)
    env.count(prop, 1)
    send(env, env.main, b, b.expect)
    env.io_seconds += time.perf_counter() - start


@settings(FUZZ, max_examples=900)
@given(u=upgrades(hostile=False))
def test_upgrades_get_the_spec_answer(env: Env, u: Upgrade) -> None:
    """Tokens, origins, models, voices, Twilio markers, in every combination."""
    _one(env, "spec_answer", u)


@settings(FUZZ, max_examples=300)
@given(u=upgrades(hostile=False, twilio=True))
def test_twilio_upgrades_need_a_signature(env: Env, u: Upgrade) -> None:
    _one(env, "twilio", u)


@settings(FUZZ, max_examples=500)
@given(u=upgrades(hostile=True))
def test_upgrades_with_hostile_header_values(env: Env, u: Upgrade) -> None:
    """Any byte HTTP allows in a header value, in every header the handshake reads."""
    _one(env, "hostile_headers", u)


@dataclass(frozen=True)
class Mutation:
    kind: str
    at: int  # a position, taken modulo the length it applies to
    data: bytes = b""


mutations = st.builds(
    Mutation,
    st.sampled_from(
        [
            "insert",
            "delete",
            "replace_line",
            "dup_line",
            "lf_only",
            "truncate",
            "append",
            "method",
            "version",
            "space_before_colon",
            "drop_line",
        ]
    ),
    st.integers(0, 10_000),
    st.binary(max_size=40) | st.sampled_from([b"\r\n", b"\n", b"\x00", b":", b" ", b"\r\n\r\n"]),
)


def mutate(data: bytes, m: Mutation) -> bytes:
    head, sep, tail = data.partition(b"\r\n\r\n")
    lines = head.split(b"\r\n")
    i = m.at % max(1, len(data))
    line = 1 + m.at % max(1, len(lines) - 1)
    if m.kind == "insert":
        return data[:i] + m.data + data[i:]
    if m.kind == "delete":
        return data[:i] + data[i + 1 + len(m.data) :]
    if m.kind == "truncate":
        return data[:i]
    if m.kind == "append":
        return data + m.data
    if m.kind == "lf_only":
        return data.replace(b"\r\n", b"\n")
    if m.kind == "method":
        rest = data.split(b"\r\n", 1)[1] if b"\r\n" in data else b""  # after lf_only: none
        return m.data + lines[0][lines[0].find(b" ") :] + b"\r\n" + rest
    if m.kind == "version":
        first = lines[0].rsplit(b" ", 1)[0] + b" " + (m.data or b"HTTP/1.0")
        return b"\r\n".join([first, *lines[1:]]) + sep + tail
    if len(lines) < 2:
        return data + m.data
    if m.kind == "replace_line":
        lines[line] = m.data
    elif m.kind == "dup_line":
        lines.insert(line, lines[line])
    elif m.kind == "drop_line":
        del lines[line]
    elif m.kind == "space_before_colon":
        lines[line] = lines[line].replace(b":", b" :", 1)
    return b"\r\n".join(lines) + sep + tail


def _key_in(data: bytes) -> bytes | None:
    """The one Sec-WebSocket-Key of a (mangled) request head, if it has exactly one."""
    head = data.partition(b"\r\n\r\n")[0]
    keys = [
        line.split(b":", 1)[1].strip(b" \t")
        for line in head.split(b"\r\n")
        if line.lower().startswith(b"sec-websocket-key:")
    ]
    return keys[0] if len(keys) == 1 else None


@settings(FUZZ, max_examples=700)
@given(u=upgrades(), ms=st.lists(mutations, min_size=1, max_size=3))
def test_mangled_upgrade_bytes(env: Env, u: Upgrade, ms: list[Mutation]) -> None:
    """Any bytes: a 4xx, a correct handshake or a closed connection; no 5xx, no hang."""
    env.ensure(env.main)
    b = build(u, env.main.daemon)
    env.secrets.extend(b.secrets)
    data = b.data
    for m in ms:
        data = mutate(data, m)
    env.count("mangled", 1)
    # Half-closed: a truncated request must not wait for bytes that will never come.
    r = exchange(env.main.daemon.port, data, half_close=True, timeout=10)
    env.alive(env.main, "these bytes")
    env.statuses[r.status if r is not None else None] += 1
    if r is None:
        return
    assert r.status == 101 or 200 <= r.status < 500, (r.status, r.body[:200])
    if r.status == 101:
        key = _key_in(data)
        if key is not None:
            assert r.header("sec-websocket-accept") == ws_accept(key), r.headers


@settings(FUZZ, max_examples=120)
@given(
    firsts=st.lists(upgrades(hostile=False, twilio=False), min_size=RATE, max_size=RATE),
    twilio=upgrades(hostile=False, twilio=True),
    last=upgrades(hostile=False, twilio=False),
    prefix=field_bytes,
)
def test_upgrade_rate_limit_is_checked_first(
    env: Env, firsts: list[Upgrade], twilio: Upgrade, last: Upgrade, prefix: bytes
) -> None:
    """docs/contract.md §5 check 1: past ws_upgrades_per_minute for its IP, any client upgrade is
    429 + Retry-After, whatever else is wrong with it; Twilio's are not counted,
    unless their signature or stream token fails (§10): then they are, and get 429."""
    env.ensure(env.limited)
    n = next(env.ips)
    ip = f"10.{(n >> 16) & 255}.{(n >> 8) & 255}.{n & 255}".encode()
    # The relay trusts 127.0.0.1: the last hop is the client, whatever comes before.
    xff = (prefix + b", " + ip) if prefix else ip

    def one(u: Upgrade, expect: frozenset[int] | None = None, *, empty: bool = False) -> None:
        clean = replace(u, forwarded_for=xff, version=b"13", key=None, host=None)
        b = build(clean, env.limited.daemon)
        env.secrets.extend(b.secrets)
        if expect is None:
            # With the bucket empty, what would be a 403 for a Twilio upgrade is a 429.
            expect = frozenset(429 if empty and s == 403 else s for s in b.expect)
        send(env, env.limited, b, expect)

    for u in firsts:
        one(u)
    one(twilio, empty=True)  # valid: exempt, its own answer; forged: counted, 429
    one(last, frozenset({429}))
    one(twilio, empty=True)  # the same once the IP's bucket is empty
    env.count("rate_limit", RATE + 3)
