"""A simulated Twilio Media Streams client: a phone call as the relay sees it.

It opens a real WebSocket to the relay and behaves as Twilio documents: a signed
handshake with Twilio's User-Agent and no Origin; ``connected``, ``start``,
``media`` (160-byte μ-law frames every 20 ms), ``dtmf`` and ``stop`` in Twilio's
shapes; and real-time playback of the relay's audio, echoing each ``mark`` once
the audio before it has played and, on ``clear``, dropping unplayed audio and
echoing every pending mark at once. It records what the relay sent and what
played when, so tests can check barge-in truncation against the truth.

:func:`voice_webhook` plays the step before: Twilio asking ``/twilio/voice`` what to
do with a call, and reading the stream URL (with its stream token) and parameters
from the TwiML, so that the call connects as Twilio's would.

Times are ``trio.current_time()`` seconds. Everything runs in the nursery of
:func:`twilio_call`; nothing outlives the ``async with``.
"""

from __future__ import annotations

import base64
import binascii
import itertools
import secrets
import socket
import struct
import urllib.parse
from collections import deque
from collections.abc import AsyncIterator, Callable, Iterable, Iterator, Mapping
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any, Literal
from xml.etree import ElementTree

import httpx
import orjson
import trio
import trio_websocket
from twilio.request_validator import RequestValidator

from relay.testing.fuzz import ws_frame

BYTES_PER_SECOND = 8000  # μ-law 8 kHz
FRAME_BYTES = 160  # 20 ms
FRAME_SECONDS = 0.02
USER_AGENT = "Twilio.TmeWs/1.0"

Json = dict[str, Any]


def pattern_frame(index: int) -> bytes:
    """Caller frame ``index`` (from 0) of the default audio: 160 bytes, unlike its neighbours."""
    return bytes((index * 7 + k) & 0xFF for k in range(FRAME_BYTES))


def pattern_frames() -> Iterator[bytes]:
    """The default caller audio: ``pattern_frame(0)``, ``pattern_frame(1)``, … forever."""
    return map(pattern_frame, itertools.count())


@dataclass(frozen=True, slots=True)
class PlayedChunk:
    """One relay ``media``, played in real time over [start, end): ``nbytes`` bytes.

    ``index`` is its position in :attr:`TwilioCall.received_media`. Entries are
    scheduled on arrival; a ``clear`` shortens the one playing to what played
    and drops those not started.
    """

    index: int
    nbytes: int
    start: float
    end: float

    def played_at(self, at: float) -> int:
        """Bytes of this chunk played by time ``at``."""
        if at >= self.end:
            return self.nbytes
        return min(max(int((at - self.start) * BYTES_PER_SECOND), 0), self.nbytes)


def protocol_error(event: Json, stream_sid: str) -> str | None:
    """Why Twilio would reject this relay message (error 31924), or None if it is valid."""
    kind = event.get("event")
    if kind not in ("media", "mark", "clear"):
        return f"unexpected event {kind!r}"
    if event.get("streamSid") != stream_sid:
        return f"{kind}: streamSid {event.get('streamSid')!r}, expected {stream_sid!r}"
    body = event.get(kind)
    if kind == "media":
        payload = body.get("payload") if isinstance(body, dict) else None
        if not isinstance(payload, str):
            return "media: payload missing"
        try:
            base64.b64decode(payload, validate=True)
        except binascii.Error:
            return "media: payload is not base64"
    if kind == "mark":
        name = body.get("name") if isinstance(body, dict) else None
        if not isinstance(name, str) or not name:
            return "mark: name missing or empty"
    return None


