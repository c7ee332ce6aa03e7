"""A fake Twilio REST API (Conversations v1, Calls) and OpenAI chat completions, over real HTTP.

In process::

    async with fake_twilio(account_sid="AC…", auth_token="…", openai_key="sk-…") as fake:
        fake.base_url      # http://127.0.0.1:PORT — Twilio api_base
        fake.openai_base   # http://127.0.0.1:PORT/v1 — OpenAI api_base

As a process: ``python -m relay.testing.fake_twilio --port N`` prints its base
URL on stdout and serves until killed; credentials come from flags or from
``TWILIO_ACCOUNT_SID``, ``TWILIO_AUTH_TOKEN`` and ``OPENAI_API_KEY``. A test
driving the process reads state at ``GET /_fake/state``, sets knobs with
``POST /_fake/config`` and preloads with ``POST /_fake/conversations`` (JSON).

Answers are shaped like Twilio's and OpenAI's so the real client libraries
parse them; errors carry Twilio's error JSON (``code``, ``message``,
``more_info``, ``status``). Every request is recorded in :attr:`FakeTwilio.requests`.
"""

from __future__ import annotations

import argparse
import base64
import binascii
import itertools
import json
import os
import re
import secrets
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Mapping
from contextlib import asynccontextmanager
from dataclasses import asdict, dataclass, field
from typing import Any
from urllib.parse import parse_qsl, urlencode
from xml.etree import ElementTree

import trio

from relay.testing.loopback import serving

__all__ = [
    "FakeCall",
    "FakeCallUpdate",
    "FakeConversation",
    "FakeFault",
    "FakeMessage",
    "FakeParticipant",
    "FakeTwilio",
    "RecordedRequest",
    "fake_twilio",
]

Reply = tuple[int, Any]
_E164 = re.compile(r"\A\+[1-9][0-9]{7,14}\Z")
_CALL_SID = re.compile(r"\ACA[0-9a-f]{32}\Z")
_CALL_UPDATE_STATUSES = frozenset({"completed", "canceled"})
_CONVO_HOST = "https://conversations.twilio.com"
_EPOCH_ISO = "2024-01-01T00:00:00Z"
_EPOCH_RFC2822 = "Mon, 01 Jan 2024 00:00:00 +0000"


def twilio_error(code: int, message: str, status: int) -> dict[str, Any]:
    """Twilio's (legacy) error body, which the library turns into ``TwilioRestException``."""
    return {
        "code": code,
        "message": message,
        "status": status,
        "more_info": f"https://www.twilio.com/docs/errors/{code}",
    }


@dataclass
class RecordedRequest:
    """One request as the fake received it, and the ``status`` it was answered with
    (0 while still in progress). ``headers`` keys are lower-case."""

    method: str
    path: str
    query: list[tuple[str, str]]
    headers: dict[str, str]
    form: list[tuple[str, str]]
    json: Any
    status: int = 0
    received_at: float = 0.0  # trio.current_time() on arrival (the test's clock, in process)

    @classmethod
    def from_asgi(cls, scope: Mapping[str, Any], body: bytes) -> RecordedRequest:
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope["headers"]}
        content_type = headers.get("content-type", "")
        text = body.decode("utf-8", "replace")
        form = parse_qsl(text, keep_blank_values=True) if "form-urlencoded" in content_type else []
        try:
            parsed = json.loads(text) if "json" in content_type else None
        except ValueError:
            parsed = None
        query = parse_qsl(scope["query_string"].decode("latin-1"), keep_blank_values=True)
        return cls(scope["method"], scope["path"], query, headers, form, parsed)

    def field(self, name: str) -> str | None:
        """The first form value called ``name``."""
        return next((v for k, v in self.form if k == name), None)

    def param(self, name: str) -> str | None:
        """The first query parameter called ``name``."""
        return next((v for k, v in self.query if k == name), None)


@dataclass
class FakeParticipant:
    sid: str
    identity: str | None = None
    address: str | None = None
    proxy_address: str | None = None
    projected_address: str | None = None

    def to_json(self, conversation_sid: str, account_sid: str) -> dict[str, Any]:
        binding: dict[str, Any] | None = None
        if self.address:
            binding = {"type": "sms", "address": self.address, "proxy_address": self.proxy_address}
        elif self.projected_address:
            binding = {"type": "sms", "projected_address": self.projected_address}
        return {
            "account_sid": account_sid,
            "conversation_sid": conversation_sid,
            "sid": self.sid,
            "identity": self.identity,
            "attributes": "{}",
            "messaging_binding": binding,
            "role_sid": None,
            "date_created": _EPOCH_ISO,
            "date_updated": _EPOCH_ISO,
            "url": f"{_CONVO_HOST}/v1/Conversations/{conversation_sid}/Participants/{self.sid}",
            "last_read_message_index": None,
            "last_read_timestamp": None,
        }


