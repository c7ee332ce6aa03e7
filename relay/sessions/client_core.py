"""One browser session's behaviour, sans I/O: a client ⇄ OpenAI Realtime.

Decided here, once: every message relayed unchanged and in order both ways, the
client's message-size limit, and every ending with the close code each side
gets (docs/contract.md §5). No trio, no sockets: events come in as method calls
(a message from either side, a socket that is gone, the drain, the time limit),
sends go out through :class:`ClientOut`, and :attr:`ClientCore.ending` says how
to close. The drivers in ``relay.sessions.client_session`` (the reactor's fast
path and the pumps) only feed it and carry out what it asks.

Guarantees (tests/unit/test_client_core.py): messages go on byte-identical and in
order; a client message over the limit ends the session 1009 and is not sent;
once :attr:`ClientCore.ending` is set, nothing more is sent; the token usage of
every ``response.done`` relayed to the client is summed (docs/contract.md §9, §11).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Protocol

import orjson

from relay.calls.usage import Usage
from relay.sessions.closing import Ending, client_code_for_upstream
from relay.sessions.dialect import dialect_for, voice_update
from relay.sessions.response_done import may_be_response_done, response_usage
from relay.ws.errors import Disconnected


class Send(Protocol):
    def __call__(self, message: str | bytes, /) -> None: ...


class Counts(Protocol):
    """Messages relayed each way (``relay.ops.metrics.Tally``)."""

    up: int
    down: int


class ClientOut:
    """Where the core's sends go; each driver has one (plain attributes holding
    the driver's callables: a send is one call)."""

    __slots__ = ("to_client", "to_upstream")

    def __init__(self, to_client: Send, to_upstream: Send) -> None:
        self.to_client = to_client
        self.to_upstream = to_upstream


def opening(dialect: str, voice: str | None) -> bytes | None:
    """What goes upstream before the client is accepted: the voice it asked for
    (a ``session.update``), or nothing."""
    if voice is None:
        return None
    return orjson.dumps(voice_update(dialect_for(dialect), voice))


def too_big(message: str | bytes, limit: int) -> bool:
    """For client messages: over ASGI (an upgrade on a keep-alive connection)
    Hypercorn limits text in characters, not UTF-8 bytes, so the session checks."""
    if isinstance(message, bytes):
        return len(message) > limit
    # A str of n chars is between n and 4n UTF-8 bytes: encode only when it matters.
    if len(message) * 4 <= limit:
        return False
    return len(message) > limit or len(message.encode("utf-8")) > limit


def client_gone(gone: Disconnected) -> Ending:
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


def upstream_gone(closed: Disconnected) -> Ending:
    if closed.stalled:
        return Ending("upstream_stalled", 1011, "upstream stalled", None)
    if closed.local:  # the upstream broke the rules; oversize → 1009 / 1000
        if closed.code == 1009:
            return Ending("oversize", 1009, "message too big", 1000)
        return Ending("upstream_failed", 1011, "upstream protocol error", closed.code)
    code = closed.code
    failed = code in (1005, 1006)
    text = "" if failed else closed.reason
    outcome = "upstream_failed" if failed else "upstream_closed"
    return Ending(outcome, client_code_for_upstream(code), text, None)


OVERSIZE = Ending("oversize", 1009, "message too big", 1000)
CLIENT_LOST = Ending("client_closed", None, upstream_code=1000)
DRAIN = Ending("drain", 1001, "server shutting down", 1001, "server shutting down")
TIME_LIMIT = Ending("time_limit", 1000, "session time limit", 1000, "session time limit")


class ClientCore:
    """The state of one browser session and its reactions."""

    __slots__ = ("ending", "limit", "on_usage", "out", "tally", "usage")

    def __init__(self, limit: int, out: ClientOut, tally: Counts) -> None:
        self.limit = limit  # max_message_bytes, in UTF-8 bytes
        self.out = out  # the driver swaps it: each driver's sends go its own way
        self.tally = tally
        self.ending: Ending | None = None
        self.usage = Usage()  # summed over the session, for its end log line
        # Each response.done's tokens, for the metric (set by the session).
        self.on_usage: Callable[[tuple[int, int, int, int] | None], None] | None = None

    def client(self, message: str | bytes) -> None:
        """A message from the client: upstream unchanged, unless it is over the limit.
        Sends upstream only."""
        if self.ending is not None:
            return
        if too_big(message, self.limit):
            self.ending = OVERSIZE
            return
        self.out.to_upstream(message)
        self.tally.up += 1

    def upstream(self, message: str | bytes) -> None:
        """A message from OpenAI (the upstream socket has refused any over the limit:
        that arrives as :meth:`upstream_gone` with 1009). Sends to the client only."""
        if self.ending is not None:
            return
        self.out.to_client(message)
        self.tally.down += 1
        # The one kind of message the relay reads (docs/contract.md §9): text, found
        # without parsing the others; after the send, so counting never delays one.
        if isinstance(message, str) and may_be_response_done(message):
            self._count(message)

    def _count(self, message: str) -> None:
        added = self.usage.add(response_usage(message))
        if added is not None and self.on_usage is not None:
            self.on_usage(added)

    def client_gone(self, gone: Disconnected) -> None:
        self._end(client_gone(gone))

    def client_lost(self) -> None:
        """The client's transport failed mid-send without a close (the ASGI path)."""
        self._end(CLIENT_LOST)

    def upstream_gone(self, closed: Disconnected) -> None:
        self._end(upstream_gone(closed))

    def drain_expired(self) -> None:
        self._end(DRAIN)

    def time_limit(self) -> None:
        self._end(TIME_LIMIT)

    def _end(self, ending: Ending) -> None:
        if self.ending is None:
            self.ending = ending
