"""The twilio library's REST client, run under Trio, plus the few calls the webhook makes.

The library's own async client is aiohttp (asyncio only); :class:`TwilioHttpClient`
is a drop-in ``twilio.http.AsyncHttpClient`` over ``httpx.AsyncClient``, which
runs under Trio. Every helper below uses the library's ``*_async`` methods.

Errors: an HTTP status >= 400 raises ``twilio.base.exceptions.TwilioRestException``
(``.status``, ``.code``) — for list calls too, which the library alone would
report as a bare ``TwilioException``. A transport failure (refused, timeout)
raises :class:`TwilioTransportError`. Every request, answer included, ends
within the client's ``timeout``, however the server behaves. Both are ``TwilioException``, so one
``except TwilioException`` covers every Twilio failure. No message carries the
auth token.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from types import TracebackType
from typing import Any
from urllib.parse import urlencode, urlsplit, urlunsplit

import httpx
import trio
from twilio.base.exceptions import TwilioException, TwilioRestException
from twilio.http import AsyncHttpClient
from twilio.http.response import Response
from twilio.rest import Client

from relay.ops.http_client import http_client

__all__ = [
    "Participant",
    "TwilioHttpClient",
    "TwilioRest",
    "TwilioTransportError",
    "create_group",
    "ensure_participant",
    "list_participants",
    "make_twilio_client",
    "place_call",
    "post_message",
    "recent_messages",
]

_logger = logging.getLogger("relay.twilio")
_PARTICIPANT_EXISTS = 50433


class TwilioTransportError(TwilioException):  # type: ignore[misc]
    """The Twilio API could not be reached or did not answer in time."""


class TwilioHttpClient(AsyncHttpClient):  # type: ignore[misc]
    """``twilio.http.AsyncHttpClient`` over ``httpx.AsyncClient`` (Trio-safe).

    ``api_base`` (e.g. ``http://127.0.0.1:9000``; empty for real Twilio)
    replaces the scheme and host of every request URI, the path kept (after
    any path ``api_base`` has), so one fake server can stand in for all of
    Twilio's hosts. ``timeout`` bounds each request as a whole, in seconds.
    """

    def __init__(self, *, api_base: str = "", timeout: float = 10.0) -> None:
        super().__init__(_logger, True, timeout)
        base = urlsplit(api_base) if api_base else None
        if base is not None and not (base.scheme and base.netloc):
            raise ValueError(f"twilio api_base must be scheme://host[:port], got {api_base!r}")
        self._base = base
        self._http = http_client(timeout=httpx.Timeout(timeout), follow_redirects=False)

    def rewrite(self, uri: str) -> str:
        """The URI actually requested: ``uri`` moved onto ``api_base`` when one is set."""
        if self._base is None:
            return uri
        parts = urlsplit(uri)
        path = self._base.path.rstrip("/") + parts.path
        return urlunsplit((self._base.scheme, self._base.netloc, path, parts.query, ""))

    async def request(
        self,
        method: str,
        uri: str,
        params: Mapping[str, object] | None = None,
        data: Mapping[str, object] | None = None,
        headers: Mapping[str, str] | None = None,
        auth: tuple[str, str] | None = None,
        # The name and shape are the library's interface.
        timeout: float | None = None,
        allow_redirects: bool = False,
    ) -> Response:
        """Send one request; every HTTP status comes back as a ``Response``.

        The library, not this client, decides which statuses are errors.
        """
        if timeout is not None and timeout <= 0:
            raise ValueError(timeout)
        send_headers = dict(headers or {})
        content_type = next((v for k, v in send_headers.items() if k.lower() == "content-type"), "")
        body: bytes | None = None
        if data:
            if "json" in content_type.lower():
                body = json.dumps(data).encode()
            else:
                body = urlencode(_form_pairs(data)).encode()
        url = self.rewrite(uri)
        # The exception text can hold the URL, never credentials (those ride in a header).
        what = f"Twilio {method.upper()} {urlsplit(url).path}"
        deadline = timeout if timeout is not None else self.timeout
        reply: httpx.Response | None = None
        # httpx's timeout bounds each network operation, not the exchange: a
        # server that trickles its answer a byte at a time would hold the
        # request, and the webhook job waiting on it, forever.
        with trio.move_on_after(deadline if deadline is not None else float("inf")):
            try:
                reply = await self._http.request(
                    method.upper(),
                    url,
                    params=tuple(_form_pairs(params)) if params else None,
                    content=body,
                    headers=send_headers,
                    auth=httpx.BasicAuth(*auth) if auth is not None else None,
                    timeout=httpx.Timeout(timeout)
                    if timeout is not None
                    else httpx.USE_CLIENT_DEFAULT,
                    follow_redirects=allow_redirects,
                )
            except httpx.HTTPError as exc:
                raise TwilioTransportError(f"{what} failed: {type(exc).__name__}") from None
        if reply is None:
            raise TwilioTransportError(f"{what} failed: no complete answer within {deadline:g} s")
        return Response(reply.status_code, reply.text, reply.headers)

    async def aclose(self) -> None:
        """Close the connection pool; further requests fail."""
        await self._http.aclose()


def _form_pairs(data: Mapping[str, object]) -> list[tuple[str, str]]:
    """Form fields as Twilio expects them: lists become repeated keys, booleans lower-case."""
    pairs: list[tuple[str, str]] = []
    for key, value in data.items():
        for item in value if isinstance(value, list | tuple) else [value]:
            if item is None:
                continue
            text = ("true" if item else "false") if isinstance(item, bool) else str(item)
            pairs.append((key, text))
    return pairs


def make_twilio_client(
    account_sid: str, auth_token: str, api_base: str = "", timeout: float = 10.0
) -> tuple[Client, TwilioHttpClient]:
    """A library ``Client`` wired to a fresh :class:`TwilioHttpClient`; close the latter."""
    http = TwilioHttpClient(api_base=api_base, timeout=timeout)
    return Client(account_sid, auth_token, http_client=http), http


class TwilioRest:
    """Owns one ``Client`` and its connection pool; ``async with`` or :meth:`aclose` it."""

    def __init__(
        self, account_sid: str, auth_token: str, *, api_base: str = "", timeout: float = 10.0
    ) -> None:
        self.client, self.http = make_twilio_client(account_sid, auth_token, api_base, timeout)

    async def aclose(self) -> None:
        await self.http.aclose()

    async def __aenter__(self) -> TwilioRest:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.aclose()


@dataclass(frozen=True)
class Participant:
    """What the relay needs of a conversation participant."""

    sid: str
    identity: str | None
    address: str | None
    projected_address: str | None


def _as_rest_error(exc: TwilioException) -> TwilioException:
    """Turn the library's bare ``TwilioException("Unable to fetch page", response)``
    into the ``TwilioRestException`` every other call raises."""
    response = exc.args[1] if len(exc.args) > 1 else None
    if isinstance(exc, TwilioRestException) or not isinstance(response, Response):
        return exc
    code: int = response.status_code
    message = "Unable to fetch page"
    try:
        payload = json.loads(response.text)
        code = int(payload.get("code", code))
        message = f"{message}: {payload['message']}"
    except (ValueError, TypeError, KeyError, AttributeError):
        pass
    return TwilioRestException(response.status_code, "", message, code, "GET")


async def ensure_participant(
    client: Client, conversation_sid: str, identity: str, projected_address: str
) -> None:
    """Make sure ``identity`` is in the conversation with ``projected_address``.

    "Already there" (409, code 50433) is success, so concurrent callers race safely.
    """
    participants = client.conversations.v1.conversations(conversation_sid).participants
    try:
        await participants.create_async(
            identity=identity, messaging_binding_projected_address=projected_address
        )
    except TwilioRestException as exc:
        if exc.status != 409 and exc.code != _PARTICIPANT_EXISTS:
            raise


async def list_participants(client: Client, conversation_sid: str) -> list[Participant]:
    """Every participant of the conversation (all pages)."""
    participants = client.conversations.v1.conversations(conversation_sid).participants
    try:
        records: list[Any] = await participants.list_async(page_size=50)
    except TwilioException as exc:
        raise _as_rest_error(exc) from None
    found: list[Participant] = []
    for record in records:
        binding = record.messaging_binding if isinstance(record.messaging_binding, dict) else {}
        found.append(
            Participant(
                sid=record.sid,
                identity=record.identity,
                address=binding.get("address"),
                projected_address=binding.get("projected_address"),
            )
        )
    return found


async def recent_messages(
    client: Client, conversation_sid: str, limit: int = 20
) -> list[tuple[str, str]]:
    """The last ``limit`` text messages as ``(author, body)``, oldest first.

    Messages without a body (media only) are left out: there is nothing to read.
    """
    messages = client.conversations.v1.conversations(conversation_sid).messages
    try:
        records: list[Any] = await messages.list_async(order="desc", limit=limit)
    except TwilioException as exc:
        raise _as_rest_error(exc) from None
    return [(r.author or "", r.body) for r in reversed(records) if r.body]


async def post_message(client: Client, conversation_sid: str, author: str, body: str) -> None:
    """Post ``body`` as ``author`` in the conversation."""
    messages = client.conversations.v1.conversations(conversation_sid).messages
    await messages.create_async(author=author, body=body)


async def place_call(
    client: Client, to: str, from_: str, url: str, status_callback: str | None = None
) -> str:
    """Start an outbound call and return its SID.

    Answering-machine detection waits for the greeting to end
    (``DetectMessageEnd``) and runs synchronously, so ``AnsweredBy`` reaches
    the voice webhook and a voicemail can be left after the beep. With
    ``status_callback``, Twilio POSTs the call's end there (``completed``
    covers every final status: busy, no-answer, failed, canceled too).
    """
    extra: dict[str, Any] = {}
    if status_callback:
        extra = {
            "status_callback": status_callback,
            "status_callback_event": ["completed"],
            "status_callback_method": "POST",
        }
    call = await client.calls.create_async(
        to=to,
        from_=from_,
        url=url,
        machine_detection="DetectMessageEnd",
        async_amd="false",
        **extra,
    )
    sid: str = call.sid
    return sid


async def update_call(
    client: Client, call_sid: str, *, status: str | None = None, twiml: str | None = None
) -> None:
    """Change a live call (``POST …/Calls/<CallSid>.json``): ``status="completed"``
    hangs up, ``twiml`` replaces what the call is doing (a transfer's ``<Dial>``)."""
    kwargs: dict[str, str] = {}
    if status is not None:
        kwargs["status"] = status
    if twiml is not None:
        kwargs["twiml"] = twiml
    await client.calls(call_sid).update_async(**kwargs)


async def create_group(
    client: Client,
    *,
    author_address: str,
    numbers: Sequence[str],
    bot_identity: str,
    projected_address: str,
    intro: str,
) -> str:
    """Create a group-texting conversation and return its SID.

    The bot (``bot_identity`` + ``projected_address``) joins first, then the
    author and each number as SMS participants; ``intro`` is posted as the bot
    only after all of them are in, so everyone receives it. A participant that
    is already there (409) counts as added. On any other Twilio failure the
    half-made conversation is deleted (best effort) and the error re-raised;
    on cancellation it is left as is (nothing was posted, so nobody was texted).
    """
    conversation = await client.conversations.v1.conversations.create_async()
    sid: str = conversation.sid
    participants = client.conversations.v1.conversations(sid).participants
    try:
        await ensure_participant(client, sid, bot_identity, projected_address)
        for address in dict.fromkeys([author_address, *numbers]):
            try:
                await participants.create_async(messaging_binding_address=address)
            except TwilioRestException as exc:
                if exc.status != 409 and exc.code != _PARTICIPANT_EXISTS:
                    raise
        await post_message(client, sid, bot_identity, intro)
    except TwilioException:
        try:
            await client.conversations.v1.conversations(sid).delete_async()
        except TwilioException:
            _logger.warning("could not delete half-made conversation %s", sid)
        raise
    return sid