@dataclass
class FakeMessage:
    sid: str
    index: int
    author: str
    body: str | None
    participant_sid: str | None = None

    def to_json(self, conversation_sid: str, account_sid: str) -> dict[str, Any]:
        url = f"{_CONVO_HOST}/v1/Conversations/{conversation_sid}/Messages/{self.sid}"
        return {
            "account_sid": account_sid,
            "conversation_sid": conversation_sid,
            "sid": self.sid,
            "index": self.index,
            "author": self.author,
            "body": self.body,
            "media": None,
            "attributes": "{}",
            "participant_sid": self.participant_sid,
            "date_created": _EPOCH_ISO,
            "date_updated": _EPOCH_ISO,
            "url": url,
            "delivery": None,
            "links": {"delivery_receipts": url + "/Receipts"},
            "content_sid": None,
        }


@dataclass
class FakeConversation:
    sid: str
    friendly_name: str | None = None
    participants: list[FakeParticipant] = field(default_factory=list)
    messages: list[FakeMessage] = field(default_factory=list)

    def to_json(self, account_sid: str) -> dict[str, Any]:
        url = f"{_CONVO_HOST}/v1/Conversations/{self.sid}"
        return {
            "account_sid": account_sid,
            "chat_service_sid": "IS" + "0" * 32,
            "messaging_service_sid": "MG" + "0" * 32,
            "sid": self.sid,
            "friendly_name": self.friendly_name,
            "unique_name": None,
            "attributes": "{}",
            "state": "active",
            "date_created": _EPOCH_ISO,
            "date_updated": _EPOCH_ISO,
            "timers": {},
            "url": url,
            "bindings": None,
            "links": {
                "participants": url + "/Participants",
                "messages": url + "/Messages",
                "webhooks": url + "/Webhooks",
            },
        }


@dataclass
class FakeCall:
    sid: str
    to: str
    from_: str
    url: str | None
    machine_detection: str | None
    async_amd: str | None
    form: list[tuple[str, str]]

    def voice_form(self, account_sid: str, answered_by: str | None = None) -> dict[str, str]:
        """The form Twilio POSTs to this call's ``Url`` once it is answered (an
        outbound call's, with its AMD result if any): what ``/twilio/voice`` reads."""
        form = {
            "AccountSid": account_sid,
            "ApiVersion": "2010-04-01",
            "CallSid": self.sid,
            "CallStatus": "in-progress",
            "Direction": "outbound-api",
            "From": self.from_,
            "To": self.to,
        }
        if answered_by is not None:
            form["AnsweredBy"] = answered_by
        return form

    def to_json(self, account_sid: str) -> dict[str, Any]:
        uri = f"/2010-04-01/Accounts/{account_sid}/Calls/{self.sid}"
        return {
            "sid": self.sid,
            "account_sid": account_sid,
            "api_version": "2010-04-01",
            "to": self.to,
            "to_formatted": self.to,
            "from": self.from_,
            "from_formatted": self.from_,
            "status": "queued",
            "direction": "outbound-api",
            "answered_by": None,
            "annotation": None,
            "caller_name": None,
            "duration": None,
            "date_created": _EPOCH_RFC2822,
            "date_updated": _EPOCH_RFC2822,
            "start_time": None,
            "end_time": None,
            "forwarded_from": None,
            "group_sid": None,
            "parent_call_sid": None,
            "phone_number_sid": "PN" + "0" * 32,
            "price": None,
            "price_unit": "USD",
            "queue_time": "0",
            "trunk_sid": None,
            "uri": uri + ".json",
            "subresource_uris": {
                "notifications": uri + "/Notifications.json",
                "recordings": uri + "/Recordings.json",
            },
        }


