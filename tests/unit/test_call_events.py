"""``call.ended`` events against real receivers on 127.0.0.1 (docs/contract.md §11
"Call events"): signed, retried with a fresh signature, given up 30 s after the
call's end, counted once, and logged without a secret or a word of the transcript."""

from __future__ import annotations

import email.utils
import json
import logging
import socket
import time

import httpx
import pytest
import trio

from relay.calls.events import deliver_call_event, retry_after
from relay.calls.report import CallReport
from relay.calls.signing import verify
from relay.config import HttpToolSettings, Secrets, parse_settings
from relay.daemon.call_services import CallServices
from relay.daemon.outbound import Outbound
from relay.daemon.state import DaemonState
from relay.ops.metrics import Metrics
from relay.store.memory import MemoryStore
from relay.testing.metrics import sample_value
from relay.testing.scripted_http import Handler, Request, respond, scripted_http

KEY = "event-signing-key-0123456789"
SECRET_WORDS = "my card number is 4111"


def report(ended_ago: float = 0.0, **changes: object) -> CallReport:
    ended = time.time() - ended_ago
    r = CallReport(
        call_sid="CA123",
        stream_sid="MZ456",
        direction="inbound",
        answered_by=None,
        caller="+14155550100",
        callee="+14155550199",
        started_at=ended - 42,
        ended_at=ended,
        outcome="caller_hung_up",
        tools=[("lookup_order", True)],
        transcript=[("caller", SECRET_WORDS), ("assistant", "Thanks, goodbye.")],
    )
    for name, value in changes.items():
        setattr(r, name, value)
    return r


def counted(metrics: Metrics) -> dict[str, float]:
    text = metrics.render().decode()
    return {
        outcome: sample_value(text, "relay_call_events_total", outcome=outcome)
        for outcome in ("sent", "failed")
    }


def statuses(*codes: int) -> Handler:
    """A receiver answering ``codes`` in turn, then the last one for ever."""
    answers = list(codes)

    async def handler(request: Request, stream: trio.SocketStream) -> None:
        code = answers.pop(0) if len(answers) > 1 else answers[0]
        await respond(stream, code, b"{}")

    return handler


async def deliver(url: str, r: CallReport, metrics: Metrics) -> bool:
    async with httpx.AsyncClient(follow_redirects=False) as http:
        return await deliver_call_event(http, url + "/events", KEY, r, metrics)


async def test_delivered_signed_and_counted_once() -> None:
    metrics, r = Metrics(), report()
    with trio.fail_after(10):
        async with scripted_http(statuses(204)) as server:
            assert await deliver(server.url, r, metrics)
    [request] = server.requests
    assert request.method == "POST" and request.target == "/events"
    assert request.headers["content-type"] == "application/json"
    assert json.loads(request.body) == r.event()
    assert verify(request.headers["x-relay-signature"], request.body, KEY)
    assert counted(metrics) == {"sent": 1, "failed": 0}


async def test_retried_with_a_fresh_signature_until_taken() -> None:
    metrics = Metrics()
    with trio.fail_after(20):
        async with scripted_http(statuses(500, 429, 408, 200)) as server:
            start = trio.current_time()
            assert await deliver(server.url, report(), metrics)
            elapsed = trio.current_time() - start
    assert len(server.requests) == 4
    assert len({req.body for req in server.requests}) == 1  # the same event each time
    stamps = []
    for req in server.requests:
        header = req.headers["x-relay-signature"]
        assert verify(header, req.body, KEY)
        stamps.append(int(header.split(",")[0].removeprefix("t=")))
    # Backoff 1 + 2 + 4 s (±20 %): the last attempt is signed at its own time.
    assert 5.5 <= elapsed < 10
    assert stamps == sorted(stamps) and stamps[-1] - stamps[0] >= 5
    assert counted(metrics) == {"sent": 1, "failed": 0}