class TwilioCall:
    """One simulated call. Get it from :func:`twilio_call`; the attributes are the record."""

    def __init__(
        self,
        ws: trio_websocket.WebSocketConnection,
        nursery: trio.Nursery,
        *,
        stream_sid: str,
        call_sid: str,
        account_sid: str,
        custom_parameters: Mapping[str, str],
        frames: Iterable[bytes] | None,
        stream: trio.abc.Stream | None = None,
    ) -> None:
        self.stream_sid = stream_sid
        self.call_sid = call_sid
        self.account_sid = account_sid
        self.custom_parameters = dict(custom_parameters)
        self.received_events: list[Json] = []  # every relay message that parsed as an object
        self.received_times: list[float] = []  # arrival of each of received_events
        self.received_media: list[bytes] = []  # decoded media payloads, in order
        self.playback: list[PlayedChunk] = []
        self.clears: list[float] = []
        self.cleared_at_bytes: list[int] = []  # total bytes played when each clear arrived
        self.echoed_marks: list[tuple[float, str]] = []  # (time echoed, name)
        self.protocol_errors: list[str] = []
        self.sent_audio = bytearray()  # every caller media payload, in order
        self.closed = trio.Event()
        self._ws = ws
        self._stream = stream
        self._nursery = nursery
        self._frames = frames
        self._send_lock = trio.Lock()  # a sequenceNumber and its send go out together
        self._sequence = 0
        self._chunk = 0
        self._connected_sent = False
        self._t0: float | None = None
        self._play_end = -float("inf")
        self._marks: deque[tuple[float, str]] = deque()  # (due, name), due non-decreasing
        self._marks_changed = trio.Event()
        self._mark_wait = trio.CancelScope()
        self._audio_scope = trio.CancelScope()
        self._changed = trio.Event()

    @property
    def close_code(self) -> int | None:
        """The close code once the socket closed (1000 if we closed it), else None."""
        return self._ws.closed.code if self._ws.closed else None

    @property
    def close_reason(self) -> str | None:
        return self._ws.closed.reason if self._ws.closed else None

    def events(self, kind: str) -> list[Json]:
        """Received relay messages whose ``event`` is ``kind``."""
        return [e for e in self.received_events if e.get("event") == kind]

    def played_bytes(self, at: float | None = None) -> int:
        """Relay audio played by ``at`` (default now), over the whole call."""
        when = trio.current_time() if at is None else at
        return sum(chunk.played_at(when) for chunk in self.playback)

    def pending_marks(self) -> list[str]:
        """Marks received and not yet echoed, in order."""
        return [name for _, name in self._marks]

    async def wait_until(self, predicate: Callable[[], bool]) -> None:
        """Return once ``predicate()`` is true; it is re-checked after every relay
        message, every mark echo, and when the socket closes."""
        while not predicate():
            await self._changed.wait()

    async def send_connected(self) -> None:
        """Send Twilio's first message (once; :meth:`start` sends it if needed)."""
        self._connected_sent = True
        await self._send({"event": "connected", "protocol": "Call", "version": "1.0.0"}, False)

    async def start(self) -> None:
        """Send ``connected`` (unless sent) and ``start``; then stream caller audio if enabled."""
        if not self._connected_sent:
            await self.send_connected()
        self._t0 = trio.current_time()
        start = {
            "accountSid": self.account_sid,
            "streamSid": self.stream_sid,
            "callSid": self.call_sid,
            "tracks": ["inbound"],
            "mediaFormat": {"encoding": "audio/x-mulaw", "sampleRate": 8000, "channels": 1},
            "customParameters": self.custom_parameters,
        }
        await self._send({"event": "start", "streamSid": self.stream_sid, "start": start})
        if self._frames is not None:
            self._nursery.start_soon(self._stream_frames, self._frames)
            self._frames = None  # one stream per call, however often start() is called

    def media_message(self, payload: bytes) -> Json:
        """The next ``media`` carrying caller audio (raw μ-law), as Twilio numbers
        its chunks and stamps them; for :meth:`send_media` or :meth:`send_together`."""
        self._chunk += 1
        t0 = trio.current_time() if self._t0 is None else self._t0
        media = {
            "track": "inbound",
            "chunk": str(self._chunk),
            "timestamp": str(int((trio.current_time() - t0) * 1000)),
            "payload": base64.b64encode(payload).decode(),
        }
        return {"event": "media", "streamSid": self.stream_sid, "media": media}

    def mark_message(self, name: str) -> Json:
        """The ``mark`` echo Twilio sends once mark ``name``'s audio has played."""
        return {"event": "mark", "streamSid": self.stream_sid, "mark": {"name": name}}

    async def send_media(self, payload: bytes) -> None:
        """Send caller audio (raw μ-law) as one ``media``."""
        await self._send(self.media_message(payload))
        # Recorded once sent: stop() cancels this task, possibly at the send's first
        # checkpoint, and a frame that never left must not count as sent audio.
        self.sent_audio += payload

    async def send_dtmf(self, digit: str) -> None:
        dtmf = {"track": "inbound_track", "digit": digit}
        await self._send({"event": "dtmf", "streamSid": self.stream_sid, "dtmf": dtmf})

    async def stop(self) -> None:
        """Stop the caller audio and send ``stop``, as Twilio does when the call ends."""
        self._audio_scope.cancel()
        stop = {"accountSid": self.account_sid, "callSid": self.call_sid}
        await self._send({"event": "stop", "streamSid": self.stream_sid, "stop": stop})

    async def send_raw(self, message: str | bytes) -> None:
        """Send anything as is (unknown events, malformed JSON)."""
        await self._ws.send_message(message)

    async def send_together(self, messages: Iterable[Json]) -> None:
        """Send Twilio messages (numbered as usual) as masked text frames in one
        write, so that they reach the relay in one TCP segment and one ``recv``,
        as they do when a Twilio edge catches up after a delay. Caller audio in
        them counts as sent."""
        async with self._send_lock:
            wire = bytearray()
            audio = bytearray()
            for message in messages:
                self._sequence += 1
                message = {**message, "sequenceNumber": str(self._sequence)}
                if message.get("event") == "media":
                    audio += base64.b64decode(message["media"]["payload"])
                wire += ws_frame(0x1, orjson.dumps(message))  # text, not relay.ws's codec
            await self.send_wire(bytes(wire))
            self.sent_audio += audio

    async def send_wire(self, wire: bytes) -> None:
        """Raw bytes on the socket (frames built with ``relay.testing.fuzz.ws_frame``:
        fragments, pings, anything), whole, between trio-websocket's own frames."""
        stream = self._stream
        if stream is None:
            raise RuntimeError("send_wire() needs the call's stream")
        # trio-websocket writes its own frames (pongs, close) under this lock;
        # holding it keeps ours whole and the stream's send_all unshared.
        async with self._ws._stream_lock:
            await stream.send_all(wire)

    async def close(self, code: int = 1000, reason: str | None = None) -> None:
        self._audio_scope.cancel()
        await self._ws.aclose(code, reason)

    def abort(self, *, reset: bool = False) -> None:
        """Drop the TCP connection with no close frame, as a crashed Twilio edge
        would: an orderly TCP close (FIN), or with ``reset`` a TCP reset (RST,
        ``SO_LINGER`` 0). Caller audio stops; the relay's answer is never read."""
        stream = self._stream
        if isinstance(stream, trio.SSLStream):
            stream = stream.transport_stream
        if not isinstance(stream, trio.SocketStream):
            raise RuntimeError("abort() needs the call's TCP stream")
        self._audio_scope.cancel()
        if reset:
            stream.socket.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        stream.socket.close()

    async def _send(self, message: Json, numbered: bool = True) -> None:
        async with self._send_lock:
            if numbered:
                self._sequence += 1
                message["sequenceNumber"] = str(self._sequence)
            await self._ws.send_message(orjson.dumps(message).decode())

    async def _stream_frames(self, frames: Iterable[bytes]) -> None:
        # Paced against the start time, not the previous send, so delays don't accumulate.
        with self._audio_scope:
            t0 = trio.current_time()
            try:
                for n, frame in enumerate(frames):
                    await trio.sleep_until(t0 + n * FRAME_SECONDS)
                    await self.send_media(frame)
            except trio_websocket.ConnectionClosed:
                return

    async def _receive(self) -> None:
        try:
            while True:
                message = await self._ws.get_message()
                await self._handle(message, trio.current_time())
                self._notify()
        except trio_websocket.ConnectionClosed:
            pass
        finally:
            self._audio_scope.cancel()
            self.closed.set()
            self._notify()

    async def _handle(self, message: str | bytes, now: float) -> None:
        if isinstance(message, bytes):
            self.protocol_errors.append("binary message")
            return
        try:
            event = orjson.loads(message)
        except orjson.JSONDecodeError:
            self.protocol_errors.append(f"not JSON: {message[:80]!r}")
            return
        if not isinstance(event, dict):
            self.protocol_errors.append(f"not an object: {message[:80]!r}")
            return
        self.received_events.append(event)
        self.received_times.append(now)
        problem = protocol_error(event, self.stream_sid)
        if problem is not None:
            self.protocol_errors.append(problem)
        elif event["event"] == "media":
            audio = base64.b64decode(event["media"]["payload"])
            start = max(now, self._play_end)
            self._play_end = start + len(audio) / BYTES_PER_SECOND
            self.received_media.append(audio)
            index = len(self.received_media) - 1
            self.playback.append(PlayedChunk(index, len(audio), start, self._play_end))
        elif event["event"] == "mark":
            self._marks.append((max(now, self._play_end), event["mark"]["name"]))
            self._marks_changed.set()
        else:
            await self._clear(now)

    async def _clear(self, now: float) -> None:
        self.clears.append(now)
        self.cleared_at_bytes.append(self.played_bytes(now))
        kept = []
        for chunk in self.playback:
            played = chunk.played_at(now)
            if played == chunk.nbytes:
                kept.append(chunk)
            elif played > 0:
                end = chunk.start + played / BYTES_PER_SECOND
                kept.append(PlayedChunk(chunk.index, played, chunk.start, end))
        self.playback = kept
        self._play_end = min(self._play_end, now)
        pending = [name for _, name in self._marks]
        self._marks.clear()
        self._mark_wait.cancel()  # the echo task may be sleeping on a dropped mark
        for name in pending:
            await self._echo(name)

    async def _echo_marks(self) -> None:
        try:
            while True:
                if not self._marks:
                    self._marks_changed = trio.Event()
                    await self._marks_changed.wait()
                    continue
                due, name = self._marks[0]
                with trio.CancelScope() as self._mark_wait:
                    await trio.sleep_until(due)
                if self._mark_wait.cancelled_caught:
                    continue  # a clear echoed it already
                self._marks.popleft()
                await self._echo(name)
                self._notify()
        except trio_websocket.ConnectionClosed:
            return

    async def _echo(self, name: str) -> None:
        self.echoed_marks.append((trio.current_time(), name))
        await self._send(self.mark_message(name))

    def _notify(self) -> None:
        self._changed.set()
        self._changed = trio.Event()


