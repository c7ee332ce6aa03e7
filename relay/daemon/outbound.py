"""The daemon's outgoing clients, made once and shared by every route and call.

- ``rest``: Twilio REST (Conversations replies, ``@call`` placing, live-call
  updates, errand reports).
- ``chat``: OpenAI chat completions (SMS replies, ``@call`` summaries).
- ``operator``: the operator's own endpoints (HTTP tools, ``call.ended`` events).
  A pool of its own, so that a slow tool holding connections never queues an
  SMS reply or an errand report behind it.

Every request sets its own deadline; none follows a redirect. Closed through
``rt.closers`` when the daemon stops.
"""

from __future__ import annotations

from relay.calls.summaries import TaskReports
from relay.calls.tasks import TaskBook
from relay.conversations.twilio_rest import TwilioRest
from relay.daemon.state import DaemonState
from relay.ops.http_client import http_client

# Each Twilio REST request as a whole, in seconds.
REST_TIMEOUT = 10.0


class Outbound:
    def __init__(self, rt: DaemonState) -> None:
        s = rt.settings
        self.rest = TwilioRest(
            s.secrets.twilio_account_sid or "",
            s.secrets.twilio_auth_token or "",
            api_base=s.twilio.api_base,
            timeout=REST_TIMEOUT,
        )
        self.chat = http_client(follow_redirects=False)
        self.operator = http_client(follow_redirects=False)
        # Errand reports: started by a call's end and by a status callback alike.
        self.reports = TaskReports(s, TaskBook(rt.store), self.rest.client, self.chat, rt.spawn_job)
        rt.closers.append(self.aclose)

    async def aclose(self) -> None:
        await self.rest.aclose()
        await self.chat.aclose()
        await self.operator.aclose()
