"""Who is asking and may they: client IP (``admission.client_ip``), Origin allowlist, rate buckets.

Each check returns a :class:`Refusal` (status, one-line reason, headers) or None,
so the HTTP and WebSocket front ends answer the same way.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from urllib.parse import urlsplit

from relay.admission.client_ip import client_ip, forwarded_lines, ip_allowed, ip_key
from relay.config import AuthSettings
from relay.store.base import Store

__all__ = [
    "OriginPolicy",
    "Refusal",
    "client_ip",
    "forwarded_lines",
    "ip_allowed",
    "ip_key",
    "rate_limit",
]


@dataclass(frozen=True)
class Refusal:
    status: int
    reason: str
    headers: tuple[tuple[str, str], ...] = field(default=())


_DEFAULT_PORTS = {"http": 80, "https": 443}


def _origin_key(origin: str) -> tuple[str, str, int] | None:
    try:
        parts = urlsplit(origin.strip())
        port = parts.port
    except ValueError:
        return None
    scheme = parts.scheme.lower()
    if scheme not in _DEFAULT_PORTS or not parts.hostname:
        return None
    if parts.path not in ("", "/") or parts.query or parts.fragment or parts.username:
        return None
    return scheme, parts.hostname.lower(), port if port is not None else _DEFAULT_PORTS[scheme]


class OriginPolicy:
    """Exact (scheme, host, port) match against the allowlist, plus localhost over http."""

    def __init__(self, auth: AuthSettings) -> None:
        self._allowed = {k for o in auth.allowed_origins if (k := _origin_key(o)) is not None}
        self._localhost = auth.allow_localhost

    def allows(self, origin: str | None) -> bool:
        if not origin:
            return False
        key = _origin_key(origin)
        if key is None:
            return False
        if key in self._allowed:
            return True
        return self._localhost and key[0] == "http" and key[1] == "localhost"


async def rate_limit(store: Store, key: str, per_minute: int) -> Refusal | None:
    """Take a token from ``key``'s bucket; 429 with Retry-After (whole seconds, ≥ 1) if empty."""
    verdict = await store.take(key, per_minute, 60.0)
    if verdict.allowed:
        return None
    wait = max(1, math.ceil(verdict.retry_after))
    return Refusal(429, "rate limit exceeded", (("Retry-After", str(wait)),))
