"""A fake OpenAI Realtime server: a real WebSocket server on 127.0.0.1.

For tests and benchmarks, in process (``async with fake_realtime() as fake``) or
as a process (``python -m relay.testing.fake_realtime --port N``, which prints
its URL and serves until killed). It speaks either dialect, records everything
a peer sends, and enforces the rules of the real service that a relay could
break, answering each breach with the real ``error`` event (also kept in
``FakeConnection.errors``, so a test can assert there were none).

Phone calls that act (docs/contract.md §11): a response may call function tools
(:class:`ToolCall`, through :meth:`FakeConnection.respond` or a queued
:class:`ResponsePlan`), with its ``response.done`` before or only after the peer's
answers; every ``response.done`` carries ``response.usage`` (:data:`DEFAULT_USAGE`);
spoken responses carry their transcript, and the caller's turns are emitted on
demand (:meth:`FakeConnection.emit_caller_transcript`). The answers and typed
messages the peer creates are checked as the real service checks them and kept
(``answered``, ``function_outputs``, ``user_texts``, ``response_creates``).

Guarantees: every task it starts lives in the context manager's nursery and is
cancelled when the ``async with`` exits; every accepted socket is closed by
then. Audio is G.711 μ-law: 8 bytes per millisecond, unless a mode such as
:mod:`relay.testing.fake_voice` turns the knobs (``bytes_per_ms``, ``synthesize``).
"""

from __future__ import annotations

import argparse
import base64
import binascii
import itertools
import re
import socket
import struct
import urllib.parse
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from contextlib import asynccontextmanager, suppress
from dataclasses import dataclass, field
from functools import partial
from typing import Any, ClassVar, Literal

import orjson
import trio
import trio_websocket

from relay.sessions.dialect import Dialect, dialect_for

Event = dict[str, Any]
Hook = Callable[["FakeConnection"], Awaitable[None]]
EventHook = Callable[["FakeConnection", Event], Awaitable[None]]

BYTES_PER_MS = 8
PATH = "/v1/realtime"
CLOSE_TIMEOUT = 2.0
_ids = itertools.count(1)


def _new_id(prefix: str) -> str:
    return f"{prefix}_{next(_ids):08x}"


# Kernel TCP states (linux/tcp_states.h), as :meth:`FakeConnection.tcp_state` reports them.
TCP_ESTABLISHED = 1
TCP_CLOSE = 7  # the peer reset the connection (or it is fully closed)
TCP_CLOSE_WAIT = 8  # the peer sent FIN: an orderly close


class _Valve:
    """One direction of a connection's byte flow: open (the default) or shut."""

    def __init__(self) -> None:
        self._open = trio.Event()
        self._open.set()

    @property
    def is_open(self) -> bool:
        return self._open.is_set()

    def shut(self) -> None:
        if self._open.is_set():
            self._open = trio.Event()

    def open(self) -> None:
        self._open.set()

    async def wait_open(self) -> None:
        await self._open.wait()


class _FaultStream(trio.abc.Stream):
    """The accepted socket as the WebSocket layer sees it, with a valve on each
    direction, so a test can make the fake a peer that stops reading or writing
    at the TCP level (kernel buffers fill; pings go unanswered)."""

    def __init__(self, inner: trio.SocketStream) -> None:
        self.inner = inner
        self.reading = _Valve()
        self.writing = _Valve()

    async def send_all(self, data: bytes | bytearray | memoryview) -> None:
        await self.writing.wait_open()
        await self.inner.send_all(data)

    async def wait_send_all_might_not_block(self) -> None:
        await self.writing.wait_open()
        await self.inner.wait_send_all_might_not_block()

    async def receive_some(self, max_bytes: int | None = None) -> bytes | bytearray:
        await self.reading.wait_open()
        return await self.inner.receive_some(max_bytes)

    async def aclose(self) -> None:
        await self.inner.aclose()


def chunk_audio(seq: int, size: int) -> bytes:
    """Audio chunk number ``seq`` of a connection: its 4-byte big-endian sequence
    number, then filler, so a test can check order and byte identity."""
    head = (seq & 0xFFFFFFFF).to_bytes(4, "big")
    return (head + bytes([seq % 251]) * max(0, size - 4))[:size]


# What every ``response.done`` reports as ``response.usage`` unless a test says
# otherwise (``FakeRealtime.usage``, ``respond(usage=...)``): distinct numbers in
# each slot, so a relay that swaps input and output or text and audio is caught.
DEFAULT_USAGE: Mapping[str, int] = {
    "input_text": 11,
    "input_audio": 22,
    "input_cached": 5,
    "output_text": 3,
    "output_audio": 40,
}


def usage_object(
    *,
    input_text: int = 0,
    input_audio: int = 0,
    input_cached: int = 0,
    output_text: int = 0,
    output_audio: int = 0,
) -> Event:
    """A ``response.usage`` as the real service writes it (docs: totals plus details)."""
    inputs, outputs = input_text + input_audio, output_text + output_audio
    return {
        "total_tokens": inputs + outputs,
        "input_tokens": inputs,
        "output_tokens": outputs,
        "input_token_details": {
            "text_tokens": input_text,
            "audio_tokens": input_audio,
            "cached_tokens": input_cached,
            "cached_tokens_details": {"text_tokens": input_cached, "audio_tokens": 0},
        },
        "output_token_details": {"text_tokens": output_text, "audio_tokens": output_audio},
    }


@dataclass(frozen=True)
class ToolCall:
    """One function call the fake's model makes. ``arguments`` is sent as given
    when it is a string (so a test can send broken JSON or a JSON array), else
    as its JSON text. ``call_id`` defaults to a fresh ``call_…`` id."""

    name: str
    arguments: str | Mapping[str, Any] = "{}"
    call_id: str | None = None

    def arguments_text(self) -> str:
        if isinstance(self.arguments, str):
            return self.arguments
        return orjson.dumps(dict(self.arguments)).decode()


