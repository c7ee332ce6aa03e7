"""What a session core sent, recorded without sockets: shared by the cores'
unit tests (tests/unit/test_twilio_core.py, test_call_core.py, test_client_core.py)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import orjson

from relay.sessions.twilio_core import TwilioOut


@dataclass
class Tally:
    """The message counts a core keeps (the session's Tally, without the metrics)."""

    up: int = 0
    down: int = 0


@dataclass
class Wire:
    """Everything the core asked to send, in order: ("twilio", event) or ("up", event)."""

    sent: list[tuple[str, dict[str, Any]]] = field(default_factory=list)
    writes_to_twilio: list[int] = field(default_factory=list)  # texts per write
    # Set while a Twilio message is fed: the fast path relies on the core sending
    # nothing to Twilio then (it checks only the upstream can take a write).
    from_twilio: bool = False

    def out(self) -> TwilioOut:
        def to_twilio(*texts: bytes) -> None:
            assert not self.from_twilio, "a Twilio message made the core write to Twilio"
            self.writes_to_twilio.append(len(texts))
            self.sent.extend(("twilio", orjson.loads(t)) for t in texts)

        def to_upstream(text: bytes) -> None:
            self.sent.append(("up", orjson.loads(text)))

        return TwilioOut(to_twilio, to_upstream)

    def up(self, kind: str) -> list[dict[str, Any]]:
        return [e for side, e in self.sent if side == "up" and e["type"] == kind]

    def twilio(self, kind: str) -> list[dict[str, Any]]:
        return [e for side, e in self.sent if side == "twilio" and e["event"] == kind]
