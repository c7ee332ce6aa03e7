"""Phone calls that act, in the call's core (docs/contract.md §11): tools offered
and answered, end_call and transfer_call, key presses, transcript and usage.

No sockets and no trio: the test plays the driver, carrying out the core's asks
(HTTP tools, transfers, task lookups, timers) when it chooses, so every order of
events (a tool answer before or after its response.done, a barge-in while a tool
runs, an end_call during a barge-in) is reachable.
"""

from __future__ import annotations

import base64
from dataclasses import dataclass, field
from typing import Any

import orjson
from hypothesis import given, settings
from hypothesis import strategies as st

from relay.config import CallsSettings, HttpToolSettings, LimitSettings, OpenAISettings, Settings
from relay.sessions.call_tools import Ask, LookupTask, RunTool, Transfer, Wake
from relay.sessions.twilio_core import TwilioCore
from tests.core_wire import Tally, Wire

SID = "MZ00000000000000000000000000000000"
CALL = "CA00000000000000000000000000000000"
LOOKUP = HttpToolSettings(
    name="lookup_order",
    url="http://127.0.0.1:9/tools",
    description="Look up an order",
    parameters={
        "type": "object",
        "properties": {"order": {"type": "string"}},
        "required": ["order"],
    },
)


@dataclass
class Driver(Wire):
    """What the core sent, and the asks it made, in order."""

    asks: list[Ask] = field(default_factory=list)
    tools: list[tuple[str, bool]] = field(default_factory=list)

    def outputs(self) -> dict[str, list[dict[str, Any]]]:
        """Function call outputs by call_id (each a list, to see duplicates)."""
        found: dict[str, list[dict[str, Any]]] = {}
        for e in self.up("conversation.item.create"):
            item = e["item"]
            if item["type"] == "function_call_output":
                found.setdefault(item["call_id"], []).append(orjson.loads(item["output"]))
        return found

    def take(self, kind: type[Any]) -> list[Any]:
        mine = [a for a in self.asks if isinstance(a, kind)]
        self.asks = [a for a in self.asks if not isinstance(a, kind)]
        return mine


def settings_with(dialect: str = "ga", goodbye: float = 15.0, **calls: Any) -> Settings:
    return Settings(
        openai=OpenAISettings(dialect=dialect),  # type: ignore[arg-type]
        limits=LimitSettings(goodbye_seconds=goodbye),
        calls=CallsSettings(**calls),
    )


def make(
    s: Settings | None = None, *, direction: str = "inbound", amd: str = ""
) -> tuple[TwilioCore, Driver]:
    d = Driver()
    c = TwilioCore(s or settings_with(), d.out(), Tally())
    c.ask = lambda ask: d.asks.append(ask)
    c.on_tool = lambda name, ok: d.tools.append((name, ok))
    params = {"direction": direction, "from": "+14155550100", "to": "+14155550199"}
    if amd:
        params["amd"] = amd
    c.twilio(
        orjson.dumps(
            {
                "event": "start",
                "streamSid": SID,
                "start": {"streamSid": SID, "callSid": CALL, "customParameters": params},
            }
        ),
        0,
    )
    return c, d


def up(c: TwilioCore, now: float = 0, **event: Any) -> None:
    c.upstream(orjson.dumps(event), now)


def fn_call(
    c: TwilioCore, call_id: str, name: str, args: Any, response: str = "r1", now: float = 0
) -> None:
    text = args if isinstance(args, str) else orjson.dumps(args).decode()
    up(
        c,
        now,
        type="response.function_call_arguments.done",
        call_id=call_id,
        name=name,
        arguments=text,
        response_id=response,
        item_id=f"it_{call_id}",
        output_index=0,
    )


def fn_item(c: TwilioCore, call_id: str, name: str, args: Any, response: str = "r1") -> None:
    up(
        c,
        type="response.output_item.done",
        response_id=response,
        output_index=0,
        item={
            "type": "function_call",
            "id": f"it_{call_id}",
            "call_id": call_id,
            "name": name,
            "arguments": orjson.dumps(args).decode(),
        },
    )


