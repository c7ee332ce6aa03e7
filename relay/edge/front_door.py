"""The WebSocket front door: which kind of connection, and may it in (docs/contract.md §5, §6).

Every refusal happens before accept, as a real HTTP response with the
status the contract names and a one-line reason.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable

from relay.admission.guards import Refusal, client_ip, ip_key, rate_limit
from relay.admission.tokens import token_id, verify
from relay.admission.twilio_auth import MEDIA_PATH, TwilioGate, public_ws_url, verify_stream_token
from relay.daemon.state import DaemonState
from relay.edge.asgi_ws import AsgiWebSocket, Receive, Scope, Send
from relay.store.base import Lease
from relay.ws.peer import PeerSocket

log = logging.getLogger("relay.upgrade")

AT_CAPACITY = Refusal(503, "server at capacity")

_MEDIA_PREFIX = MEDIA_PATH + "/"

# The Twilio runner gets the CallSid the stream token names (None on plain /twilio/media).
SessionRunner = Callable[[DaemonState, PeerSocket, str, str | None], Awaitable[None]]
ClientRunner = Callable[[DaemonState, PeerSocket, str, str, str | None], Awaitable[None]]


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


class Held:
    """What one upgrade holds from its checks to the end of its session: a seat
    under ``max_sessions``, one under its IP's ``sessions_per_ip``, a lease of its
    token. :meth:`release` gives back whatever was taken, on every way out."""

    __slots__ = ("ip_key", "lease", "rt", "seat")

    def __init__(self, rt: DaemonState) -> None:
        self.rt = rt
        self.seat = False
        self.ip_key: str | None = None
        self.lease: Lease | None = None

    def take_seat(self) -> bool:
        self.seat = self.rt.seats.take()
        return self.seat

    def take_ip(self, key: str) -> bool:
        if not self.rt.seats.take_ip(key):
            return False
        self.ip_key = key
        return True

    async def take_token(self, token: str, limit: int) -> bool:
        """A lease of the token's nonce: its spellings are one token (docs/contract.md §10)."""
        self.lease = await self.rt.store.acquire(f"token:{token_id(token)}", limit)
        return self.lease is not None

    async def release(self) -> None:
        if self.seat:
            self.seat = False
            self.rt.seats.give_back()
        if self.ip_key is not None:
            self.rt.seats.give_back_ip(self.ip_key)
            self.ip_key = None
        if self.lease is not None:
            lease, self.lease = self.lease, None
            await self.rt.store.release(lease)


class FrontDoor:
    def __init__(self, rt: DaemonState, client: ClientRunner, twilio: SessionRunner) -> None:
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
        # Both upgrade paths join repeated header lines in order: one line is all of them.
        forwarded = ws.headers.get("x-forwarded-for")
        ip = client_ip(
            ws.peer, () if forwarded is None else (forwarded,), s.server.trusted_networks
        )
        if self.rt.draining.is_set():
            await self._refuse(ws, ip, "draining", Refusal(503, "server draining"))
            return
        held = Held(self.rt)
        try:
            await self._serve(ws, ip, held)
        finally:
            await held.release()

    async def _serve(self, ws: PeerSocket, ip: str, held: Held) -> None:
        s = self.rt.settings
        if is_twilio(ws):
            if not held.take_seat():
                await self._refuse(ws, ip, "max_sessions", AT_CAPACITY)
                return
            refusal, reason, call = self._twilio_checks(ws)
            if refusal is not None and refusal.status == 403:
                # Forged (or replayed past its token): such upgrades are not exempt
                # from the per-IP upgrade bucket, so a flood of them meets a 429.
                per_ip = ip_key(ip, s.limits.ipv6_prefix)
                limited = await rate_limit(
                    self.rt.store, f"ws:{per_ip}", s.limits.ws_upgrades_per_minute
                )
                if limited is not None:
                    refusal, reason = limited, "ws_rate"
            if refusal is not None:
                await self._refuse(ws, ip, reason, refusal)
                return
            await self._twilio(self.rt, ws, ip, call)
            return
        refusal, reason, model, voice = await self._client_checks(ws, ip, held)
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
        self, ws: PeerSocket, ip: str, held: Held
    ) -> tuple[Refusal | None, str, str, str | None]:
        """docs/contract.md §5 steps 1 to 4, in that order; seats and the token's
        lease are taken into ``held`` as their checks pass."""
        s = self.rt.settings
        per_ip = ip_key(ip, s.limits.ipv6_prefix)
        refusal = await rate_limit(self.rt.store, f"ws:{per_ip}", s.limits.ws_upgrades_per_minute)
        if refusal is not None:
            return refusal, "ws_rate", "", None
        if not held.take_seat():
            return AT_CAPACITY, "max_sessions", "", None
        if not held.take_ip(per_ip):
            return Refusal(429, "too many sessions from this address"), "sessions_per_ip", "", None
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
        per_token = s.auth.sessions_per_token
        if per_token and token is not None and not await held.take_token(token, per_token):
            return Refusal(401, "token in use"), "token_in_use", "", None
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
