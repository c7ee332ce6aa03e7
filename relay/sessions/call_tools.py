"""The tools a phone call offers and the requests its core makes of its driver
(docs/contract.md §11). Pure: no I/O, no trio.

The core never waits: anything that takes time (an HTTP tool, a Twilio REST
update, the ``@call`` task lookup, a timer) is an :data:`Ask` the driver carries
out as a task of the call, feeding the answer back into the core.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Protocol

from relay.calls.report import CallReport
from relay.config import CallsSettings, HttpToolSettings

END_CALL = "end_call"
TRANSFER_CALL = "transfer_call"
BUILTINS = (END_CALL, TRANSFER_CALL)


@dataclass(frozen=True, slots=True)
class Tool:
    name: str
    schema: Mapping[str, Any]
    http: HttpToolSettings | None = None  # None: a built-in


@dataclass(frozen=True, slots=True)
class RunTool:
    """Call an operator's HTTP tool; answer with ``TwilioCore.tool_answered``."""

    call_id: str
    tool: HttpToolSettings
    arguments: dict[str, Any]


@dataclass(frozen=True, slots=True)
class Transfer:
    """Redirect the live call to ``number``; answer with ``TwilioCore.transfer_answered``."""

    call_id: str
    number: str


@dataclass(frozen=True, slots=True)
class LookupTask:
    """Find the ``@call`` task of this call; answer with ``TwilioCore.task_found``."""

    call_sid: str


@dataclass(frozen=True, slots=True)
class Wake:
    """Call ``TwilioCore.wake`` at ``at_ms`` (the session's millisecond clock)."""

    at_ms: float


Ask = RunTool | Transfer | LookupTask | Wake


class CallUpdateFailed(Exception):
    """Twilio REST refused a live call's update or could not be reached; the
    message is speakable to the model (no secrets, no URLs)."""


class CallDesk(Protocol):
    """What a call's driver asks of the daemon (``relay.daemon.call_services``)."""

    async def find_task(self, call_sid: str) -> str | None: ...

    async def run_http_tool(
        self,
        tool: HttpToolSettings,
        call_id: str,
        arguments: dict[str, Any],
        call_sid: str | None,
        stream_sid: str | None,
    ) -> tuple[bool, str]: ...

    async def update_call(
        self, call_sid: str, *, status: str | None = None, twiml: str | None = None
    ) -> None:
        """Raises :class:`CallUpdateFailed` on failure."""

    def call_ended(self, report: CallReport) -> None: ...


END_CALL_SCHEMA: Mapping[str, Any] = {
    "type": "object",
    "properties": {
        "reason": {"type": "string", "description": "Why the call is ending, in a few words."}
    },
}


def offered_tools(
    calls: CallsSettings, *, end_call: bool = False
) -> tuple[list[dict[str, object]], dict[str, Tool]]:
    """The ``tools`` of the session.update and the same tools by name.
    ``end_call`` forces the built-in of that name (an ``@call`` task call)."""
    defs: list[dict[str, object]] = []
    by_name: dict[str, Tool] = {}

    def offer(name: str, description: str, schema: Mapping[str, Any], http: Any = None) -> None:
        defs.append(
            {"type": "function", "name": name, "description": description, "parameters": schema}
        )
        by_name[name] = Tool(name, schema, http)

    if END_CALL in calls.tools or end_call:
        offer(
            END_CALL,
            "Hang up the phone call. Use it when the conversation is over, after you "
            "have said goodbye.",
            END_CALL_SCHEMA,
        )
    if TRANSFER_CALL in calls.tools and calls.transfer_targets:
        names = sorted(calls.transfer_targets)
        offer(
            TRANSFER_CALL,
            "Transfer the caller to a person. Say that you are transferring them first. "
            f"Possible targets: {', '.join(names)}.",
            {
                "type": "object",
                "properties": {"target": {"type": "string", "enum": names}},
                "required": ["target"],
            },
        )
    for tool in calls.http_tools:
        offer(tool.name, tool.description, dict(tool.parameters), tool)
    return defs, by_name