# When a response that calls tools sends its ``response.done``: at once after the
# calls ("before" the relay can have answered), or only once the relay has sent a
# ``function_call_output`` for every call of it ("after").
DoneWhen = Literal["before", "after"]
# Which events carry each call: both (as the real service sends), or only one of
# them, to show the relay answers from either.
CallEvents = Literal["both", "arguments_done", "item_done"]


@dataclass(frozen=True)
class ResponsePlan:
    """What the next ``response.create`` gets instead of a plain spoken answer
    (queue them in :attr:`FakeRealtime.plans`); the fields are :meth:`FakeConnection.respond`'s."""

    chunks: int | None = None
    text: str = "Hello."
    calls: tuple[ToolCall, ...] = ()
    done: DoneWhen = "before"
    call_events: CallEvents = "both"
    usage: Mapping[str, int] | None = None


@dataclass
class _Response:
    response_id: str
    item_id: str
    stop: trio.Event = field(default_factory=trio.Event)
    calls: tuple[ToolCall, ...] = ()
    call_ids: tuple[str, ...] = ()
    done: DoneWhen = "before"
    call_events: CallEvents = "both"
    usage: Mapping[str, int] | None = None
    done_sent: trio.Event = field(default_factory=trio.Event)


class FakeConnection:
    """One handshake the fake received, and (if accepted) its whole conversation."""

    def __init__(
        self,
        fake: FakeRealtime,
        stream: trio.SocketStream,
        request: Any,
        faults: _FaultStream | None = None,
    ) -> None:
        self.fake = fake
        self.dialect = fake.dialect
        self.path: str = request.path
        self.query = dict(urllib.parse.parse_qsl(urllib.parse.urlsplit(self.path).query))
        self.headers = [(k.decode("latin-1"), v.decode("latin-1")) for k, v in request.headers]
        self.accepted = False
        self.refused_status: int | None = None
        self.received: list[str | bytes] = []  # every message, in order, as received
        self.events: list[Event] = []  # the JSON objects among them (not in echo mode)
        self.sent: list[Event] = []  # every event the fake sent (not echoes)
        self.errors: list[Event] = []  # the "error" object of every error event sent
        self.input_audio = bytearray()  # decoded audio of every valid append, concatenated
        self.item_audio: dict[str, int] = {}  # assistant item id -> audio bytes sent
        self.truncations: list[tuple[str, int]] = []  # accepted (item_id, audio_end_ms)
        self.responses: list[_Response] = []  # every response started, in order
        self.tool_calls: dict[str, str] = {}  # call_id -> tool name, of every call made
        self.answered: dict[str, list[str]] = {}  # call_id -> each output the peer sent for it
        self.close_code: int | None = None  # of a close the peer started; None: no frame
        self.close_reason: str | None = None
        self.server_close: tuple[int, str] | None = None  # a close the fake started
        self.closed = trio.Event()
        self.session = _initial_session(self.dialect, self.query.get("model", "gpt-realtime"))
        self._stream = stream
        self._faults = faults if faults is not None else _FaultStream(stream)
        self._ws: trio_websocket.WebSocketConnection | None = None
        self._nursery: trio.Nursery | None = None
        self._active: _Response | None = None
        self._truncated_ms: dict[str, int] = {}
        self._seq = 0
        self._aborted = False
        self._last_tcp_state: int | None = None
        self._close_done = trio.Event()
        self._activity = trio.Event()

    def header(self, name: str) -> str | None:
        """The first handshake header called ``name`` (any case), else None."""
        return next((v for k, v in self.headers if k.lower() == name.lower()), None)

    @property
    def responding(self) -> bool:
        """Is a response in progress (its ``response.done`` not yet sent)?"""
        return self._active is not None

    def events_of(self, event_type: str) -> list[Event]:
        """Every client event of ``event_type`` received so far, in order."""
        return [e for e in self.events if e.get("type") == event_type]

    @property
    def response_creates(self) -> list[Event]:
        return self.events_of("response.create")

    @property
    def function_outputs(self) -> list[Event]:
        """The ``item`` of every ``function_call_output`` the peer created, in order."""
        items = (e.get("item") for e in self.events_of("conversation.item.create"))
        return [i for i in items if isinstance(i, dict) and i.get("type") == "function_call_output"]

    def output_for(self, call_id: str) -> Any:
        """The parsed ``output`` of the one answer to ``call_id``; AssertionError
        unless exactly one arrived."""
        outputs = self.answered.get(call_id, [])
        assert len(outputs) == 1, f"{len(outputs)} outputs for {call_id}"
        return orjson.loads(outputs[0])

    @property
    def user_texts(self) -> list[str]:
        """The ``input_text`` of every user ``message`` the peer created, in order."""
        texts: list[str] = []
        for e in self.events_of("conversation.item.create"):
            item = e.get("item") or {}
            content = item.get("content") if item.get("role") == "user" else None
            if item.get("type") == "message" and isinstance(content, list):
                texts += [c["text"] for c in content if isinstance(c, dict)
                          and isinstance(c.get("text"), str)]  # fmt: skip
        return texts

    def usage_sent(self) -> dict[str, int]:
        """The usage of every ``response.done`` sent, summed: ``input_tokens``,
        ``output_tokens``, ``input_audio_tokens``, ``output_audio_tokens`` and the
        text counts (the ``call.ended`` event's fields, plus text)."""
        total = dict.fromkeys(("input_tokens", "output_tokens", "input_audio_tokens",
                               "output_audio_tokens", "input_text_tokens",
                               "output_text_tokens"), 0)  # fmt: skip
        for e in self.sent:
            usage = e.get("response", {}).get("usage") if e["type"] == "response.done" else None
            if usage is None:
                continue
            total["input_tokens"] += usage["input_tokens"]
            total["output_tokens"] += usage["output_tokens"]
            for side in ("input", "output"):
                details = usage[f"{side}_token_details"]
                total[f"{side}_audio_tokens"] += details["audio_tokens"]
                total[f"{side}_text_tokens"] += details["text_tokens"]
        return total

    async def wait_response_done(self, index: int = -1) -> None:
        """Wait until response number ``index`` (default: the latest) sent its ``response.done``."""
        await self.responses[index].done_sent.wait()

    async def emit_caller_transcript(self, text: str, item_id: str | None = None) -> str:
        """The caller's turn as the input transcription reports it (the same in
        both dialects); returns the item id."""
        item_id = item_id or _new_id("item")
        await self._emit("conversation.item.input_audio_transcription.delta", item_id=item_id,
                         content_index=0, delta=text)  # fmt: skip
        await self._emit("conversation.item.input_audio_transcription.completed",
                         item_id=item_id, content_index=0, transcript=text)  # fmt: skip
        return item_id

    def item_ms(self, item_id: str) -> int:
        """Milliseconds of audio the fake has sent for ``item_id``."""
        return self.item_audio.get(item_id, 0) // self.fake.bytes_per_ms

    async def wait_for(self, event_type: str, count: int = 1) -> Event:
        """Wait until ``count`` client events of ``event_type`` arrived; return the last."""
        while True:
            found = [e for e in self.events if e.get("type") == event_type]
            if len(found) >= count:
                return found[count - 1]
            await self._activity.wait()

    async def send_event(self, event: Event) -> None:
        """Send one server event (an ``event_id`` is added if missing)."""
        event = {"event_id": _new_id("event"), **event}
        self.sent.append(event)
        await self.send_raw(orjson.dumps(event).decode())

    async def _emit(self, event_type: str, **fields: Any) -> None:
        await self.send_event({"type": event_type, **fields})

    async def send_raw(self, message: str | bytes) -> None:
        """Send a message exactly as given."""
        assert self._ws is not None, "the handshake was not accepted"
        await self._ws.send_message(message)

    async def close(self, code: int = 1000, reason: str = "") -> None:
        """Start a close handshake; returns once the peer answered (or after a while)."""
        if self.server_close is None:
            self.server_close = (code, reason)
        try:
            assert self._ws is not None, "the handshake was not accepted"
            with trio.move_on_after(CLOSE_TIMEOUT):
                await self._ws.aclose(code, reason)
        finally:
            self._close_done.set()

    def abort(self, *, reset: bool = False) -> None:
        """Drop the TCP connection with no close frame: an orderly TCP close (FIN),
        or with ``reset`` a TCP reset (RST, ``SO_LINGER`` 0), as a crashed host or
        a middlebox does."""
        self._aborted = True
        self.tcp_state()  # what the peer had done by then, kept for later reads
        if reset:
            self._stream.socket.setsockopt(
                socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0)
            )
        self._stream.socket.close()

    def stop_reading(self) -> None:
        """Take no more bytes from the socket: what the peer sends piles up in the
        kernel buffers, then in the peer; its pings and close frames go unseen."""
        self._faults.reading.shut()

    def stop_writing(self) -> None:
        """Send nothing more, not even a pong: the reader stalls on its first pong,
        so from then on the fake is silent and, once its buffer fills, deaf."""
        self._faults.writing.shut()

    def resume(self) -> None:
        """Undo :meth:`stop_reading` and :meth:`stop_writing`."""
        self._faults.reading.open()
        self._faults.writing.open()

    def tcp_state(self) -> int | None:
        """The kernel's state of this TCP connection, read without touching the
        data: ``TCP_ESTABLISHED``, ``TCP_CLOSE`` once the peer reset it,
        ``TCP_CLOSE_WAIT`` once the peer closed it in order. After the fake
        closed its socket: the state just before that (None if unknown)."""
        sock = self._stream.socket
        if sock.fileno() < 0:
            return self._last_tcp_state
        info = sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, 8)
        self._last_tcp_state = info[0]
        return info[0]

    async def emit_speech_started(
        self, audio_start_ms: int, item_id: str | None = None, *, interrupt: bool = True
    ) -> str:
        """The caller started speaking; like server VAD, this also cancels the
        response in progress unless ``interrupt`` is false. Returns the item id."""
        item_id = item_id or _new_id("item")
        started = self.dialect.speech_started
        await self._emit(started, audio_start_ms=audio_start_ms, item_id=item_id)
        if interrupt and self._active is not None:
            self._active.stop.set()
        return item_id

    def respond(
        self,
        *,
        chunks: int | None = None,
        chunk_bytes: int | None = None,
        chunk_interval: float | None = None,
        text: str = "Hello.",
        calls: tuple[ToolCall, ...] | list[ToolCall] = (),
        done: DoneWhen = "before",
        call_events: CallEvents = "both",
        usage: Mapping[str, int] | None = None,
    ) -> str:
        """Start a response now (as ``response.create`` would); returns the item id
        of its spoken part (with no audio, of its first call).

        ``chunk_bytes`` and ``chunk_interval`` override the fake's knobs for this
        response only; ``text`` is its transcript. With ``calls``, the model then
        calls those function tools (after ``chunks`` audio deltas; ``chunks=0``:
        no spoken part at all), and sends ``response.done`` as ``done`` says.
        ``usage`` (keys of :data:`DEFAULT_USAGE`) overrides the fake's for this
        response's ``response.done``. Raises ``RuntimeError`` if one is already in progress."""
        if self._active is not None:
            raise RuntimeError("a response is already in progress")
        assert self._nursery is not None, "the handshake was not accepted"
        n = self.fake.response_chunks if chunks is None else chunks
        call_ids = tuple(c.call_id or _new_id("call") for c in calls)
        resp = _Response(_new_id("resp"), _new_id("item"), calls=tuple(calls), call_ids=call_ids,
                         done=done, call_events=call_events, usage=usage)  # fmt: skip
        self._active = resp
        self.responses.append(resp)
        self.tool_calls.update(zip(call_ids, (c.name for c in calls), strict=True))
        if n > 0 or not calls:
            self.item_audio[resp.item_id] = 0
        self._nursery.start_soon(self._speak, resp, n, chunk_bytes, chunk_interval, text)
        return resp.item_id

    def plan(self, plan: ResponsePlan) -> str:
        """:meth:`respond` with a :class:`ResponsePlan`'s fields."""
        return self.respond(chunks=plan.chunks, text=plan.text, calls=plan.calls, done=plan.done,
                            call_events=plan.call_events, usage=plan.usage)  # fmt: skip

    async def _speak(
        self,
        resp: _Response,
        chunks: int,
        chunk_bytes: int | None = None,
        chunk_interval: float | None = None,
        text: str = "Hello.",
    ) -> None:
        d, fake = self.dialect, self.fake
        ids = dict(response_id=resp.response_id, item_id=resp.item_id,
                   output_index=0, content_index=0)  # fmt: skip
        item = dict(id=resp.item_id, object="realtime.item", type="message", role="assistant",
                    status="in_progress", content=[])  # fmt: skip
        spoken = chunks > 0 or not resp.calls
        output: list[Event] = []
        status = "cancelled"
        try:
            await self._emit("response.created", response=_response(resp, "in_progress", []))
            if spoken:
                output.append({"id": resp.item_id, "type": "message", "role": "assistant"})
                await self._emit("response.output_item.added", response_id=resp.response_id,
                                 output_index=0, item=item)  # fmt: skip
            for index in range(chunks):
                if resp.stop.is_set():
                    break
                size = fake.chunk_bytes if chunk_bytes is None else chunk_bytes
                if fake.synthesize is None:
                    audio = chunk_audio(self._seq, size)
                else:
                    audio = fake.synthesize(index, size)
                self._seq += 1
                # Counted before sending: the peer can never have seen more than this.
                self.item_audio[resp.item_id] += len(audio)
                await self._emit(d.audio_delta, **ids, delta=base64.b64encode(audio).decode())
                # Wait on the stop event rather than cancel a send: a cancelled send
                # could leave half a frame on the wire.
                interval = fake.chunk_interval if chunk_interval is None else chunk_interval
                with trio.move_on_after(interval):
                    await resp.stop.wait()
            if spoken and not resp.stop.is_set():
                await self._emit(d.transcript_delta, **ids, delta=text)
                await self._emit(d.audio_done, **ids)
                await self._emit(d.transcript_done, **ids, transcript=text)
            if not resp.stop.is_set():
                for n, (call, call_id) in enumerate(zip(resp.calls, resp.call_ids, strict=True)):
                    output.append(await self._call_tool(resp, call, call_id, len(output), n == 0))
                if resp.calls and resp.done == "after":
                    await self._wait_answered(resp.call_ids)
                status = "completed"
            self._active = None
            await self._emit(d.response_done, response=_response(resp, status, output,
                                                                 self._usage(resp)))  # fmt: skip
            resp.done_sent.set()
        except trio_websocket.ConnectionClosed:
            pass  # the receive loop sees the close and ends the connection
        finally:
            if self._active is resp:
                self._active = None

    async def _call_tool(
        self, resp: _Response, call: ToolCall, call_id: str, index: int, first: bool
    ) -> Event:
        """Emit one function call as the real service does; returns its finished item."""
        # With no spoken part, the first call's item takes the response's item id.
        item_id = resp.item_id if first and resp.item_id not in self.item_audio else _new_id("item")
        arguments = call.arguments_text()
        item = dict(id=item_id, object="realtime.item", type="function_call", status="in_progress",
                    name=call.name, call_id=call_id, arguments="")  # fmt: skip
        where = dict(response_id=resp.response_id, output_index=index)
        await self._emit("response.output_item.added", **where, item=item)
        await self._emit("response.function_call_arguments.delta", **where, item_id=item_id,
                         call_id=call_id, delta=arguments)  # fmt: skip
        if resp.call_events in ("both", "arguments_done"):
            await self._emit("response.function_call_arguments.done", **where, item_id=item_id,
                             call_id=call_id, name=call.name, arguments=arguments)  # fmt: skip
        finished = {**item, "status": "completed", "arguments": arguments}
        if resp.call_events in ("both", "item_done"):
            await self._emit("response.output_item.done", **where, item=finished)
        return finished

    async def _wait_answered(self, call_ids: tuple[str, ...]) -> None:
        while not all(call_id in self.answered for call_id in call_ids):
            await self._activity.wait()

    def _usage(self, resp: _Response) -> Event | None:
        counts = resp.usage if resp.usage is not None else self.fake.usage
        return None if counts is None else usage_object(**counts)

    async def _error(
        self, code: str, message: str, *, param: str | None = None, cause: Event | None = None
    ) -> None:
        error = dict(type="invalid_request_error", code=code, message=message, param=param,
                     event_id=(cause or {}).get("event_id"))  # fmt: skip
        self.errors.append(error)
        await self._emit("error", error=error)

    async def _receive_loop(self) -> None:
        assert self._ws is not None
        while True:
            try:
                message = await self._ws.get_message()
            except trio_websocket.ConnectionClosed as exc:
                self._note_close(exc.reason)
                return
            if self.fake.record:
                self.received.append(message)
            try:
                if self.fake.echo:
                    await self._ws.send_message(message)
                else:
                    await self._handle(message)
            except trio_websocket.ConnectionClosed:
                pass  # the next get_message reports how it closed
            self._activity.set()
            self._activity = trio.Event()

    def _note_close(self, reason: trio_websocket.CloseReason | None) -> None:
        # 1006 is trio-websocket's word for "no close frame": record that as None.
        if self.server_close or self._aborted or reason is None or reason.code == 1006:
            return
        self.close_code, self.close_reason = reason.code, reason.reason or ""

    async def _handle(self, message: str | bytes) -> None:
        if isinstance(message, bytes):
            await self._error("invalid_value", "Binary messages are not supported.")
            return
        try:
            event = orjson.loads(message)
        except orjson.JSONDecodeError:
            await self._error("invalid_json", "The server could not parse the event as JSON.")
            return
        if not isinstance(event, dict) or not isinstance(event.get("type"), str):
            await self._error("invalid_value", "Expected an object with a 'type'.", param="type")
            return
        if self.fake.record:
            self.events.append(event)
        handler = self._handlers.get(event["type"])
        if handler is None:
            message = f"Unknown event type: '{event['type']}'."
            await self._error("unknown_event", message, param="type", cause=event)
        else:
            await handler(self, event)
            if self.fake.on_event is not None:
                await self.fake.on_event(self, event)

    async def _on_session_update(self, event: Event) -> None:
        session = event.get("session")
        if not isinstance(session, dict):
            await self._error("invalid_type", "Expected an object.", param="session", cause=event)
            return
        if not self.dialect.beta_header and session.keys() & _BETA_ONLY_KEYS:
            # What OpenAI does since the beta shut down: no error event, a close.
            await self.close(4000, "beta_api_shape_disabled")
            return
        problem = _session_problem(self.dialect, session)
        if problem is not None:
            await self._error(problem[0], problem[2], param=problem[1], cause=event)
            return
        voice = _voice(session)
        if voice is not None and any(self.item_audio.values()) and voice != _voice(self.session):
            message = "Cannot update a conversation's voice if assistant audio is present."
            await self._error("cannot_update_voice", message, param="session.voice", cause=event)
            return
        _merge(self.session, session)
        await self._emit("session.updated", session=self.session)

    async def _on_append(self, event: Event) -> None:
        audio = event.get("audio")
        try:
            if not isinstance(audio, str):
                raise ValueError
            decoded = base64.b64decode(audio, validate=True)
            if self.fake.record:
                self.input_audio += decoded
        except (ValueError, binascii.Error):
            message = "Invalid 'audio'. Expected base64-encoded audio bytes."
            await self._error("invalid_value", message, param="audio", cause=event)

    async def _on_response_create(self, event: Event) -> None:
        if self._active is not None:
            message = (f"Conversation already has an active response in progress: "
                       f"{self._active.response_id}. Wait until the response is finished "
                       "before creating a new one.")  # fmt: skip
            await self._error("conversation_already_has_active_response", message, cause=event)
        elif self.fake.plans:
            self.plan(self.fake.plans.pop(0))
        elif self.fake.auto_respond:
            self.respond()

    async def _on_response_cancel(self, event: Event) -> None:
        if self._active is None:
            message = "Cancellation failed: no active response found."
            await self._error("response_cancel_not_active", message, cause=event)
        else:
            self._active.stop.set()

    async def _on_truncate(self, event: Event) -> None:
        item_id, end_ms = event.get("item_id"), event.get("audio_end_ms")
        problem = truncate_problem(
            event, self.item_audio, self._truncated_ms, self.fake.bytes_per_ms
        )
        if problem is not None:
            await self._error("invalid_value", problem[1], param=problem[0], cause=event)
            return
        assert isinstance(item_id, str) and isinstance(end_ms, int)
        self._truncated_ms[item_id] = end_ms
        self.truncations.append((item_id, end_ms))
        await self._emit("conversation.item.truncated", item_id=item_id, content_index=0,
                         audio_end_ms=end_ms)  # fmt: skip

    async def _on_item_create(self, event: Event) -> None:
        problem = _item_problem(event.get("item"), self.tool_calls)
        if problem is not None:
            await self._error("invalid_value", problem[1], param=problem[0], cause=event)
            return
        item = {"id": _new_id("item"), **event["item"]}
        if item["type"] == "function_call_output":
            self.answered.setdefault(item["call_id"], []).append(item["output"])
        added = (
            "conversation.item.created" if self.dialect.beta_header else "conversation.item.added"
        )
        await self._emit(added, previous_item_id=None, item=item)

    async def _on_commit(self, event: Event) -> None:
        await self._emit("input_audio_buffer.committed", item_id=_new_id("item"))

    async def _on_clear(self, event: Event) -> None:
        await self._emit("input_audio_buffer.cleared")

    async def _ignore(self, event: Event) -> None:
        pass

    _handlers: ClassVar[dict[str, Callable[[FakeConnection, Event], Awaitable[None]]]] = {
        "session.update": _on_session_update,
        "input_audio_buffer.append": _on_append,
        "input_audio_buffer.commit": _on_commit,
        "input_audio_buffer.clear": _on_clear,
        "response.create": _on_response_create,
        "response.cancel": _on_response_cancel,
        "conversation.item.truncate": _on_truncate,
        "conversation.item.create": _on_item_create,
        "conversation.item.retrieve": _ignore,
        "conversation.item.delete": _ignore,
    }


