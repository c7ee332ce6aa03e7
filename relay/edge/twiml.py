"""``POST /twilio/voice``: TwiML that connects a call to this relay's media stream
(docs/contract.md §6), on a URL that carries a stream token for that call (§10)."""

from __future__ import annotations

import re
from collections.abc import Awaitable, Callable, Sequence

from quart import Response
from twilio.twiml.voice_response import Connect, Stream, VoiceResponse

from relay.admission.twilio_auth import MEDIA_PATH, mint_stream_token, public_ws_url
from relay.daemon.state import DaemonState
from relay.edge.app import text
from relay.edge.signed_form import SignedForms

# Characters XML 1.0 cannot carry even escaped (controls other than tab, LF, CR;
# surrogates; U+FFFE/U+FFFF): Twilio's library copies values as they are.
_NOT_XML = re.compile("[\x00-\x08\x0b\x0c\x0e-\x1f\ud800-\udfff\ufffe\uffff]")


def xml_safe(value: str) -> str:
    return _NOT_XML.sub("", value)


def connect_twiml(
    stream_url: str, direction: str, amd: str | None, more: Sequence[tuple[str, str]] = ()
) -> str:
    """``<Response><Connect><Stream url=…>`` with the call's direction, AMD result
    and ``more`` parameters (``from``, ``to``), each of these only when not empty."""
    response = VoiceResponse()
    connect = Connect()
    stream = Stream(url=stream_url)
    stream.parameter(name="direction", value=xml_safe(direction))
    for name, value in (("amd", amd or ""), *more):
        value = xml_safe(value)
        if value:
            stream.parameter(name=name, value=value)
    connect.append(stream)
    response.append(connect)
    return str(response.to_xml(xml_declaration=True))


def voice_handler(rt: DaemonState, forms: SignedForms) -> Callable[[], Awaitable[Response]]:
    s = rt.settings

    async def handle() -> Response:
        form = await forms.read()
        if isinstance(form, Response):
            return form
        call = form.get("CallSid", "")
        key = s.secrets.encryption_key
        if not call or key is None:  # the key is there whenever serve runs
            rt.metrics.reject("twilio_form")
            return text("CallSid missing", 400)
        direction = form.get("Direction", "inbound") or "inbound"
        amd = form.get("AnsweredBy") or None
        url = public_ws_url(s, f"{MEDIA_PATH}/{mint_stream_token(key, call)}")
        parties = (("from", form.get("From", "")), ("to", form.get("To", "")))
        xml = connect_twiml(url, direction, amd, parties)
        return Response(xml, content_type="text/xml; charset=utf-8")

    return handle