async def test_given_up_30_s_after_the_call_counted_failed_and_logged_cleanly(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """The call ended 27 s ago: three seconds of retries are left, then one log line."""
    metrics = Metrics()
    caplog.set_level(logging.DEBUG, logger="relay")
    with trio.fail_after(10):
        async with scripted_http(statuses(503)) as server:
            start = trio.current_time()
            assert not await deliver(server.url, report(ended_ago=27), metrics)
            elapsed = trio.current_time() - start
    assert 2.5 <= elapsed < 4.5
    assert 2 <= len(server.requests) <= 3  # at 0 s, ~1 s, ~3 s
    assert counted(metrics) == {"sent": 0, "failed": 1}
    [line] = [rec.getMessage() for rec in caplog.records if "call.ended" in rec.getMessage()]
    assert line.startswith("call.ended event for CA123 not delivered after")
    assert "answered HTTP 503; gave up 30 s after the call's end" in line
    logged = caplog.text
    assert KEY not in logged and SECRET_WORDS not in logged and server.url not in logged


async def test_a_receiver_that_never_answers_is_given_up_on_time() -> None:
    async def silent(request: Request, stream: trio.SocketStream) -> None:
        await trio.sleep_forever()

    metrics = Metrics()
    with trio.fail_after(10):
        async with scripted_http(silent) as server:
            start = trio.current_time()
            assert not await deliver(server.url, report(ended_ago=28), metrics)
            elapsed = trio.current_time() - start
    assert 1.5 <= elapsed < 3
    assert counted(metrics) == {"sent": 0, "failed": 1}


async def test_cut_off_by_the_daemon_stopping_is_still_counted_and_logged(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """The drain's time is up while a receiver is still down: the job is cancelled,
    and the event is counted failed and named in the log all the same."""
    metrics = Metrics()
    caplog.set_level(logging.INFO, logger="relay")
    with trio.fail_after(5):
        async with scripted_http(statuses(502)) as server:
            with trio.move_on_after(0.5) as stopping:
                await deliver(server.url, report(), metrics)
    assert stopping.cancelled_caught
    assert counted(metrics) == {"sent": 0, "failed": 1}
    [line] = [rec.getMessage() for rec in caplog.records if "call.ended" in rec.getMessage()]
    assert line.endswith("answered HTTP 502; cut off: relay is stopping")


async def test_no_attempt_after_the_budget() -> None:
    metrics = Metrics()
    with trio.fail_after(5):
        async with scripted_http(statuses(200)) as server:
            assert not await deliver(server.url, report(ended_ago=31), metrics)
    assert server.requests == []
    assert counted(metrics) == {"sent": 0, "failed": 1}


async def test_connection_refused_is_retried_then_given_up() -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    metrics = Metrics()
    with trio.fail_after(10):
        assert not await deliver(f"http://127.0.0.1:{port}", report(ended_ago=28), metrics)
    assert counted(metrics) == {"sent": 0, "failed": 1}


@pytest.mark.parametrize("status", [400, 401, 404, 410])
async def test_a_refusal_is_not_retried(status: int) -> None:
    metrics = Metrics()
    with trio.fail_after(5):
        async with scripted_http(statuses(status)) as server:
            start = trio.current_time()
            assert not await deliver(server.url, report(), metrics)
            assert trio.current_time() - start < 1
    assert len(server.requests) == 1
    assert counted(metrics) == {"sent": 0, "failed": 1}


async def test_a_redirect_is_not_followed() -> None:
    metrics = Metrics()
    with trio.fail_after(5):
        async with scripted_http(statuses(200)) as elsewhere:

            async def moved(request: Request, stream: trio.SocketStream) -> None:
                await respond(stream, 308, b"", {"Location": elsewhere.url + "/steal"})

            async with scripted_http(moved) as server:
                assert not await deliver(server.url, report(), metrics)
    assert len(server.requests) == 1 and elsewhere.requests == []
    assert counted(metrics) == {"sent": 0, "failed": 1}


async def test_a_huge_answer_is_not_read() -> None:
    """The receiver's body is never read: megabytes of it cost nothing."""

    async def huge(request: Request, stream: trio.SocketStream) -> None:
        await stream.send_all(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n")
        while True:
            await stream.send_all(b"10000\r\n" + b"x" * 0x10000 + b"\r\n")

    metrics = Metrics()
    with trio.fail_after(5):
        async with scripted_http(huge) as server:
            assert await deliver(server.url, report(), metrics)
    assert counted(metrics) == {"sent": 1, "failed": 0}


async def test_transcript_with_a_lone_surrogate_still_goes_out() -> None:
    metrics = Metrics()
    r = report(transcript=[("caller", "half a character: \ud83d")])
    with trio.fail_after(5):
        async with scripted_http(statuses(200)) as server:
            assert await deliver(server.url, r, metrics)
    [request] = server.requests
    assert json.loads(request.body)["transcript"][0]["text"] == "half a character: \ud83d"


def answers(*script: tuple[int, dict[str, str]]) -> Handler:
    """A receiver answering ``(status, headers)`` in turn, then the last for ever."""
    left = list(script)

    async def handler(request: Request, stream: trio.SocketStream) -> None:
        status, headers = left.pop(0) if len(left) > 1 else left[0]
        await respond(stream, status, b"{}", headers)

    return handler


@pytest.mark.parametrize("status", [429, 503])
async def test_retry_after_is_waited_for(status: int) -> None:
    """Backoff alone would come back after ~1 s; the receiver asked for 3."""
    metrics = Metrics()
    with trio.fail_after(10):
        script = answers((status, {"Retry-After": "3"}), (200, {}))
        async with scripted_http(script) as server:
            start = trio.current_time()
            assert await deliver(server.url, report(), metrics)
            elapsed = trio.current_time() - start
    assert len(server.requests) == 2
    assert 3 <= elapsed < 5
    assert counted(metrics) == {"sent": 1, "failed": 0}


def _http_date(unix: float) -> str:
    return email.utils.formatdate(unix, usegmt=True)


@pytest.mark.parametrize(
    "asked", ["3600", "999999999", "far date"], ids=["seconds", "huge", "http-date"]
)
async def test_a_retry_after_past_the_budget_gives_up_at_once(
    asked: str, caplog: pytest.LogCaptureFixture
) -> None:
    """A receiver cannot hold a background job slot for its Retry-After: one past
    the 30 s budget ends the delivery now, counted and logged once."""
    if asked == "far date":
        asked = _http_date(time.time() + 7200)
    metrics = Metrics()
    caplog.set_level(logging.INFO, logger="relay")
    with trio.fail_after(5):
        async with scripted_http(answers((429, {"Retry-After": asked}))) as server:
            start = trio.current_time()
            assert not await deliver(server.url, report(), metrics)
            assert trio.current_time() - start < 1
    assert len(server.requests) == 1
    assert counted(metrics) == {"sent": 0, "failed": 1}
    [line] = [rec.getMessage() for rec in caplog.records if "call.ended" in rec.getMessage()]
    assert "answered HTTP 429; gave up: it asked to wait" in line
    assert "past 30 s after the call's end" in line


@pytest.mark.parametrize(
    "asked",
    ["soon", "-5", "1.5", "9" * 70, "Mon, 99 Foo 2026 00:00:00 GMT", "2026-12-03"],
)
async def test_an_unreadable_retry_after_is_ignored(asked: str) -> None:
    """Junk (or a value only a lenient parser would read) falls back to the backoff."""
    metrics = Metrics()
    with trio.fail_after(10):
        async with scripted_http(answers((503, {"Retry-After": asked}), (200, {}))) as server:
            start = trio.current_time()
            assert await deliver(server.url, report(), metrics)
            assert trio.current_time() - start < 2  # the first backoff, 1 s ±20 %
    assert len(server.requests) == 2


async def test_retry_after_is_heeded_only_on_429_and_503() -> None:
    metrics = Metrics()
    with trio.fail_after(10):
        async with scripted_http(answers((500, {"Retry-After": "3600"}), (200, {}))) as server:
            assert await deliver(server.url, report(), metrics)
    assert len(server.requests) == 2


def test_retry_after_values() -> None:
    now = 1_800_000_000.0
    assert retry_after("7", now) == 7.0
    assert retry_after(" 7 ", now) == 7.0
    assert retry_after(_http_date(now + 20), now) == pytest.approx(20, abs=1)
    assert retry_after(_http_date(now - 20), now) == 0.0  # past: retry now
    assert retry_after("Thu, 03 Dec 2026 12:00:00", now) is None  # no zone
    for junk in (None, "", "x", "-1", "1e3", "0x10", "7" * 10, "a" * 65, "\uff13"):
        assert retry_after(junk, now) is None, junk


async def test_call_services_send_the_event_as_a_background_job() -> None:
    """``CallServices.call_ended`` spawns the delivery in the job nursery the drain waits for;
    without an events_url it sends nothing."""
    with trio.fail_after(10):
        async with scripted_http(statuses(200)) as server:
            settings = parse_settings(
                {"calls": {"events_url": server.url + "/events"}},
                Secrets(events_signing_key=KEY),
            )
            rt = DaemonState(settings, MemoryStore())
            out = Outbound(rt)
            services = CallServices(rt, out)
            async with trio.open_nursery() as jobs:
                rt.attach_jobs(jobs)
                services.call_ended(report())
                assert rt.jobs_in_flight == 1
                await rt.wait_idle()
                rt.attach_jobs(None)
            [event] = server.requests
            assert verify(event.headers["x-relay-signature"], event.body, KEY)
            assert counted(rt.metrics) == {"sent": 1, "failed": 0}
            # The same services answer a call's HTTP tool, signed with the same key.
            tool = HttpToolSettings(name="lookup", url=server.url + "/tools/lookup")
            ok, output = await services.run_http_tool(tool, "call_9", {"a": 1}, "CA1", "MZ1")
            assert (ok, output) == (True, "{}")
            assert verify(
                server.requests[1].headers["x-relay-signature"], server.requests[1].body, KEY
            )
            await out.aclose()

            quiet = DaemonState(parse_settings({}), MemoryStore())
            quiet_out = Outbound(quiet)
            idle = CallServices(quiet, quiet_out)
            async with trio.open_nursery() as jobs:
                quiet.attach_jobs(jobs)
                idle.call_ended(report())
                assert quiet.jobs_in_flight == 0
            await quiet_out.aclose()
            assert len(server.requests) == 2