class FakeRealtime:
    """The server, its recorded connections, and the knobs a test may turn at any time."""

    def __init__(self, dialect: Dialect, *, expected_key: str | None = None) -> None:
        self.dialect = dialect
        self.expected_key = expected_key  # None: any Authorization is accepted
        self.port = 0
        self.connections: list[FakeConnection] = []
        self.refuse_status: int | None = None  # refuse every handshake with this status
        self.accept_delay = 0.0  # stall this long before answering a handshake
        self.on_connect: Hook | None = None  # runs beside the receive loop of each connection
        self.response_chunks = 5
        self.chunk_bytes = 160  # 20 ms of μ-law
        self.chunk_interval = 0.02  # seconds between audio deltas; 0: as fast as possible
        self.auto_respond = True  # answer response.create with a spoken response
        # What the next response.create gets, first to last, before auto_respond's
        # plain answer; shared by all connections.
        self.plans: list[ResponsePlan] = []
        # Counts (keys of DEFAULT_USAGE) of every response.done's usage; None: none.
        self.usage: Mapping[str, int] | None = dict(DEFAULT_USAGE)
        self.echo = False  # send back every message unchanged; no protocol, no session.created
        # Audio modes (relay.testing.fake_voice): the unit of assistant audio, what
        # delta number ``index`` of a response holds, and a hook that sees every
        # valid client event after the fake handled it.
        self.bytes_per_ms = BYTES_PER_MS
        self.synthesize: Callable[[int, int], bytes] | None = None  # None: chunk_audio
        self.on_event: EventHook | None = None
        # False: keep no copy of what peers send (received, events, input_audio),
        # so a long-running fake (``relay demo``) does not grow with every append.
        self.record = True
        self.message_queue_size = 100_000
        self.max_message_size = 64 * 1024 * 1024
        self._activity = trio.Event()

    @property
    def url(self) -> str:
        return f"ws://127.0.0.1:{self.port}{PATH}"

    async def wait_connection(self, index: int = 0) -> FakeConnection:
        """Wait until handshake number ``index`` (from 0) has arrived."""
        while len(self.connections) <= index:
            await self._activity.wait()
        return self.connections[index]

    async def _handle_stream(self, stream: trio.SocketStream) -> None:
        conn: FakeConnection | None = None
        try:
            async with trio.open_nursery() as nursery:  # holds the connection's reader task
                request = None
                faults = _FaultStream(stream)
                with trio.move_on_after(10):  # a peer that never sends a request
                    request = await trio_websocket.wrap_server_stream(
                        nursery, faults, self.message_queue_size, self.max_message_size
                    )
                if request is not None:
                    conn = FakeConnection(self, stream, request, faults)
                    self.connections.append(conn)
                    self._activity.set()
                    self._activity = trio.Event()
                    await self._serve(conn, request)
                nursery.cancel_scope.cancel()
        finally:
            if conn is not None:
                conn.tcp_state()  # how the peer left, kept for reads after the close
            try:
                await trio.aclose_forcefully(stream)
            finally:  # closing checkpoints, and a cancelled checkpoint raises
                if conn is not None:
                    conn.closed.set()

    async def _serve(self, conn: FakeConnection, request: Any) -> None:
        try:
            await trio.sleep(self.accept_delay)
            status = self._refusal(conn)
            if status is not None:
                conn.refused_status = status
                body = orjson.dumps({"error": {"message": f"refused with {status} by the fake"}})
                headers = [(b"Content-Type", b"application/json")]
                await request.reject(status, extra_headers=headers, body=body)
                return
            conn._ws = await request.accept()
            conn.accepted = True
            async with trio.open_nursery() as nursery:
                conn._nursery = nursery
                if not self.echo:
                    await conn._emit("session.created", session=conn.session)
                if self.on_connect is not None:
                    nursery.start_soon(_run_hook, self.on_connect, conn)
                await conn._receive_loop()
                if conn.server_close is not None:
                    with trio.move_on_after(CLOSE_TIMEOUT):
                        await conn._close_done.wait()
                nursery.cancel_scope.cancel()
        except (
            trio_websocket.ConnectionClosed,
            trio.BrokenResourceError,
            trio.ClosedResourceError,
        ):
            pass  # the peer left mid-handshake or mid-send; nothing left to record

    def _refusal(self, conn: FakeConnection) -> int | None:
        if self.refuse_status is not None:
            return self.refuse_status
        if urllib.parse.urlsplit(conn.path).path != PATH:
            return 404
        key = self.expected_key
        if key is not None and conn.header("Authorization") != f"Bearer {key}":
            return 401
        return None


