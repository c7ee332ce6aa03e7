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

from quart import Response

from relay.calls.summaries import STATUS_WORDS, TaskReports
from relay.daemon.state import DaemonState
from relay.edge.app import text
from relay.edge.signed_form import SignedForms

log = logging.getLogger("relay.calls")

# The statuses a call ends with; Twilio sends only these for the "completed" event.
FINAL = frozenset({"completed", *STATUS_WORDS})


def status_handler(
    rt: DaemonState, forms: SignedForms, reports: TaskReports
) -> Callable[[], Awaitable[Response]]:
    s = rt.settings
    counted = rt.metrics.call_status_total

    def ok(outcome: str) -> Response:
        counted.labels(outcome=outcome).inc()
        return text("ok")

    async def handle() -> Response:
        form = await forms.read(counted)
        if isinstance(form, Response):
            return form
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
