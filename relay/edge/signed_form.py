"""The first step of every Twilio webhook route: read the form, check its
signature and its SIDs (docs/contract.md §7), or say why not. The signature
check is made once per request and shared with the HTTP app, which lets a
signed request past the per-IP bucket.

One reader for ``/twilio/voice``, ``/twilio/convo`` and ``/twilio/status`` so
that a refusal looks the same on each: 413/408 for a body too large or too
slow, 400 for one that is not a form, 403 for a bad signature or AccountSid,
400 for a malformed SID.
"""

from __future__ import annotations

from dataclasses import dataclass

from prometheus_client import Counter
from quart import Response, g, request
from werkzeug.exceptions import HTTPException

from relay.admission.twilio_auth import TwilioGate, form_refusal, public_http_url
from relay.daemon.state import DaemonState
from relay.edge.app import refusal_response, text


@dataclass(frozen=True)
class SignedForms:
    rt: DaemonState
    gate: TwilioGate

    async def form_pairs(self) -> list[tuple[str, str]]:
        """The form's (key, value) pairs, repeats kept, in order."""
        form = await request.form
        return [(k, v) for k in form for v in form.getlist(k)]

    async def signed(self) -> bool:
        """Valid signature for this request? Cached on ``g``: the HTTP app asks it
        first (a signed request skips the per-IP bucket), the route again."""
        if "twilio_signed" not in g:
            signature = request.headers.get("X-Twilio-Signature")
            ok = False
            try:
                # The whole body is read before any answer, the guard's 429 too, so
                # that a kept-alive connection (a proxy's) can carry the next request.
                await request.get_data()
            except Exception:  # too large: read() answers that (413)
                signature = None
            if signature:
                url = public_http_url(
                    self.rt.settings, request.path, request.query_string.decode("latin-1")
                )
                try:
                    ok = self.gate.valid(url, await self.form_pairs(), signature)
                except Exception:  # a body that is not a form cannot be signed by Twilio
                    ok = False
            g.twilio_signed = ok
        return bool(g.twilio_signed)

    async def read(self, counted: Counter | None = None) -> dict[str, str] | Response:
        """The request's form, signed and well formed; or the refusal to answer
        with. ``counted`` (labelled by ``outcome``) gets ``malformed`` or
        ``forbidden`` for each refusal."""

        def count(outcome: str) -> None:
            if counted is not None:
                counted.labels(outcome=outcome).inc()

        try:
            # The whole body is in before any answer goes out (see _closing),
            # whatever its type: Quart reads only form bodies for the form.
            await request.get_data()
            pairs = await self.form_pairs()
        except HTTPException as exc:  # too large (413), too slow (408): keep the status
            count("malformed")
            status = exc.code if exc.code is not None and 400 <= exc.code < 500 else 400
            return _closing(text("unreadable form", status))
        except Exception:  # undecodable body: nothing Twilio would send
            count("malformed")
            return _closing(text("malformed form", 400))
        # signed() already checked (and cached) the signature for the HTTP bucket.
        is_signed = await self.signed()
        refusal = self.gate.refusal_for(lambda: is_signed)
        if refusal is not None:
            count("forbidden")
            self.rt.metrics.reject("twilio_signature")
            return refusal_response(refusal)
        form = dict(pairs)  # Twilio sends each key once; with repeats, the last wins
        # Every SID has its shape before anything reads one: SIDs go into REST
        # paths (unescaped by the twilio library) and into dedupe keys.
        refusal = form_refusal(form, self.rt.settings.secrets.twilio_account_sid)
        if refusal is not None:
            count("forbidden" if refusal.status == 403 else "malformed")
            self.rt.metrics.reject("twilio_form")
            return refusal_response(refusal)
        return form


def _closing(response: Response) -> Response:
    """Ask the client not to reuse the connection.

    These answers can go out before the body has all arrived. Hypercorn then
    closes the half-read connection from inside the response task, which
    Quart-Trio cancels as soon as the request ends, so the close is lost and
    the connection stays open, unread: a client that sent its next request on
    it would wait forever. ``Connection: close`` makes it open a fresh one.
    """
    response.headers["Connection"] = "close"
    return response
