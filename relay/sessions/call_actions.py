"""What a phone call does besides talking (docs/contract.md §11): its tools, the
hang-up and the transfer after the audio owed, key presses, the transcript.

A part of :class:`relay.sessions.twilio_core.TwilioCore`, kept in its own
module so that each reads on its own; sans I/O like the rest of the core. The
attributes declared on :class:`CallActions` are the core's, set in its
``__init__``; the ones :meth:`CallActions._init_actions` sets are this part's.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import orjson

from relay.calls.arguments import check_arguments
from relay.calls.transcript import Transcript
from relay.sessions import dialect as rt_dialect
from relay.sessions.call_tools import (
    END_CALL,
    TRANSFER_CALL,
    Ask,
    RunTool,
    Tool,
    Transfer,
    Wake,
)
from relay.sessions.closing import Ending
from relay.sessions.dialect import Dialect
from relay.sessions.keypad import Keypad
from relay.sessions.playback import Playback
from relay.sessions.turns import Turns

# Key presses closer together than this are one message.
DTMF_GAP_MS = 1500.0
MAX_DIGITS = 64  # keys kept of one burst
# Function calls one call answers; beyond it each gets an error output (a model in a
# loop must not grow the call's memory, nor hammer an operator's tool).
MAX_TOOL_CALLS = 128


@dataclass(frozen=True, slots=True)
class _AfterAudio:
    """A hang-up (``target`` None) or a transfer, carried out once the audio sent
    has played, or at ``deadline_ms``."""

    call_id: str
    response_id: str
    deadline_ms: float
    target: str | None = None
    number: str = ""


def _output(ok: bool, error: str | None = None) -> str:
    if ok:
        return '{"ok": true}'
    return orjson.dumps({"ok": False, "error": error or "failed"}).decode()


class CallActions:
    """Tools, hang-up, transfer, key presses and transcript of one call."""

    # The core's (relay.sessions.twilio_core.TwilioCore):
    settings: Any
    calls: Any
    dialect: Dialect
    out: Any
    playback: Playback
    stream_sid: str | None
    closing: bool
    response_active: bool
    ending: Ending | None
    transcript: Transcript | None
    # The driver's way to carry out an Ask (a task of the call); None in a core
    # that cannot (then tools that need I/O answer an error, and no timers run).
    ask: Callable[[Ask], None] | None
    on_tool: Callable[[str, bool], None] | None  # metrics

    def flush(self) -> None:
        raise NotImplementedError  # the core's

    def _end(self, ending: Ending) -> None:
        raise NotImplementedError  # the core's

    def _init_actions(self) -> None:
        self._tools: dict[str, Tool] = {}
        self._turns = Turns()
        self._want_response = False  # a response.create waiting for the active response
        self._after_audio: _AfterAudio | None = None  # after end_call or transfer_call
        self._transferring = False
        self.hangup_requested = False  # the driver completes the call through REST
        self.draining = False
        self.transfer_target: str | None = None
        self.tools_used: list[tuple[str, bool]] = []
        self._tool_of: dict[str, str] = {}  # HTTP tool calls in flight: call_id -> tool
        self._transfer_call = ("", "")  # (call_id, target name) of the transfer in flight
        self._keypad = Keypad(DTMF_GAP_MS, MAX_DIGITS)
        self._wake_at: float | None = None

    def tool_answered(self, call_id: str, ok: bool, output: str) -> None:
        """An HTTP tool answered (``output`` is JSON text, an error output when not ok)."""
        tool = self._tool_of.pop(call_id, None)
        if tool is None:
            return
        self._note_tool(tool, ok)
        self._answer(call_id, output)

    def transfer_answered(self, ok: bool, error: str | None, now_ms: float) -> None:
        """Twilio REST answered the transfer: the call ends, or goes on with an error."""
        del now_ms
        if not self._transferring:
            return
        self._transferring = False
        call_id, target = self._transfer_call
        self._note_tool(TRANSFER_CALL, ok)
        if ok:
            self.transfer_target = target
            self._answer(call_id, _output(True), followup=False)
            self._end(Ending("transferred", 1000, "", 1000))
        else:
            self._answer(call_id, _output(False, error or "the transfer failed"))

    def wake(self, at_ms: float, now_ms: float) -> None:
        """A timer asked for with :class:`Wake` fired."""
        if self._wake_at == at_ms:
            self._wake_at = None
        if self.ending is not None:
            return
        keys = self._keypad.take(now_ms)
        if keys is not None:
            self._send_keys(keys)
        if self._after_audio is not None:
            self._maybe_act(now_ms)
        due = []
        if self._keypad.pending:
            due.append(self._keypad.due_ms)
        if self._after_audio is not None:
            due.append(self._after_audio.deadline_ms)
        if due:
            self._arm(min(due))

    def _arm(self, at_ms: float) -> None:
        """Ask the driver for a wake at ``at_ms`` unless an earlier one is coming."""
        if self.ask is None or (self._wake_at is not None and self._wake_at <= at_ms):
            return
        self._wake_at = at_ms
        self.ask(Wake(at_ms))

    def _on_dtmf(self, digit: object, now_ms: float) -> None:
        if not self.calls.dtmf or self.stream_sid is None or self.closing:
            return
        # Anything but a phone's key is dropped: nothing a hostile stream can smuggle in.
        if self._keypad.press(digit, now_ms):
            self._arm(self._keypad.due_ms)

    def _send_keys(self, text: str) -> None:
        self.flush()  # the caller's audio before the key presses goes first
        self.out.to_upstream(orjson.dumps(rt_dialect.user_text(text)))
        self._request_response()

    def _request_response(self) -> None:
        """``response.create`` now, or once the active response is done (a second one
        while a response is active is refused by the service)."""
        if self.closing:
            return  # a voicemail or goodbye is the last response of the call
        if self.response_active:
            self._want_response = True
            return
        self._want_response = False
        self.out.to_upstream(orjson.dumps(rt_dialect.response_create(self.dialect)))

    def _on_call_args(self, event: dict[str, Any], now_ms: float) -> None:
        self._on_function_call(
            event.get("call_id"),
            event.get("name"),
            event.get("arguments"),
            event.get("response_id"),
            now_ms,
        )

    def _on_item_done(self, event: dict[str, Any], now_ms: float) -> None:
        item = event.get("item")
        if isinstance(item, dict) and item.get("type") == "function_call":
            self._on_function_call(
                item.get("call_id"),
                item.get("name"),
                item.get("arguments"),
                event.get("response_id"),
                now_ms,
            )

    def _on_function_call(
        self,
        call_id: object,
        name: object,
        arguments: object,
        response_id: object,
        now_ms: float,
    ) -> None:
        """One function call of the model, answered exactly once whichever of its two
        announcements (arguments done, output item done) comes first."""
        if not isinstance(call_id, str) or not call_id or self.stream_sid is None:
            return
        if not self._turns.open(call_id, str(response_id or "")):
            return  # announced before (or a model in a loop: see Turns.open)
        tool = self._tools.get(name) if isinstance(name, str) else None
        if self._turns.seen > MAX_TOOL_CALLS:
            self._refuse(call_id, "unknown", "too many tool calls on this call")
            return
        if tool is None:
            self._refuse(call_id, "unknown", f"unknown tool {str(name)[:64]!r}")
            return
        try:
            args = orjson.loads(arguments) if isinstance(arguments, str | bytes) else None
        except orjson.JSONDecodeError:
            args = None
        problem = check_arguments(tool.schema, args)
        if problem is not None:
            self._refuse(call_id, tool.name, problem)
            return
        assert isinstance(args, dict)
        if tool.name == END_CALL:
            self._on_end_call(call_id, now_ms)
        elif tool.name == TRANSFER_CALL:
            self._on_transfer(call_id, str(args["target"]), now_ms)
        elif tool.http is not None:
            if self.ask is None:
                self._refuse(call_id, tool.name, "tools are not available on this call")
                return
            self._tool_of[call_id] = tool.name
            self.ask(RunTool(call_id, tool.http, args))

    def _refuse(self, call_id: str, tool: str, why: str) -> None:
        self._note_tool(tool, False)
        self._answer(call_id, _output(False, why))

    def _note_tool(self, name: str, ok: bool) -> None:
        if len(self.tools_used) < MAX_TOOL_CALLS:
            self.tools_used.append((name, ok))
        if self.on_tool is not None:
            self.on_tool(name if name in self._tools else "unknown", ok)

    def _on_end_call(self, call_id: str, now_ms: float) -> None:
        if self._after_audio is not None or self._transferring:
            self._refuse(call_id, END_CALL, "the call is already ending")
            return
        self._note_tool(END_CALL, True)
        response_id = self._turns.response_of(call_id) or ""
        self._answer(call_id, _output(True), followup=False)
        self._after(_AfterAudio(call_id, response_id, self._deadline(now_ms)), now_ms)

    def _on_transfer(self, call_id: str, target: str, now_ms: float) -> None:
        number = self.calls.transfer_targets.get(target)
        if number is None:  # the schema's enum already says so; kept for safety
            self._refuse(call_id, TRANSFER_CALL, f"unknown transfer target {target[:64]!r}")
            return
        if self._after_audio is not None or self._transferring or self.ask is None:
            self._refuse(call_id, TRANSFER_CALL, "the call cannot be transferred now")
            return
        # Answered once Twilio has: the output says whether the transfer happened.
        response_id = self._turns.response_of(call_id) or ""
        after = _AfterAudio(call_id, response_id, self._deadline(now_ms), target, number)
        self._after(after, now_ms)

    def _deadline(self, now_ms: float) -> float:
        return now_ms + float(self.settings.limits.goodbye_seconds) * 1000

    def _after(self, after: _AfterAudio, now_ms: float) -> None:
        """Carry out ``after`` once the audio sent has played, ``goodbye_seconds`` at most."""
        self._after_audio = after
        self._arm(after.deadline_ms)
        self._maybe_act(now_ms)

    def _maybe_act(self, now_ms: float) -> None:
        after = self._after_audio
        if after is None or self.ending is not None:
            return
        # Owed: the rest of the response that made the call, and every mark.
        played = self._turns.is_done(after.response_id) and self.playback.all_played()
        if not played and now_ms < after.deadline_ms:
            return
        self._after_audio = None
        if after.target is None:
            self.hangup_requested = True
            self._end(Ending("assistant_ended", 1000, "", 1000))
        elif self.ask is not None:
            self._transferring = True
            self._transfer_call = (after.call_id, after.target)
            self.ask(Transfer(after.call_id, after.number))

    def _answer(self, call_id: str, output: str, *, followup: bool = True) -> None:
        """Send the one output of ``call_id``; once its response is done and every
        call of it answered, the model goes on (docs/contract.md §11)."""
        if self.ending is not None:
            return
        self.flush()
        self.out.to_upstream(orjson.dumps(rt_dialect.function_output(call_id, output)))
        if self._turns.answered(call_id, followup=followup) and self.ending is None:
            self._request_response()

    def _response_done(self, response_id: str, now_ms: float) -> None:
        if self._turns.done(response_id) and self.ending is None:
            self._request_response()
        if self._want_response and not self.response_active and self.ending is None:
            self._request_response()
        if self._after_audio is not None:
            self._maybe_act(now_ms)

    def _on_assistant_text(self, event: dict[str, Any], now_ms: float) -> None:
        text = event.get("transcript")
        if self.transcript is not None and isinstance(text, str):
            self.transcript.add("assistant", text)

    def _on_caller_text(self, event: dict[str, Any], now_ms: float) -> None:
        text = event.get("transcript")
        if self.transcript is not None and isinstance(text, str):
            self.transcript.add("caller", text)
