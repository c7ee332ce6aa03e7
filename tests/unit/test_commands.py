"""relay.conversations.commands: every number form, mixtures, junk, and properties."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from relay.conversations.commands import (
    Command,
    mentions_ai,
    normalize_number,
    parse_command,
    split_targets,
)

# --- normalize_number ---------------------------------------------------------------------


@pytest.mark.parametrize(
    "text",
    [
        "4155550000",
        "415-555-0000",
        "(415) 555-0000",
        "(415)555-0000",
        "+1 415 555 0000",
        "+14155550000",
        "1-415-555-0000",
        "1 415 555 0000",
        "14155550000",
        "415.555.0000",
        "415 555 0000",
        "+1 (415) 555-0000",
        "  4155550000  ",
        "415\u2013555\u20130000",  # en dash, as smart punctuation types it
        "+1-415-555-0000",
    ],
)
def test_normalize_north_american_forms(text: str) -> None:
    assert normalize_number(text) == "+14155550000"


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("+442079460958", "+442079460958"),
        ("+44 20 7946 0958", "+442079460958"),
        ("+4930123456", "+4930123456"),
        ("+12345678", None),  # +1 numbers must be 11 digits
        ("+4412345", None),  # 7 digits: too short for E.164 here
        ("+1234567890123456", None),  # 16 digits: too long
        ("+0441234567", None),  # country codes never start with 0
    ],
)
def test_normalize_e164(text: str, expected: str | None) -> None:
    assert normalize_number(text) == expected


@pytest.mark.parametrize(
    "text",
    [
        "",
        "   ",
        "555-0000",  # seven digits: no area code
        "1415555000",  # ten digits starting with 1: area codes never do
        "0415555000",  # area codes never start with 0
        "24155550000",  # eleven digits not starting with 1
        "11155550000",  # 1 + area code starting with 1
        "415555000012",
        "415-555-000O",  # letter O
        "call me",
        "41+55550000",
        "++14155550000",
        "4155550000x12",
        "\u0664\u0661\u0665\u0665\u0665\u0665\u0660\u0660\u0660\u0660",  # Arabic-Indic digits
        "+",
    ],
)
def test_normalize_rejects(text: str) -> None:
    assert normalize_number(text) is None


# --- parse_command: recognising the command ----------------------------------------------


@pytest.mark.parametrize(
    ("body", "kind"),
    [
        ("@call 4155550000", "call"),
        ("@CALL 4155550000", "call"),
        ("@Call 4155550000", "call"),
        ("   @call 4155550000", "call"),
        ("\n@call 4155550000", "call"),
        ("@call: 4155550000", "call"),
        ("@call:4155550000", "call"),
        ("@group 4155550000", "group"),
        ("@GROUP 4155550000", "group"),
        ("@call\n4155550000", "call"),
    ],
)
def test_command_word(body: str, kind: str) -> None:
    command = parse_command(body)
    assert command is not None
    assert command.kind == kind
    assert command.numbers == ("+14155550000",)
    assert command.unreadable == ()


@pytest.mark.parametrize(
    "body",
    [
        "",
        "hello",
        "call 4155550000",
        "please @call 4155550000",  # not at the start
        "@callme 4155550000",
        "@caller",
        "@groups 4155550000",
        "@call_4155550000",
        "@ai @call 4155550000",
        "@@call 4155550000",
        "@call@group 4155550000",
    ],
)
def test_not_a_command(body: str) -> None:
    assert parse_command(body) is None


@pytest.mark.parametrize("body", ["@call", "@call   ", "@group", "@call:", "  @GROUP\n"])
def test_empty_command_is_still_a_command(body: str) -> None:
    command = parse_command(body)
    assert command is not None
    assert command.numbers == ()
    assert command.unreadable == ()


# --- parse_command: numbers --------------------------------------------------------------


def test_every_listed_form_in_one_message() -> None:
    body = (
        "@call 4155550001, 415-555-0002, (415) 555-0003, +1 415 555 0004, "
        "+14155550005, 1-415-555-0006, 415.555.0007"
    )
    assert parse_command(body) == Command("call", tuple(f"+1415555000{i}" for i in range(1, 8)), ())


@pytest.mark.parametrize(
    ("args", "numbers"),
    [
        ("4155550001 4155550002", ("+14155550001", "+14155550002")),
        ("4155550001,4155550002", ("+14155550001", "+14155550002")),
        ("4155550001 , 4155550002", ("+14155550001", "+14155550002")),
        ("4155550001;4155550002", ("+14155550001", "+14155550002")),
        ("4155550001\n4155550002", ("+14155550001", "+14155550002")),
        ("4155550001 and 4155550002", ("+14155550001", "+14155550002")),
        ("4155550001 & 4155550002", ("+14155550001", "+14155550002")),
        ("+1 415 555 0001 +1 415 555 0002", ("+14155550001", "+14155550002")),
        ("415 555 0001 415 555 0002", ("+14155550001", "+14155550002")),
        ("1 415 555 0001 415 555 0002", ("+14155550001", "+14155550002")),
        ("(415) 555-0001 (415) 555-0002", ("+14155550001", "+14155550002")),
        ("+44 20 7946 0958 4155550002", ("+442079460958", "+14155550002")),
        ("+44 20 7946 0958, +1 415 555 0002", ("+442079460958", "+14155550002")),
        ("415 - 555 - 0001", ("+14155550001",)),
        (",,4155550001,,", ("+14155550001",)),
    ],
)
def test_separators_and_grouping(args: str, numbers: tuple[str, ...]) -> None:
    command = parse_command("@call " + args)
    assert command == Command("call", numbers, ())


def test_duplicates_removed_order_kept() -> None:
    command = parse_command("@group 4155550002, (415) 555-0001, +14155550002, 415.555.0001")
    assert command is not None
    assert command.numbers == ("+14155550002", "+14155550001")


@pytest.mark.parametrize(
    ("args", "numbers", "unreadable"),
    [
        ("mom", (), ("mom",)),
        ("my mom", (), ("my mom",)),
        ("mom and dad", (), ("mom", "dad")),
        ("555-0000", (), ("555-0000",)),
        ("555-0000 4155550001", ("+14155550001",), ("555-0000",)),
        ("4155550001 555-0000", ("+14155550001",), ("555-0000",)),
        ("4155550001, bob, 4155550002", ("+14155550001", "+14155550002"), ("bob",)),
        ("4155550001 x12", ("+14155550001",), ("x12",)),
        ("1415555000", (), ("1415555000",)),
        ("415555000012", (), ("415555000012",)),
        ("+12345", (), ("+12345",)),
        ("0207 946 0958", (), ("0207 946", "0958")),
        ("415-555-000O", (), ("415-555-000O",)),
        ("junk, junk", (), ("junk",)),
        ("-", (), ("-",)),
        ("please call 4155550001 now", ("+14155550001",), ("please call", "now")),
    ],
)
def test_unreadable_is_reported_as_typed(
    args: str, numbers: tuple[str, ...], unreadable: tuple[str, ...]
) -> None:
    # @group has no task: every word is a number or reported as unreadable.
    assert parse_command("@group " + args) == Command("group", numbers, unreadable)


@pytest.mark.parametrize(
    ("args", "numbers", "unreadable"),
    [
        ("mom", (), ("mom",)),
        ("my mom", (), ("my mom",)),
        ("555-0000 4155550001", ("+14155550001",), ("555-0000",)),
        ("4155550001 555-0000", ("+14155550001",), ("555-0000",)),
        ("0207 946 0958", (), ("0207 946", "0958")),
        # No number before the words: no task, read as before.
        ("please call 4155550001 now", ("+14155550001",), ("please call", "now")),
        ("555-12 ask him", (), ("555-12", "ask him")),
    ],
)
def test_call_without_a_task_reads_as_before(
    args: str, numbers: tuple[str, ...], unreadable: tuple[str, ...]
) -> None:
    assert parse_command("@call " + args) == Command("call", numbers, unreadable)


@pytest.mark.parametrize(
    ("args", "numbers", "unreadable", "task"),
    [
        (
            "415-555-0100 ask whether Tuesday at 3 works for the cleaning",
            ("+14155550100",),
            (),
            "ask whether Tuesday at 3 works for the cleaning",
        ),
        ("415-555-0100: ask about Tuesday", ("+14155550100",), (), "ask about Tuesday"),
        ("415-555-0100 - ask about Tuesday", ("+14155550100",), (), "ask about Tuesday"),
        ("4155550001 and ask, and say hi", ("+14155550001",), (), "ask, and say hi"),
        (
            "4155550001, 4155550002 & confirm 2 seats\nfor 7pm",
            ("+14155550001", "+14155550002"),
            (),
            "confirm 2 seats\nfor 7pm",
        ),
        # Numbers inside the task are the task's, never called.
        (
            "4155550001 ask them to call 4155550009 back",
            ("+14155550001",),
            (),
            "ask them to call 4155550009 back",
        ),
        # Digits that complete no number, just before the task, are the task's.
        ("4155550001 555-12 ask", ("+14155550001",), (), "555-12 ask"),
        ("4155550100 7 people at 8", ("+14155550100",), (), "7 people at 8"),
        ("+1 415 555 0100, 12 seats", ("+14155550100",), (), "12 seats"),
        ("4155550001, bob, 4155550002", ("+14155550001",), (), "bob, 4155550002"),
        ("4155550001 x12", ("+14155550001",), (), "x12"),
    ],
)
def test_call_task_is_the_text_after_the_numbers(
    args: str, numbers: tuple[str, ...], unreadable: tuple[str, ...], task: str
) -> None:
    assert parse_command("@call " + args) == Command("call", numbers, unreadable, task)


def test_numbers_come_back_as_written_too() -> None:
    command = parse_command("@call +1 415 555 0100\tand (415) 555-0101, 4155550100 hello")
    assert command is not None
    assert command.numbers == ("+14155550100", "+14155550101")
    assert command.written == ("+1 415 555 0100", "(415) 555-0101")
    assert command.task == "hello"


def test_group_kind_parses_numbers_the_same_way() -> None:
    assert parse_command("@group +1 415 555 0001, oops") == Command(
        "group", ("+14155550001",), ("oops",)
    )


# --- mentions_ai ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("body", "expected"),
    [
        ("@ai what time is it", True),
        ("hey @ai", True),
        ("hey @AI, help", True),
        ("hey @Ai?", True),
        ("(@ai)", True),
        ("what do you think @ai.", True),
        ("line one\n@ai line two", True),
        ("@aide", False),
        ("me@ai.com", False),
        ("ai", False),
        ("@ a i", False),
        ("@@ai", False),
        ("@ai_bot", False),
        ("", False),
    ],
)
def test_mentions_ai(body: str, expected: bool) -> None:
    assert mentions_ai(body) is expected


# --- properties ----------------------------------------------------------------------------

_area = st.integers(200, 999).map(str)
_rest = st.integers(0, 9_999_999).map(lambda n: f"{n:07d}")
_FORMATS = [
    "{a}{e}{s}",
    "{a}-{e}-{s}",
    "({a}) {e}-{s}",
    "({a}){e}-{s}",
    "+1 {a} {e} {s}",
    "+1{a}{e}{s}",
    "1-{a}-{e}-{s}",
    "1 {a} {e} {s}",
    "1{a}{e}{s}",
    "{a}.{e}.{s}",
    "{a} {e} {s}",
    "+1 ({a}) {e}-{s}",
]


def _format(fmt: str, area: str, rest: str) -> str:
    return fmt.format(a=area, e=rest[:3], s=rest[3:])


@given(area=_area, rest=_rest, fmt=st.sampled_from(_FORMATS))
def test_any_format_normalizes_to_plus1(area: str, rest: str, fmt: str) -> None:
    assert normalize_number(_format(fmt, area, rest)) == "+1" + area + rest


@given(
    items=st.lists(st.tuples(_area, _rest, st.sampled_from(_FORMATS)), min_size=1, max_size=6),
    seps=st.lists(st.sampled_from([", ", ",", " , ", "; ", "\n", " and ", " "]), min_size=6),
)
def test_lists_of_numbers_parse_back(items: list[tuple[str, str, str]], seps: list[str]) -> None:
    texts = [_format(fmt, area, rest) for area, rest, fmt in items]
    body = "@call " + "".join(t + sep for t, sep in zip(texts, seps, strict=False))
    expected = tuple(dict.fromkeys("+1" + area + rest for area, rest, _ in items))
    assert parse_command(body) == Command("call", expected, ())


@given(st.text(max_size=80))
def test_never_raises_and_never_loses_text(args: str) -> None:
    command = parse_command("@call " + args)
    assert command is not None
    for number in command.numbers:
        assert number.startswith("+") and number[1:].isdigit() and 8 <= len(number) - 1 <= 15
    for piece in command.unreadable:
        assert piece and piece in args
    assert command.task in args and command.task == command.task.strip()
    assert len(command.written) == len(command.numbers)
    for written in command.written:
        assert written and "".join(written.split()) in "".join(args.split())
    assert len(set(command.numbers)) == len(command.numbers)
    assert len(set(command.unreadable)) == len(command.unreadable)


@given(st.text(max_size=80))
def test_text_without_at_sign_is_never_a_command(body: str) -> None:
    if "@" not in body:
        assert parse_command(body) is None
        assert not mentions_ai(body)


def test_split_targets_keeps_the_first_in_order() -> None:
    numbers = tuple(f"+1415555010{n}" for n in range(8))
    assert split_targets(numbers, 5) == (numbers[:5], numbers[5:])
    assert split_targets(numbers[:2], 5) == (numbers[:2], ())
