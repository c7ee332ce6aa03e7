"""What a phone call leaves behind when it ends: the facts a ``call.ended`` event
carries (docs/contract.md §11) and an ``@call`` summary is made from (§12)."""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass, field
from typing import Any

from relay.calls.usage import Usage

# The core's ending outcomes (metrics labels) -> the event's outcome vocabulary.
EVENT_OUTCOMES = {
    "twilio_stop": "caller_hung_up",
    "twilio_closed": "caller_hung_up",
    "assistant_ended": "assistant_ended",
    "transferred": "transferred",
    "voicemail": "voicemail_left",
    "goodbye": "time_limit",
    "time_limit": "time_limit",
    "upstream_failed": "upstream_failed",
    "upstream_closed": "upstream_failed",
    "twilio_stalled": "stalled",
    "upstream_stalled": "stalled",
    "drain": "draining",
}


def rfc3339(unix: float) -> str:
    """UTC, whole seconds: ``2026-12-03T09:15:00Z``."""
    when = dt.datetime.fromtimestamp(int(unix), tz=dt.UTC)
    return when.strftime("%Y-%m-%dT%H:%M:%SZ")


@dataclass
class CallReport:
    """One ended call. ``outcome`` is already in the event's vocabulary."""

    call_sid: str | None
    stream_sid: str | None
    direction: str | None
    answered_by: str | None
    caller: str | None  # Twilio's From
    callee: str | None  # Twilio's To
    started_at: float  # unix seconds
    ended_at: float
    outcome: str
    transfer_target: str | None = None
    tools: list[tuple[str, bool]] = field(default_factory=list)  # (name, ok) as answered
    transcript: list[tuple[str, str]] = field(default_factory=list)  # (role, text)
    usage: Usage = field(default_factory=Usage)
    # The @call errand this call ran, if any (docs/contract.md §12).
    task: str | None = None

    def event(self) -> dict[str, Any]:
        """The ``call.ended`` event body (docs/contract.md §11)."""
        return {
            "type": "call.ended",
            "call_sid": self.call_sid,
            "stream_sid": self.stream_sid,
            "direction": self.direction,
            "answered_by": self.answered_by,
            "from": self.caller,
            "to": self.callee,
            "started_at": rfc3339(self.started_at),
            "ended_at": rfc3339(self.ended_at),
            "duration_seconds": round(max(0.0, self.ended_at - self.started_at), 3),
            "outcome": self.outcome,
            "transfer_target": self.transfer_target,
            "tools": [{"name": name, "ok": ok} for name, ok in self.tools],
            "transcript": [{"role": role, "text": text} for role, text in self.transcript],
            "usage": self.usage.event_fields(),
        }