def done(c: TwilioCore, response: str = "r1", now: float = 0, usage: Any = None) -> None:
    body: dict[str, Any] = {"id": response, "status": "completed"}
    if usage is not None:
        body["usage"] = usage
    up(c, now, type="response.done", response=body)


def created(c: TwilioCore, response: str = "r1") -> None:
    up(c, type="response.created", response={"id": response})


def delta(c: TwilioCore, item: str, nbytes: int, now: float = 0) -> None:
    up(
        c,
        now,
        type="response.output_audio.delta",
        item_id=item,
        delta=base64.b64encode(b"\xff" * nbytes).decode(),
    )


def mark_all(c: TwilioCore, d: Driver, now: float) -> None:
    for m in d.twilio("mark"):
        c.twilio(orjson.dumps({"event": "mark", "mark": {"name": m["mark"]["name"]}}), now)


def dtmf(c: TwilioCore, digit: str, now: float) -> None:
    c.twilio(
        orjson.dumps({"event": "dtmf", "dtmf": {"track": "inbound_track", "digit": digit}}), now
    )


def wake_all(c: TwilioCore, d: Driver, now: float) -> None:
    for w in d.take(Wake):
        if w.at_ms <= now:
            c.wake(w.at_ms, now)
        else:
            d.asks.append(w)


# -- what the call is offered --------------------------------------------------


def test_default_offers_end_call_only_and_transcription_ga() -> None:
    _, d = make()
    session = d.up("session.update")[0]["session"]
    assert [t["name"] for t in session["tools"]] == ["end_call"]
    assert session["tool_choice"] == "auto"
    assert session["audio"]["input"]["transcription"] == {"model": "gpt-4o-mini-transcribe"}
    assert "input_audio_transcription" not in session


def test_beta_transcription_and_tools_shape() -> None:
    s = settings_with("beta", transfer_targets={"desk": "+14155550100"}, http_tools=(LOOKUP,))
    _, d = make(s)
    session = d.up("session.update")[0]["session"]
    assert session["input_audio_transcription"] == {"model": "gpt-4o-mini-transcribe"}
    tools = {t["name"]: t for t in session["tools"]}
    assert set(tools) == {"end_call", "transfer_call", "lookup_order"}
    assert tools["transfer_call"]["parameters"]["properties"]["target"]["enum"] == ["desk"]
    assert tools["lookup_order"]["parameters"] == dict(LOOKUP.parameters)
    assert all(t["type"] == "function" for t in tools.values())


def test_nothing_configured_offers_nothing() -> None:
    _, d = make(settings_with(tools=(), transcripts=False))
    session = d.up("session.update")[0]["session"]
    assert "tools" not in session and "tool_choice" not in session
    assert "transcription" not in session["audio"]["input"]


def test_transfer_without_targets_is_not_offered() -> None:
    _, d = make(settings_with(tools=("transfer_call",)))
    assert "tools" not in d.up("session.update")[0]["session"]


# -- answering tools -------------------------------------------------------------


def test_http_tool_answer_after_done_then_one_response_create() -> None:
    c, d = make(settings_with(http_tools=(LOOKUP,)))
    creates = len(d.up("response.create"))
    created(c)
    fn_call(c, "c1", "lookup_order", {"order": "42"})
    fn_item(c, "c1", "lookup_order", {"order": "42"})  # the same call announced twice
    done(c)
    [run] = d.take(RunTool)
    assert run.arguments == {"order": "42"} and run.tool is LOOKUP
    assert len(d.up("response.create")) == creates  # nothing before the answer
    c.tool_answered("c1", True, '{"status": "shipped"}')
    assert d.outputs() == {"c1": [{"status": "shipped"}]}
    assert len(d.up("response.create")) == creates + 1
    assert d.tools == [("lookup_order", True)]