async def _run_hook(hook: Hook, conn: FakeConnection) -> None:
    # The peer going away while the test's script talks to it is not the script's fault.
    with suppress(trio_websocket.ConnectionClosed):
        await hook(conn)


def _initial_session(d: Dialect, model: str) -> Event:
    vad = dict(type="server_vad", threshold=0.5, prefix_padding_ms=300, silence_duration_ms=200)
    common = dict(id=_new_id("sess"), object="realtime.session", model=model, instructions="")
    if d.beta_header:
        return {**common, "modalities": ["text", "audio"], "voice": "alloy", "turn_detection": vad,
                "input_audio_format": "pcm16", "output_audio_format": "pcm16"}  # fmt: skip
    pcm = {"type": "audio/pcm", "rate": 24000}
    audio = {"input": {"format": pcm, "turn_detection": vad},
             "output": {"format": pcm, "voice": "alloy"}}  # fmt: skip
    return {"type": "realtime", **common, "output_modalities": ["audio"], "audio": audio}


# What each dialect's session.update accepts (openai.types.realtime / .beta.realtime).
_COMMON_KEYS = {"model", "instructions", "tools", "tool_choice", "tracing"}
_GA_KEYS = frozenset({*_COMMON_KEYS, "type", "output_modalities", "audio", "max_output_tokens",
                      "truncation", "prompt", "include"})  # fmt: skip
