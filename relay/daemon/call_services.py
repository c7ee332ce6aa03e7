"""What a phone call needs from outside its sockets (docs/contract.md §11 and §12):
its ``@call`` task, HTTP tools, Twilio REST on the live call, and what happens
after it ends (the ``call.ended`` event, the ``@call`` summary).

Built once per daemon, on the daemon's shared clients (:mod:`relay.daemon.outbound`).
The call's core never waits for any of this: the session driver runs each
request as a task of the call and feeds the answer back to the core.
"""

from __future__ import annotations

import logging
from typing import Any

import httpx
from twilio.base.exceptions import TwilioException

from relay.calls.events import deliver_call_event
from relay.calls.http_tools import call_http_tool, error_output
from relay.calls.report import CallReport
from relay.config import HttpToolSettings
from relay.conversations.twilio_rest import update_call
from relay.daemon.outbound import Outbound
from relay.daemon.state import DaemonState
from relay.sessions.call_tools import CallUpdateFailed

log = logging.getLogger("relay.calls")


class CallServices:
    def __init__(self, rt: DaemonState, out: Outbound) -> None:
        self.rt = rt
        self.rest = out.rest
        self.http = out.operator  # tools and events: the operator's endpoints
        self.task_reports = out.reports

    async def find_task(self, call_sid: str) -> str | None:
        """The ``@call`` task placed for this call, if any (docs/contract.md §12)."""
        return await self.task_reports.task_for_stream(call_sid)

    async def run_http_tool(
        self,
        tool: HttpToolSettings,
        call_id: str,
        arguments: dict[str, Any],
        call_sid: str | None,
        stream_sid: str | None,
    ) -> tuple[bool, str]:
        """Call an operator tool; (ok, the output as JSON text). Never raises
        for the tool's failures: they become an output the model can speak about."""
        key = self.rt.settings.secrets.events_signing_key
        if key is None:  # serve refuses to start so (docs/contract.md §2); never unsigned
            return False, error_output("tool is not available")
        return await call_http_tool(
            self.http,
            tool,
            key,
            call_id=call_id,
            arguments=arguments,
            call_sid=call_sid,
            stream_sid=stream_sid,
        )

    async def update_call(
        self, call_sid: str, *, status: str | None = None, twiml: str | None = None
    ) -> None:
        """Hang up or redirect a live call; raises :class:`CallUpdateFailed`."""
        if not self.rt.settings.secrets.twilio_ready:
            raise CallUpdateFailed("Twilio credentials are not configured")
        try:
            await update_call(self.rest.client, call_sid, status=status, twiml=twiml)
        except TwilioException as exc:
            status_code = getattr(exc, "status", None)
            raise CallUpdateFailed(
                f"Twilio refused the call update (HTTP {status_code})"
                if status_code
                else f"Twilio could not be reached ({exc.__class__.__name__})"
            ) from None
        except httpx.HTTPError as exc:
            raise CallUpdateFailed(
                f"Twilio could not be reached ({exc.__class__.__name__})"
            ) from None

    def call_ended(self, report: CallReport) -> None:
        """A call is over: deliver its event and its ``@call`` summary in the background."""
        self._send_event(report)
        self.task_reports.after_call(report)

    def _send_event(self, report: CallReport) -> None:
        calls, key = self.rt.settings.calls, self.rt.settings.secrets.events_signing_key
        if not calls.events_url or key is None:
            return
        url, metrics = calls.events_url, self.rt.metrics

        async def job() -> None:
            await deliver_call_event(self.http, url, key, report, metrics)

        if not self.rt.spawn_job("call_event", job):
            metrics.call_events_total.labels(outcome="failed").inc()
            log.warning(
                "call.ended event for %s not sent: the background jobs are full", report.call_sid
            )