@dataclass(frozen=True)
class FakeCallUpdate:
    """One ``POST /2010-04-01/Accounts/{AC}/Calls/{CA}.json`` (hang up, redirect) as
    received: the form's ``Status``, ``Twiml`` and ``Url``, and the HTTP status it
    was answered with (0: not answered yet; a fault's status when one hit it)."""

    call_sid: str
    status: str | None
    twiml: str | None
    url: str | None
    answered: int
    form: tuple[tuple[str, str], ...]
    received_at: float  # trio.current_time() on arrival

    @property
    def ok(self) -> bool:
        return 200 <= self.answered < 300


@dataclass
class FakeFault:
    """How the fake misbehaves for requests whose path contains ``match``.

    Exactly one of: ``status`` (answer it with Twilio's error body, plus a
    ``Retry-After`` header when ``retry_after`` is set), ``hang`` (read the
    request, then never answer), ``trickle`` (answer 200 and then one body
    byte every ``trickle`` seconds, never finishing: each read succeeds, so
    only an overall deadline ends it). ``times`` limits how many requests it
    hits (None: all of them).
    """

    match: str
    status: int | None = None
    retry_after: int | None = None
    hang: bool = False
    trickle: float | None = None
    times: int | None = None

    def __post_init__(self) -> None:
        if (self.status is not None) + self.hang + (self.trickle is not None) != 1:
            raise ValueError("a fault is exactly one of status, hang or trickle")


