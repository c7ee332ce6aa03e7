"""One phone call's behaviour, sans I/O: Twilio Media Streams ⇄ OpenAI Realtime.

Everything a call does is decided here, once: which caller audio goes up and
how waiting frames are joined, the ``start`` (stream-token check, voice,
prompts, voicemail), playback and barge-in, the goodbye before the time limit,
the drain, and every ending with the close code each side gets
(docs/contract.md §6). The module imports no trio and no sockets: events come
in as method calls (a raw Twilio or OpenAI message, a timer firing, the drain,
a socket that is gone), time comes in as a number of milliseconds, and actions
go out through :class:`TwilioOut` (send to Twilio, send upstream) and
:attr:`TwilioCore.ending` (close both sides with these codes). The two drivers
in ``relay.sessions.twilio_session`` (the reactor's fast path, which may not
wait, and the pumps, which may) only feed it and carry out what it asks.

Guarantees (each checked by tests/unit/test_twilio_core.py over random event
sequences):

- on ``start`` exactly one ``session.update`` and one ``response.create`` go up,
  so the assistant speaks first; a ``start`` whose callSid is not the one the
  stream token names ends the call 1008 before anything goes up;
- caller audio goes up byte-identical and in order, never in voicemail or
  goodbye; frames fed in one batch (what was ready at once) go up as one append,
  ended by the first other event or by :meth:`TwilioCore.flush`;
- each assistant audio delta becomes one Twilio ``media`` and one ``mark``;
- on ``speech_started`` with unplayed audio: ``clear``, then exactly one
  ``conversation.item.truncate`` at the played position (``relay.sessions.playback``);
- voicemail and goodbye end the call (1000) once Twilio has confirmed the final
  response played;
- once :attr:`TwilioCore.ending` is set, nothing more is sent.

Calls that act (docs/contract.md §11; tests/unit/test_call_core.py): the
``session.update`` offers the configured tools and transcription; every
function call is answered by exactly one ``function_call_output``, and each
response whose calls are all answered and whose ``response.done`` arrived gets
one ``response.create`` (not after ``end_call`` or a transfer that happened,
and not while another response is active: then after it); ``end_call`` and a
transfer wait for the audio owed (``goodbye_seconds`` at most); key presses
become one typed message per burst (``relay.sessions.keypad``); the transcript
and token usage are kept for :meth:`TwilioCore.report`. Whatever takes time is
an ``Ask`` the driver carries out (``relay.sessions.call_tools``): the core
never waits, so audio keeps flowing both ways meanwhile.
"""

from __future__ import annotations

import base64
import binascii
import logging
from collections.abc import Callable
from typing import Any, Protocol

import orjson

from relay.calls.report import EVENT_OUTCOMES, CallReport
from relay.calls.transcript import Transcript
from relay.calls.usage import Usage
from relay.sessions import dialect as rt_dialect
from relay.sessions.call_actions import CallActions
from relay.sessions.call_tools import (
    LookupTask,
    offered_tools,
)
from relay.sessions.closing import Ending
from relay.sessions.playback import Playback
from relay.ws.errors import Disconnected

log = logging.getLogger("relay.twilio")

MACHINE_ANSWERS = frozenset(
    {"machine_start", "machine_end_beep", "machine_end_silence", "machine_end_other", "fax"}
)
OUTBOUND = frozenset({"outbound", "outbound-api", "outbound-dial"})

VOICEMAIL_TASK = "\n\nThe call is about this task: {task}\nSay in one sentence what it is about."
# Caller audio held during a task lookup (bounded by its 2 s timeout: 100 frames).
MAX_EARLY_FRAMES = 250
CALLER_TRANSCRIPT = "conversation.item.input_audio_transcription.completed"
TASK_INSTRUCTIONS = (
    "\n\nThe people who asked for this call gave you this task: {task}\n"
    "Pursue it politely and briefly. Once you have the answer, or it is clear you "
    "will not get one, thank them, say goodbye and call end_call."
)


class SendTexts(Protocol):
    def __call__(self, *texts: bytes) -> None: ...


class SendText(Protocol):
    def __call__(self, text: bytes, /) -> None: ...


class Counts(Protocol):
    """Messages relayed each way (``relay.ops.metrics.Tally``)."""

    up: int
    down: int


class TwilioOut:
    """Where the core's sends go; each driver has one. ``to_twilio`` takes the
    JSON texts (UTF-8) of one write to Twilio, ``to_upstream`` one message up.
    Plain attributes holding the driver's callables: a send from the core is
    one call, with no frame of ours in between."""

    __slots__ = ("to_twilio", "to_upstream")

    def __init__(self, to_twilio: SendTexts, to_upstream: SendText) -> None:
        self.to_twilio = to_twilio
        self.to_upstream = to_upstream


