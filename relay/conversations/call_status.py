"""``POST /twilio/status``: Twilio's status callback for the calls ``@call`` placed
(docs/contract.md §12).

Checked like every Twilio webhook (signature over ``public_url`` + path,
AccountSid, the SIDs' shapes); then answered ``200 ok`` at once. Only a final
status is acted on, once per CallSid (Twilio retries, replays): a background
job finds the call's task, if any, and reports it in the conversation it came
from (:class:`relay.calls.summaries.TaskReports`). A call with no task costs
one store lookup and nothing else.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable

from quart import Response, request
from werkzeug.exceptions import HTTPException

from relay.admission.twilio_auth import TwilioGate, form_refusal
from relay.calls.summaries import STATUS_WORDS, TaskReports
from relay.calls.tasks import TaskBook
from relay.conversations.twilio_rest import TwilioRest
from relay.daemon.state import DaemonState
from relay.edge.app import refusal_response, text
from relay.ops.http_client import http_client

log = logging.getLogger("relay.calls")

REST_TIMEOUT = 10.0
# The statuses a call ends with; Twilio sends only these for the "completed" event.
FINAL = frozenset({"completed", *STATUS_WORDS})


def status_handler(
    rt: DaemonState,
    gate: TwilioGate,
    signed: Callable[[], Awaitable[bool]],
    form_pairs: Callable[[], Awaitable[list[tuple[str, str]]]],
) -> Callable[[], Awaitable[Response]]:
    s = rt.settings
    rest = TwilioRest(
        s.secrets.twilio_account_sid or "",
        s.secrets.twilio_auth_token or "",
        api_base=s.twilio.api_base,
        timeout=REST_TIMEOUT,
    )
    # No chat from here: a status callback reports a call no stream ran.
    http = http_client(follow_redirects=False)

    async def aclose() -> None:
        await rest.aclose()
        await http.aclose()

    rt.closers.append(aclose)
    reports = TaskReports(s, TaskBook(rt.store), rest.client, http, rt.spawn_job)
    counted = rt.metrics.call_status_total

    def ok(outcome: str) -> Response:
        counted.labels(outcome=outcome).inc()
        return text("ok")

    async def handle() -> Response:
        try:
            # The whole body is in before any answer goes out, whatever its type.
            await request.get_data()
            pairs = await form_pairs()
        except HTTPException as exc:  # too large (413), too slow (408): keep the status
            counted.labels(outcome="malformed").inc()
            code = exc.code if exc.code is not None and 400 <= exc.code < 500 else 400
            return _closing(text("unreadable form", code))
        except Exception:  # undecodable body: nothing Twilio would send
            counted.labels(outcome="malformed").inc()
            return _closing(text("malformed form", 400))
        # signed() already checked (and cached) the signature for the HTTP bucket.
        is_signed = await signed()
        refusal = gate.refusal_for(lambda: is_signed)
        if refusal is not None:
            counted.labels(outcome="forbidden").inc()
            rt.metrics.reject("twilio_signature")
            return refusal_response(refusal)
        form = dict(pairs)
        refusal = form_refusal(form, s.secrets.twilio_account_sid)
        if refusal is not None:
            counted.labels(outcome="forbidden" if refusal.status == 403 else "malformed").inc()
            rt.metrics.reject("twilio_form")
            return refusal_response(refusal)
        call_sid = form.get("CallSid", "")
        if not call_sid:
            counted.labels(outcome="malformed").inc()
            rt.metrics.reject("twilio_form")
            return text("CallSid missing", 400)
        status = form.get("CallStatus", "")
        if status not in FINAL or not s.calls.summaries:
            return ok("ignored")
        # One report per call: Twilio's retries and any replay of a signed form
        # stop here, before they cost a job (the job's claim decides across processes).
        if not await rt.store.first_seen(f"status:{call_sid}", s.limits.dedupe_seconds):
            return ok("duplicate")
        if not reports.after_status(call_sid, status):
            log.warning(
                "status callback job refused: background work is at its bound",
                extra={"call_sid": call_sid},
            )
            return ok("overloaded")
        return ok("accepted")

    return handle


def _closing(response: Response) -> Response:
    """Ask the client not to reuse a connection whose body may be half read
    (see relay.conversations.webhook._closing)."""
    response.headers["Connection"] = "close"
    return response
