"""The handlers the edge calls: a runner per WebSocket session kind for the front
door, and the Twilio HTTP routes (TwiML, Conversations webhook, call status) for the app.

Kept in the daemon, which binds the layers together, so that ``edge.app`` holds
no protocol logic and ``sessions``/``conversations`` import neither the edge's
routes nor each other.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable

from quart import Response

from relay.admission.twilio_auth import TwilioGate
from relay.conversations.call_status import status_handler
from relay.conversations.webhook import ConvoJobs, convo_handler
from relay.daemon.outbound import Outbound
from relay.daemon.state import DaemonState
from relay.edge.signed_form import SignedForms
from relay.edge.twiml import voice_handler
from relay.sessions.call_tools import CallDesk
from relay.sessions.client_session import ClientSession
from relay.sessions.twilio_session import TwilioSession
from relay.ws.peer import PeerSocket

Handler = Callable[[], Awaitable[Response]]


async def client_runner(
    rt: DaemonState, ws: PeerSocket, ip: str, model: str, voice: str | None
) -> None:
    await ClientSession(rt, ws, ip, model, voice).run()


async def twilio_runner(
    rt: DaemonState, ws: PeerSocket, ip: str, call: str | None, *, desk: CallDesk | None = None
) -> None:
    await TwilioSession(rt, ws, ip, call, desk).run()


def twilio_routes(
    rt: DaemonState, gate: TwilioGate, out: Outbound
) -> tuple[dict[str, Handler], Callable[[], Awaitable[bool]]]:
    """The signed Twilio webhooks, and the check that exempts signed requests
    from the per-IP HTTP bucket."""

    forms = SignedForms(rt, gate)
    routes = {
        "/twilio/convo": convo_handler(rt, forms, ConvoJobs(rt, out.rest, out.chat)),
        "/twilio/voice": voice_handler(rt, forms),
        "/twilio/status": status_handler(rt, forms, out.reports),
    }
    return routes, forms.signed