class CallSettings(Protocol):
    """What the core reads of the settings (``relay.config.Settings``)."""

    @property
    def openai(self) -> Any: ...
    @property
    def prompts(self) -> Any: ...
    @property
    def limits(self) -> Any: ...
    @property
    def calls(self) -> Any: ...


def b64_len(payload: str) -> int:
    """Decoded size of a base64 string, without decoding it."""
    n = len(payload)
    if n < 4:
        return (n * 3) // 4
    return (n * 3) // 4 - payload.count("=", n - 2)


def is_audio(payload: object) -> bool:
    """Non-empty, well-formed standard base64 with padding (what Twilio sends and
    OpenAI accepts, and nothing that could break the JSON it is spliced into):
    anything else is not audio either side would take. ``a2b_base64`` in strict
    mode checks that in C (cheaper than a regular expression, docs/architecture.md)."""
    # Strict mode still takes "AAAA=" (padding after a whole quantum): the length
    # check refuses it.
    if not isinstance(payload, str) or not payload or len(payload) % 4:
        return False
    try:
        binascii.a2b_base64(payload, strict_mode=True)
    except (binascii.Error, ValueError):  # ValueError: not ASCII
        return False
    return True


def _upstream_event(raw: str | bytes) -> tuple[Any, Any] | None:
    """An upstream message as (event, its ``type``), or None for one that is not
    JSON or has no type (which the call ignores)."""
    try:
        event = orjson.loads(raw)
        return event, event["type"]
    except (orjson.JSONDecodeError, TypeError, KeyError):
        return None


def _param(params: dict[str, Any], name: str) -> str | None:
    value = params.get(name)
    return value if isinstance(value, str) and value else None


def append_message(frames: list[str]) -> bytes:
    """The ``input_audio_buffer.append`` (JSON, UTF-8) carrying ``frames`` (base64
    audio, each passed :func:`is_audio`), in order."""
    if len(frames) == 1:
        payload = frames[0]
    else:
        # Twilio's 160-byte frames end in padding, so base64 strings cannot be
        # concatenated as text; the audio bytes can.
        payload = base64.b64encode(b"".join([base64.b64decode(f) for f in frames])).decode()
    # orjson on a small dict is cheaper than validating the payload for splicing.
    return orjson.dumps(rt_dialect.append_audio(payload))


def twilio_gone(gone: Disconnected) -> Ending:
    """Twilio's socket is over: a stalled one was aborted, a broken one is told why."""
    if gone.stalled:
        return Ending("twilio_stalled", None)
    if gone.local:
        return Ending("twilio_closed", gone.code, gone.reason)
    return Ending("twilio_closed", None)


def upstream_gone(closed: Disconnected) -> Ending:
    if closed.stalled:
        return Ending("upstream_stalled", 1011, "upstream stalled", None)
    if closed.local:  # it broke the protocol: tell it why, end the call
        return Ending("upstream_failed", 1011, "upstream closed", closed.code)
    failed = closed.code in (1005, 1006, 1011)
    return Ending(
        "upstream_failed" if failed else "upstream_closed",
        1011 if failed else 1000,
        "upstream closed",
        None,
    )


UPSTREAM_UNAVAILABLE = Ending("upstream_failed", 1011, "upstream unavailable", None)
TIME_LIMIT = Ending("time_limit", 1000, "session time limit", 1000, "session time limit")
DRAIN = Ending("drain", 1001, "server shutting down", 1001, "server shutting down")