_BETA_KEYS = frozenset({*_COMMON_KEYS, "modalities", "voice", "input_audio_format",
                        "output_audio_format", "input_audio_transcription", "turn_detection",
                        "input_audio_noise_reduction", "temperature", "speed",
                        "max_response_output_tokens"})  # fmt: skip
_BETA_ONLY_KEYS = _BETA_KEYS - _GA_KEYS
_GA_AUDIO_KEYS = {
    "input": {"format", "turn_detection", "transcription", "noise_reduction"},
    "output": {"format", "voice", "speed"},
}
_GA_FORMATS = {"audio/pcm", "audio/pcmu", "audio/pcma"}
_BETA_FORMATS = {"pcm16", "g711_ulaw", "g711_alaw"}
_VADS = {"server_vad", "semantic_vad"}
VOICES = frozenset({"alloy", "ash", "ballad", "coral", "echo", "sage", "shimmer", "verse",
                    "marin", "cedar"})  # fmt: skip


def truncate_problem(
    event: Event,
    item_bytes: Mapping[str, int],
    truncated_ms: Mapping[str, int],
    bytes_per_ms: int = BYTES_PER_MS,
) -> tuple[str, str] | None:
    """What the real service refuses in a ``conversation.item.truncate``, as
    ``(param, message)`` in its words; None if valid. ``item_bytes``: audio sent
    per item (``bytes_per_ms`` to the millisecond: 8 for μ-law, 48 for 24 kHz
    PCM16); ``truncated_ms``: where earlier truncates cut (a truncated item
    keeps only the audio before the cut)."""
    item_id, end_ms = event.get("item_id"), event.get("audio_end_ms")
    if not isinstance(item_id, str) or item_id not in item_bytes:
        return "item_id", "Only model output audio messages can be truncated"
    if event.get("content_index") != 0:
        return "content_index", "Invalid 'content_index'."
    if not isinstance(end_ms, int) or isinstance(end_ms, bool) or end_ms < 0:
        return "audio_end_ms", "Invalid 'audio_end_ms'."
    have = min(item_bytes[item_id] // bytes_per_ms, truncated_ms.get(item_id, end_ms))
    if end_ms > have:
        return "audio_end_ms", f"Audio content of {have} ms is already shorter than {end_ms} ms"
    return None


def _session_problem(d: Dialect, s: Event) -> tuple[str, str, str] | None:
    """(code, param, message) of the first thing in ``s`` the real service refuses."""
    for key in s:
        if key not in (_BETA_KEYS if d.beta_header else _GA_KEYS):
            return "unknown_parameter", f"session.{key}", f"Unknown parameter: 'session.{key}'."
    if d.beta_header:
        if sorted(s.get("modalities", ["text"])) not in (["text"], ["audio", "text"]):
            return _invalid("session.modalities")
        for key in ("input_audio_format", "output_audio_format"):
            if key in s and s[key] not in _BETA_FORMATS:
                return _invalid(f"session.{key}")
        vad = s.get("turn_detection")
    else:
        if s.get("type") != "realtime":
            return "missing_required_parameter", "session.type", "Missing 'session.type'."
        if s.get("output_modalities", ["audio"]) not in (["audio"], ["text"]):
            return _invalid("session.output_modalities")
        audio = s.get("audio", {})
        if not isinstance(audio, dict):
            return _invalid("session.audio")
        for side, part in audio.items():
            if side not in _GA_AUDIO_KEYS or not isinstance(part, dict):
                return "unknown_parameter", f"session.audio.{side}", "Unknown parameter."
            if unknown := part.keys() - _GA_AUDIO_KEYS[side]:
                param = f"session.audio.{side}.{min(unknown)}"
                return "unknown_parameter", param, f"Unknown parameter: '{param}'."
            fmt = part.get("format")
            fmt = fmt.get("type") if isinstance(fmt, dict) else fmt
            if fmt is not None and fmt not in _GA_FORMATS:
                return _invalid(f"session.audio.{side}.format.type")
        vad = audio.get("input", {}).get("turn_detection")
    if vad is not None and (not isinstance(vad, dict) or vad.get("type") not in _VADS):
        return _invalid("session.turn_detection")
    if d.beta_header:
        where, transcription = (
            "session.input_audio_transcription",
            s.get("input_audio_transcription"),
        )
    else:
        audio_in = s.get("audio", {}).get("input", {})
        where, transcription = "session.audio.input.transcription", audio_in.get("transcription")
    if transcription is not None and (problem := _transcription_problem(where, transcription)):
        return problem
    if (problem := _tools_problem(s)) is not None:
        return problem
    voice = _voice(s)
    if voice is not None and voice not in VOICES:
        return _invalid("session.voice")
    return None


# Content part types (and the field holding their data) each role may send.
_PARTS: dict[str, dict[str, str]] = {
    "user": {"input_text": "text", "input_audio": "audio", "input_image": "image_url"},
    "system": {"input_text": "text"},
    "assistant": {
        "output_text": "text",
        "text": "text",
        "output_audio": "transcript",
        "audio": "transcript",
    },
}


def _item_problem(item: Any, calls: Mapping[str, str]) -> tuple[str, str] | None:
    """(param, message) of what the real service refuses in a created item: a
    tool's answer for a call it never made, a message with parts its role
    cannot hold. Other item types pass unchecked."""
    if not isinstance(item, dict):
        return "item", "Expected an object."
    kind = item.get("type")
    if kind == "function_call_output":
        call_id, output = item.get("call_id"), item.get("output")
        if not isinstance(call_id, str) or call_id not in calls:
            return "item.call_id", f"No function call found with call_id {call_id!r}."
        if not isinstance(output, str):
            return "item.output", "Invalid type for 'item.output': expected a string."
    elif kind == "message":
        parts, content = _PARTS.get(str(item.get("role"))), item.get("content")
        if parts is None:
            return "item.role", "Invalid value for 'item.role'."
        if not isinstance(content, list) or not content:
            return "item.content", "Invalid 'item.content': expected a non-empty array."
        for n, part in enumerate(content):
            key = parts.get(str(part.get("type"))) if isinstance(part, dict) else None
            if key is None or not isinstance(part.get(key), str):
                return f"item.content[{n}]", f"Invalid content part for role {item['role']!r}."
    elif not isinstance(kind, str):
        return "item.type", "Missing required parameter: 'item.type'."
    return None


_TOOL_NAME = re.compile(r"\A[a-zA-Z0-9_-]{1,64}\Z")
_FUNCTION_KEYS = frozenset({"type", "name", "description", "parameters"})
_TRANSCRIPTION_KEYS = frozenset({"model", "language", "prompt"})


def _transcription_problem(where: str, value: Any) -> tuple[str, str, str] | None:
    if not isinstance(value, dict):
        return _invalid(where)
    if unknown := value.keys() - _TRANSCRIPTION_KEYS:
        param = f"{where}.{min(unknown)}"
        return "unknown_parameter", param, f"Unknown parameter: '{param}'."
    if not isinstance(value.get("model"), str):
        return _invalid(f"{where}.model")
    return None


def _tools_problem(s: Event) -> tuple[str, str, str] | None:
    """Function tools and tool_choice, as both dialects take them."""
    tools = s.get("tools", [])
    if not isinstance(tools, list):
        return _invalid("session.tools")
    for n, tool in enumerate(tools):
        where = f"session.tools[{n}]"
        if not isinstance(tool, dict) or tool.get("type") != "function":
            return _invalid(f"{where}.type")
        if unknown := tool.keys() - _FUNCTION_KEYS:
            param = f"{where}.{min(unknown)}"
            return "unknown_parameter", param, f"Unknown parameter: '{param}'."
        if not isinstance(tool.get("name"), str) or not _TOOL_NAME.match(tool["name"]):
            return _invalid(f"{where}.name")
        if not isinstance(tool.get("description", ""), str):
            return _invalid(f"{where}.description")
        if not isinstance(tool.get("parameters", {}), dict):
            return _invalid(f"{where}.parameters")
    names = [t["name"] for t in tools]
    if len(set(names)) != len(names):
        return "invalid_value", "session.tools", "Tool names must be unique."
    choice = s.get("tool_choice", "auto")
    if choice not in ("auto", "none", "required") and not (
        isinstance(choice, dict)
        and choice.get("type") == "function"
        and choice.get("name") in names
    ):
        return _invalid("session.tool_choice")
    return None


def _invalid(param: str) -> tuple[str, str, str]:
    return "invalid_value", param, f"Invalid value for '{param}'."


def _voice(session: Event) -> Any:
    audio = session.get("audio")
    output = audio.get("output") if isinstance(audio, dict) else None
    return session.get("voice", output.get("voice") if isinstance(output, dict) else None)


def _merge(into: Event, update: Event) -> None:
    for key, value in update.items():
        if isinstance(value, dict) and isinstance(into.get(key), dict):
            _merge(into[key], value)
        else:
            into[key] = value


def _response(
    resp: _Response, status: str, output: list[Event], usage: Event | None = None
) -> Event:
    body: Event = dict(id=resp.response_id, object="realtime.response", status=status,
                       output=output)  # fmt: skip
    if usage is not None:
        body["usage"] = usage
    return body


@asynccontextmanager
async def fake_realtime(
    dialect: str = "ga", *, expected_key: str | None = None, port: int = 0, echo: bool = False
) -> AsyncIterator[FakeRealtime]:
    """Serve a :class:`FakeRealtime` on 127.0.0.1 (``port`` 0: any free port).

    Every connection, task and socket of the fake ends when the block exits."""
    fake = FakeRealtime(dialect_for(dialect), expected_key=expected_key)
    fake.echo = echo
    async with trio.open_nursery() as nursery:
        serve = partial(trio.serve_tcp, fake._handle_stream, port, host="127.0.0.1",
                        handler_nursery=nursery)  # fmt: skip
        listeners: list[trio.SocketListener] = await nursery.start(serve)
        fake.port = listeners[0].socket.getsockname()[1]
        try:
            yield fake
        finally:
            nursery.cancel_scope.cancel()


async def _serve_forever(args: argparse.Namespace) -> None:
    key, port = args.expected_key, args.port
    async with fake_realtime(args.dialect, expected_key=key, port=port, echo=args.echo) as fake:
        fake.response_chunks = args.chunks
        fake.chunk_bytes = args.chunk_bytes
        fake.chunk_interval = args.chunk_interval
        print(fake.url, flush=True)
        await trio.sleep_forever()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Fake OpenAI Realtime server on 127.0.0.1.")
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--dialect", choices=("ga", "beta"), default="ga")
    parser.add_argument("--expected-key", default=None)
    parser.add_argument("--echo", action="store_true")
    parser.add_argument("--chunks", type=int, default=5)
    parser.add_argument("--chunk-bytes", type=int, default=160)
    parser.add_argument("--chunk-interval", type=float, default=0.02)
    with suppress(KeyboardInterrupt):  # Ctrl-C is how an interactive user stops it
        trio.run(_serve_forever, parser.parse_args(argv))


if __name__ == "__main__":
    main()
