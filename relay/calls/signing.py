"""``X-Relay-Signature`` for call events and HTTP tool requests (docs/contract.md §11).

The usual signed-webhook shape (Stripe's): ``t=<unix seconds>,v1=<hex HMAC-SHA256>``
over ``"<t>.<raw body>"`` keyed with ``EVENTS_SIGNING_KEY``. The relay only signs;
:func:`verify` is what a receiver does, kept here so the tests (and the README's
receiver snippets, which a test runs) check against one reference.
"""

from __future__ import annotations

import hashlib
import hmac
import time

HEADER = "X-Relay-Signature"

# A real header is ~80 characters; a longer one is refused before any parsing, so a
# hostile sender cannot make a receiver split or hash megabytes.
_MAX_HEADER = 4096
# Unix seconds fit in 10 digits until 2286; a longer ``t`` is not a timestamp.
_MAX_T_DIGITS = 12
_HEX_DIGEST_LEN = 64


def _mac(key: str, t: int, body: bytes) -> str:
    signed = str(t).encode("ascii") + b"." + body
    return hmac.new(key.encode("utf-8"), signed, hashlib.sha256).hexdigest()


def signature_header(key: str, body: bytes, now: float | None = None) -> str:
    """The header value for ``body`` sent at ``now`` (default: the current time)."""
    t = int(time.time() if now is None else now)
    return f"t={t},v1={_mac(key, t, body)}"


def _parse(header: str) -> tuple[int, list[str]] | None:
    """``(t, v1 signatures)``, or None when the header is not well formed. Unknown
    schemes (a future ``v2``, Stripe's ``v0``) are skipped, as receivers should."""
    t: int | None = None
    signatures: list[str] = []
    for part in header.split(","):
        name, sep, value = part.strip().partition("=")
        if not sep:
            return None
        if name == "t":
            # One t only: two would leave it open which one was signed.
            if t is not None or not value.isascii() or not value.isdigit():
                return None
            if len(value) > _MAX_T_DIGITS:
                return None
            t = int(value)
        elif name == "v1":
            signatures.append(value)
    if t is None or not signatures:
        return None
    return t, signatures


def verify(
    header: str | None,
    body: bytes,
    key: str,
    now: float | None = None,
    tolerance: float = 300,
) -> bool:
    """True when ``header`` signs ``body`` with ``key`` and its ``t`` is within
    ``tolerance`` seconds of ``now``, in the past (replays) or the future (a ``t``
    made up ahead of time). Several ``v1`` entries are allowed (key rotation); any
    one that matches is enough. The comparison is constant-time."""
    if header is None or len(header) > _MAX_HEADER:
        return False
    parsed = _parse(header)
    if parsed is None:
        return False
    t, signatures = parsed
    current = time.time() if now is None else now
    if abs(current - t) > tolerance:
        return False
    expected = _mac(key, t, body).encode("ascii")
    matched = False
    for candidate in signatures:
        # Every entry is compared (no early exit), so timing says nothing about
        # which one matched; a non-hex or wrong-length entry simply does not match.
        raw = candidate.encode("utf-8", "replace")
        matched |= len(raw) == _HEX_DIGEST_LEN and hmac.compare_digest(raw, expected)
    return matched
