"""Parse SMS bodies into bot commands: ``@call``, ``@group`` and the ``@ai`` mention.

Pure: no I/O, no trio. Guarantees:

- A command word is recognised only at the start of the body (after optional
  whitespace), case-insensitively, and only as a whole word (``@callme`` is not
  ``@call``).
- Every phone number comes back in E.164 (``+`` and 8-15 digits); ten digits
  mean a North American number (``+1``).
- Nothing the sender typed is silently dropped: text that is not a readable
  number is returned verbatim in ``unreadable``. Only separators (commas,
  semicolons, new lines, the word ``and``, ``&``) are discarded.
- ``numbers`` and ``unreadable`` keep first-seen order, without duplicates.
- ``@call`` only: the numbers are the leading list; from the first word that
  is neither a number, a piece of one nor a separator, the rest of the body is
  the call's task (docs/contract.md §12), verbatim. A body whose leading list
  holds no readable number has no task: it is read as before, word by word.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Literal

__all__ = ["Command", "mentions_ai", "normalize_number", "parse_command", "split_targets"]

_COMMAND = re.compile(r"\A\s*@(call|group)(?![\w@])\s*:?(.*)\Z", re.IGNORECASE | re.DOTALL)
_AI_MENTION = re.compile(r"(?<![\w@.])@ai(?![\w@])", re.IGNORECASE)
_SEPARATORS = re.compile(r"[,;\n\r]|&|\band\b", re.IGNORECASE)
_TOKEN = re.compile(r"\S+")
# Hyphens as phones and word processors type them: ASCII, Unicode dashes, minus sign.
_PUNCT = "-.()\u2010\u2011\u2012\u2013\u2014\u2015\u2212"
_NUMBERISH = re.compile(rf"\A\+?[0-9{re.escape(_PUNCT)}]*\Z")
_SPACING = re.compile(rf"[\s{re.escape(_PUNCT)}]+")
_DIGITS = re.compile(r"[0-9]")
# The pieces of an @call's leading number list: separators (a colon too, as in
# "@call 415-555-0100: ask …") and white-space separated words.
_LIST_PIECE = re.compile(r"[,;:\n\r&]|\band\b|[^\s,;:&]+", re.IGNORECASE)
_LIST_SEPARATOR = re.compile(r"\A(?:[,;:\n\r&]|and)\Z", re.IGNORECASE)


@dataclass(frozen=True)
class Command:
    """A parsed ``@call``/``@group``: E.164 numbers plus whatever could not be read,
    and for ``@call`` the task after the numbers ("" for none).

    ``written`` holds each of ``numbers`` as the author typed it (white space
    collapsed), for replies that quote them back; it is left out of comparisons.
    """

    kind: Literal["call", "group"]
    numbers: tuple[str, ...] = ()
    unreadable: tuple[str, ...] = ()
    task: str = ""
    written: tuple[str, ...] = field(default=(), compare=False)


def parse_command(body: str) -> Command | None:
    """Return the command at the start of ``body``, or ``None`` when there is none.

    An empty argument list (``"@call"``) is still a command, with no numbers,
    so the caller can answer with usage help rather than an AI reply.
    """
    match = _COMMAND.match(body)
    if match is None:
        return None
    kind: Literal["call", "group"] = "call" if match.group(1).lower() == "call" else "group"
    args, task = match.group(2), ""
    if kind == "call":
        listed, task = _split_task(args)
        if task and not _read_numbers(listed)[0]:
            listed, task = args, ""  # no number before it: not a task, read it all
        args = listed
    numbers, unreadable, written = _read_numbers(args)
    return Command(kind, numbers, unreadable, task, written)


def _read_numbers(args: str) -> tuple[tuple[str, ...], tuple[str, ...], tuple[str, ...]]:
    """(numbers, unreadable pieces, numbers as written) of a list of numbers."""
    numbers: list[str] = []
    unreadable: list[str] = []
    written: list[str] = []
    for chunk in _SEPARATORS.split(args):
        for number, text in _scan_chunk(chunk):
            if number is not None:
                if number not in numbers:
                    numbers.append(number)
                    written.append(" ".join(text.split()))
            else:
                _append_unique(unreadable, text)
    return tuple(numbers), tuple(unreadable), tuple(written)


def _split_task(args: str) -> tuple[str, str]:
    """(the leading list of numbers, the task after it, stripped; "" when none).

    The list is the leading words that look like (pieces of) numbers, and
    separators, up to the last one that completes a readable number; the task
    starts at the next word that is not a separator. So digits that complete
    no number just before the task are the task's ("4155550100 7 people at 8"),
    while a message with no task reads as before.
    """
    digit_words: list[re.Match[str]] = []
    for piece in _LIST_PIECE.finditer(args):
        word = piece.group()
        if _LIST_SEPARATOR.match(word):
            continue
        if _NUMBERISH.match(word):
            if _DIGITS.search(word):
                digit_words.append(piece)
            continue
        for index in range(len(digit_words) - 1, -1, -1):
            end = digit_words[index].end()
            if _ends_with_number(args[:end]):
                start = digit_words[index + 1].start() if index + 1 < len(digit_words) else None
                return args[:end], args[piece.start() if start is None else start :].strip()
        return args, ""
    return args, ""


def _ends_with_number(text: str) -> bool:
    """True when the last piece of ``text`` (a list of numbers) is a readable number."""
    pieces = _scan_chunk(_SEPARATORS.split(text)[-1])
    return bool(pieces) and pieces[-1][0] is not None


def split_targets(numbers: tuple[str, ...], limit: int) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """(the first ``limit`` numbers, the rest): what one ``@call``/``@group`` may act on
    (``twilio.max_call_targets``, docs/contract.md §7) and what it must refuse."""
    return numbers[:limit], numbers[limit:]


def mentions_ai(body: str) -> bool:
    """True when ``body`` mentions ``@ai`` as a word (not ``@aide``, not ``me@ai.com``)."""
    return _AI_MENTION.search(body) is not None


def normalize_number(text: str) -> str | None:
    """E.164 for one phone number as people type it, or ``None`` if it is not one.

    Accepted: 10 digits with a valid North American area code (first digit
    2-9) → ``+1``; 11 digits starting ``1`` likewise → ``+``; ``+`` then 8-15
    digits (``+1`` numbers must then be 11 digits). Spaces, dots, dashes and
    parentheses between digits are ignored; anything else makes it unreadable.
    """
    stripped = text.strip()
    plus = stripped.startswith("+")
    rest = _SPACING.sub("", stripped[1:] if plus else stripped)
    if not rest.isascii() or not rest.isdigit():
        return None
    if plus:
        if rest.startswith("1"):
            return "+" + rest if _is_nanp(rest[1:]) else None
        return "+" + rest if 8 <= len(rest) <= 15 and rest[0] != "0" else None
    if _is_nanp(rest):
        return "+1" + rest
    if len(rest) == 11 and rest.startswith("1") and _is_nanp(rest[1:]):
        return "+" + rest
    return None


def _is_nanp(digits: str) -> bool:
    return len(digits) == 10 and digits[0] in "23456789"


@dataclass
class _Group:
    """Consecutive tokens of one chunk being gathered into one number (or one piece of junk)."""

    start: int
    end: int
    digits: str = ""
    plus: bool = False
    numberish: bool = True

    def capacity(self) -> int:
        """How many digits this group may still grow to before it must be cut."""
        if self.plus:
            return 11 if self.digits.startswith("1") else 15
        if not self.digits:
            return 15
        return 11 if self.digits.startswith("1") else 10

    def complete(self) -> bool:
        return len(self.digits) == self.capacity()


def _scan_chunk(chunk: str) -> list[tuple[str | None, str]]:
    """Split one separator-free chunk into ``(number, text)`` pieces, in order.

    Digit groups are gathered greedily (``+1 415 555 0000`` is one number):
    a group ends when it reaches a full number's length, when the next token
    would overflow it, or when the next token starts with ``+``. Runs of
    words that are not numbers stay together as one unreadable piece.
    """
    pieces: list[tuple[str | None, str]] = []
    group: _Group | None = None

    def flush() -> None:
        nonlocal group
        if group is not None:
            text = chunk[group.start : group.end]
            number = normalize_number(text) if group.numberish else None
            pieces.append((number, text))
            group = None

    for match in _TOKEN.finditer(chunk):
        token = match.group()
        numberish = _NUMBERISH.match(token) is not None
        digits = "".join(_DIGITS.findall(token)) if numberish else ""
        if group is not None and (
            group.numberish != numberish
            or (numberish and token.startswith("+"))
            or (numberish and len(group.digits) + len(digits) > group.capacity())
        ):
            flush()
        if group is None:
            group = _Group(
                match.start(), match.end(), plus=token.startswith("+"), numberish=numberish
            )
        group.end = match.end()
        group.digits += digits
        if group.numberish and group.complete():
            flush()
    flush()
    return pieces


def _append_unique(items: list[str], item: str) -> None:
    if item not in items:
        items.append(item)
