"""The HTTP/1.1 side of a WebSocket: request heads, upgrade answers, refusals."""

from __future__ import annotations

import base64
import binascii
import hashlib
from dataclasses import dataclass
from urllib.parse import unquote

GUID = b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11"
# The largest request head taken, blank line included (docs/contract.md §10):
# larger ones get 431, as h11's default incomplete-event limit.
MAX_HEAD = 16 * 1024


class HeadError(ValueError):
    """A request head refused before anything else is looked at: ``status``, one-line ``reason``."""

    def __init__(self, status: int, reason: str) -> None:
        super().__init__(status, reason)
        self.status = status
        self.reason = reason


@dataclass(frozen=True)
class RequestHead:
    method: str
    raw_path: bytes
    query_string: bytes
    http_version: str
    headers: list[tuple[bytes, bytes]]  # names lower-cased, in order

    @property
    def path(self) -> str:
        """Percent-decoded, as an ASGI server would give it."""
        return unquote(self.raw_path.decode("latin-1"))

    def header(self, name: bytes) -> str | None:
        """All values of ``name`` joined with ", " (HTTP list semantics), or None."""
        values = [v.decode("latin-1") for k, v in self.headers if k == name]
        return ", ".join(values) if values else None

    def tokens(self, name: bytes) -> set[str]:
        value = self.header(name) or ""
        return {t.strip().lower() for t in value.split(",") if t.strip()}

    @property
    def asks_websocket(self) -> bool:
        """``Upgrade: websocket``, valid request or not."""
        return "websocket" in self.tokens(b"upgrade")

    @property
    def is_websocket_upgrade(self) -> bool:
        return (
            self.method == "GET"
            and self.http_version == "1.1"
            and self.asks_websocket
            and "upgrade" in self.tokens(b"connection")
        )


def parse_head(head: bytes) -> RequestHead:
    """A request head (up to and excluding the blank line); :class:`HeadError` (400)
    if it is not valid HTTP/1.1 framing."""
    text = head.decode("latin-1")
    request_line, *lines = text.split("\r\n")
    bare = text.replace("\r\n", "")
    if "\r" in bare or "\n" in bare:
        # A bare CR or LF: one parser's line end is another's value (request
        # smuggling, forged headers), so neither may appear inside a line.
        raise HeadError(400, "CR or LF inside a header value")
    try:
        method, target, version = request_line.split(" ")
    except ValueError:
        raise HeadError(400, "malformed request line") from None
    if not version.startswith("HTTP/") or not target.startswith("/"):
        raise HeadError(400, "malformed request line")
    headers: list[tuple[bytes, bytes]] = []
    for line in lines:
        name, sep, value = line.partition(":")
        if not sep or not name or name != name.strip() or line[0] in " \t":
            # No obsolete line folding, no space before the colon.
            raise HeadError(400, "malformed header line")
        headers.append((name.lower().encode("latin-1"), value.strip().encode("latin-1")))
    raw_path, _, query = target.partition("?")
    return RequestHead(
        method,
        raw_path.encode("latin-1"),
        query.encode("latin-1"),
        version[5:],
        headers,
    )


def upgrade_problem(head: RequestHead) -> tuple[int, str] | None:
    """Why this upgrade is not a valid RFC 6455 handshake, as (status, reason)."""
    hosts = sum(1 for name, _ in head.headers if name == b"host")
    if hosts != 1:  # RFC 9112 §3.2: exactly one Host, else 400
        return 400, "missing Host header" if not hosts else "more than one Host header"
    if head.header(b"sec-websocket-version") != "13":
        return 426, "unsupported WebSocket version (13 expected)"
    key = head.header(b"sec-websocket-key") or ""
    try:
        if len(base64.b64decode(key, validate=True)) != 16:
            raise ValueError
    except (binascii.Error, ValueError):
        return 400, "invalid Sec-WebSocket-Key"
    return None


def accept_value(key: str) -> str:
    return base64.b64encode(hashlib.sha1(key.encode("latin-1") + GUID).digest()).decode()


def upgrade_response(key: str, subprotocol: str | None) -> bytes:
    lines = [
        "HTTP/1.1 101 Switching Protocols",
        "Upgrade: websocket",
        "Connection: Upgrade",
        f"Sec-WebSocket-Accept: {accept_value(key)}",
    ]
    if subprotocol:
        lines.append(f"Sec-WebSocket-Protocol: {subprotocol}")
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")


_REASONS = {
    400: "Bad Request",
    401: "Unauthorized",
    403: "Forbidden",
    426: "Upgrade Required",
    429: "Too Many Requests",
    431: "Request Header Fields Too Large",
    502: "Bad Gateway",
    503: "Service Unavailable",
}


def refusal_response(status: int, reason: str, headers: tuple[tuple[str, str], ...] = ()) -> bytes:
    """A complete HTTP refusal with a one-line plain-text body; the connection closes."""
    body = (reason + "\n").encode("utf-8")
    phrase = _REASONS.get(status, "Refused")
    lines = [
        f"HTTP/1.1 {status} {phrase}",
        "content-type: text/plain; charset=utf-8",
        f"content-length: {len(body)}",
        "connection: close",
    ]
    lines += [f"{k.lower()}: {v}" for k, v in headers]
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + body
