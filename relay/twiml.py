"""``POST /twilio/voice``: TwiML that connects a call to this relay's media stream (SPEC §6)."""

from __future__ import annotations

import re
from collections.abc import Awaitable, Callable

from quart import Response
from twilio.twiml.voice_response import Connect, Stream, VoiceResponse

from relay.app import refusal_response
from relay.runtime import Runtime
from relay.twilio_auth import TwilioGate, public_ws_url

MEDIA_PATH = "/twilio/media"
# Characters XML 1.0 cannot carry even escaped (controls other than tab, LF, CR;
# surrogates; U+FFFE/U+FFFF): Twilio's library copies values as they are.
_NOT_XML = re.compile("[\x00-\x08\x0b\x0c\x0e-\x1f\ud800-\udfff\ufffe\uffff]")


def xml_safe(value: str) -> str:
    return _NOT_XML.sub("", value)


def connect_twiml(stream_url: str, direction: str, amd: str | None) -> str:
    """``<Response><Connect><Stream url=…>`` with the call's direction and AMD result."""
    response = VoiceResponse()
    connect = Connect()
    stream = Stream(url=stream_url)
    stream.parameter(name="direction", value=xml_safe(direction))
    amd = xml_safe(amd) if amd else None
    if amd:
        stream.parameter(name="amd", value=amd)
    connect.append(stream)
    response.append(connect)
    return str(response.to_xml(xml_declaration=True))


def voice_handler(
    rt: Runtime,
    gate: TwilioGate,
    signed: Callable[[], Awaitable[bool]],
    form_pairs: Callable[[], Awaitable[list[tuple[str, str]]]],
) -> Callable[[], Awaitable[Response]]:
    async def handle() -> Response:
        pairs = await form_pairs()
        # signed() already checked (and cached) the signature for the HTTP bucket.
        is_signed = await signed()
        refusal = gate.refusal_for(lambda: is_signed)
        if refusal is not None:
            rt.metrics.reject("twilio_signature")
            return refusal_response(refusal)
        form = dict(pairs)
        direction = form.get("Direction", "inbound") or "inbound"
        amd = form.get("AnsweredBy") or None
        xml = connect_twiml(public_ws_url(rt.settings, MEDIA_PATH), direction, amd)
        return Response(xml, content_type="text/xml; charset=utf-8")

    return handle