class TwilioCore(CallActions):
    """The state of one call and its reactions; see the module docstring."""

    def __init__(
        self,
        settings: CallSettings,
        out: TwilioOut,
        tally: Counts,
        *,
        session_id: str = "",
        token_call: str | None = None,
        on_bargein: Callable[[], None] | None = None,
    ) -> None:
        self.settings = settings
        self.out = out  # the driver swaps it: each driver's sends go its own way
        self.tally = tally
        self.id = session_id
        # The CallSid the stream token names (None: no token): ``start`` must match it.
        self.token_call = token_call
        self.dialect = d = rt_dialect.dialect_for(settings.openai.dialect)
        self.playback = Playback()
        self.stream_sid: str | None = None
        self._sid_json = b'""'  # the stream sid as a JSON string, for the messages we build
        self.call_sid: str | None = None
        # The parties (Twilio's From and To, via the TwiML's parameters), for logs and
        # call events; whatever the stream's start said, so never trusted for access.
        self.caller: str | None = None
        self.callee: str | None = None
        self.voicemail = False
        # "closing": a final response (voicemail or goodbye) was asked for; the call
        # ends once it has been played. No caller audio, no barge-in meanwhile.
        self.closing = False
        self.final_response_id: str | None = None
        self.final_response_done = False
        self.response_active = False
        self.ending: Ending | None = None
        self.bargeins = 0
        self._on_bargein = on_bargein  # for the metric
        # Caller audio fed and not yet sent: the join of the frames that were ready
        # at once (docs/contract.md §6 allows it; it never waits for more).
        self._join: list[str] = []
        self._audio = d.audio_delta
        self._speech = d.speech_started
        self._done = d.response_done
        # -- calls that act (docs/contract.md §11) --
        self.calls = settings.calls
        self.ask = None  # set by a driver that can carry out asks (CallActions.ask)
        self.on_tool = None
        self.on_usage: Callable[[tuple[int, int, int, int] | None], None] | None = None
        self.direction: str | None = None
        self.answered_by: str | None = None
        self.task: str | None = None
        self._pending_start: dict[str, Any] | None = None  # a start waiting for its task
        self._early: list[str] = []  # caller audio held meanwhile
        self._init_actions()
        self.transcript: Transcript | None = None
        self.usage = Usage()
        self._rare = {
            "response.function_call_arguments.done": self._on_call_args,
            "response.output_item.done": self._on_item_done,
            d.transcript_done: self._on_assistant_text,
            CALLER_TRANSCRIPT: self._on_caller_text,
        }

    # -- events in ------------------------------------------------------------
    def twilio(self, raw: str | bytes, now_ms: float) -> None:
        """A message from Twilio (whatever arrived: the core ignores what is not
        a Twilio event). Media is held for the join until :meth:`flush` or the
        next other event. Sends upstream only, never to Twilio (a driver that
        feeds it without waiting needs only the upstream socket to take a write)."""
        if self.ending is not None:
            return
        try:
            event = orjson.loads(raw)
            kind = event["event"]
            if kind == "media":
                if self.stream_sid is None or self.voicemail or self.closing:
                    if self._pending_start is not None:
                        self._hold(event["media"]["payload"])
                    return
                payload = event["media"]["payload"]
                # Not audio: OpenAI would answer every such append with an error.
                if is_audio(payload):
                    self._join.append(payload)
                return
            if self._join:
                self.flush()
            if kind == "mark":
                self.playback.on_mark(str(event["mark"]["name"]), now_ms)
                self._maybe_close()
                if self._after_audio is not None:
                    self._maybe_act(now_ms)
            elif kind == "start":
                self._on_start(event)
            elif kind == "stop":
                self._end(Ending("twilio_stop", 1000, "", 1000))
            elif kind == "dtmf":
                self._on_dtmf(event["dtmf"]["digit"], now_ms)
            # connected and unknown events do not disturb the call.
        except (orjson.JSONDecodeError, KeyError, TypeError, AttributeError):
            return  # not a Twilio event, or a malformed one: the call ignores it

    def flush(self) -> None:
        """No more Twilio messages are ready now: send the joined caller audio."""
        join = self._join
        if join:
            if self.ending is None:
                self.out.to_upstream(append_message(join))
                self.tally.up += len(join)
            join.clear()

    def upstream(self, raw: str | bytes, now_ms: float) -> None:
        """A message from OpenAI Realtime."""
        if self.ending is not None:
            return
        parsed = _upstream_event(raw)
        if parsed is None:
            return
        event, kind = parsed
        try:
            if kind == self._audio:
                pair = self._delta_messages(event, now_ms)
                if pair is not None:
                    # One write: the media/mark pair is never split by another message.
                    self.out.to_twilio(*pair)
                    self.tally.down += 1
            elif kind == self._speech:
                self._barge_in(now_ms)
            elif kind == "response.created":
                self.response_active = True
                if self.closing and self.final_response_id is None:
                    # The first response created after the final request is the
                    # final one; a response it cancelled ends before it starts.
                    self.final_response_id = str(event["response"]["id"])
            elif kind == self._done:
                self.response_active = False
                response = event.get("response") or {}
                done_id = response.get("id")
                added = self.usage.add(response.get("usage"))
                if self.on_usage is not None:
                    self.on_usage(added)
                if self.final_response_id is not None and done_id == self.final_response_id:
                    self.final_response_done = True
                    self._maybe_close()
                self._response_done(str(done_id or ""), now_ms)
            elif (handler := self._rare.get(kind)) is not None:
                handler(event, now_ms)
            elif kind == "error":
                err = event.get("error") or {}
                log.warning(
                    "upstream error: %s",
                    str(err.get("message", ""))[:200],
                    extra={"session": self.id, "code": err.get("code")},
                )
        except (KeyError, TypeError, AttributeError):
            return

    def twilio_gone(self, gone: Disconnected) -> None:
        """Twilio's socket is over (read or write): what came before still goes up."""
        self.flush()
        self._end(twilio_gone(gone))

    def upstream_gone(self, closed: Disconnected) -> None:
        self._join.clear()
        self._end(upstream_gone(closed))

    def upstream_unavailable(self) -> None:
        """The upstream could not be opened: the call ends 1011 before it began."""
        self._end(UPSTREAM_UNAVAILABLE)

    def goodbye_due(self) -> None:
        """``goodbye_seconds`` before the time limit: ask for the goodbye."""
        self._begin_goodbye()

    def drain_started(self, drain_seconds: float) -> None:
        """The daemon drains: say goodbye if the drain leaves time for it."""
        self.draining = True
        if drain_seconds >= 3:
            self._begin_goodbye()

    def drain_expired(self) -> None:
        self._end(DRAIN)

    def time_limit(self) -> None:
        """``session_seconds`` are up (the call ends now unless it already has)."""
        self._end(TIME_LIMIT)

    def task_found(self, task: str | None) -> None:
        """The ``@call`` task lookup asked for on ``start`` answered (None: no task)."""
        start, self._pending_start = self._pending_start, None
        if start is None or self.ending is not None:
            return
        self.task = task
        self._begin(start)

    def report(self, started_unix: float, ended_unix: float) -> CallReport | None:
        """What the call leaves behind, or None for a stream that never started a call."""
        ending = self.ending
        if self.stream_sid is None or ending is None:
            return None
        return CallReport(
            call_sid=self.call_sid,
            stream_sid=self.stream_sid,
            direction=self.direction,
            answered_by=self.answered_by,
            caller=self.caller,
            callee=self.callee,
            started_at=started_unix,
            ended_at=ended_unix,
            # A goodbye the drain asked for ended the call because of the drain.
            outcome="draining"
            if self.draining and ending.outcome == "goodbye"
            else EVENT_OUTCOMES.get(ending.outcome, ending.outcome),
            transfer_target=self.transfer_target,
            tools=list(self.tools_used),
            transcript=self.transcript.turns() if self.transcript is not None else [],
            usage=self.usage,
            task=self.task,
        )

    # -- reactions ------------------------------------------------------------
    def _end(self, ending: Ending) -> None:
        if self.ending is None:
            self._join.clear()
            self.ending = ending

    def _on_start(self, event: dict[str, Any]) -> None:
        if self.stream_sid is not None or self._pending_start is not None:
            return  # Twilio sends one start per stream; a second is noise
        start = event["start"]
        call_sid = start.get("callSid")
        if self.token_call is not None and call_sid != self.token_call:
            # A stream token is for one call: a replayed URL cannot carry another one.
            # Nothing has gone upstream yet (it waits for start).
            self._end(Ending("stream_token", 1008, "call does not match stream token", 1000))
            return
        sid = event.get("streamSid") or start.get("streamSid")
        if not isinstance(sid, str) or not sid:
            return
        params = start.get("customParameters") or {}
        if not isinstance(params, dict):
            params = {}
        begin = {"sid": sid, "call_sid": call_sid, "params": params}
        direction = str(params.get("direction") or "inbound")
        if (
            self.ask is not None
            and direction in OUTBOUND
            and isinstance(call_sid, str)
            and call_sid
        ):
            # Only calls we placed can carry an @call task (docs/contract.md §12): the
            # session.update waits for the lookup; caller audio meanwhile is dropped
            # (there is no stream sid yet), as it would be before any start.
            self._pending_start = begin
            self.ask(LookupTask(call_sid))
            return
        self._begin(begin)

    def _begin(self, begin: dict[str, Any]) -> None:
        """The start's session.update and first response.create."""
        sid: str = begin["sid"]
        call_sid = begin["call_sid"]
        params: dict[str, Any] = begin["params"]
        self.stream_sid = sid
        self._sid_json = orjson.dumps(sid)
        self.call_sid = call_sid if isinstance(call_sid, str) else None
        self.caller = _param(params, "from")
        self.callee = _param(params, "to")
        self.direction = _param(params, "direction")
        self.answered_by = _param(params, "amd")
        s = self.settings
        calls = self.calls
        amd = str(params.get("amd") or "")
        direction = str(params.get("direction") or "inbound")
        voice = params.get("voice")
        if voice not in s.openai.voices:
            voice = s.openai.default_voice
        self.voicemail = amd in MACHINE_ANSWERS
        if self.voicemail:
            instructions = s.prompts.voicemail
            self.closing = True
        else:
            instructions = s.prompts.outbound if direction in OUTBOUND else s.prompts.inbound
        task = self.task
        if task is not None:
            template = VOICEMAIL_TASK if self.voicemail else TASK_INSTRUCTIONS
            instructions += template.format(task=task)
        tool_defs, self._tools = offered_tools(calls, end_call=task is not None)
        transcribe = calls.transcripts or task is not None
        if transcribe:
            self.transcript = Transcript()
        log.info(
            "call started",
            extra={
                "session": self.id,
                "call_sid": self.call_sid,
                "stream_sid": sid,
                "from": self.caller,
                "to": self.callee,
                "direction": direction,
                "amd": amd or None,
                "voice": voice,
                "task": task is not None,
                "tools": len(tool_defs),
            },
        )
        update = rt_dialect.phone_session_update(
            self.dialect,
            voice=str(voice),
            instructions=instructions,
            turn_detection=not self.voicemail,
            tools=tool_defs,
            transcription_model=calls.transcription_model if transcribe else None,
        )
        self.out.to_upstream(orjson.dumps(update))
        self.out.to_upstream(orjson.dumps(rt_dialect.response_create(self.dialect)))
        early, self._early = self._early, []
        if early and not self.voicemail:
            self._join.extend(early)  # the audio that came during the task lookup
            self.flush()

    def _delta_messages(self, event: dict[str, Any], now_ms: float) -> tuple[bytes, bytes] | None:
        """The Twilio ``media`` and ``mark`` (JSON, UTF-8) for an audio delta, recorded
        as sent, or None when it is not played. Raises KeyError/TypeError for a
        malformed one."""
        sid = self.stream_sid
        payload = event["delta"]
        item_id = event.get("item_id")
        # Audio that is not base64 would reach Twilio as a malformed media (31924), and
        # audio of no item could never be truncated: neither is played.
        if sid is None or not is_audio(payload) or not isinstance(item_id, str) or not item_id:
            return None
        if self.playback.was_truncated(item_id):
            return None  # audio of an interrupted answer still in flight: never play it
        mark = self.playback.on_delta(item_id, b64_len(payload), now_ms)
        # Spliced, not serialised: the sid was JSON-encoded once, the payload passed
        # is_audio (base64 only) and mark names are digits.
        sid_json = self._sid_json
        return (
            b'{"event":"media","streamSid":%b,"media":{"payload":"%b"}}'
            % (sid_json, payload.encode()),
            b'{"event":"mark","streamSid":%b,"mark":{"name":"%b"}}' % (sid_json, mark.encode()),
        )

    def _barge_in(self, now_ms: float) -> None:
        # Ordered with the deltas around it: a delta that arrives after the truncate
        # belongs to audio the caller will never hear, and is dropped.
        if self.closing or self.stream_sid is None:
            return  # voicemail and goodbye are not interrupted
        cut = self.playback.barge_in(now_ms)
        if cut is None:
            return
        self.out.to_twilio(b'{"event":"clear","streamSid":%b}' % self._sid_json)
        self.out.to_upstream(orjson.dumps(rt_dialect.truncate(cut.item_id, cut.audio_end_ms)))
        self.bargeins += 1
        if self._on_bargein is not None:
            self._on_bargein()
        if self._after_audio is not None:
            self._maybe_act(now_ms)  # the audio owed before a hang-up was just cleared

    def _maybe_close(self) -> None:
        """A final response (voicemail, goodbye) ends the call once Twilio has played it."""
        if self.closing and self.final_response_done and self.playback.all_played():
            outcome = "voicemail" if self.voicemail else "goodbye"
            self._end(Ending(outcome, 1000, "", 1000))

    def _begin_goodbye(self) -> None:
        if self.ending is not None or self.closing or self.stream_sid is None:
            return
        self.flush()  # caller audio that came before the goodbye still goes up
        self.closing = True
        if self.response_active:
            self.out.to_upstream(b'{"type":"response.cancel"}')
        create = rt_dialect.response_create(
            self.dialect, instructions=self.settings.prompts.goodbye
        )
        self.out.to_upstream(orjson.dumps(create))

    def _hold(self, payload: object) -> None:
        """Caller audio that arrives while the start waits for its task lookup: it
        goes up after the session.update, so the audio upstream stays the caller's."""
        if is_audio(payload) and len(self._early) < MAX_EARLY_FRAMES:
            assert isinstance(payload, str)
            self._early.append(payload)
