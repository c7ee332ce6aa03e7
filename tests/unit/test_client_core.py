"""relay.sessions.client_core on its own: random event sequences, no sockets, no trio."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import orjson
from hypothesis import given, settings
from hypothesis import strategies as st

from relay.sessions.client_core import ClientCore, ClientOut, opening
from relay.ws.errors import Disconnected, UpstreamClosed

LIMIT = 64


@dataclass
class Tally:
    up: int = 0
    down: int = 0


@dataclass
class Wire:
    to_client: list[str | bytes] = field(default_factory=list)
    to_upstream: list[str | bytes] = field(default_factory=list)
    order: list[str] = field(default_factory=list)
    feeding: str = ""  # the side whose message the core is handling


def core() -> tuple[ClientCore, Wire, Tally]:
    wire, tally = Wire(), Tally()

    # The fast path relies on each side's messages going to the other side only.
    def to_client(m: str | bytes) -> None:
        assert wire.feeding == "upstream"
        wire.to_client.append(m)
        wire.order.append("client")

    def to_upstream(m: str | bytes) -> None:
        assert wire.feeding == "client"
        wire.to_upstream.append(m)
        wire.order.append("up")

    return ClientCore(LIMIT, ClientOut(to_client, to_upstream), tally), wire, tally


messages = st.one_of(
    st.text(max_size=40), st.binary(max_size=80), st.text(min_size=17, max_size=70)
)
events = st.lists(
    st.one_of(
        st.tuples(st.just("client"), messages),
        st.tuples(st.just("upstream"), messages),
        st.tuples(
            st.just("end"),
            st.sampled_from(["client_gone", "upstream_gone", "drain", "time", "lost"]),
        ),
    ),
    max_size=60,
)


def size(m: str | bytes) -> int:
    return len(m.encode() if isinstance(m, str) else m)


@settings(max_examples=400, deadline=None)
@given(events)
def test_relayed_unchanged_in_order_until_the_end_and_nothing_after(evs: list[Any]) -> None:
    c, wire, tally = core()
    want_up: list[str | bytes] = []
    want_down: list[str | bytes] = []
    for kind, arg in evs:
        over = c.ending is not None
        if kind == "client":
            if not over and size(arg) <= LIMIT:
                want_up.append(arg)
            wire.feeding = "client"
            c.client(arg)
            if not over and size(arg) > LIMIT:
                assert c.ending is not None and c.ending.client_code == 1009
                assert c.ending.upstream_code == 1000
        elif kind == "upstream":
            if not over:
                want_down.append(arg)
            wire.feeding = "upstream"
            c.upstream(arg)
        elif arg == "client_gone":
            c.client_gone(Disconnected(1000, ""))
        elif arg == "upstream_gone":
            c.upstream_gone(UpstreamClosed(4000, "app"))
        elif arg == "drain":
            c.drain_expired()
        elif arg == "time":
            c.time_limit()
        else:
            c.client_lost()
    assert wire.to_upstream == want_up
    assert wire.to_client == want_down
    assert (tally.up, tally.down) == (len(want_up), len(want_down))


@settings(max_examples=200, deadline=None)
@given(st.sampled_from(["client_gone", "upstream_gone", "drain", "time"]), events)
def test_the_first_ending_wins(first: str, evs: list[Any]) -> None:
    c, _, _ = core()
    {
        "client_gone": lambda: c.client_gone(Disconnected(1009, "", local=True)),
        "upstream_gone": lambda: c.upstream_gone(UpstreamClosed(1006, "lost")),
        "drain": c.drain_expired,
        "time": c.time_limit,
    }[first]()
    ending = c.ending
    for kind, arg in evs:
        if kind == "client":
            c.client(arg)
        elif kind == "upstream":
            c.upstream(arg)
        else:
            c.time_limit()
    assert c.ending is ending


def test_endings_carry_the_contracts_close_codes() -> None:
    cases: list[tuple[Callable[[ClientCore], None], tuple[str, int | None, int | None]]] = [
        (lambda c: c.client_gone(Disconnected(1009, "", local=True)), ("oversize", 1009, 1000)),
        (
            lambda c: c.client_gone(Disconnected(1006, "", stalled=True)),
            ("client_stalled", None, 1000),
        ),
        (lambda c: c.client_gone(Disconnected(1001, "")), ("client_closed", None, 1000)),
        (lambda c: c.upstream_gone(UpstreamClosed(1006, "")), ("upstream_failed", 1011, None)),
        (lambda c: c.upstream_gone(UpstreamClosed(4001, "x")), ("upstream_closed", 4001, None)),
        (lambda c: c.upstream_gone(UpstreamClosed(1009, "", local=True)), ("oversize", 1009, 1000)),
        (lambda c: c.drain_expired(), ("drain", 1001, 1001)),
        (lambda c: c.time_limit(), ("time_limit", 1000, 1000)),
    ]
    for act, (outcome, client_code, upstream_code) in cases:
        c, _, _ = core()
        act(c)
        assert c.ending is not None
        assert (c.ending.outcome, c.ending.client_code, c.ending.upstream_code) == (
            outcome,
            client_code,
            upstream_code,
        )


def test_opening_sets_the_voice_asked_for_and_nothing_else() -> None:
    assert opening("ga", None) is None
    assert orjson.loads(opening("beta", "ash") or b"") == {
        "type": "session.update",
        "session": {"voice": "ash"},
    }
