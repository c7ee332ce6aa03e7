"""Finding the ``response.done`` events in a browser session's pass-through without
parsing the rest (docs/contract.md §9, §11: their token usage is counted).

Every other upstream message goes to the browser unread, so the test must cost
next to nothing per message, whatever its size: audio deltas run to tens of KB,
and a substring search over all of a 25 KB one costs ~50 times the core's own
handling of it. Real events name their type in the first few dozen characters
(``{"type":"response.output_audio.delta",…`` or ``{"event_id":"…","type":…``), so
for a long message :func:`may_be_response_done` decides from there when it can,
and only otherwise searches the whole message. It may say yes to a message that
is not one (the parse then says no); it never says no to one that is.
"""

from __future__ import annotations

import orjson

# A message this short is searched whole: that costs less than reading its head.
_SCAN_BELOW = 1024
# Where the top-level "type" of a real event sits, with room to spare.
_HEAD = 128
_DONE = "response.done"
_MARKER = '"response.done"'
_TYPE_KEY = '"type":"'


def may_be_response_done(message: str) -> bool:
    """False only when ``message`` is certainly not a JSON object whose top-level
    ``type`` is ``response.done`` written plainly, as every encoder writes it (not
    ``"respons\\u0065.done"``), and given once."""
    if len(message) >= _SCAN_BELOW:
        before, found, after = message[:_HEAD].partition(_TYPE_KEY)
        # That "type" is the top-level key when the only '{' before it is the
        # message's first character (a key belongs to an object: none is nested
        # around it) and its quote is not an escaped one (it is not inside a
        # string). A brace inside an earlier string only means the slow path.
        if found and before.rfind("{") == 0 and not before.endswith("\\"):
            value = after[: len(_DONE) + 1]
            if len(value) > len(_DONE):  # not cut off by the head
                return value == _DONE + '"'
    # Short, spaced, reordered or unusual: a quoted response.done anywhere (inside a
    # JSON string a quote is escaped, so a transcript quoting it does not match).
    return _MARKER in message


def response_usage(message: str) -> object:
    """``response.usage`` of a ``response.done`` event, or None when ``message`` is
    not one (or not JSON at all: the client gets it anyway, it is just not counted)."""
    try:
        event = orjson.loads(message)
    except orjson.JSONDecodeError:
        return None
    if not isinstance(event, dict) or event.get("type") != _DONE:
        return None
    response = event.get("response")
    return response.get("usage") if isinstance(response, dict) else None