def test_http_tool_answer_before_done_waits_for_done() -> None:
    c, d = make(settings_with(http_tools=(LOOKUP,)))
    creates = len(d.up("response.create"))
    created(c)
    fn_item(c, "c1", "lookup_order", {"order": "42"})
    d.take(RunTool)
    c.tool_answered("c1", True, '{"ok": true}')
    assert d.outputs() == {"c1": [{"ok": True}]}
    assert len(d.up("response.create")) == creates
    done(c)
    assert len(d.up("response.create")) == creates + 1


def test_several_calls_in_one_response_one_response_create() -> None:
    c, d = make(settings_with(http_tools=(LOOKUP,)))
    creates = len(d.up("response.create"))
    created(c)
    for i in range(3):
        fn_call(c, f"c{i}", "lookup_order", {"order": str(i)})
    fn_call(c, "bad", "lookup_order", {"order": 7})  # wrong type: answered at once
    done(c)
    assert d.outputs()["bad"][0]["ok"] is False
    runs = d.take(RunTool)
    assert len(runs) == 3
    for run in reversed(runs):
        assert len(d.up("response.create")) == creates
        c.tool_answered(run.call_id, False, '{"ok": false, "error": "tool timed out after 5 s"}')
    assert len(d.up("response.create")) == creates + 1
    assert sorted(d.outputs()) == ["bad", "c0", "c1", "c2"]


def test_unknown_tool_and_bad_arguments_get_errors() -> None:
    c, d = make(settings_with(http_tools=(LOOKUP,)))
    created(c)
    fn_call(c, "u", "rm_rf", {})
    fn_call(c, "j", "lookup_order", "{not json")
    fn_call(c, "a", "lookup_order", [1, 2])
    fn_call(c, "m", "lookup_order", {})
    done(c)
    out = d.outputs()
    assert out["u"][0] == {"ok": False, "error": "unknown tool 'rm_rf'"}
    assert out["j"][0]["ok"] is False and "object" in out["j"][0]["error"]
    assert out["a"][0]["ok"] is False
    assert out["m"][0] == {"ok": False, "error": '"order" is required'}
    assert not d.take(RunTool)
    assert ("unknown", False) in d.tools


def test_barge_in_while_tool_runs_audio_flows_and_followup_waits() -> None:
    c, d = make(settings_with(http_tools=(LOOKUP,)))
    created(c, "r1")
    delta(c, "item1", 1600, now=0)
    fn_call(c, "c1", "lookup_order", {"order": "1"}, now=10)
    done(c, "r1", now=10)
    # The caller speaks over the answer: clear + truncate, caller audio still goes up.
    up(c, 50, type="input_audio_buffer.speech_started")
    assert len(d.twilio("clear")) == 1 and len(d.up("conversation.item.truncate")) == 1
    c.twilio(
        orjson.dumps(
            {"event": "media", "media": {"payload": base64.b64encode(b"\x00" * 160).decode()}}
        ),
        60,
    )
    c.flush()
    assert d.up("input_audio_buffer.append")
    created(c, "r2")  # server VAD answers the caller
    creates = len(d.up("response.create"))
    c.tool_answered("c1", True, '{"found": true}')
    assert len(d.up("response.create")) == creates  # r2 is active: wait for it
    done(c, "r2")
    assert len(d.up("response.create")) == creates + 1


# -- end_call and transfer_call -------------------------------------------------------


def test_end_call_waits_for_played_audio_then_ends() -> None:
    c, d = make()
    creates = len(d.up("response.create"))
    created(c)
    delta(c, "item1", 800, now=0)
    fn_call(c, "e1", "end_call", {"reason": "done"}, now=5)
    assert d.outputs() == {"e1": [{"ok": True}]}
    done(c, now=6)
    assert c.ending is None  # the goodbye has not played yet
    mark_all(c, d, 100)
    assert c.ending is not None and c.ending.outcome == "assistant_ended"
    assert (c.ending.client_code, c.ending.upstream_code) == (1000, 1000)
    assert c.hangup_requested
    assert len(d.up("response.create")) == creates  # never after end_call
    report = c.report(1000.0, 1010.0)
    assert report is not None and report.outcome == "assistant_ended"
    assert report.tools == [("end_call", True)]


