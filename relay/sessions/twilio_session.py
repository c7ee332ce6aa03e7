"""Twilio Media Streams ⇄ OpenAI Realtime: the two drivers of one call's core.

What a call does lives in :class:`relay.sessions.twilio_core.TwilioCore`; this
module only moves messages between the sockets and the core, and carries out
what it asks. There are two drivers, and neither holds session logic:

- the **fast path** (``WebSocket.fast_path``, run by the reactor when input
  arrives while the reader is parked): feeds the core every message that is
  ready, in order, as long as both sockets can take a write without waiting,
  and sends what the core asks with non-waiting writes;
- the **pumps** (tasks in the call's nursery): each waits for a message, feeds
  the core it and whatever else is ready, and awaits the core's sends. They
  take over whatever the fast path leaves (a socket whose buffer is full, a
  send of the pumps still in progress), and run everything on a socket served
  over ASGI or with the fast path switched off (``DaemonState.fast_path``).

A fast path that fails has its exception raised by the pump's ``receive``, in
the call's nursery (``relay.ws.connection``). The time limit, the goodbye timer
and the drain are tasks here too; each is one call into the core. When
:meth:`TwilioSession.run` returns, both sockets are closed and no task of the
call is left.
"""

from __future__ import annotations

import logging
import time
from collections import deque

import trio

from relay.daemon.state import DaemonState
from relay.ops.metrics import Tally, count_tokens
from relay.sessions.call_tools import (
    Ask,
    CallDesk,
    CallUpdateFailed,
    LookupTask,
    RunTool,
    Transfer,
    Wake,
)
from relay.sessions.closing import Ending, close_upstream
from relay.sessions.twilio_core import TwilioCore, TwilioOut, b64_len, is_audio
from relay.sessions.upstream import UpstreamError, open_upstream
from relay.ws.connection import WebSocket
from relay.ws.errors import Disconnected, UpstreamClosed
from relay.ws.peer import PeerSocket

__all__ = ["TwilioSession", "b64_len", "is_audio"]

log = logging.getLogger("relay.twilio")

# Bigger than any message OpenAI or Twilio sends on a call; guards memory only.
MAX_UPSTREAM_MESSAGE = 4 * 1024 * 1024

# A task lookup that takes longer (a slow Redis) starts the call without its task.
TASK_LOOKUP_SECONDS = 2.0
# Completing a call through Twilio REST after end_call: bounded, in the background.
HANGUP_SECONDS = 15.0

# Where a send the pumps carry out goes (the first item of an outbox entry).
_TO_TWILIO = True
_TO_UPSTREAM = False


