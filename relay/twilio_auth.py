"""Twilio request signatures (``X-Twilio-Signature``), checked against ``public_url``.

Behind a TLS proxy the daemon sees plain http on a private port, so the URL
Twilio signed is rebuilt from ``server.public_url`` + path (+ query), never
from the request's own Host.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

from twilio.request_validator import RequestValidator

from relay.config import Settings
from relay.guards import Refusal


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