def test_end_call_deadline_when_marks_never_come() -> None:
    c, d = make(settings_with(goodbye=2.0))
    created(c)
    delta(c, "item1", 800, now=0)
    fn_call(c, "e1", "end_call", {}, now=0)
    done(c, now=1)
    [wake] = d.take(Wake)
    assert wake.at_ms == 2000
    c.wake(wake.at_ms, 2000)
    assert c.ending is not None and c.ending.outcome == "assistant_ended"


def test_end_call_during_barge_in() -> None:
    c, d = make()
    created(c)
    delta(c, "item1", 8000, now=0)
    fn_call(c, "e1", "end_call", {}, now=10)
    done(c, now=10)
    up(c, 100, type="input_audio_buffer.speech_started")
    # The clear dropped the unplayed goodbye: nothing is owed, the call ends now.
    assert len(d.twilio("clear")) == 1
    assert c.ending is not None and c.ending.outcome == "assistant_ended"


def test_transfer_success_redirects_and_ends() -> None:
    c, d = make(settings_with(transfer_targets={"desk": "+14155550100"}))
    creates = len(d.up("response.create"))
    created(c)
    delta(c, "item1", 800, now=0)
    fn_call(c, "t1", "transfer_call", {"target": "desk"}, now=5)
    done(c, now=5)
    assert not d.take(Transfer)  # the audio is still owed
    mark_all(c, d, 200)
    [transfer] = d.take(Transfer)
    assert transfer.number == "+14155550100"
    assert c.ending is None
    c.transfer_answered(True, None, 300)
    assert d.outputs() == {"t1": [{"ok": True}]}
    assert c.ending is not None and c.ending.outcome == "transferred"
    assert len(d.up("response.create")) == creates
    report = c.report(0, 1)
    assert report is not None and report.transfer_target == "desk"
    assert report.outcome == "transferred"


def test_transfer_failure_goes_on() -> None:
    c, d = make(settings_with(transfer_targets={"desk": "+14155550100"}))
    creates = len(d.up("response.create"))
    created(c)
    fn_call(c, "t1", "transfer_call", {"target": "desk"})
    done(c)
    assert len(d.take(Transfer)) == 1
    c.transfer_answered(False, "Twilio refused the call update (HTTP 404)", 10)
    assert d.outputs() == {
        "t1": [{"ok": False, "error": "Twilio refused the call update (HTTP 404)"}]
    }
    assert c.ending is None
    assert len(d.up("response.create")) == creates + 1
    assert d.tools == [("transfer_call", False)]


def test_transfer_to_a_made_up_target_is_refused() -> None:
    c, d = make(settings_with(transfer_targets={"desk": "+14155550100"}))
    created(c)
    fn_call(c, "t1", "transfer_call", {"target": "+19005551234"})
    done(c)
    assert d.outputs()["t1"][0]["ok"] is False
    assert not d.take(Transfer)


# -- key presses --------------------------------------------------------------------


def test_dtmf_burst_is_one_message_and_one_response() -> None:
    c, d = make()
    creates = len(d.up("response.create"))
    for i, digit in enumerate("123"):
        dtmf(c, digit, i * 300.0)
    dtmf(c, "x", 700)  # not a key: ignored
    wake_all(c, d, 1000)  # too early: 600 + 1500
    assert not [e for e in d.up("conversation.item.create") if e["item"]["type"] == "message"]
    wake_all(c, d, 2100)
    wake_all(c, d, 2100)
    messages = [
        e["item"] for e in d.up("conversation.item.create") if e["item"]["type"] == "message"
    ]
    assert messages == [
        {
            "type": "message",
            "role": "user",
            "content": [{"type": "input_text", "text": "The caller pressed 1 2 3."}],
        }
    ]
    assert len(d.up("response.create")) == creates + 1
    dtmf(c, "#", 5000)
    wake_all(c, d, 6600)
    assert len([e for e in d.up("conversation.item.create") if e["item"]["type"] == "message"]) == 2