class FakeTwilio:
    """State and knobs of the fake; an ASGI app. Create with :func:`fake_twilio`."""

    def __init__(self, *, account_sid: str, auth_token: str, openai_key: str = "") -> None:
        self.account_sid = account_sid
        self.auth_token = auth_token
        self.openai_key = openai_key
        self.base_url = ""
        self.requests: list[RecordedRequest] = []
        self.conversations: dict[str, FakeConversation] = {}
        self.calls: list[FakeCall] = []
        # Calls hung up through a call update: a later update of one is refused
        # as Twilio refuses it (the call is no longer in progress).
        self.ended_calls: set[str] = set()
        # Knobs. Twilio routes: the next `fail_next` requests whose path contains
        # `fail_match` (any, if None) answer `fail_status`; each answer waits `delay`.
        self.fail_status = 500
        self.fail_next = 0
        self.fail_match: str | None = None
        self.delay = 0.0
        # Per-path faults, first match wins; checked before everything else but
        # the /_fake/ control routes. Also settable in process mode.
        self.faults: list[FakeFault] = []
        # Chat completions: reply text, wait before answering (see chat_delay), or
        # fail with a status.
        self.chat_reply = "Hello from the fake assistant."
        self._chat_delay = 0.0
        self._chat_delay_changed = trio.Event()
        self.chat_status: int | None = None
        # A random stem plus a counter: unique across fakes, so one long-lived
        # relay serving many tests (each with its own fake) never sees a SID twice.
        self._sid_stem = secrets.randbits(64)
        self._sids = itertools.count(1)

    @property
    def chat_delay(self) -> float:
        """Seconds from a chat request's arrival to its answer. Requests already
        waiting follow a change: lowering it releases them."""
        return self._chat_delay

    @chat_delay.setter
    def chat_delay(self, seconds: float) -> None:
        self._chat_delay = seconds
        self._chat_delay_changed.set()
        self._chat_delay_changed = trio.Event()

    @property
    def openai_base(self) -> str:
        """The ``openai.api_base`` that points at this fake."""
        return self.base_url + "/v1"

    @property
    def call_updates(self) -> list[FakeCallUpdate]:
        """Every call update received, in order, whatever it was answered."""
        updates = []
        for r in self.requests:
            sid = _call_update_sid(r.path) if r.method == "POST" else None
            if sid is not None:
                form = tuple(r.form)
                updates.append(FakeCallUpdate(sid, r.field("Status"), r.field("Twiml"),
                                              r.field("Url"), r.status, form,
                                              r.received_at))  # fmt: skip
        return updates

    def fail_call_updates(self, status: int = 500, *, times: int | None = 1) -> FakeFault:
        """Answer the next ``times`` call updates (None: all) with ``status`` and
        Twilio's error body; returns the fault (remove it from :attr:`faults` to stop)."""
        fault = FakeFault(match="/Calls/CA", status=status, times=times)
        self.faults.insert(0, fault)
        return fault

    @property
    def chat_requests(self) -> list[RecordedRequest]:
        return [r for r in self.requests if r.path == "/v1/chat/completions"]

    def new_sid(self, prefix: str) -> str:
        return f"{prefix}{self._sid_stem:016x}{next(self._sids):016x}"

    def add_conversation(
        self,
        sid: str | None = None,
        *,
        participants: Iterable[str | Mapping[str, str]] = (),
        messages: Iterable[tuple[str, str]] = (),
        friendly_name: str | None = None,
    ) -> FakeConversation:
        """Preload a conversation.

        A participant is a mapping with any of ``identity``, ``address``,
        ``proxy_address``, ``projected_address``, or a string: ``+…`` is an
        SMS address, anything else an identity. Messages are ``(author, body)``.
        """
        convo = FakeConversation(sid or self.new_sid("CH"), friendly_name)
        self.conversations[convo.sid] = convo
        for p in participants:
            spec: Mapping[str, str] = (
                p if not isinstance(p, str) else {"address" if p.startswith("+") else "identity": p}
            )
            convo.participants.append(FakeParticipant(sid=self.new_sid("MB"), **spec))
        for author, body in messages:
            self.add_message(convo.sid, author, body)
        return convo

    def add_message(self, conversation_sid: str, author: str, body: str | None) -> FakeMessage:
        """Append a message (``body=None``: media only) as if ``author`` had sent it."""
        convo = self.conversations[conversation_sid]
        sender = next((p for p in convo.participants if author in (p.identity, p.address)), None)
        message = FakeMessage(
            sid=self.new_sid("IM"),
            index=len(convo.messages),
            author=author,
            body=body,
            participant_sid=sender.sid if sender else None,
        )
        convo.messages.append(message)
        return message

    def message_added_form(self, conversation_sid: str, message: FakeMessage) -> dict[str, str]:
        """The ``onMessageAdded`` form Twilio POSTs to the webhook for ``message``
        (fields as Twilio names them; empty ones left out), to sign and send."""
        form = {
            "AccountSid": self.account_sid,
            "Author": message.author,
            "Body": message.body or "",
            "ConversationSid": conversation_sid,
            "DateCreated": _EPOCH_ISO,
            "EventType": "onMessageAdded",
            "Index": str(message.index),
            "MessageSid": message.sid,
            "ParticipantSid": message.participant_sid or "",
            "RetryCount": "0",
            "Source": "SMS",
        }
        return {k: v for k, v in form.items() if v}

    # -- ASGI ---------------------------------------------------------------------------

    async def __call__(
        self,
        scope: Any,
        receive: Callable[[], Awaitable[Any]],
        send: Callable[[Any], Awaitable[None]],
    ) -> None:
        # Served by relay.testing.loopback: only http scopes reach here.
        body = b""
        while True:
            event = await receive()
            body += event.get("body", b"")
            if not event.get("more_body", False):
                break
        request = RecordedRequest.from_asgi(scope, body)
        request.received_at = trio.current_time()
        self.requests.append(request)
        fault = self._fault_for(request)
        if fault is not None:
            await self._misbehave(fault, request, receive, send)
            return
        status, payload = await self._route(request)
        request.status = status
        headers = [(b"content-type", b"application/json")] if payload is not None else []
        await send({"type": "http.response.start", "status": status, "headers": headers})
        data = json.dumps(payload).encode() if payload is not None else b""
        await send({"type": "http.response.body", "body": data})

    def _fault_for(self, req: RecordedRequest) -> FakeFault | None:
        if req.path.startswith("/_fake/"):
            return None
        for fault in self.faults:
            if fault.match in req.path and (fault.times is None or fault.times > 0):
                if fault.times is not None:
                    fault.times -= 1
                return fault
        return None

    async def _misbehave(
        self,
        fault: FakeFault,
        req: RecordedRequest,
        receive: Callable[[], Awaitable[Any]],
        send: Callable[[Any], Awaitable[None]],
    ) -> None:
        async def client_gone() -> None:
            while (await receive())["type"] != "http.disconnect":
                pass

        if fault.hang:
            # Accepted and read; the answer never comes (status stays 0). Only
            # the client's leaving (or the fake's shutdown) ends this.
            await client_gone()
            return
        headers = [(b"content-type", b"application/json")]
        if fault.trickle is not None:
            req.status = 200
            await send({"type": "http.response.start", "status": 200, "headers": headers})
            async with trio.open_nursery() as nursery:

                async def trickle(interval: float) -> None:
                    while True:
                        await send({"type": "http.response.body", "body": b" ", "more_body": True})
                        await trio.sleep(interval)

                nursery.start_soon(trickle, fault.trickle)
                await client_gone()
                nursery.cancel_scope.cancel()
            return
        assert fault.status is not None
        req.status = fault.status
        if fault.retry_after is not None:
            headers.append((b"retry-after", str(fault.retry_after).encode()))
        code = {429: 20429, 500: 20500, 503: 20503}.get(fault.status, fault.status)
        body = json.dumps(twilio_error(code, "Fake failure", fault.status)).encode()
        await send({"type": "http.response.start", "status": fault.status, "headers": headers})
        await send({"type": "http.response.body", "body": body})

    async def _route(self, req: RecordedRequest) -> Reply:
        path, method = req.path, req.method
        if path.startswith("/_fake/"):
            return self._control(req)
        if path == "/v1/chat/completions" and method == "POST":
            return await self._chat(req)
        if not self._authorized(req):
            return 401, twilio_error(20003, "Authentication Error - invalid username", 401)
        if self.fail_next > 0 and (self.fail_match is None or self.fail_match in path):
            self.fail_next -= 1
            await trio.sleep(self.delay)
            code = {429: 20429, 500: 20500, 503: 20503}.get(self.fail_status, self.fail_status)
            return self.fail_status, twilio_error(code, "Fake failure", self.fail_status)
        await trio.sleep(self.delay)
        parts = path.strip("/").split("/")
        if parts[:2] == ["v1", "Conversations"]:
            return self._conversations(req, parts[2:])
        if len(parts) == 4 and parts[0] == "2010-04-01" and parts[3] == "Calls.json":
            if parts[2] != self.account_sid:
                return _not_found(path)
            return self._create_call(req) if method == "POST" else _not_allowed()
        if len(parts) == 5 and parts[:2] == ["2010-04-01", "Accounts"] and parts[3] == "Calls":
            sid = _call_update_sid(path)
            if parts[2] != self.account_sid or sid is None:
                return _not_found(path)
            return self._update_call(req, sid) if method == "POST" else _not_allowed()
        return _not_found(path)

    def _authorized(self, req: RecordedRequest) -> bool:
        scheme, _, encoded = req.headers.get("authorization", "").partition(" ")
        try:
            decoded = base64.b64decode(encoded, validate=True).decode()
        except (binascii.Error, UnicodeDecodeError):
            return False
        return scheme.lower() == "basic" and decoded == f"{self.account_sid}:{self.auth_token}"

    # -- Conversations ------------------------------------------------------------------

    def _conversations(self, req: RecordedRequest, rest: list[str]) -> Reply:
        if not rest:
            if req.method != "POST":
                return _not_allowed()
            created = self.add_conversation(friendly_name=req.field("FriendlyName"))
            return 201, created.to_json(self.account_sid)
        convo = self.conversations.get(rest[0])
        if convo is None:
            return _not_found(req.path)
        if len(rest) == 1:
            if req.method == "DELETE":
                del self.conversations[convo.sid]
                return 204, None
            return (200, convo.to_json(self.account_sid)) if req.method == "GET" else _not_allowed()
        if len(rest) == 2 and rest[1] == "Participants":
            if req.method == "POST":
                return self._create_participant(req, convo)
            records = [p.to_json(convo.sid, self.account_sid) for p in convo.participants]
            return 200, _page(req, records, "participants", convo.sid)
        if len(rest) == 2 and rest[1] == "Messages":
            if req.method == "POST":
                message = self.add_message(
                    convo.sid, req.field("Author") or "system", req.field("Body")
                )
                return 201, message.to_json(convo.sid, self.account_sid)
            records = [m.to_json(convo.sid, self.account_sid) for m in convo.messages]
            if req.param("Order") == "desc":
                records.reverse()
            return 200, _page(req, records, "messages", convo.sid)
        return _not_found(req.path)

    def _create_participant(self, req: RecordedRequest, convo: FakeConversation) -> Reply:
        identity = req.field("Identity")
        address = req.field("MessagingBinding.Address")
        projected = req.field("MessagingBinding.ProjectedAddress")
        for value in (address, projected):
            if value is not None and not _E164.match(value):
                return 400, twilio_error(50407, "Invalid messaging binding address", 400)
        if identity is None and address is None:
            return 400, twilio_error(50411, "Participant address is empty", 400)
        for p in convo.participants:
            if (identity and identity == p.identity) or (address and address == p.address):
                return 409, twilio_error(50433, "Participant already exists", 409)
        participant = FakeParticipant(
            sid=self.new_sid("MB"),
            identity=identity,
            address=address,
            proxy_address=req.field("MessagingBinding.ProxyAddress"),
            projected_address=projected,
        )
        convo.participants.append(participant)
        return 201, participant.to_json(convo.sid, self.account_sid)

    # -- Voice ----------------------------------------------------------------------------

    def _create_call(self, req: RecordedRequest) -> Reply:
        to, from_, url = req.field("To"), req.field("From"), req.field("Url")
        if to is None or not _E164.match(to):
            return 400, twilio_error(21211, f"Invalid 'To' Phone Number: {to}", 400)
        if not from_:
            return 400, twilio_error(21603, "A 'From' phone number is required.", 400)
        if not url and not req.field("Twiml") and not req.field("ApplicationSid"):
            return 400, twilio_error(21205, "Url parameter is required.", 400)
        call = FakeCall(
            sid=self.new_sid("CA"),
            to=to,
            from_=from_,
            url=url,
            machine_detection=req.field("MachineDetection"),
            async_amd=req.field("AsyncAmd"),
            form=list(req.form),
        )
        self.calls.append(call)
        return 201, call.to_json(self.account_sid)

    def _update_call(self, req: RecordedRequest, sid: str) -> Reply:
        """Any well-formed CallSid is a live call (the tests' calls are simulated
        streams the fake never placed), until an update hangs it up."""
        status, twiml, url = req.field("Status"), req.field("Twiml"), req.field("Url")
        if sid in self.ended_calls:
            message = "Call is not in-progress. Cannot redirect."
            return 400, twilio_error(21220, f"Unable to update record: {message}", 400)
        if status is None and twiml is None and url is None:
            return 400, twilio_error(20001, "A Status, Twiml or Url is required.", 400)
        if status is not None and status not in _CALL_UPDATE_STATUSES:
            return 400, twilio_error(20001, f"Invalid Status: {status}", 400)
        if twiml is not None and not _is_twiml(twiml):
            return 400, twilio_error(12100, "Document parse failure", 400)
        call = next((c for c in self.calls if c.sid == sid), None)
        body = (call or FakeCall(sid, "", "", None, None, None, [])).to_json(self.account_sid)
        if status is not None:
            self.ended_calls.add(sid)
            body["status"] = status
        else:
            body["status"] = "in-progress"
        return 200, body

    # -- OpenAI ---------------------------------------------------------------------------

    async def _chat(self, req: RecordedRequest) -> Reply:
        if self.openai_key and req.headers.get("authorization") != f"Bearer {self.openai_key}":
            return 401, _openai_error("Incorrect API key provided.", "invalid_api_key")
        arrived = trio.current_time()
        while (left := arrived + self._chat_delay - trio.current_time()) > 0:
            with trio.move_on_after(left):
                await self._chat_delay_changed.wait()
        if self.chat_status is not None:
            return self.chat_status, _openai_error("Fake failure.", "fake_failure")
        body = req.json if isinstance(req.json, dict) else {}
        if not isinstance(body.get("messages"), list) or not body.get("model"):
            return 400, _openai_error("'model' and 'messages' are required.", "invalid_request")
        return 200, {
            "id": self.new_sid("chatcmpl-"),
            "object": "chat.completion",
            "created": int(time.time()),
            "model": body["model"],
            "choices": [
                {
                    "index": 0,
                    "finish_reason": "stop",
                    "message": {"role": "assistant", "content": self.chat_reply},
                }
            ],
            "usage": {"prompt_tokens": 1, "completion_tokens": 1, "total_tokens": 2},
        }

    # -- control (process mode) --------------------------------------------------------

    def _control(self, req: RecordedRequest) -> Reply:
        if req.path == "/_fake/state" and req.method == "GET":
            return 200, {
                "requests": [asdict(r) for r in self.requests if not r.path.startswith("/_fake/")],
                "calls": [asdict(c) for c in self.calls],
                "call_updates": [asdict(u) for u in self.call_updates],
                "conversations": {sid: asdict(c) for sid, c in self.conversations.items()},
            }
        body = req.json if isinstance(req.json, dict) else {}
        if req.path == "/_fake/config" and req.method == "POST":
            for knob in (
                "fail_status",
                "fail_next",
                "fail_match",
                "delay",
                "chat_reply",
                "chat_delay",
                "chat_status",
            ):
                if knob in body:
                    setattr(self, knob, body[knob])
            if "faults" in body:
                self.faults = [FakeFault(**f) for f in body["faults"]]
            return 200, {"ok": True}
        if req.path == "/_fake/conversations" and req.method == "POST":
            convo = self.add_conversation(
                body.get("sid"),
                participants=body.get("participants", []),
                messages=[tuple(m) for m in body.get("messages", [])],
            )
            return 201, {"sid": convo.sid}
        return _not_found(req.path)