class TwilioSession:
    def __init__(
        self,
        rt: DaemonState,
        ws: PeerSocket,
        ip: str,
        call: str | None = None,
        desk: CallDesk | None = None,
    ) -> None:
        self.rt = rt
        self.desk = desk
        self.ws = ws
        self.ip = ip
        self.id = rt.new_session_id("twilio")
        self.tally = Tally("twilio")  # messages relayed, for logs and metrics
        # The pumps' sends, in the order the core asked for them: whichever pump is
        # running carries them out, one at a time (see _perform).
        self._outbox: deque[tuple[bool, tuple[bytes, ...]]] = deque()
        outbox = self._outbox
        self._pump_out = TwilioOut(
            lambda *texts: outbox.append((_TO_TWILIO, texts)),
            lambda text: outbox.append((_TO_UPSTREAM, (text,))),
        )
        self.core = TwilioCore(
            rt.settings,
            self._pump_out,
            self.tally,
            session_id=self.id,
            token_call=call,
            on_bargein=rt.metrics.bargeins_total.inc,
        )
        metrics = rt.metrics
        if desk is not None:
            self.core.ask = self._ask
        self.core.on_tool = lambda tool, ok: metrics.tool_calls_total.labels(
            tool=tool, outcome="ok" if ok else "error"
        ).inc()
        self.core.on_usage = lambda added: count_tokens(metrics, "twilio", added)
        self._fast_out = self._pump_out  # the fast path's, once there is one
        self._up: WebSocket | None = None
        self._scope: trio.CancelScope | None = None
        self._nursery: trio.Nursery | None = None

    @property
    def ending(self) -> Ending | None:
        return self.core.ending

    # -- lifecycle ------------------------------------------------------------
    async def run(self) -> None:
        s = self.rt.settings
        started = trio.current_time()
        started_unix = time.time()
        await self.ws.accept()
        with self.rt.session("twilio", self.tally):
            async with trio.open_nursery() as conn:  # owns the upstream reader task
                try:
                    self._up = await open_upstream(
                        conn,
                        realtime_url=s.openai.realtime_url,
                        model=s.openai.model,
                        api_key=s.secrets.openai_api_key or "",
                        dialect=self.core.dialect,
                        timeout=s.openai.connect_timeout_seconds,
                        max_message_size=MAX_UPSTREAM_MESSAGE,
                        stall_seconds=s.limits.stall_seconds,
                    )
                except UpstreamError as exc:
                    log.warning("call upstream failed: %s", exc.reason, extra={"session": self.id})
                    self.core.upstream_unavailable()
                    ending = self.core.ending
                    assert ending is not None and ending.client_code is not None
                    await self.ws.close(ending.client_code, ending.client_reason)
                    self.rt.metrics.sessions_total.labels(
                        kind="twilio", outcome=ending.outcome
                    ).inc()
                    return
                self.rt.metrics.upstream_connect_seconds.observe(trio.current_time() - started)
                log.info(
                    "session start",
                    extra={
                        "session": self.id,
                        "kind": "twilio",
                        "client_ip": self.ip,
                        "model": s.openai.model,
                    },
                )
                await self._call(started)
                await self._finish()
                conn.cancel_scope.cancel()
        self._log_end(trio.current_time() - started)
        self._after_call(started_unix)

    async def _call(self, started: float) -> None:
        up, ws = self._up, self.ws
        assert up is not None
        fast = self.rt.fast_path and isinstance(ws, WebSocket)
        if fast:
            assert isinstance(ws, WebSocket)
            self._fast_out = TwilioOut(ws.send_text_now, up.send_text_now)
            ws.fast_path = self._fast_from_twilio
            up.fast_path = self._fast_from_upstream
        try:
            await self._pumps(started)
        finally:
            up.fast_path = None
            if isinstance(ws, WebSocket):
                ws.fast_path = None

    async def _pumps(self, started: float) -> None:
        limits = self.rt.settings.limits
        async with trio.open_nursery() as nursery:
            self._scope = nursery.cancel_scope
            self._nursery = nursery
            nursery.cancel_scope.deadline = started + limits.session_seconds
            nursery.start_soon(self._twilio_pump)
            nursery.start_soon(self._upstream_pump)
            nursery.start_soon(
                self._goodbye_timer, started + limits.session_seconds - limits.goodbye_seconds
            )
            nursery.start_soon(self._drain_watch)
        self._nursery = None
        self.core.time_limit()  # only the deadline ends a call without the core saying why

    async def _finish(self) -> None:
        ending = self.core.ending
        assert ending is not None and self._up is not None
        with trio.CancelScope(shield=True):
            if ending.client_code is not None:
                await self.ws.close(ending.client_code, ending.client_reason)
            await close_upstream(self._up, ending.upstream_code or 1000, ending.upstream_reason)
        self.rt.metrics.sessions_total.labels(kind="twilio", outcome=ending.outcome).inc()

    # -- what the core asks of the world (docs/contract.md §11) ----------------
    def _ask(self, ask: Ask) -> None:
        """Carry out ``ask`` as a task of the call: cancelled with it, never waited for
        by the message path (audio keeps flowing while a tool runs)."""
        if self._scope is None or self._nursery is None:
            return
        self._nursery.start_soon(self._carry_out, ask)

    async def _carry_out(self, ask: Ask) -> None:
        core, desk = self.core, self.desk
        assert desk is not None
        if isinstance(ask, Wake):
            await trio.sleep_until(ask.at_ms / 1000)
            core.wake(ask.at_ms, trio.current_time() * 1000)
        elif isinstance(ask, LookupTask):
            task = None
            with trio.move_on_after(TASK_LOOKUP_SECONDS):
                try:
                    task = await desk.find_task(ask.call_sid)
                except Exception:  # a broken store must not break the call: no task
                    log.exception("task lookup failed", extra={"session": self.id})
            core.task_found(task)
        elif isinstance(ask, RunTool):
            try:
                ok, output = await desk.run_http_tool(
                    ask.tool, ask.call_id, ask.arguments, core.call_sid, core.stream_sid
                )
            except Exception:  # a bug of ours: the model hears a failure, the call goes on
                log.exception("tool %s crashed", ask.tool.name, extra={"session": self.id})
                ok, output = False, '{"ok": false, "error": "the tool failed"}'
            core.tool_answered(ask.call_id, ok, output)
        elif isinstance(ask, Transfer):
            twiml = f"<Response><Dial>{ask.number}</Dial></Response>"
            error: str | None = None
            if core.call_sid is None:
                error = "the call has no CallSid"
            else:
                try:
                    await desk.update_call(core.call_sid, twiml=twiml)
                except CallUpdateFailed as exc:
                    error = str(exc)
            core.transfer_answered(error is None, error, trio.current_time() * 1000)
        await self._perform()

    def _after_call(self, started_unix: float) -> None:
        """The call is over: its REST hang-up (after end_call), its event and summary."""
        core, desk = self.core, self.desk
        if desk is None:
            return
        call_sid = core.call_sid
        if core.hangup_requested and call_sid is not None:

            async def hang_up() -> None:
                with trio.move_on_after(HANGUP_SECONDS):
                    try:
                        await desk.update_call(call_sid, status="completed")
                    except CallUpdateFailed as exc:
                        log.warning("call hang-up failed: %s", exc, extra={"session": self.id})

            self.rt.spawn_job("call_hangup", hang_up)
        report = core.report(started_unix, time.time())
        if report is not None:
            desk.call_ended(report)

    # -- the fast path: never waits -------------------------------------------
    def _fast_from_twilio(self, messages: deque[str | bytes]) -> None:
        """Feed the core Twilio's ready messages while the upstream takes writes now
        (the core sends nothing to Twilio for a Twilio message)."""
        core, up = self.core, self._up
        assert up is not None
        if self._outbox:
            return  # the pumps are carrying out earlier sends: after them, in order
        core.out = self._fast_out
        try:
            now = trio.current_time() * 1000
            while messages and core.ending is None and up.can_send_now():
                core.twilio(messages.popleft(), now)
            core.flush()
        finally:
            core.out = self._pump_out
        if core.ending is not None:
            self._over()

    def _fast_from_upstream(self, messages: deque[str | bytes]) -> None:
        """Feed the core OpenAI's ready messages while both sockets take writes now."""
        core, ws, up = self.core, self.ws, self._up
        assert isinstance(ws, WebSocket) and up is not None
        if self._outbox:
            return
        core.out = self._fast_out
        try:
            now = trio.current_time() * 1000
            while messages and core.ending is None and ws.can_send_now() and up.can_send_now():
                core.upstream(messages.popleft(), now)
        finally:
            core.out = self._pump_out
        if core.ending is not None:
            self._over()

    # -- the pumps: may wait ----------------------------------------------------
    async def _twilio_pump(self) -> None:
        core, ws = self.core, self.ws
        while core.ending is None:
            try:
                raw = await ws.receive()
                now = trio.current_time() * 1000
                core.twilio(raw, now)
                # And what else is ready (never waiting for more): one batch, one join.
                while core.ending is None and (more := ws.receive_nowait()) is not None:
                    core.twilio(more, now)
                core.flush()
            except Disconnected as gone:
                core.twilio_gone(gone)  # what came before it still goes up
            await self._perform()
        self._over()

    async def _upstream_pump(self) -> None:
        core, up = self.core, self._up
        assert up is not None
        while core.ending is None:
            try:
                raw = await up.receive()
            except UpstreamClosed as closed:
                core.upstream_gone(closed)
            else:
                core.upstream(raw, trio.current_time() * 1000)
            await self._perform()
        self._over()

    async def _goodbye_timer(self, at: float) -> None:
        await trio.sleep_until(at)
        self.core.goodbye_due()
        await self._perform()

    async def _drain_watch(self) -> None:
        await self.rt.draining.wait()
        self.core.drain_started(self.rt.settings.server.drain_seconds)
        await self._perform()
        await self.rt.drain_expired.wait()
        self.core.drain_expired()
        self._over()

    async def _perform(self) -> None:
        """Carry out the core's sends, in order; a socket found gone is the core's news.
        Each entry is taken just before its write starts, so sends that several tasks
        carry out reach each socket in the order the core asked for them."""
        box, core, ws, up = self._outbox, self.core, self.ws, self._up
        assert up is not None
        while box:
            to_twilio, texts = box.popleft()
            try:
                if to_twilio:
                    await ws.send_texts(texts)
                else:
                    await up.send_texts(texts)
            except Disconnected as gone:
                box.clear()
                if to_twilio:
                    core.twilio_gone(gone)
                else:
                    core.upstream_gone(gone)
        if core.ending is not None:
            self._over()

    def _over(self) -> None:
        """The core has ended the call: stop every task of it."""
        if self._scope is not None:
            self._scope.cancel()

    def _log_end(self, duration: float) -> None:
        core = self.core
        ending = core.ending
        log.info(
            "session end",
            extra={
                "session": self.id,
                "kind": "twilio",
                "client_ip": self.ip,
                "call_sid": core.call_sid,
                "stream_sid": core.stream_sid,
                "model": self.rt.settings.openai.model,
                "duration_s": round(duration, 3),
                "outcome": ending.outcome if ending else None,
                "close_code": ending.client_code if ending else None,
                "close_reason": ending.client_reason if ending else None,
                "messages_up": self.tally.up,
                "messages_down": self.tally.down,
                "bargeins": core.bargeins,
                "tool_calls": len(core.tools_used),
                **core.usage.log_fields(),
            },
        )