def test_dtmf_off_ignores_keys() -> None:
    c, d = make(settings_with(dtmf=False))
    dtmf(c, "1", 0)
    assert not d.take(Wake)


@settings(max_examples=60, deadline=None)
@given(st.lists(st.tuples(st.sampled_from("0123456789*#"), st.integers(0, 3000)), max_size=90))
def test_dtmf_bursts_split_by_gaps(presses: list[tuple[str, int]]) -> None:
    c, d = make()
    now = 0.0
    expected: list[list[str]] = []
    last = None
    for digit, gap in presses:
        now += gap
        wake_all(c, d, now)
        if last is None or now - last >= 1500:
            expected.append([])
        if len(expected[-1]) < 64:
            expected[-1].append(digit)
        last = now
        dtmf(c, digit, now)
    wake_all(c, d, now + 1500)
    texts = [
        e["item"]["content"][0]["text"]
        for e in d.up("conversation.item.create")
        if e["item"]["type"] == "message"
    ]
    assert texts == [f"The caller pressed {' '.join(b)}." for b in expected]


# -- transcript, usage, task ---------------------------------------------------------


def test_transcript_in_order_and_bounded() -> None:
    c, _ = make()
    up(
        c,
        type="conversation.item.input_audio_transcription.completed",
        item_id="i",
        content_index=0,
        transcript="Hi there",
    )
    up(
        c,
        type="response.output_audio_transcript.done",
        item_id="a",
        transcript="Hello! How can I help?",
    )
    for i in range(200):
        up(
            c,
            type="response.output_audio_transcript.done",
            item_id="a",
            transcript=f"{i:04d}" + "x" * 1000,
        )
    assert c.transcript is not None
    turns = c.transcript.turns()
    assert sum(len(t.encode()) for _, t in turns) <= 64 * 1024
    assert turns[-1][1].startswith("0199") and turns[0][1] != "Hi there"


def test_usage_sums_every_response_done() -> None:
    c, _ = make()
    usage = {
        "total_tokens": 30,
        "input_tokens": 20,
        "output_tokens": 10,
        "input_token_details": {"text_tokens": 5, "audio_tokens": 15},
        "output_token_details": {"text_tokens": 4, "audio_tokens": 6},
    }
    done(c, "a", usage=usage)
    done(c, "b", usage=usage)
    done(c, "c", usage={"input_tokens": "many"})
    assert c.usage.event_fields() == {
        "input_tokens": 40,
        "output_tokens": 20,
        "input_audio_tokens": 30,
        "output_audio_tokens": 12,
    }


def test_task_call_waits_for_lookup_and_carries_the_task() -> None:
    c, d = make(settings_with(tools=(), transcripts=False), direction="outbound-api")
    assert not d.up("session.update")
    [lookup] = d.take(LookupTask)
    assert lookup.call_sid == CALL
    c.task_found("ask whether Tuesday at 3 works")
    session = d.up("session.update")[0]["session"]
    assert "ask whether Tuesday at 3 works" in session["instructions"]
    assert [t["name"] for t in session["tools"]] == ["end_call"]
    assert session["audio"]["input"]["transcription"]["model"]
    assert len(d.up("response.create")) == 1


def test_outbound_without_task_starts_as_before() -> None:
    c, d = make(direction="outbound-api")
    c.task_found(None)
    session = d.up("session.update")[0]["session"]
    assert "task" not in session["instructions"]


# -- every call answered exactly once, whatever the order --------------------------------

STEP = st.one_of(
    st.tuples(st.just("call"), st.integers(0, 5), st.integers(0, 2)),  # call i in response r
    st.tuples(st.just("item"), st.integers(0, 5), st.integers(0, 2)),
    st.tuples(st.just("done"), st.integers(0, 2), st.just(0)),
    st.tuples(st.just("answer"), st.integers(0, 5), st.just(0)),
)