def _page(
    req: RecordedRequest, records: list[dict[str, Any]], key: str, sid: str
) -> dict[str, Any]:
    """One page in Twilio's v1 shape: the records under ``key`` plus ``meta`` with page URLs."""
    size = max(1, min(int(req.param("PageSize") or 50), 1000))
    number = max(0, int(req.param("Page") or 0))
    extra = [("Order", req.param("Order"))] if req.param("Order") else []

    def url(page: int) -> str:
        query = urlencode([*extra, ("PageSize", size), ("Page", page)])
        return f"{_CONVO_HOST}/v1/Conversations/{sid}/{key.capitalize()}?{query}"

    has_next = (number + 1) * size < len(records)
    return {
        key: records[number * size : (number + 1) * size],
        "meta": {
            "page": number,
            "page_size": size,
            "key": key,
            "url": url(number),
            "first_page_url": url(0),
            "previous_page_url": url(number - 1) if number > 0 else None,
            "next_page_url": url(number + 1) if has_next else None,
        },
    }


def _call_update_sid(path: str) -> str | None:
    """The CallSid of a ``/2010-04-01/Accounts/{AC}/Calls/{CA}.json`` path, if it is one."""
    parts = path.strip("/").split("/")
    if len(parts) != 5 or parts[:2] != ["2010-04-01", "Accounts"] or parts[3] != "Calls":
        return None
    sid = parts[4].removesuffix(".json")
    return sid if parts[4].endswith(".json") and _CALL_SID.match(sid) else None


