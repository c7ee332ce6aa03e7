"""Browser client ⇄ OpenAI Realtime: one nursery, two pumps, a drain watcher, a deadline.

Guarantees (SPEC §5): the client is accepted only once the upstream is open;
every message is relayed unchanged and in order both ways; the session ends
with the close codes of the contract; when this coroutine returns, both
sockets are closed and no task of the session is left.
"""

from __future__ import annotations

import logging
from collections import deque

import orjson
import trio

from relay.metrics import Tally
from relay.realtime.closing import Ending, client_code_for_upstream, clip_reason, close_upstream
from relay.realtime.dialect import dialect_for, voice_update
from relay.realtime.upstream import UpstreamError, open_upstream
from relay.runtime import Runtime
from relay.ws.connection import WebSocket
from relay.ws.errors import Disconnected, UpstreamClosed
from relay.ws.peer import PeerSocket

log = logging.getLogger("relay.client")


def _too_big(message: str | bytes, limit: int) -> bool:
    """For client messages: over ASGI (an upgrade on a keep-alive connection)
    Hypercorn limits text in characters, not UTF-8 bytes, so the session checks."""
    if isinstance(message, bytes):
        return len(message) > limit
    # A str of n chars is between n and 4n UTF-8 bytes: encode only when it matters.
    if len(message) * 4 <= limit:
        return False
    return len(message) > limit or len(message.encode("utf-8")) > limit


