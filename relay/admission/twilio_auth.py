"""Is it really our Twilio? Request signatures (``X-Twilio-Signature``), checked
against ``public_url``; the shape of the SIDs a signed form carries; the stream
tokens that tie a media stream to the call whose TwiML named it.

Behind a TLS proxy the daemon sees plain http on a private port, so the URL
Twilio signed is rebuilt from ``server.public_url`` + path (+ query), never
from the request's own Host.
"""

from __future__ import annotations

import re
import time
from collections.abc import Callable, Mapping, Sequence

from twilio.request_validator import RequestValidator

from relay.admission.guards import Refusal
from relay.admission.tokens import expiry_problem, open_claims, seal
from relay.config import Settings


class _Form:
    """The ``getall`` shape RequestValidator understands for repeated keys."""

    def __init__(self, pairs: Sequence[tuple[str, str]]) -> None:
        self._pairs = pairs

    def __iter__(self):  # type: ignore[no-untyped-def]
        return iter({k for k, _ in self._pairs})

    def __bool__(self) -> bool:
        return bool(self._pairs)

    def getall(self, name: str) -> list[str]:
        return [v for k, v in self._pairs if k == name]


def public_http_url(settings: Settings, path: str, query: str = "") -> str:
    url = settings.server.public_url.rstrip("/") + path
    return f"{url}?{query}" if query else url


def public_ws_url(settings: Settings, path: str, query: str = "") -> str:
    """The wss:// (or ws://) URL Twilio connects to and signs for a media stream."""
    url = public_http_url(settings, path, query)
    if url.startswith("https://"):
        return "wss://" + url[len("https://") :]
    return "ws://" + url[len("http://") :]


class TwilioGate:
    """Decides whether a request really comes from our Twilio account."""

    def __init__(self, settings: Settings) -> None:
        self._settings = settings
        token = settings.secrets.twilio_auth_token
        self._validator = RequestValidator(token) if token else None

    @property
    def enforcing(self) -> bool:
        return self._settings.twilio.validate_signatures

    def valid(self, url: str, form: Sequence[tuple[str, str]], signature: str | None) -> bool:
        if self._validator is None or not signature:
            return False
        try:
            return bool(self._validator.validate(url, _Form(form), signature))
        except (UnicodeError, ValueError):
            return False

    def check(
        self, url: str, form: Sequence[tuple[str, str]], signature: str | None
    ) -> Refusal | None:
        """None when the request may proceed; else 503 (no secrets, fail closed) or 403."""
        return self.refusal_for(lambda: self.valid(url, form, signature))

    def refusal_for(self, valid: Callable[[], bool]) -> Refusal | None:
        """The same decision, given how to learn whether the signature is valid (only
        asked when validation is on and the secrets are there)."""
        if not self.enforcing:
            return None
        if self._validator is None or not self._settings.secrets.twilio_account_sid:
            return Refusal(503, "twilio credentials not configured")
        if not valid():
            return Refusal(403, "invalid twilio signature")
        return None


# -- SID shapes (docs/contract.md §7) -------------------------------------------------------

# The two letters each SID field Twilio sends must start with. Twilio's signature
# is an HMAC over the sorted field names and values run together, so it cannot
# tell where one field ends and the next begins: a captured form with a value
# cut short or run on into its neighbour still verifies. A SID has one fixed
# length, so no boundary next to one can move unseen.
SID_PREFIXES: dict[str, str] = {
    "AccountSid": "AC",
    "CallSid": "CA",
    "ParentCallSid": "CA",
    "ConversationSid": "CH",
    "MessageSid": "IM",
    "ParticipantSid": "MB",
    "ChatServiceSid": "IS",
    "ConversationServiceSid": "IS",
    "MessagingServiceSid": "MG",
    "WebhookSid": "WH",
    "RoleSid": "RL",
    "ContentSid": "HX",
    "ApplicationSid": "AP",
}
_SID_BODY = re.compile(r"\A[A-Z]{2}[0-9a-f]{32}\Z")


def sid_shape_ok(field: str, value: str) -> bool:
    """``value`` has the Twilio shape of ``field``: its two letters (any two upper-case
    letters for a SID field not in :data:`SID_PREFIXES`) and 32 lower-case hex digits."""
    if _SID_BODY.match(value) is None:
        return False
    prefix = SID_PREFIXES.get(field)
    return prefix is None or value.startswith(prefix)


def form_refusal(form: Mapping[str, str], account_sid: str | None) -> Refusal | None:
    """A signed Twilio form that is not our account's (403) or carries a SID field of
    the wrong shape (400); None when it may proceed. An empty value counts as absent
    (Twilio sends unset fields empty). With no ``TWILIO_ACCOUNT_SID`` configured
    (only possible with signatures off) there is nothing to compare AccountSid to."""
    theirs = form.get("AccountSid")
    # Not a secret (it rides in every form): a plain comparison, which unlike
    # hmac.compare_digest takes any text a form may carry.
    if theirs and account_sid and theirs != account_sid:
        return Refusal(403, "AccountSid is not this account")
    for name, value in form.items():
        if name.endswith("Sid") and value and not sid_shape_ok(name, value):
            # The name goes into the answer and the log: only one we know by name.
            return Refusal(400, f"malformed {name}" if name in SID_PREFIXES else "malformed SID")
    return None


# -- stream tokens (docs/contract.md §10) -----------------------------------------------------

# Where Twilio connects a call's media stream: plain, or /twilio/media/<stream token>.
MEDIA_PATH = "/twilio/media"
# Twilio opens the media stream within a second or two of reading the TwiML.
STREAM_TOKEN_SECONDS = 120
_TWILIO_ORIGIN = "twilio"


def mint_stream_token(key: bytes, call_sid: str, *, now: float | None = None) -> str:
    """The token of ``/twilio/media/<token>``: sealed like a client token (§4), whose
    claim names the call it is for and expires in :data:`STREAM_TOKEN_SECONDS`."""
    issued = int(time.time() if now is None else now)
    return seal(
        key, {"origin": _TWILIO_ORIGIN, "call": call_sid, "exp": issued + STREAM_TOKEN_SECONDS}
    )


def verify_stream_token(
    key: bytes, token: str, *, skew_seconds: int, now: float | None = None
) -> tuple[str | None, str]:
    """(the call the token is for, "") when it is valid; else (None, a one-line reason
    that never holds the token). A client token is not a stream token (its origin)."""
    claims, problem = open_claims(key, token, what="stream token")
    if claims is None:
        return None, problem
    if claims.get("origin") != _TWILIO_ORIGIN:
        return None, "stream token origin is not twilio"
    call = claims.get("call")
    if not isinstance(call, str) or not call:
        return None, "stream token claims malformed"
    late = expiry_problem(
        claims,
        max_ttl_seconds=STREAM_TOKEN_SECONDS,
        skew_seconds=skew_seconds,
        now=now,
        what="stream token",
    )
    return (None, late) if late is not None else (call, "")
