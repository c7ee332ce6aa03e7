"""How sessions end: the close code each side gets, and closing without hanging."""

from __future__ import annotations

from dataclasses import dataclass

from relay.ws.connection import WebSocket

# Codes that must never be sent in a close frame (RFC 6455 §7.4.1), or that only
# describe a missing close; the client gets 1011 for those (docs/contract.md §5).
_NOT_SENDABLE = frozenset({1004, 1005, 1006, 1015})
MAX_REASON_BYTES = 123


@dataclass(frozen=True)
class Ending:
    """Why a session ended and what each side is told."""

    outcome: str  # metrics label: client_closed, upstream_closed, upstream_failed, oversize, ...
    client_code: int | None  # None: the client is already gone
    client_reason: str = ""
    upstream_code: int | None = 1000  # None: the upstream is already gone
    upstream_reason: str = ""


def client_code_for_upstream(code: int | None) -> int:
    if code is None or code in _NOT_SENDABLE or not (1000 <= code <= 4999) or 1016 <= code < 3000:
        return 1011
    return code


def clip_reason(reason: str) -> str:
    data = reason.encode("utf-8")
    if len(data) <= MAX_REASON_BYTES:
        return reason
    return data[:MAX_REASON_BYTES].decode("utf-8", "ignore")


async def close_upstream(up: WebSocket, code: int, reason: str = "") -> None:
    """Send a close and wait briefly for the peer's; never hangs on a stalled peer
    (``WebSocket.close`` is shielded and bounded)."""
    await up.close(code, clip_reason(reason))
