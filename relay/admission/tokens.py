"""Client tokens (docs/contract.md §4): AES-GCM over a small JSON claim, base64url without padding.

    token = base64url_nopad(nonce[12] || AESGCM(key).encrypt(nonce, plaintext, None))

Pure: no I/O. Verification never raises on bad input; it answers with a reason.
"""

from __future__ import annotations

import base64
import binascii
import os
import secrets
import time
from typing import Any

import orjson
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

NONCE_BYTES = 12
TAG_BYTES = 16
# A token longer than this cannot be one we minted with any sane claim; refuse it
# before spending time on base64 and AES.
MAX_TOKEN_CHARS = 4096


def b64url_encode(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def b64url_decode(text: str) -> bytes:
    padded = text + "=" * (-len(text) % 4)
    return base64.urlsafe_b64decode(padded.encode("ascii"))


def new_key() -> str:
    """A fresh 32-byte ENCRYPTION_KEY, base64url without padding."""
    return b64url_encode(secrets.token_bytes(32))


def seal(key: bytes, claims: dict[str, object]) -> str:
    """A token carrying ``claims``: AES-GCM under ``key`` with a fresh nonce."""
    nonce = os.urandom(NONCE_BYTES)
    return b64url_encode(nonce + AESGCM(key).encrypt(nonce, orjson.dumps(claims), None))


def mint(key: bytes, ttl_seconds: int, *, now: float | None = None) -> str:
    """A client token valid for ``ttl_seconds`` from ``now``."""
    issued = int(time.time() if now is None else now)
    return seal(key, {"origin": "client", "exp": issued + int(ttl_seconds)})


def open_claims(
    key: bytes, token: str, *, what: str = "token"
) -> tuple[dict[str, Any] | None, str]:
    """(the claims, "") of a token that decrypts to a JSON object; else (None, a
    one-line reason starting with ``what``, never holding the token)."""
    if not token or len(token) > MAX_TOKEN_CHARS:
        return None, f"{what} missing or too long"
    try:
        raw = b64url_decode(token)
    except (binascii.Error, ValueError, UnicodeEncodeError):
        return None, f"{what} is not base64url"
    if len(raw) < NONCE_BYTES + TAG_BYTES:
        return None, f"{what} too short"
    try:
        plaintext = AESGCM(key).decrypt(raw[:NONCE_BYTES], raw[NONCE_BYTES:], None)
    except InvalidTag:
        return None, f"{what} does not decrypt"
    try:
        claims = orjson.loads(plaintext)
    except orjson.JSONDecodeError:
        return None, f"{what} claims are not JSON"
    # Claims that are not an object have no origin: the caller's origin check says so.
    return (claims if isinstance(claims, dict) else {}), ""


def expiry_problem(
    claims: dict[str, Any], *, max_ttl_seconds: int, skew_seconds: int, now: float | None, what: str
) -> str | None:
    """None when ``exp`` is an integer inside [now - skew, now + max_ttl + skew]."""
    exp = claims.get("exp")
    if isinstance(exp, bool) or not isinstance(exp, int):
        return f"{what} exp is not an integer"
    current = time.time() if now is None else now
    if current > exp + skew_seconds:
        return f"{what} expired"
    if exp - current > max_ttl_seconds + skew_seconds:
        return f"{what} lifetime too long"
    return None


def token_id(token: str) -> str | None:
    """What identifies a token: its nonce (hex), or None if it does not decode.

    The base64 decoder forgives padding, the standard alphabet and stray
    characters, so one token can be spelled many ways; its nonce cannot, and
    per-token caps count by it (docs/contract.md §10).
    """
    if not token or len(token) > MAX_TOKEN_CHARS:
        return None
    try:
        raw = b64url_decode(token)
    except (binascii.Error, ValueError, UnicodeEncodeError):
        return None
    return raw[:NONCE_BYTES].hex() if len(raw) >= NONCE_BYTES + TAG_BYTES else None


def verify(
    key: bytes,
    token: str,
    *,
    max_ttl_seconds: int,
    skew_seconds: int,
    now: float | None = None,
) -> str | None:
    """None when the token is valid; otherwise a one-line reason (never the token itself)."""
    claims, problem = open_claims(key, token)
    if claims is None:
        return problem
    if claims.get("origin") != "client":
        return "token origin is not client"
    return expiry_problem(
        claims, max_ttl_seconds=max_ttl_seconds, skew_seconds=skew_seconds, now=now, what="token"
    )
