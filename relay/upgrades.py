"""The WebSocket front door: which kind of connection, and may it in (SPEC §5, §6).

Every refusal happens before accept, as a real HTTP response with the
status the contract names and a one-line reason.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable

from relay.asgi_ws import AsgiWebSocket, Receive, Scope, Send
from relay.guards import Refusal, client_ip, rate_limit
from relay.runtime import Runtime
from relay.tokens import verify
from relay.twilio_auth import MEDIA_PATH, TwilioGate, public_ws_url, verify_stream_token
from relay.ws.peer import PeerSocket

log = logging.getLogger("relay.upgrade")

_MEDIA_PREFIX = MEDIA_PATH + "/"

# The Twilio runner gets the CallSid the stream token names (None on plain /twilio/media).
SessionRunner = Callable[[Runtime, PeerSocket, str, str | None], Awaitable[None]]
ClientRunner = Callable[[Runtime, PeerSocket, str, str, str | None], Awaitable[None]]


def is_twilio(ws: PeerSocket) -> bool:
    """Twilio allows no query string in a stream URL, so the path or headers identify it."""
    return (
        ws.path == MEDIA_PATH
        or ws.path.startswith(_MEDIA_PREFIX)
        or ws.query.get("mode") == "twilio"
        or "x-twilio-signature" in ws.headers
        or ws.headers.get("user-agent", "").startswith("Twilio.")
    )


def token_from(ws: PeerSocket) -> str | None:
    """``/token/<t>`` or ``/auth/<t>`` (first segment after it), else ``?auth=<t>``."""
    segments = ws.path.strip("/").split("/")
    if len(segments) >= 2 and segments[0] in ("token", "auth") and segments[1]:
        return segments[1]
    return ws.query.get("auth") or None


class FrontDoor:
    def __init__(self, rt: Runtime, client: ClientRunner, twilio: SessionRunner) -> None:
        self.rt = rt
        self.gate = TwilioGate(rt.settings)
        self._client = client
        self._twilio = twilio

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        """An upgrade Hypercorn received (on a keep-alive connection, see ``listener``)."""
        await self.serve(AsgiWebSocket(scope, receive, send))

    async def serve(self, ws: PeerSocket) -> None:
        if not await ws.wait_connect():
            return
        s = self.rt.settings
        ip = client_ip(ws.peer, ws.headers.get("x-forwarded-for"), s.server.trusted_networks)
        if self.rt.draining.is_set():
            await self._refuse(ws, ip, "draining", Refusal(503, "server draining"))
            return
        if is_twilio(ws):
            refusal, reason, call = self._twilio_checks(ws)
            if refusal is not None and refusal.status == 403:
                # Forged (or replayed past its token): such upgrades are not exempt
                # from the per-IP upgrade bucket, so a flood of them meets a 429.
                limited = await rate_limit(
                    self.rt.store, f"ws:{ip}", s.limits.ws_upgrades_per_minute
                )
                if limited is not None:
                    refusal, reason = limited, "ws_rate"
            if refusal is not None:
                await self._refuse(ws, ip, reason, refusal)
                return
            await self._twilio(self.rt, ws, ip, call)
            return
        refusal, reason, model, voice = await self._client_checks(ws, ip)
        if refusal is not None:
            await self._refuse(ws, ip, reason, refusal)
            return
        await self._client(self.rt, ws, ip, model, voice)

    def _twilio_checks(self, ws: PeerSocket) -> tuple[Refusal | None, str, str | None]:
        """(refusal, its metrics reason, the call the stream token names) for an
        upgrade taken for Twilio's (docs/contract.md §6, §10)."""
        s = self.rt.settings
        url = public_ws_url(s, ws.path, ws.raw_query)
        refusal = self.gate.check(url, [], ws.headers.get("x-twilio-signature"))
        if refusal is not None:
            return refusal, "twilio_signature", None
        if not ws.path.startswith(_MEDIA_PREFIX):
            # Plain /twilio/media, and any other stream taken for Twilio's by its
            # query or headers: none carries a token.
            if s.twilio.require_stream_token:
                return Refusal(403, "stream token required"), "stream_token", None
            return None, "", None
        key = s.secrets.encryption_key
        if key is None:  # serve does not start without it
            return Refusal(403, "stream token cannot be checked"), "stream_token", None
        call, problem = verify_stream_token(
            key, ws.path[len(_MEDIA_PREFIX) :], skew_seconds=s.auth.clock_skew_seconds
        )
        if call is None:
            return Refusal(403, problem), "stream_token", None
        return None, "", call

    async def _client_checks(
        self, ws: PeerSocket, ip: str
    ) -> tuple[Refusal | None, str, str, str | None]:
        s = self.rt.settings
        refusal = await rate_limit(self.rt.store, f"ws:{ip}", s.limits.ws_upgrades_per_minute)
        if refusal is not None:
            return refusal, "ws_rate", "", None
        if not self.rt.origins.allows(ws.headers.get("origin")):
            return Refusal(403, "origin not allowed"), "origin", "", None
        key = s.secrets.encryption_key
        token = token_from(ws)
        problem = (
            "token missing"
            if token is None or key is None
            else verify(
                key,
                token,
                max_ttl_seconds=s.auth.token_max_ttl_seconds,
                skew_seconds=s.auth.clock_skew_seconds,
            )
        )
        if problem is not None:
            return Refusal(401, problem), "token", "", None
        model = ws.query.get("model", s.openai.model)
        if model not in s.openai.models:
            return Refusal(400, "model not allowed"), "model", "", None
        voice = ws.query.get("voice")
        if voice is not None and voice not in s.openai.voices:
            return Refusal(400, "voice not allowed"), "voice", "", None
        return None, "", model, voice

    async def _refuse(self, ws: PeerSocket, ip: str, reason: str, refusal: Refusal) -> None:
        self.rt.metrics.reject(reason)
        self.rt.refusal_log.note(reason, ip, refusal.reason)
        await ws.reject(refusal.status, refusal.reason, refusal.headers)