class ClientSession:
    def __init__(self, rt: Runtime, ws: PeerSocket, ip: str, model: str, voice: str | None) -> None:
        self.rt = rt
        self.ws = ws
        self.ip = ip
        self.model = model
        self.voice = voice
        self.id = rt.new_session_id("client")
        self.limit = rt.settings.limits.max_message_bytes
        self.ending: Ending | None = None
        self.tally = Tally("client")  # messages relayed, for logs and metrics
        self._up: WebSocket | None = None

    def _end(self, ending: Ending, scope: trio.CancelScope) -> None:
        if self.ending is None:
            self.ending = ending
        scope.cancel()

    async def run(self) -> None:
        s = self.rt.settings
        async with trio.open_nursery() as conn:  # owns the upstream socket's reader task
            started = trio.current_time()
            try:
                up = await open_upstream(
                    conn,
                    realtime_url=s.openai.realtime_url,
                    model=self.model,
                    api_key=s.secrets.openai_api_key or "",
                    dialect=dialect_for(s.openai.dialect),
                    timeout=s.openai.connect_timeout_seconds,
                    max_message_size=self.limit,
                    stall_seconds=s.limits.stall_seconds,
                )
            except UpstreamError as exc:
                self.rt.metrics.reject("upstream")
                log.warning("client upgrade refused: %s", exc.reason, extra={"client_ip": self.ip})
                await self.ws.reject(502, exc.reason)
                return
            self.rt.metrics.upstream_connect_seconds.observe(trio.current_time() - started)
            try:
                if self.voice is not None:
                    await up.send(
                        orjson.dumps(
                            voice_update(dialect_for(s.openai.dialect), self.voice)
                        ).decode()
                    )
                offered = self.ws.subprotocols
                await self.ws.accept("realtime" if "realtime" in offered else None)
            except (Disconnected, OSError):  # either side, UpstreamClosed included
                await close_upstream(up, 1000)
                await self.ws.reject(502, "upstream closed during setup")
                return
            with self.rt.session("client", self.tally):
                log.info(
                    "session start",
                    extra={
                        "session": self.id,
                        "kind": "client",
                        "client_ip": self.ip,
                        "model": self.model,
                    },
                )
                await self._relay(up)
                await self._finish(up)
                self._log_end(trio.current_time() - started)
            conn.cancel_scope.cancel()

    async def _relay(self, up: WebSocket) -> None:
        self._up = up
        ws = self.ws
        if isinstance(ws, WebSocket):
            # Messages that can go on at once are relayed by the reactor while the
            # pumps are parked; the pumps handle the rest (waits, limits, endings).
            ws.fast_path = self._fast_to_upstream
            up.fast_path = self._fast_to_client
        try:
            await self._pumps(up)
        finally:
            up.fast_path = None
            if isinstance(ws, WebSocket):
                ws.fast_path = None

    def _fast_to_upstream(self, messages: deque[str | bytes]) -> None:
        """``WebSocket.fast_path`` of the client's socket: what the pump would send."""
        up, limit = self._up, self.limit
        assert up is not None
        while messages and self.ending is None:
            if _too_big(messages[0], limit) or not up.can_send_now():
                return
            up.send_now(messages.popleft())
            self.tally.up += 1

    def _fast_to_client(self, messages: deque[str | bytes]) -> None:
        """``WebSocket.fast_path`` of the upstream socket: what the pump would send."""
        ws = self.ws
        assert isinstance(ws, WebSocket)
        while messages and self.ending is None:
            if not ws.can_send_now():
                return
            ws.send_now(messages.popleft())
            self.tally.down += 1

    async def _pumps(self, up: WebSocket) -> None:
        s = self.rt.settings
        async with trio.open_nursery() as nursery:
            scope = nursery.cancel_scope
            scope.deadline = trio.current_time() + s.limits.session_seconds
            nursery.start_soon(self._client_to_upstream, up, scope)
            nursery.start_soon(self._upstream_to_client, up, scope)
            nursery.start_soon(self._drain_watch, scope)
        if self.ending is None:  # only the deadline ends a session without a pump saying why
            self.ending = Ending(
                "time_limit", 1000, "session time limit", 1000, "session time limit"
            )

    async def _client_to_upstream(self, up: WebSocket, scope: trio.CancelScope) -> None:
        limit = self.limit
        while True:
            try:
                message = await self.ws.receive()
            except Disconnected as gone:
                self._end(self._client_gone(gone), scope)
                return
            if _too_big(message, limit):
                self._end(Ending("oversize", 1009, "message too big", 1000), scope)
                return
            try:
                await up.send(message)
            except UpstreamClosed as closed:
                self._end(self._upstream_gone(closed), scope)
                return
            self.tally.up += 1

    async def _upstream_to_client(self, up: WebSocket, scope: trio.CancelScope) -> None:
        while True:
            try:
                # The upstream socket refuses a message over the limit itself (UTF-8
                # bytes, from the frame header): that arrives here as UpstreamClosed
                # 1009 and becomes 1009 to the client, 1000 upstream.
                message = await up.receive()
            except UpstreamClosed as closed:
                self._end(self._upstream_gone(closed), scope)
                return
            try:
                await self.ws.send(message)
            except Disconnected as gone:
                self._end(self._client_gone(gone), scope)
                return
            except Exception:  # the client's transport is gone mid-send (ASGI path)
                self._end(Ending("client_closed", None, upstream_code=1000), scope)
                return
            self.tally.down += 1

    @staticmethod
    def _client_gone(gone: Disconnected) -> Ending:
        """The client's socket is over: say why, and what each side still gets."""
        if gone.stalled:  # aborted: it could not have read a close anyway
            return Ending("client_stalled", None, upstream_code=1000)
        if gone.local:  # it broke the rules (1009 oversize, 1002, 1007): tell it so
            outcome = "oversize" if gone.code == 1009 else "protocol_error"
            reason = "message too big" if gone.code == 1009 else gone.reason
            return Ending(outcome, gone.code, reason, 1000)
        # Over ASGI, Hypercorn has already closed an oversized message with 1009.
        outcome = "oversize" if gone.code == 1009 else "client_closed"
        return Ending(outcome, None, upstream_code=1000)

    @staticmethod
    def _upstream_gone(closed: Disconnected) -> Ending:
        if closed.stalled:
            return Ending("upstream_stalled", 1011, "upstream stalled", None)
        if closed.local:  # the upstream broke the rules; SPEC: oversize → 1009 / 1000
            if closed.code == 1009:
                return Ending("oversize", 1009, "message too big", 1000)
            return Ending("upstream_failed", 1011, "upstream protocol error", closed.code)
        code = closed.code
        failed = code in (1005, 1006)
        text = "" if failed else closed.reason
        outcome = "upstream_failed" if failed else "upstream_closed"
        return Ending(outcome, client_code_for_upstream(code), text, None)

    async def _drain_watch(self, scope: trio.CancelScope) -> None:
        await self.rt.drain_expired.wait()
        self._end(
            Ending("drain", 1001, "server shutting down", 1001, "server shutting down"), scope
        )

    async def _finish(self, up: WebSocket) -> None:
        ending = self.ending
        assert ending is not None
        with trio.CancelScope(shield=True):
            if ending.client_code is not None:
                await self.ws.close(ending.client_code, clip_reason(ending.client_reason))
            if ending.upstream_code is not None:
                await close_upstream(up, ending.upstream_code, ending.upstream_reason)
            else:
                await close_upstream(up, 1000)  # already closed: this only releases the socket
        self.rt.metrics.sessions_total.labels(kind="client", outcome=ending.outcome).inc()

    def _log_end(self, duration: float) -> None:
        ending = self.ending
        assert ending is not None
        log.info(
            "session end",
            extra={
                "session": self.id,
                "kind": "client",
                "client_ip": self.ip,
                "model": self.model,
                "duration_s": round(duration, 3),
                "outcome": ending.outcome,
                "close_code": ending.client_code,
                "close_reason": ending.client_reason,
                "messages_up": self.tally.up,
                "messages_down": self.tally.down,
            },
        )
