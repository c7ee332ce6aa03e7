"""The web backend of ``relay demo``: the page, a token endpoint, and a refusal explainer.

It plays the part a real site's backend plays beside relay (README "Browser
clients"): it serves the page, and mints a fresh client token per session
with the relay's ``ENCRYPTION_KEY`` (relay lets one token hold one session).
Plain HTTP/1.1 on loopback, one request per connection, parsed by h11; it never
shares Hypercorn's listener hook with the relay it runs beside.

``POST /diagnose`` exists because a browser cannot see why a WebSocket upgrade
was refused: the page is told 1006 and nothing else, whether relay answered
401, 403 or 429. The backend repeats the handshake the page made (same token
and query, the page's own ``Origin``) from the server side, where the status
and its one-line reason are visible, and reports them.
"""

from __future__ import annotations

import base64
import contextlib
import logging
import mimetypes
import os
import urllib.parse
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import h11
import orjson
import trio

from relay.admission.tokens import mint
from relay.config import Settings

log = logging.getLogger("relay.demo")

MAX_BODY = 8 * 1024
REQUEST_SECONDS = 10.0
DIAGNOSE_SECONDS = 5.0
TOKEN_TTL = 60
# The query a page may ask the explainer to repeat: relay's own parameters only.
RELAY_PARAMS = ("model", "voice")

Extra = Callable[[], Any]  # a JSON-able snapshot served at GET /fake/sessions


@dataclass(frozen=True)
class Site:
    settings: Settings
    page_dir: Path
    relay_host: str
    relay_port: int
    page_port: int
    fake: bool
    fake_sessions: Extra | None = None

    @property
    def relay_url(self) -> str:
        host = f"[{self.relay_host}]" if ":" in self.relay_host else self.relay_host
        return f"ws://{host}:{self.relay_port}"

    def page_hosts(self) -> frozenset[str]:
        """The Host headers this backend answers: a DNS-rebinding page gets nothing."""
        return frozenset(f"{h}:{self.page_port}" for h in ("localhost", "127.0.0.1", "[::1]"))

    def config(self) -> dict[str, Any]:
        s = self.settings
        return {
            "relayUrl": self.relay_url,
            "fake": self.fake,
            "dialect": s.openai.dialect,
            "model": s.openai.model,
            "sessionSeconds": s.limits.session_seconds,
        }


async def serve_connection(site: Site, stream: trio.SocketStream) -> None:
    """Answer one request on ``stream``, then close it."""
    conn = h11.Connection(h11.SERVER)
    try:
        with trio.move_on_after(REQUEST_SECONDS):
            request, body = await _read_request(conn, stream)
            status, headers, content = await _answer(site, request, body)
            await _send(conn, stream, status, headers, content)
    except (h11.RemoteProtocolError, _TooLarge):
        await _send_quietly(conn, stream, 400, b"bad request\n")
    except (trio.BrokenResourceError, trio.ClosedResourceError, OSError):
        pass  # the browser went away; nothing to answer
    finally:
        await trio.aclose_forcefully(stream)


class _TooLarge(Exception):
    pass


async def _read_request(
    conn: h11.Connection, stream: trio.SocketStream
) -> tuple[h11.Request, bytes]:
    request: h11.Request | None = None
    body = b""
    while True:
        event = conn.next_event()
        if event is h11.NEED_DATA:
            conn.receive_data(await stream.receive_some(16384))
        elif isinstance(event, h11.Request):
            request = event
        elif isinstance(event, h11.Data):
            body += event.data
            if len(body) > MAX_BODY:
                raise _TooLarge
        elif isinstance(event, h11.EndOfMessage) and request is not None:
            return request, body
        else:
            raise h11.RemoteProtocolError("connection closed mid-request")


async def _answer(
    site: Site, request: h11.Request, body: bytes
) -> tuple[int, list[tuple[str, str]], bytes]:
    headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in request.headers}
    if headers.get("host") not in site.page_hosts():
        return _text(421, "this demo answers only on localhost\n")
    path = urllib.parse.urlsplit(request.target.decode("latin-1")).path
    method = request.method.decode("ascii", "replace")
    if method == "POST" and path == "/diagnose":
        origin = headers.get("origin") or f"http://{headers['host']}"
        return _json(await diagnose(site, body, origin))
    if method != "GET":
        return _text(405, "method not allowed\n")
    if path == "/config.json":
        return _json(site.config())
    if path == "/token":
        key = site.settings.secrets.encryption_key
        assert key is not None  # the demo always has one (made up if not set)
        ttl = min(TOKEN_TTL, site.settings.auth.token_max_ttl_seconds)
        return _json({"token": mint(key, ttl), "expires_in": ttl})
    if path == "/fake/sessions" and site.fake_sessions is not None:
        return _json(site.fake_sessions())
    return _static(site.page_dir, "index.html" if path == "/" else path.lstrip("/"))


