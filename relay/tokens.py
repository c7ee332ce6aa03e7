"""Client tokens (SPEC §4): AES-GCM over a small JSON claim, base64url without padding.

    token = base64url_nopad(nonce[12] || AESGCM(key).encrypt(nonce, plaintext, None))

Pure: no I/O. Verification never raises on bad input; it answers with a reason.
"""

from __future__ import annotations

import base64
import binascii
import os
import secrets
import time

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


def mint(key: bytes, ttl_seconds: int, *, now: float | None = None) -> str:
    """A client token valid for ``ttl_seconds`` from ``now``."""
    issued = int(time.time() if now is None else now)
    plaintext = orjson.dumps({"origin": "client", "exp": issued + int(ttl_seconds)})
    nonce = os.urandom(NONCE_BYTES)
    return b64url_encode(nonce + AESGCM(key).encrypt(nonce, plaintext, None))


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
    if not token or len(token) > MAX_TOKEN_CHARS:
        return "token missing or too long"
    try:
        raw = b64url_decode(token)
    except (binascii.Error, ValueError, UnicodeEncodeError):
        return "token is not base64url"
    if len(raw) < NONCE_BYTES + TAG_BYTES:
        return "token too short"
    try:
        plaintext = AESGCM(key).decrypt(raw[:NONCE_BYTES], raw[NONCE_BYTES:], None)
    except InvalidTag:
        return "token does not decrypt"
    try:
        claims = orjson.loads(plaintext)
    except orjson.JSONDecodeError:
        return "token claims are not JSON"
    if not isinstance(claims, dict) or claims.get("origin") != "client":
        return "token origin is not client"
    exp = claims.get("exp")
    if isinstance(exp, bool) or not isinstance(exp, int):
        return "token exp is not an integer"
    current = time.time() if now is None else now
    if current > exp + skew_seconds:
        return "token expired"
    if exp - current > max_ttl_seconds + skew_seconds:
        return "token lifetime too long"
    return None