def _handshake_headers(
    public_url: str, auth_token: str, sign: bool | Literal["wrong"], user_agent: str
) -> list[tuple[bytes, bytes]]:
    headers = [(b"User-Agent", user_agent.encode())]
    if sign is False:
        return headers
    if not auth_token:
        raise ValueError("a signed handshake needs auth_token")
    token = auth_token + "-wrong" if sign == "wrong" else auth_token
    signature = RequestValidator(token).compute_signature(public_url, {})
    return [*headers, (b"X-Twilio-Signature", signature.encode())]


_Stream = trio.SocketStream | trio.SSLStream[trio.SocketStream]


async def _open_stream(url: str) -> tuple[_Stream, str, str]:
    parts = urllib.parse.urlsplit(url)
    if parts.scheme not in ("ws", "wss") or not parts.hostname:
        raise ValueError(f"not a ws:// or wss:// URL: {url!r}")
    secure = parts.scheme == "wss"
    port = parts.port or (443 if secure else 80)
    stream: _Stream
    if secure:
        stream = await trio.open_ssl_over_tcp_stream(parts.hostname, port, https_compatible=True)
    else:
        stream = await trio.open_tcp_stream(parts.hostname, port)
    host = parts.hostname if parts.port is None else f"{parts.hostname}:{port}"
    resource = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
    return stream, host, resource