def _static(root: Path, name: str) -> tuple[int, list[tuple[str, str]], bytes]:
    # Only plain names in the page's own folder: no "..", no subfolders.
    if "/" in name or name.startswith(".") or not (root / name).is_file():
        return _text(404, "not found\n")
    kind = mimetypes.guess_type(name)[0] or "application/octet-stream"
    if name.endswith(".js"):
        kind = "text/javascript"  # modules must be served as JavaScript
    return 200, [("content-type", f"{kind}; charset=utf-8")], (root / name).read_bytes()


async def diagnose(site: Site, body: bytes, origin: str) -> dict[str, Any]:
    """Repeat the page's upgrade from here and report relay's answer."""
    try:
        asked = orjson.loads(body)
        token = str(asked["token"])
        query = urllib.parse.parse_qs(str(asked.get("query", "")).lstrip("?"))
    except (orjson.JSONDecodeError, KeyError, TypeError):
        return {"status": 0, "reason": "the page's question was not understood"}
    kept = {k: v[0] for k, v in query.items() if k in RELAY_PARAMS and v}
    target = "/token/" + urllib.parse.quote(token, safe="")
    if kept:
        target += "?" + urllib.parse.urlencode(kept)
    try:
        with trio.fail_after(DIAGNOSE_SECONDS):
            status, reason = await _handshake(site.relay_host, site.relay_port, target, origin)
    except (OSError, trio.TooSlowError) as exc:
        return {"status": 0, "reason": f"relay is not reachable ({exc.__class__.__name__})"}
    if status == 101:
        return {"status": 0, "reason": "relay accepts this session now; the first try was lost"}
    return {"status": status, "reason": reason}


async def _handshake(host: str, port: int, target: str, origin: str) -> tuple[int, str]:
    """Send one WebSocket upgrade; the status and the body's first line (relay's reason)."""
    authority = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
    request = h11.Request(
        method="GET",
        target=target,
        headers=[
            ("Host", authority),
            ("Upgrade", "websocket"),
            ("Connection", "Upgrade"),
            ("Sec-WebSocket-Key", base64.b64encode(os.urandom(16)).decode()),
            ("Sec-WebSocket-Version", "13"),
            ("Origin", origin),
        ],
    )
    stream = await trio.open_tcp_stream(host, port)
    conn = h11.Connection(h11.CLIENT)
    try:
        await stream.send_all(conn.send(request) or b"")
        status, body = 0, b""
        while True:
            event = conn.next_event()
            if event is h11.NEED_DATA:
                data = await stream.receive_some(16384)
                conn.receive_data(data)
                if not data and status:
                    break
            elif isinstance(event, h11.InformationalResponse):
                return event.status_code, ""  # 101: accepted; closing ends that session
            elif isinstance(event, h11.Response):
                status = event.status_code
            elif isinstance(event, h11.Data):
                body += event.data[:MAX_BODY]
            else:
                break
        return status, body.decode("utf-8", "replace").strip().splitlines()[0] if body else ""
    finally:
        await trio.aclose_forcefully(stream)


def _json(data: Mapping[str, Any] | list[Any]) -> tuple[int, list[tuple[str, str]], bytes]:
    return 200, [("content-type", "application/json")], orjson.dumps(data)


def _text(status: int, text: str) -> tuple[int, list[tuple[str, str]], bytes]:
    return status, [("content-type", "text/plain; charset=utf-8")], text.encode()


async def _send(
    conn: h11.Connection,
    stream: trio.SocketStream,
    status: int,
    headers: list[tuple[str, str]],
    content: bytes,
) -> None:
    fixed = [
        ("content-length", str(len(content))),
        ("cache-control", "no-store"),
        ("connection", "close"),
        *headers,
    ]
    for event in (
        h11.Response(status_code=status, headers=fixed),
        h11.Data(data=content),
        h11.EndOfMessage(),
    ):
        data = conn.send(event)
        if data:
            await stream.send_all(data)


async def _send_quietly(
    conn: h11.Connection, stream: trio.SocketStream, status: int, content: bytes
) -> None:
    if conn.our_state not in (h11.IDLE, h11.SEND_RESPONSE):
        return
    with contextlib.suppress(
        h11.LocalProtocolError, trio.BrokenResourceError, trio.ClosedResourceError, OSError
    ):
        await _send(conn, stream, status, [("content-type", "text/plain")], content)
