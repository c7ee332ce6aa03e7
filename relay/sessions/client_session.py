"""Browser client ⇄ OpenAI Realtime: the two drivers of one session's core.

What a session does lives in :class:`relay.sessions.client_core.ClientCore`;
this module opens the upstream, accepts the client, and then only moves
messages between the sockets and the core and carries out what it asks, by
one of two drivers that hold no session logic (as in
``relay.sessions.twilio_session``):

- the **fast path** (``WebSocket.fast_path``, run by the reactor while the
  reader is parked) feeds the core what is ready as long as both sockets take
  a write without waiting, and sends with non-waiting writes;
- the **pumps** (tasks in the session's nursery) wait for a message, feed the
  core, and await its sends: everything the fast path leaves, everything on a
  socket served over ASGI, everything with the fast path switched off.

A fast path's exception is raised by the pump's ``receive``, in the session's
nursery. When :meth:`ClientSession.run` returns, both sockets are closed and
no task of the session is left.
"""

from __future__ import annotations

import logging
from collections import deque
from collections.abc import Callable

import trio

from relay.daemon.state import DaemonState
from relay.ops.metrics import Tally, count_tokens
from relay.sessions.client_core import ClientCore, ClientOut, opening
from relay.sessions.closing import clip_reason, close_upstream
from relay.sessions.dialect import dialect_for
from relay.sessions.upstream import UpstreamError, open_upstream
from relay.ws.connection import WebSocket
from relay.ws.errors import Disconnected, UpstreamClosed
from relay.ws.peer import PeerSocket

log = logging.getLogger("relay.client")


class ClientSession:
    def __init__(
        self, rt: DaemonState, ws: PeerSocket, ip: str, model: str, voice: str | None
    ) -> None:
        self.rt = rt
        self.ws = ws
        self.ip = ip
        self.model = model
        self.voice = voice
        self.id = rt.new_session_id("client")
        self.limit = rt.settings.limits.max_message_bytes
        self.tally = Tally("client")  # messages relayed, for logs and metrics
        # The pumps' sends (to the client?, message), in the order the core asked.
        self._outbox: deque[tuple[bool, str | bytes]] = deque()
        outbox = self._outbox
        self._pump_out = ClientOut(
            lambda message: outbox.append((True, message)),
            lambda message: outbox.append((False, message)),
        )
        self._fast_out = self._pump_out  # the fast path's, once there is one
        self.core = ClientCore(self.limit, self._pump_out, self.tally)
        metrics = rt.metrics
        self.core.on_usage = lambda added: count_tokens(metrics, "client", added)
        self._up: WebSocket | None = None
        self._scope: trio.CancelScope | None = None

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
                first = opening(s.openai.dialect, self.voice)
                if first is not None:
                    await up.send_texts((first,))
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
        if self.rt.fast_path and isinstance(ws, WebSocket):
            self._fast_out = ClientOut(ws.send_now, up.send_now)
            ws.fast_path = self._fast_from_client
            up.fast_path = self._fast_from_upstream
        try:
            await self._pumps()
        finally:
            up.fast_path = None
            if isinstance(ws, WebSocket):
                ws.fast_path = None

    async def _pumps(self) -> None:
        s = self.rt.settings
        async with trio.open_nursery() as nursery:
            self._scope = scope = nursery.cancel_scope
            scope.deadline = trio.current_time() + s.limits.session_seconds
            nursery.start_soon(self._client_pump)
            nursery.start_soon(self._upstream_pump)
            nursery.start_soon(self._drain_watch)
        self.core.time_limit()  # only the deadline ends a session without the core saying why

    # -- the fast path: never waits -------------------------------------------
    def _fast_from_client(self, messages: deque[str | bytes]) -> None:
        """Feed the core the client's ready messages while the upstream takes writes
        now (the core sends a client message upstream only)."""
        assert self._up is not None
        self._fast(messages, self.core.client, self._up)

    def _fast_from_upstream(self, messages: deque[str | bytes]) -> None:
        """Feed the core OpenAI's ready messages while the client takes writes now."""
        assert isinstance(self.ws, WebSocket)
        self._fast(messages, self.core.upstream, self.ws)

    def _fast(
        self, messages: deque[str | bytes], feed: Callable[[str | bytes], None], to: WebSocket
    ) -> None:
        core = self.core
        if self._outbox:
            return  # the pumps are carrying out earlier sends: after them, in order
        core.out = self._fast_out
        try:
            while messages and core.ending is None and to.can_send_now():
                feed(messages.popleft())
        finally:
            core.out = self._pump_out
        if core.ending is not None:
            self._over()

    # -- the pumps: may wait ----------------------------------------------------
    async def _client_pump(self) -> None:
        core, ws = self.core, self.ws
        while core.ending is None:
            try:
                core.client(await ws.receive())
            except Disconnected as gone:
                core.client_gone(gone)
            await self._perform()
        self._over()

    async def _upstream_pump(self) -> None:
        core, up = self.core, self._up
        assert up is not None
        while core.ending is None:
            try:
                core.upstream(await up.receive())
            except UpstreamClosed as closed:
                core.upstream_gone(closed)
            await self._perform()
        self._over()

    async def _drain_watch(self) -> None:
        await self.rt.drain_expired.wait()
        self.core.drain_expired()
        self._over()

    async def _perform(self) -> None:
        """Carry out the core's sends, in order (each entry is taken just before its
        write starts); a socket found gone is the core's news."""
        box, core, ws, up = self._outbox, self.core, self.ws, self._up
        assert up is not None
        while box:
            to_client, message = box.popleft()
            try:
                if to_client:
                    await ws.send(message)
                else:
                    await up.send(message)
            except UpstreamClosed as closed:  # before Disconnected: it is one
                box.clear()
                core.upstream_gone(closed)
            except Disconnected as gone:
                box.clear()
                core.client_gone(gone)
            except Exception:
                if not to_client:
                    raise
                box.clear()  # the client's transport is gone mid-send (ASGI path)
                core.client_lost()
        if core.ending is not None:
            self._over()

    def _over(self) -> None:
        """The core has ended the session: stop every task of it."""
        if self._scope is not None:
            self._scope.cancel()

    async def _finish(self, up: WebSocket) -> None:
        ending = self.core.ending
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
        ending = self.core.ending
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
                **self.core.usage.log_fields(),
            },
        )