def _sole_error(group: BaseExceptionGroup[BaseException]) -> BaseException | None:
    """The only exception in ``group`` that is not a Cancelled, if there is exactly one."""
    leaves: list[BaseException] = []
    pending: list[BaseException] = [group]
    while pending:
        exc = pending.pop()
        if isinstance(exc, BaseExceptionGroup):
            pending.extend(exc.exceptions)
        elif not isinstance(exc, trio.Cancelled):
            leaves.append(exc)
    return leaves[0] if len(leaves) == 1 else None


@dataclass(frozen=True)
class StreamOrder:
    """What ``POST /twilio/voice`` told Twilio: the stream URL (public, with its
    stream token) and the ``<Parameter>``s, for the call ``call_sid``."""

    url: str
    parameters: dict[str, str]
    call_sid: str

    @property
    def path(self) -> str:
        """The URL's path (``/twilio/media/<stream token>``), to dial the relay locally."""
        return urllib.parse.urlsplit(self.url).path


def parse_stream_twiml(xml: str | bytes, call_sid: str) -> StreamOrder:
    """The ``<Connect><Stream>`` of a TwiML answer; ValueError if it has none."""
    root = ElementTree.fromstring(xml)
    stream = root.find("./Connect/Stream")
    url = stream.get("url") if stream is not None else None
    if stream is None or not url:
        raise ValueError("no <Connect><Stream url=…> in the TwiML")
    parameters = {str(p.get("name")): str(p.get("value", "")) for p in stream.findall("Parameter")}
    return StreamOrder(url, parameters, call_sid)


