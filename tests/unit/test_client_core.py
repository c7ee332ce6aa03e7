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
from tests.core_wire import Tally

LIMIT = 64


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


# -- token usage from response.done (docs/contract.md §9, §11) ----------------------


def done(usage: object, **more: object) -> str:
    return orjson.dumps({"type": "response.done", "response": {"usage": usage}, **more}).decode()


USAGE = {
    "total_tokens": 60,
    "input_tokens": 40,
    "output_tokens": 20,
    "input_token_details": {"text_tokens": 10, "audio_tokens": 30, "cached_tokens": 5},
    "output_token_details": {"text_tokens": 4, "audio_tokens": 16},
}


def counting() -> tuple[ClientCore, Wire, list[tuple[int, int, int, int] | None]]:
    wire = Wire(feeding="upstream")
    added: list[tuple[int, int, int, int] | None] = []
    c = ClientCore(LIMIT, ClientOut(wire.to_client.append, wire.to_upstream.append), Tally())
    c.on_usage = added.append
    return c, wire, added


def test_usage_of_every_response_done_is_summed_and_reported_each_time() -> None:
    c, wire, added = counting()
    first, second = done(USAGE), done({"input_tokens": 7, "output_tokens": 3})
    c.upstream(first)
    c.upstream('{"type":"response.output_audio.delta","delta":"AAAA"}')
    c.upstream(second)
    # Relayed exactly as they came: counting reads, it never rewrites.
    assert wire.to_client == [
        first,
        '{"type":"response.output_audio.delta","delta":"AAAA"}',
        second,
    ]
    assert added == [(10, 30, 4, 16), (7, 0, 3, 0)]
    assert c.usage.log_fields() == {"tokens_in": 47, "tokens_out": 23}


def test_key_order_and_whitespace_do_not_matter() -> None:
    c, _, added = counting()
    # "type" last, after the response (nothing in the protocol fixes the order).
    c.upstream(
        '{"response": {"usage": {"input_tokens": 5, "output_tokens": 2}},'
        '\n "type" : "response.done"}'
    )
    assert added == [(5, 0, 2, 0)]


def test_messages_that_only_mention_response_done_are_not_counted() -> None:
    c, wire, added = counting()
    sneaky: list[str | bytes] = [
        # A transcript quoting it (quotes are escaped inside a JSON string).
        orjson.dumps(
            {
                "type": "response.output_audio_transcript.done",
                "transcript": 'say "response.done" with usage {"input_tokens": 999}',
            }
        ).decode(),
        # As a key: the marker matches, the parse says it is something else.
        orjson.dumps(
            {
                "type": "session.updated",
                "session": {"tools": [{"parameters": {"response.done": {"usage": USAGE}}}]},
                "response": {"usage": USAGE},
            }
        ).decode(),
        # As a nested type.
        orjson.dumps(
            {"type": "x", "item": {"type": "response.done", "response": {"usage": USAGE}}}
        ).decode(),
        # Not JSON, or not an object.
        '"response.done" {"usage":',
        '["response.done", {"response": {"usage": {"input_tokens": 1}}}]',
        '"response.done"',
        "[" * 5000 + '"response.done"' + "]" * 5000,  # deeper than the parser goes
        # Binary: Realtime events are text.
        done(USAGE).encode(),
    ]
    for message in sneaky:
        c.upstream(message)
    assert wire.to_client == sneaky
    assert added == []
    assert c.usage.log_fields() == {"tokens_in": 0, "tokens_out": 0}


def test_response_done_without_usable_usage() -> None:
    c, wire, added = counting()
    usage: object
    for usage in (
        None,
        "lots",
        [],
        {"input_tokens": -5, "output_tokens": True},
        {"input_tokens": 10**12},
    ):
        c.upstream(done(usage))
    c.upstream('{"type":"response.done"}')
    c.upstream('{"type":"response.done","response":null}')
    assert len(wire.to_client) == 7
    # A usage object counts what is well formed in it (nothing, here) and no more.
    assert all(a == (0, 0, 0, 0) for a in added)
    assert c.usage.log_fields() == {"tokens_in": 0, "tokens_out": 0}


def test_nothing_is_counted_after_the_end_or_from_the_client() -> None:
    added: list[tuple[int, int, int, int] | None] = []
    wire = Wire(feeding="client")
    c = ClientCore(1000, ClientOut(wire.to_client.append, wire.to_upstream.append), Tally())
    c.on_usage = added.append
    c.client(done(USAGE))  # the client's messages are never read
    assert wire.to_upstream == [done(USAGE)]
    c.time_limit()
    c.upstream(done(USAGE))
    assert added == []


def test_without_a_hook_the_core_still_sums() -> None:
    c = ClientCore(LIMIT, ClientOut(lambda m: None, lambda m: None), Tally())
    c.upstream(done(USAGE))
    assert c.usage.event_fields()["input_audio_tokens"] == 30


@settings(max_examples=200, deadline=None)
@given(
    st.lists(
        st.one_of(
            st.tuples(st.just("done"), st.integers(0, 10**6), st.integers(0, 10**6)),
            st.tuples(st.just("other"), st.text(max_size=40), st.just(0)),
        ),
        max_size=30,
    )
)
def test_the_sum_is_the_sum_of_the_response_dones(evs: list[tuple[str, Any, int]]) -> None:
    c, wire, added = counting()
    want_in = want_out = 0
    for kind, a, b in evs:
        if kind == "done":
            c.upstream(done({"input_tokens": a, "output_tokens": b}))
            want_in, want_out = want_in + a, want_out + b
        else:
            c.upstream(orjson.dumps({"type": "conversation.item.created", "text": a}).decode())
    assert c.usage.log_fields() == {"tokens_in": want_in, "tokens_out": want_out}
    counted = [x for x in added if x is not None]
    assert len(counted) == len(added)  # only real usage is reported
    assert sum(x[0] for x in counted) == want_in and sum(x[2] for x in counted) == want_out
    assert len(wire.to_client) == len(evs)