@settings(max_examples=200, deadline=None)
@given(st.lists(STEP, max_size=40))
def test_each_call_answered_once_and_followups_counted(steps: list[tuple[str, int, int]]) -> None:
    c, d = make(settings_with(http_tools=(LOOKUP,)))
    base = len(d.up("response.create"))
    response_of: dict[int, int] = {}
    finished: set[int] = set()
    for kind, a, b in steps:
        if kind in ("call", "item"):
            if a not in response_of and b in finished:
                continue  # a call cannot belong to a response already done
            response_of.setdefault(a, b)
            announce = fn_call if kind == "call" else fn_item
            announce(c, f"c{a}", "lookup_order", {"order": str(a)}, f"r{response_of[a]}")
        elif kind == "done" and a not in finished:
            finished.add(a)
            done(c, f"r{a}")
        elif kind == "answer":
            for run in d.take(RunTool):
                if run.call_id == f"c{a}":
                    c.tool_answered(run.call_id, True, f'{{"n": {a}}}')
                else:
                    d.asks.append(run)
    for run in d.take(RunTool):
        c.tool_answered(run.call_id, True, "{}")
    for r in range(3):
        if r not in finished:
            finished.add(r)
            done(c, f"r{r}")
    outputs = d.outputs()
    assert sorted(outputs) == sorted(f"c{a}" for a in response_of)
    assert all(len(v) == 1 for v in outputs.values())
    with_calls = {response_of[a] for a in response_of}
    assert len(d.up("response.create")) == base + len(with_calls)


def test_audio_during_task_lookup_goes_up_after_the_update() -> None:
    c, d = make(direction="outbound-api")
    frames = [bytes([i]) * 160 for i in range(3)]
    for f in frames:
        c.twilio(
            orjson.dumps({"event": "media", "media": {"payload": base64.b64encode(f).decode()}}), 1
        )
    c.flush()
    assert not d.sent  # nothing up before the session.update
    c.task_found(None)
    kinds = [e["type"] for side, e in d.sent if side == "up"]
    assert kinds == ["session.update", "response.create", "input_audio_buffer.append"]
    audio = base64.b64decode(d.up("input_audio_buffer.append")[0]["audio"])
    assert audio == b"".join(frames)


def test_voicemail_task_call_never_sends_held_audio() -> None:
    c, d = make(direction="outbound-api", amd="machine_end_beep")
    c.twilio(
        orjson.dumps(
            {"event": "media", "media": {"payload": base64.b64encode(b"\x01" * 160).decode()}}
        ),
        1,
    )
    c.task_found("ask about Tuesday")
    assert not d.up("input_audio_buffer.append")
    assert "ask about Tuesday" in d.up("session.update")[0]["session"]["instructions"]


def test_dtmf_flood_sends_nothing_until_it_pauses() -> None:
    c, d = make()
    for i in range(5000):
        dtmf(c, "9", i * 10.0)
        wake_all(c, d, i * 10.0)
    assert not d.up("conversation.item.create")
    assert len(d.asks) <= 1  # one timer, however many keys
    wake_all(c, d, 5000 * 10.0 + 1500)
    [message] = d.up("conversation.item.create")
    assert message["item"]["content"][0]["text"] == "The caller pressed " + " ".join("9" * 64) + "."


def test_report_outcomes_for_drain_goodbye_and_time_limit() -> None:
    for draining, outcome in ((True, "draining"), (False, "time_limit")):
        c, _ = make()
        if draining:
            c.drain_started(10)
        else:
            c.goodbye_due()
        created(c, "bye")
        done(c, "bye")
        assert c.ending is not None and c.ending.outcome == "goodbye"
        report = c.report(0, 1)
        assert report is not None and report.outcome == outcome
        assert report.caller == "+14155550100" and report.callee == "+14155550199"
        assert report.direction == "inbound" and report.answered_by is None
