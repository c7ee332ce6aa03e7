"""An operator's backend for phone calls that act (docs/contract.md §11), over real
HTTP on 127.0.0.1: it answers the relay's HTTP tool requests with scripted
answers and receives its ``call.ended`` events.

    async with receiver(key) as r:
        r.tool_url("lookup_order")     # [[calls.http_tools]] url
        r.events_url                   # [calls] events_url
        r.script("lookup_order", ToolAnswer(body={"status": "shipped"}))
        ...
        r.tool_requests("lookup_order")[0].signature_ok

It checks ``X-Relay-Signature`` as a real receiver would, with its own code (not
the relay's): HMAC-SHA256 keyed with the shared key over ``"<t>.<raw body>"``,
compared in constant time against every ``v1``, ``t`` refused when more than
five minutes old (or ahead). A request whose signature fails is answered 401
and recorded with the reason, so a test can assert on both.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from contextlib import asynccontextmanager
from dataclasses import dataclass, field, replace
from typing import Any

import trio

from relay.testing.loopback import serving

__all__ = ["EventFault", "ReceivedRequest", "Receiver", "ToolAnswer", "receiver", "verify"]

HEADER = "x-relay-signature"
TOLERANCE_SECONDS = 300.0
MAX_BODY = 1 << 20  # a relay sends KiB; more is refused (413), not buffered without end
MAX_HEADER = 4096

Send = Callable[[dict[str, Any]], Awaitable[None]]
Receive = Callable[[], Awaitable[dict[str, Any]]]


def verify(header: str | None, body: bytes, key: str, now: float | None = None) -> str | None:
    """Why this signature is not good (a short reason), or None when it is.

    Stripe's scheme, which docs/contract.md §11 names: ``t=<unix seconds>,v1=<hex>``,
    any number of ``v1`` (a key rotation may send two), each compared in
    constant time; ``t`` more than :data:`TOLERANCE_SECONDS` away from now refused."""
    if header is None:
        return "missing"
    if len(header) > MAX_HEADER:
        return "too long"
    stamp: str | None = None
    candidates: list[str] = []
    for part in header.split(","):
        name, sep, value = part.strip().partition("=")
        if not sep:
            return "malformed"
        if name == "t":
            if stamp is not None:
                return "two timestamps"
            stamp = value
        elif name == "v1":
            candidates.append(value)
    if stamp is None or not stamp.isascii() or not stamp.isdigit():
        return "no timestamp"
    if not candidates:
        return "no v1 signature"
    now = time.time() if now is None else now
    if abs(now - int(stamp)) > TOLERANCE_SECONDS:
        return "timestamp outside tolerance"
    expected = hmac.new(key.encode(), stamp.encode() + b"." + body, hashlib.sha256).hexdigest()
    # compare_digest on ASCII bytes: a non-ASCII candidate must not raise.
    want = expected.encode()
    if any(hmac.compare_digest(want, c.encode("utf-8", "replace")) for c in candidates):
        return None
    return "mismatch"


@dataclass(frozen=True)
class ToolAnswer:
    """How the backend answers one tool request.

    ``body``: a JSON value (sent as JSON) or raw bytes (sent as they are, e.g. not
    JSON); ``status``; ``delay`` seconds before the answer starts; ``trickle``:
    send the body one byte per this many seconds (a slow body); ``echo``: answer
    ``{"ok": true, "tool": …, "arguments": …}`` from the request instead of ``body``."""

    body: Any = field(default_factory=lambda: {"ok": True})
    status: int = 200
    delay: float = 0.0
    trickle: float | None = None
    content_type: str = "application/json"
    echo: bool = False

    @classmethod
    def oversize(cls, size: int = 16 * 1024 + 1) -> ToolAnswer:
        """Valid JSON of exactly ``size`` bytes (over the relay's 16 KiB cap by default)."""
        pad = size - len(b'{"pad":""}')
        return cls(body=b'{"pad":"' + b"x" * pad + b'"}')

    def encoded(self, request: ReceivedRequest) -> bytes:
        if self.echo:
            parsed = request.json if isinstance(request.json, dict) else {}
            echo = {"ok": True, "tool": parsed.get("tool"), "arguments": parsed.get("arguments")}
            return json.dumps(echo).encode()
        if isinstance(self.body, bytes):
            return self.body
        return json.dumps(self.body).encode()


@dataclass(frozen=True)
class EventFault:
    """Answer the next ``times`` events with ``status`` (after ``delay`` seconds),
    with a ``Retry-After: <retry_after>`` header when it is set."""

    status: int = 500
    times: int = 1
    delay: float = 0.0
    retry_after: str | None = None


@dataclass
class ReceivedRequest:
    """One request as received. ``signature_problem`` is None when the signature
    was good; ``answered`` the status sent back (0 while in progress)."""

    method: str
    path: str
    headers: dict[str, str]  # lower-case names; a repeated header keeps its last value
    body: bytes
    json: Any
    signature_problem: str | None
    replayed: bool  # this exact signature header was seen before
    received_at: float  # unix seconds
    answered: int = 0

    @property
    def signature_ok(self) -> bool:
        return self.signature_problem is None

    @property
    def signature(self) -> str | None:
        return self.headers.get(HEADER)


class Receiver:
    """State and script of the backend; an ASGI app. Create with :func:`receiver`."""

    def __init__(self, key: str) -> None:
        self.key = key
        self.base_url = ""
        self.requests: list[ReceivedRequest] = []
        self.answers: dict[str, list[ToolAnswer]] = {}
        self.default_answer = ToolAnswer(echo=True)
        self.event_faults: list[EventFault] = []
        self.refuse_bad_signatures = True
        self.clock: Callable[[], float] = time.time
        self._seen: set[str] = set()
        self._changed = trio.Event()

    @property
    def events_url(self) -> str:
        return self.base_url + "/events"

    def tool_url(self, name: str) -> str:
        return f"{self.base_url}/tools/{name}"

    def script(self, tool: str, *answers: ToolAnswer) -> None:
        """Answer ``tool``'s next requests with ``answers`` in order; the last one
        then answers every request after them."""
        self.answers[tool] = list(answers)

    def tool_requests(self, tool: str | None = None) -> list[ReceivedRequest]:
        """Requests on ``/tools/<tool>`` (every tool's when None), in order."""
        prefix = "/tools/" if tool is None else f"/tools/{tool}"
        return [r for r in self.requests if r.path == prefix or (tool is None and
                r.path.startswith(prefix))]  # fmt: skip

    @property
    def events(self) -> list[ReceivedRequest]:
        """Every request on ``/events``, whatever it was answered."""
        return [r for r in self.requests if r.path == "/events"]

    @property
    def accepted_events(self) -> list[Any]:
        """The parsed bodies of the events answered 2xx."""
        return [r.json for r in self.events if 200 <= r.answered < 300]

    async def wait_for(self, predicate: Callable[[], bool]) -> None:
        """Return once ``predicate()`` holds; re-checked after each request's answer."""
        while not predicate():
            await self._changed.wait()

    # -- ASGI ---------------------------------------------------------------------------

    async def __call__(self, scope: Any, receive: Receive, send: Send) -> None:
        # Served by relay.testing.loopback: only http scopes reach here.
        body = bytearray()
        while True:
            event = await receive()
            body += event.get("body", b"")
            if len(body) > MAX_BODY:
                await _answer(send, 413, b'{"error": "too large"}')
                return
            if not event.get("more_body", False):
                break
        request = self._record(scope, bytes(body))
        try:
            await self._route(request, send)
        finally:
            self._notify()

    def _record(self, scope: Mapping[str, Any], body: bytes) -> ReceivedRequest:
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope["headers"]}
        try:
            parsed = json.loads(body) if body else None
        except ValueError:
            parsed = None
        header = headers.get(HEADER)
        problem = verify(header, body, self.key, self.clock())
        replayed = header is not None and header in self._seen
        if header is not None and problem is None:
            self._seen.add(header)
        request = ReceivedRequest(scope["method"], scope["path"], headers, body, parsed,
                                  problem, replayed, self.clock())  # fmt: skip
        self.requests.append(request)
        return request

    async def _route(self, request: ReceivedRequest, send: Send) -> None:
        if request.method != "POST":
            request.answered = 405
            await _answer(send, 405, b'{"error": "POST only"}')
            return
        if request.signature_problem is not None and self.refuse_bad_signatures:
            request.answered = 401
            reason = json.dumps({"error": f"signature {request.signature_problem}"}).encode()
            await _answer(send, 401, reason)
            return
        if request.path == "/events":
            await self._event(request, send)
        elif request.path.startswith("/tools/"):
            await self._tool(request, send, request.path.removeprefix("/tools/"))
        else:
            request.answered = 404
            await _answer(send, 404, b'{"error": "not found"}')

    async def _event(self, request: ReceivedRequest, send: Send) -> None:
        if self.event_faults:
            fault = self.event_faults[0]
            if fault.times <= 1:
                self.event_faults.pop(0)
            else:
                self.event_faults[0] = replace(fault, times=fault.times - 1)
            await trio.sleep(fault.delay)
            request.answered = fault.status
            more = []
            if fault.retry_after is not None:
                more.append((b"retry-after", fault.retry_after.encode()))
            await _answer(send, fault.status, b'{"error": "fault"}', more)
            return
        request.answered = 200
        await _answer(send, 200, b'{"received": true}')

    async def _tool(self, request: ReceivedRequest, send: Send, tool: str) -> None:
        queue = self.answers.get(tool) or [self.default_answer]
        answer = queue.pop(0) if len(queue) > 1 else queue[0]
        await trio.sleep(answer.delay)
        data = answer.encoded(request)
        request.answered = answer.status
        headers = [(b"content-type", answer.content_type.encode())]
        await send({"type": "http.response.start", "status": answer.status, "headers": headers})
        if answer.trickle is None:
            await send({"type": "http.response.body", "body": data})
            return
        for i in range(len(data)):
            more = i + 1 < len(data)
            await send({"type": "http.response.body", "body": data[i : i + 1], "more_body": more})
            if more:
                await trio.sleep(answer.trickle)

    def _notify(self) -> None:
        self._changed.set()
        self._changed = trio.Event()


async def _answer(
    send: Send, status: int, body: bytes, more: list[tuple[bytes, bytes]] | None = None
) -> None:
    headers = [(b"content-type", b"application/json"), *(more or [])]
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body})


@asynccontextmanager
async def receiver(key: str, *, port: int = 0) -> AsyncIterator[Receiver]:
    """Serve a :class:`Receiver` checking signatures with ``key`` on 127.0.0.1 for the block."""
    app = Receiver(key)
    async with serving(app, port=port) as base_url:
        app.base_url = base_url
        yield app
