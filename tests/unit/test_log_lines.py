"""A logged value cannot break a line (docs/contract.md §10 "Logs"): the text
formatter escapes control characters in the message, the extras and the
exception message; JSON stays one valid object per line."""

from __future__ import annotations

import json
import logging
import re
from typing import Any

from hypothesis import given
from hypothesis import strategies as st

from relay.ops.logs import CONTINUATION, JsonFormatter, TextFormatter, escape

RECORD_START = re.compile(r"^\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3} [A-Z]+ ")
FORGED = "2026-01-01 00:00:00,000 INFO relay.daemon.server: forged"
# Everything some reader takes for a line break, and a terminal escape.
BREAKERS = ["\n", "\r", "\r\n", "\x0b", "\x0c", "\x1c", "\x1d", "\x1e", "\x85", "\u2028", "\u2029"]


def record(msg: str, *args: object, exc: BaseException | None = None, **extra: Any) -> Any:
    rec = logging.LogRecord(
        "relay.test",
        logging.WARNING,
        __file__,
        1,
        msg,
        args,
        (type(exc), exc, exc.__traceback__) if exc is not None else None,
    )
    rec.__dict__.update(extra)
    return rec


def test_escape_leaves_printable_text_alone_and_escapes_the_rest() -> None:
    assert escape("MZ123 caf\u00e9 \u260e") == "MZ123 caf\u00e9 \u260e"
    assert escape("a\nb\rc\td") == "a\\nb\\rc\\td"
    assert escape("\x00\x1b[31m\x7f\x85") == "\\x00\\x1b[31m\\x7f\\x85"
    assert escape("\u2028\u2029\u202e") == "\\u2028\\u2029\\u202e"
    assert escape("\udc80") == "\\udc80"  # a lone surrogate would not even encode


def test_message_args_and_extras_stay_on_one_line() -> None:
    for brk in BREAKERS:
        out = TextFormatter().format(
            record(
                "refused: %s",
                f"bad{brk}{FORGED}",
                stream_sid=f"MZ1{brk}{FORGED}",
                direction=f"inbound{brk}\x1b[2K{FORGED}",
            )
        )
        assert len(out.splitlines()) == 1, repr(out)
        assert out.count("forged") == 3


def test_an_extra_cannot_pose_as_another_field() -> None:
    out = TextFormatter().format(
        record("call started", stream_sid="MZ1 client_ip=10.9.9.9", call_sid="CA1")
    )
    assert out.endswith(' stream_sid="MZ1 client_ip=10.9.9.9" call_sid=CA1')
    out = TextFormatter().format(record("x", note='say "hi"\\', empty=""))
    assert out.endswith(' note="say \\"hi\\"\\\\" empty=""')


def test_a_traceback_stays_readable_and_cannot_forge_a_record() -> None:
    try:
        raise ValueError(f"bad streamSid MZ1\n{FORGED}\r\x1b[1A{FORGED}")
    except ValueError as e:
        out = TextFormatter().format(record("session failed", exc=e, session="t1"))
    lines = out.splitlines()
    assert RECORD_START.match(lines[0]) and lines[0].endswith("session failed session=t1")
    # Every other line is an indented continuation: none can pass for a record.
    assert all(line.startswith(CONTINUATION) for line in lines[1:]), lines
    assert not any(RECORD_START.match(line) for line in lines[1:])
    # Still a traceback a human reads as one.
    assert lines[1] == CONTINUATION + "Traceback (most recent call last):"
    assert any(line.startswith(CONTINUATION + '  File "') for line in lines)
    assert lines[-2] == CONTINUATION + "ValueError: bad streamSid MZ1"
    assert lines[-1] == CONTINUATION + FORGED + "\\r\\x1b[1A" + FORGED


def test_a_stack_is_a_continuation_block_too() -> None:
    rec = record("where am I")
    rec.stack_info = 'Stack (most recent call last):\n  File "x.py", line 1\n    f()'
    lines = TextFormatter().format(rec).splitlines()
    assert lines[1:] == [
        CONTINUATION + "Stack (most recent call last):",
        CONTINUATION + '  File "x.py", line 1',
        CONTINUATION + "    f()",
    ]


def test_json_lines_keep_values_exactly_and_break_nowhere() -> None:
    value = "".join(BREAKERS) + FORGED + "\x1b\x00"
    try:
        raise RuntimeError(value)
    except RuntimeError as e:
        out = JsonFormatter().format(record("m %s", value, exc=e, stream_sid=value))
    assert len(out.splitlines()) == 1
    obj = json.loads(out)
    assert obj["msg"] == "m " + value and obj["stream_sid"] == value
    assert obj["exc"].endswith("RuntimeError: " + value)


@given(st.text(), st.text(), st.text())
def test_any_value_gives_one_text_line(msg: str, arg: str, value: str) -> None:
    out = TextFormatter().format(record(msg.replace("%", "%%") + " %s", arg, field=value))
    assert len(out.splitlines()) == 1
    out.encode("utf-8")  # nothing (a lone surrogate) left that the stream cannot write