async def voice_webhook(
    http_url: str,
    form: Mapping[str, str],
    *,
    public_url: str,
    auth_token: str,
) -> StreamOrder:
    """Play Twilio answering a call: POST ``form`` (it must hold ``CallSid``) to the
    relay's ``/twilio/voice`` at ``http_url``, signed for ``public_url`` (the relay's
    ``server.public_url``), and read the stream order from the TwiML.

        order = await voice_webhook(d.http_url, {"CallSid": sid, …}, public_url=…, auth_token=…)
        async with twilio_call(d.ws_url + order.path, public_url=order.url,
                               call_sid=order.call_sid,
                               custom_parameters=order.parameters, …) as call:

    Raises ``httpx.HTTPStatusError`` when the relay refuses the webhook.
    """
    signature = RequestValidator(auth_token).compute_signature(
        public_url.rstrip("/") + "/twilio/voice", dict(form)
    )
    async with httpx.AsyncClient(timeout=10) as http:
        response = await http.post(
            http_url + "/twilio/voice", data=dict(form), headers={"X-Twilio-Signature": signature}
        )
    response.raise_for_status()
    return parse_stream_twiml(response.content, form["CallSid"])


@asynccontextmanager
async def twilio_call(
    url: str,
    *,
    public_url: str | None = None,
    auth_token: str = "",
    sign: bool | Literal["wrong"] = True,
    custom_parameters: Mapping[str, str] | None = None,
    send_audio: bool = True,
    frame_source: Iterable[bytes] | None = None,
    stream_sid: str | None = None,
    call_sid: str | None = None,
    account_sid: str | None = None,
    user_agent: str = USER_AGENT,
    connect_timeout: float = 10.0,
    max_message_size: int = 16 * 2**20,
    echo_marks: bool = True,
) -> AsyncIterator[TwilioCall]:
    """Connect to the relay at ``url`` as Twilio would; yield the call.

    The handshake is signed for ``public_url`` (default ``url``), the stream URL
    Twilio was given, with ``auth_token``; ``sign=False`` omits the signature,
    ``sign="wrong"`` sends an invalid one. A refused handshake raises
    :class:`trio_websocket.ConnectionRejected` (``.status_code``), with the
    socket closed. Nothing is sent until :meth:`TwilioCall.start`; after it,
    with ``send_audio``, ``frame_source`` (default :func:`pattern_frames`) is
    streamed one frame per 20 ms until exhausted, ``stop`` or close. Marks are
    echoed when their audio has played, unless ``echo_marks`` is false (then
    they wait in :meth:`TwilioCall.pending_marks` for the test). On exit
    the socket is closed (1000) if still open and every task has ended.
    """
    public = url if public_url is None else public_url
    frames = pattern_frames() if frame_source is None else frame_source
    headers = _handshake_headers(public, auth_token, sign, user_agent)
    stream, host, resource = await _open_stream(url)
    try:
        # Owning the stream closes it on every path; trio-websocket leaves it
        # open when the server refuses the handshake.
        async with stream, trio.open_nursery() as nursery:
            with trio.fail_after(connect_timeout):
                ws = await trio_websocket.wrap_client_stream(
                    nursery,
                    stream,
                    host,
                    resource,
                    extra_headers=headers,
                    max_message_size=max_message_size,
                )
            call = TwilioCall(
                ws,
                nursery,
                stream_sid=stream_sid or "MZ" + secrets.token_hex(16),
                call_sid=call_sid or "CA" + secrets.token_hex(16),
                account_sid=account_sid or "AC" + secrets.token_hex(16),
                custom_parameters=custom_parameters or {},
                frames=frames if send_audio else None,
                stream=stream,
            )
            nursery.start_soon(call._receive)
            if echo_marks:
                nursery.start_soon(call._echo_marks)
            try:
                yield call
            finally:
                with trio.move_on_after(connect_timeout) as closing:
                    closing.shield = True
                    await ws.aclose()
                nursery.cancel_scope.cancel()
    except BaseExceptionGroup as group:
        sole = _sole_error(group)
        if sole is None:
            raise
        raise sole from None
