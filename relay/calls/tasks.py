"""``@call`` errands (docs/contract.md §12): the task a call was placed for, kept
in the store by the call's CallSid, so that whichever process Twilio's stream
or status callback reaches finds it (through Redis when the store is shared).

A task is written once, when the call is placed, and lives :data:`TASK_TTL`.
Everything in it came from a chat message, so it is cleaned and bounded here,
before it can reach a prompt, a chat message or a log.
"""

from __future__ import annotations

import json
import re
import unicodedata
from dataclasses import asdict, dataclass
from typing import Any

from relay.store.base import Store

__all__ = [
    "MAX_AUTHOR_CHARS",
    "MAX_TASK_CHARS",
    "TASK_TTL",
    "CallTask",
    "TaskBook",
    "clean_text",
]

# A task is looked up on the call's start and its end: an hour covers the ring,
# the longest call (limits.session_seconds) and Twilio's status callback retries.
TASK_TTL = 3600.0
# The task goes into the call's instructions and is echoed in the chat: a few
# sentences of errand, not a document. Longer tasks are cut (and the reply says so).
MAX_TASK_CHARS = 1000
# Twilio's Author is an identity or an address; the number is digits as typed.
MAX_AUTHOR_CHARS = 256
MAX_NUMBER_CHARS = 64
# The conversation goes into a REST path (the library does not escape it).
_CONVERSATION_SID = re.compile(r"\ACH[0-9a-f]{32}\Z")


def clean_text(text: str, limit: int) -> tuple[str, bool]:
    """``text`` as one line of at most ``limit`` characters; (the line, whether it was cut).

    Control characters and line or paragraph separators become spaces (a task
    must not start a new line in a prompt or a log, nor a new "message" in a
    transcript); invisible format characters (bidi overrides, zero-width
    marks) and lone surrogates are dropped; runs of white space become one.
    """
    kept = []
    for char in text:
        category = unicodedata.category(char)
        if category in ("Cc", "Zl", "Zp"):
            kept.append(" ")
        elif category not in ("Cf", "Cs"):
            kept.append(char)
    line = " ".join("".join(kept).split())
    if len(line) <= limit:
        return line, False
    return line[:limit].rstrip(), True


@dataclass(frozen=True)
class CallTask:
    """What an ``@call`` with a task asked for, and where to report back."""

    task: str
    conversation_sid: str
    author: str
    number: str  # as the author wrote it, for the report ("415-555-0100")
    to: str  # E.164, as called

    def to_json(self) -> str:
        return json.dumps(asdict(self), ensure_ascii=False, separators=(",", ":"))

    @classmethod
    def from_json(cls, text: str) -> CallTask | None:
        """The task written by :meth:`to_json`; None for anything else (an older or
        foreign record must not crash the call that finds it)."""
        try:
            data: Any = json.loads(text)
        except ValueError:
            return None
        if not isinstance(data, dict):
            return None
        fields = ("task", "conversation_sid", "author", "number", "to")
        values = [data.get(name) for name in fields]
        texts = [v for v in values if isinstance(v, str)]
        if len(texts) != len(fields):
            return None
        task, convo, author, number, to = texts
        if not _CONVERSATION_SID.match(convo):
            return None
        # Re-bounded on the way out too: the store may be shared with others.
        task = clean_text(task, MAX_TASK_CHARS)[0]
        if not task:
            return None
        author = clean_text(author, MAX_AUTHOR_CHARS)[0]
        number = clean_text(number, MAX_NUMBER_CHARS)[0]
        return cls(task, convo, author, number, to)


class TaskBook:
    """``@call`` tasks by CallSid, and the once-per-call claim on reporting back."""

    def __init__(self, store: Store, ttl_seconds: float = TASK_TTL) -> None:
        self.store = store
        self.ttl = ttl_seconds

    async def remember(self, call_sid: str, task: CallTask) -> None:
        await self.store.put(f"task:{call_sid}", task.to_json(), self.ttl)

    async def find(self, call_sid: str) -> CallTask | None:
        found = await self.store.get(f"task:{call_sid}")
        return CallTask.from_json(found) if found is not None else None

    async def claim_report(self, call_sid: str) -> bool:
        """True for exactly one caller per call (per process while the shared store
        is away): the one that posts the call's report in the conversation."""
        return await self.store.first_seen(f"task-report:{call_sid}", self.ttl)

    async def mark_streamed(self, call_sid: str) -> None:
        """The call's media stream started: its end will report (not the status callback)."""
        await self.store.put(f"task-stream:{call_sid}", "1", self.ttl)

    async def streamed(self, call_sid: str) -> bool:
        return await self.store.get(f"task-stream:{call_sid}") is not None
