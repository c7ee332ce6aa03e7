"""relay.sessions.response_done: the filter never misses a response.done (the parser
is the oracle), and decides real events from their head, whatever their size."""

from __future__ import annotations

import json
from typing import Any

import orjson
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from relay.sessions.response_done import may_be_response_done, response_usage

PAD = "x" * 1100 + '"}'  # ends a message long enough to be judged by its head


def is_done(message: str) -> bool:
    try:
        event = orjson.loads(message)
    except orjson.JSONDecodeError:
        return False
    return isinstance(event, dict) and event.get("type") == "response.done"


# Strings that fight the filter: quotes, backslashes, braces, the marker, "type".
tricky = st.lists(
    st.sampled_from(['"', "\\", "{", "[", ":", ",", " ", "a", "type", "response.done"]),
    max_size=12,
).map("".join)
types = st.sampled_from(["response.done", "response.output_audio.delta", "error", "response.don"])
keys = st.one_of(
    st.just("type"), st.sampled_from(["event_id", "response", "a\\", 'x"type']), tricky
)
leaves = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-(2**63), 2**63 - 1),
    tricky,
    st.sampled_from(["response.done", "response.created", "response.done\\", "x" * 300]),
)
values = st.recursive(
    leaves,
    lambda inner: st.one_of(
        st.lists(inner, max_size=3),
        st.dictionaries(keys, inner, max_size=3),
        st.fixed_dictionaries({"type": types}),  # a nested "type" the filter must not take
    ),
    max_leaves=8,
)


@st.composite
def events(draw: st.DrawFn) -> str:
    """A JSON object with a type somewhere among other keys, spelled in one of the
    ways a serializer may spell it."""
    fields: dict[str, Any] = draw(st.dictionaries(keys, values, max_size=4))
    fields.pop("type", None)
    items = list(fields.items())
    if draw(st.booleans()):
        items.insert(draw(st.integers(0, len(items))), ("type", draw(types)))
    if draw(st.booleans()):  # long enough to be judged by its head
        items.insert(draw(st.integers(0, len(items))), ("pad", "x" * 1100))
    obj = dict(items)
    style = draw(st.sampled_from(["compact", "spaced", "indent", "ascii"]))
    if style == "compact":
        return orjson.dumps(obj).decode()
    if style == "indent":
        return json.dumps(obj, indent=2)
    return json.dumps(obj, ensure_ascii=style == "ascii")


@settings(max_examples=2000, deadline=None)
@given(events())
def test_never_misses_a_response_done(message: str) -> None:
    if is_done(message):
        assert may_be_response_done(message)


@settings(max_examples=500, deadline=None)
@given(st.text(max_size=300))
def test_arbitrary_text_is_safe(message: str) -> None:
    if is_done(message):
        assert may_be_response_done(message)
    response_usage(message)  # never raises


@pytest.mark.parametrize(
    "message",
    [
        '{"type":"response.done","response":{}}',
        '{"event_id":"event_1","type":"response.done","response":{}}',
        '{"response":{"usage":{}},"type":"response.done"}',  # type last
        '{"type": "response.done"}',  # spaced
        '{\n  "type": "response.done"\n}',
        '{"event_id":"' + "e" * 400 + '","type":"response.done"}',  # type past the head
        '{"a\\"type":"x","type":"response.done"}',  # "type" inside a key first
        '{"event_id":"{","type":"response.done"}',  # a brace in a string first
        '{"response":{"type":"realtime.response"},"type":"response.done"}',  # nested first
        '{"output":[{"type":"message"}],"type":"response.done"}',
        '{"output":["x",{"a":1,"type":"message"}],"type":"response.done"}',
        # The same, long (judged by the head where it can be).
        '{"type":"response.done","pad":"' + PAD,
        '{"event_id":"event_1","type":"response.done","pad":"' + PAD,
        '{"response":{"type":"realtime.response"},"type":"response.done","pad":"' + PAD,
        '{"a\\"type":"x","type":"response.done","pad":"' + PAD,
        '{"pad":"' + "y" * 120 + '","type":"response.done","pad2":"' + PAD,  # past the head
        '{"event_id":"' + "e" * 100 + '","type":"response.done","pad":"' + PAD,  # cut by it
    ],
)
def test_the_spellings_of_a_response_done(message: str) -> None:
    assert is_done(message)
    assert may_be_response_done(message)


@pytest.mark.parametrize(
    "message",
    [
        # Real event shapes, type first: a long one is decided from its head, even
        # when the rest quotes the marker.
        '{"type":"response.output_audio.delta","delta":"' + "A" * 100_000 + '"}',
        '{"event_id":"event_9","type":"response.output_audio_transcript.done",'
        '"transcript":"x","extra":{"k":"response.done","response.done":1},"pad":"' + PAD,
        '{"type":"session.updated","session":{"tools":[{"name":"response.done"}]},'
        '"note":"\\"response.done\\"","pad":"' + PAD,
        '{"type":"response.done.not","response":{"usage":{}},"pad":"' + PAD,
        '{"type":"response.don","pad":"' + PAD,
        '{"type":"response.doner","response.done":1,"pad":"' + PAD,
        '{"type":"response.done\\u0000","pad":"' + PAD,
        # Not an object, or no marker anywhere.
        "",
        "plain text",
        '{"type":5}',
    ],
)
def test_other_messages_are_passed_over(message: str) -> None:
    assert not is_done(message)
    assert not may_be_response_done(message)


def test_usage_is_read_from_a_response_done_only() -> None:
    usage = {"input_tokens": 3}
    assert (
        response_usage(
            orjson.dumps({"type": "response.done", "response": {"usage": usage}}).decode()
        )
        == usage
    )
    assert response_usage('{"type":"response.done","response":[1]}') is None
    assert (
        response_usage('{"type":"response.created","response":{"usage":{"input_tokens":3}}}')
        is None
    )
    assert response_usage("[" * 100_000) is None  # too deep for the parser: not counted
    assert response_usage('{"type":"response.done"') is None


@pytest.mark.parametrize(
    ("message", "filtered"),
    [
        # Not an object: the filter may let it through, the parser refuses it.
        ('"response.done"x', True),
        ('["response.done"]', True),
        # The type spelled with an escape: no encoder writes ASCII letters so, and
        # the filter does not look for it (a full parse of every message would).
        ('{"type":"respons\\u0065.done"}', False),
        ('{"type":"respons\\u0065.done","pad":"' + PAD, False),
    ],
)
def test_where_the_filter_and_the_parser_differ(message: str, filtered: bool) -> None:
    assert may_be_response_done(message) is filtered
    assert response_usage(message) is None or is_done(message)
