"""Who is asking and may they: client IP, Origin allowlist, rate buckets.

Each check returns a :class:`Refusal` (status, one-line reason, headers) or None,
so the HTTP and WebSocket front ends answer the same way.
"""

from __future__ import annotations

import ipaddress
import math
from collections.abc import Iterable
from dataclasses import dataclass, field
from urllib.parse import urlsplit

from relay.config import AuthSettings, IPNetwork
from relay.store.base import Store


@dataclass(frozen=True)
class Refusal:
    status: int
    reason: str
    headers: tuple[tuple[str, str], ...] = field(default=())


def _ip(text: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    try:
        return ipaddress.ip_address(text.strip())
    except ValueError:
        return None


def _trusted(ip: str, networks: Iterable[IPNetwork]) -> bool:
    addr = _ip(ip)
    return addr is not None and any(addr in net for net in networks)


def client_ip(peer: str, forwarded_for: str | None, trusted: tuple[IPNetwork, ...]) -> str:
    """The peer address, unless the peer is a trusted proxy; then the nearest untrusted hop.

    X-Forwarded-For is read right to left: every hop a trusted proxy added is
    believed, the first address not in ``trusted`` is the client. A garbled
    entry stops the walk (it was written by someone we do not trust).
    """
    if not forwarded_for or not trusted or not _trusted(peer, trusted):
        return peer
    hops = [h.strip() for h in forwarded_for.split(",") if h.strip()]
    current = peer
    for hop in reversed(hops):
        addr = _ip(hop)
        if addr is None:
            break
        current = str(addr)
        if not any(addr in net for net in trusted):
            return current
    return current


def ip_allowed(ip: str, networks: tuple[IPNetwork, ...]) -> bool:
    return _trusted(ip, networks)


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
