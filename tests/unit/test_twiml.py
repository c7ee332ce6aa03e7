"""relay.edge.twiml: the TwiML of POST /twilio/voice is well-formed XML whatever the form says."""

from __future__ import annotations

import xml.etree.ElementTree as ET

from relay.edge.twiml import connect_twiml


def test_control_characters_from_the_form_never_break_the_xml() -> None:
    """Regression (fuzz): Direction=%1F was copied into value="\\x1f", which no XML
    parser accepts."""
    xml = connect_twiml("wss://relay.example.com/twilio/media", "in\x1fbound\x00", "fax\x0b")
    root = ET.fromstring(xml)
    params = {p.get("name"): p.get("value") for p in root.iter("Parameter")}
    assert params == {"direction": "inbound", "amd": "fax"}
    only_controls = ET.fromstring(connect_twiml("wss://r.example/twilio/media", "x", "\x1f"))
    assert [p.get("name") for p in only_controls.iter("Parameter")] == ["direction"]


def test_ordinary_values_are_kept_and_escaped() -> None:
    xml = connect_twiml("wss://relay.example.com/twilio/media", 'a"<&>\tb', None)
    root = ET.fromstring(xml)
    (param,) = root.iter("Parameter")
    assert param.get("value") == 'a"<&>\tb'


def test_from_and_to_are_parameters_when_twilio_sent_them() -> None:
    xml = connect_twiml(
        "wss://r.example/twilio/media/tok", "inbound", None, (("from", "+1415\x00"), ("to", ""))
    )
    params = {p.get("name"): p.get("value") for p in ET.fromstring(xml).iter("Parameter")}
    assert params == {"direction": "inbound", "from": "+1415"}