def _is_twiml(text: str) -> bool:
    """Twilio parses the TwiML of an update at once: well-formed XML, a <Response> root."""
    try:
        return ElementTree.fromstring(text).tag == "Response"
    except ElementTree.ParseError:
        return False


def _not_found(path: str) -> Reply:
    return 404, twilio_error(20404, f"The requested resource {path} was not found", 404)


def _not_allowed() -> Reply:
    return 405, twilio_error(20004, "Method not allowed", 405)


def _openai_error(message: str, code: str) -> dict[str, Any]:
    return {
        "error": {"message": message, "type": "invalid_request_error", "param": None, "code": code}
    }


@asynccontextmanager
async def fake_twilio(
    *,
    account_sid: str,
    auth_token: str,
    openai_key: str = "",
    host: str = "127.0.0.1",
    port: int = 0,
) -> AsyncIterator[FakeTwilio]:
    """Serve a :class:`FakeTwilio` on ``host:port`` (0 = any free port) for the block's duration."""
    fake = FakeTwilio(account_sid=account_sid, auth_token=auth_token, openai_key=openai_key)
    async with serving(fake, host=host, port=port) as base_url:
        fake.base_url = base_url
        yield fake


def main(argv: list[str] | None = None) -> None:
    """``python -m relay.testing.fake_twilio``: serve until killed, base URL on stdout."""
    parser = argparse.ArgumentParser(prog="python -m relay.testing.fake_twilio")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument(
        "--account-sid", default=os.environ.get("TWILIO_ACCOUNT_SID", "AC" + "0" * 32)
    )
    parser.add_argument("--auth-token", default=os.environ.get("TWILIO_AUTH_TOKEN", "test-token"))
    parser.add_argument("--openai-key", default=os.environ.get("OPENAI_API_KEY", ""))
    args = parser.parse_args(argv)

    async def run() -> None:
        async with fake_twilio(
            account_sid=args.account_sid,
            auth_token=args.auth_token,
            openai_key=args.openai_key,
            host=args.host,
            port=args.port,
        ) as fake:
            print(fake.base_url, flush=True)
            await trio.sleep_forever()

    try:
        trio.run(run)
    except KeyboardInterrupt:
        sys.exit(0)


if __name__ == "__main__":
    main()
