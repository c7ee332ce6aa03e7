"""/metrics (docs/contract.md §3, §9) and the logs (§3): names and labels, the allow-list
after proxy resolution, process metrics; JSON-only output, a readable text format, no secret
in any line, and refusal logging that a flood cannot turn into a disk-filler."""

from __future__ import annotations

import base64
import io
import json
import logging
import re
import signal
import subprocess
import sys
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import httpx
import orjson
import pytest
import trio
import trio_websocket
from prometheus_client.parser import text_string_to_metric_families
from twilio.request_validator import RequestValidator

from relay.admission.tokens import mint
from relay.config import decode_encryption_key
from relay.ops.logs import REDACTED, JsonFormatter, JsonLinesStream, Redactor, TextFormatter
from relay.ops.metrics import DIRECTIONS, KINDS, Metrics, ProcessMetrics, Tally
from relay.ops.refusal_log import RefusalLog
from relay.testing.daemon import (
    TEST_OPENAI_KEY,
    TEST_TWILIO_SID,
    TEST_TWILIO_TOKEN,
    Daemon,
    daemon_env,
    running_daemon,
    toml_dumps,
)
from relay.testing.fake_realtime import FakeRealtime, fake_realtime
from relay.testing.twilio_caller import twilio_call
from tests.helpers import ORIGIN, token_for, wait_for_sample

# The daemon's default public_url: what Twilio signatures are computed over.
PUBLIC = "http://localhost:8787"


@asynccontextmanager
async def echo_fake() -> AsyncIterator[FakeRealtime]:
    async with fake_realtime(expected_key=TEST_OPENAI_KEY, echo=True) as fake:
        yield fake


def families(text: str) -> dict[str, Any]:
    return {f.name: f for f in text_string_to_metric_families(text)}


# -- metrics: unit -------------------------------------------------------------------------


def test_message_tallies_count_while_live_and_after_they_retire() -> None:
    m = Metrics()

    def value(kind: str, direction: str) -> float | None:
        labels = {"kind": kind, "direction": direction}
        return m.registry.get_sample_value("relay_messages_total", labels)

    first, second = Tally("client"), Tally("twilio")
    m.track(first)
    m.track(second)
    first.up += 3
    first.down += 1
    second.up += 5
    assert value("client", "upstream") == 3 and value("client", "downstream") == 1
    assert value("twilio", "upstream") == 5 and value("twilio", "downstream") == 0
    m.retire(first)
    m.retire(first)  # twice is once: a count never doubles
    first.up += 100  # a retired tally no longer counts
    assert value("client", "upstream") == 3
    later = Tally("client")
    m.track(later)
    later.up += 2
    assert value("client", "upstream") == 5
    m.retire(later)
    m.retire(second)
    assert value("client", "upstream") == 5 and value("twilio", "upstream") == 5


def test_known_series_exist_before_any_event() -> None:
    got = families(Metrics().render().decode())
    active = {s.labels["kind"]: s.value for s in got["relay_sessions_active"].samples}
    assert active == {"client": 0, "twilio": 0}
    messages = {
        (s.labels["kind"], s.labels["direction"])
        for s in got["relay_messages"].samples
        if s.name == "relay_messages_total"
    }
    assert messages == {(k, d) for k in KINDS for d in DIRECTIONS}


def test_process_metrics_survive_a_hidden_proc_stat(tmp_path: Path) -> None:
    """Under the unit's ProcSubset=pid, /proc/stat does not exist."""
    proc = tmp_path / "proc"
    proc.mkdir()
    (proc / "self").symlink_to("/proc/self")
    from prometheus_client import CollectorRegistry, ProcessCollector, generate_latest

    stock = CollectorRegistry()
    ProcessCollector(proc=str(proc), registry=stock)
    assert b"process_" not in generate_latest(stock)  # what the fallback is for
    ours = CollectorRegistry()
    ProcessMetrics(proc=str(proc), registry=ours)
    got = families(generate_latest(ours).decode())
    start = got["process_start_time_seconds"].samples[0].value
    real = CollectorRegistry()
    ProcessMetrics(registry=real)
    truth = families(generate_latest(real).decode())["process_start_time_seconds"]
    assert abs(start - truth.samples[0].value) < 2
    for name in ("process_resident_memory_bytes", "process_cpu_seconds", "process_open_fds"):
        assert name in got


# -- metrics: end to end -------------------------------------------------------------------


async def scrape(http: httpx.AsyncClient, forwarded_for: str | None = None) -> httpx.Response:
    headers = {"X-Forwarded-For": forwarded_for} if forwarded_for else {}
    return await http.get("/metrics", headers=headers)


async def test_metrics_names_labels_allow_list_and_live_sessions() -> None:
    async with fake_realtime(expected_key=TEST_OPENAI_KEY) as fake:
        config: dict[str, dict[str, Any]] = {
            "server": {"trusted_proxies": ["127.0.0.1/32"]},
            "openai": {"realtime_url": fake.url},
        }
        async with running_daemon(config) as d, httpx.AsyncClient(base_url=d.http_url) as http:
            # The proxy (127.0.0.1, trusted) vouches for the client: its IP decides.
            assert (await scrape(http, "203.0.113.9")).status_code == 403
            assert (await scrape(http, "10.0.0.1, 203.0.113.9")).status_code == 403
            assert (await scrape(http, "127.0.0.1")).status_code == 200
            first = await scrape(http)
            assert first.status_code == 200
            assert first.headers["content-type"].startswith("text/plain; version=")

            fake.echo = True
            async with trio_websocket.open_websocket_url(
                f"{d.ws_url}/token/{token_for(d)}", extra_headers=ORIGIN
            ) as ws:
                await ws.send_message("hello")
                assert await ws.get_message() == "hello"
                await wait_for_sample(http, 'relay_sessions_active{kind="client"} 1.0')
            fake.echo = False

            async with twilio_call(
                f"{d.ws_url}/twilio/media",
                public_url="ws://localhost:8787/twilio/media",
                auth_token=TEST_TWILIO_TOKEN,
            ) as call:
                await call.start()
                await wait_for_sample(http, 'relay_sessions_active{kind="twilio"} 1.0')
                await call.stop()

            # Refusals of three kinds, each with its reason label.
            with pytest.raises(trio_websocket.ConnectionRejected):
                async with trio_websocket.open_websocket_url(
                    f"{d.ws_url}/token/not-a-token", extra_headers=ORIGIN
                ):
                    pass
            convo = await http.post(
                "/twilio/convo",
                data={"EventType": "onMessageAdded"},
                headers={"X-Twilio-Signature": "bm90IGEgc2lnbmF0dXJl"},
            )
            assert convo.status_code == 403

            text = await wait_for_sample(http, 'relay_sessions_active{kind="twilio"} 0.0')
            got = families(text)

    # Ended sessions' messages stay counted: the client session's one each way.
    relayed = {
        (s.labels["kind"], s.labels["direction"]): s.value
        for s in got["relay_messages"].samples
        if s.name == "relay_messages_total"
    }
    assert relayed["client", "upstream"] == 1 and relayed["client", "downstream"] == 1

    expected_labels = {
        "relay_sessions_active": {"kind"},
        "relay_sessions": {"kind", "outcome"},  # counters are named without _total here
        "relay_messages": {"kind", "direction"},
        "relay_rejected": {"reason"},
        "relay_bargeins": set(),
        "relay_convo_events": {"outcome"},
    }
    for name, labels in expected_labels.items():
        assert name in got, name
        samples = [s for s in got[name].samples if not s.name.endswith("_created")]
        assert samples, f"{name} has no samples"
        for sample in samples:
            assert set(sample.labels) == labels, (name, sample)
    histogram = got["relay_upstream_connect_seconds"]
    assert histogram.type == "histogram"
    buckets = [s for s in histogram.samples if s.name.endswith("_bucket")]
    assert {s.labels["le"] for s in buckets} >= {"0.1", "1.0", "+Inf"}
    count = next(s for s in histogram.samples if s.name.endswith("_count"))
    assert count.value >= 2  # the client session and the call

    def value(name: str, **labels: str) -> float:
        return float(
            next(
                s.value
                for s in got[name].samples
                if s.name == name + "_total" and s.labels == labels
            )
        )

    assert value("relay_sessions", kind="client", outcome="client_closed") == 1
    assert value("relay_sessions", kind="twilio", outcome="twilio_stop") == 1
    assert value("relay_messages", kind="client", direction="upstream") >= 1
    assert value("relay_messages", kind="client", direction="downstream") >= 1
    assert value("relay_messages", kind="twilio", direction="upstream") >= 1
    assert value("relay_rejected", reason="metrics_forbidden") == 2
    assert value("relay_rejected", reason="token") == 1
    assert value("relay_rejected", reason="twilio_signature") == 1
    assert value("relay_convo_events", outcome="forbidden") == 1
    for name in (
        "process_resident_memory_bytes",
        "process_cpu_seconds",
        "process_open_fds",
        "process_start_time_seconds",
        "process_max_fds",
    ):
        assert name in got, name


async def test_metrics_refused_without_a_trusted_proxy() -> None:
    """Without trusted_proxies, X-Forwarded-For is ignored: the peer address decides,
    both ways."""
    async with (
        running_daemon({"server": {"metrics_allow": ["192.0.2.0/24"]}}) as d,
        httpx.AsyncClient(base_url=d.http_url) as http,
    ):
        assert (await scrape(http)).status_code == 403
        assert (await scrape(http, "192.0.2.7")).status_code == 403
    async with running_daemon() as d, httpx.AsyncClient(base_url=d.http_url) as http:
        assert (await scrape(http, "203.0.113.9")).status_code == 200


# -- logs: unit ----------------------------------------------------------------------------


def record(
    msg: str, *args: Any, exc: BaseException | None = None, **extra: Any
) -> logging.LogRecord:
    rec = logging.LogRecord(
        "relay.test",
        logging.WARNING,
        __file__,
        1,
        msg,
        args,
        (type(exc), exc, exc.__traceback__) if exc else None,
    )
    rec.__dict__.update(extra)
    return rec


def test_redactor_scrubs_every_part_of_a_line() -> None:
    key = bytes(range(32))
    redact = Redactor(["sk-secret-value-123", key, "short"])
    try:
        raise ValueError("boom sk-secret-value-123")
    except ValueError as e:
        err = e
    for formatter in (JsonFormatter(redact), TextFormatter(redact)):
        out = formatter.format(
            record(
                "key %s in args",
                "sk-secret-value-123",
                exc=err,
                header="Bearer sk-secret-value-123",
                enc=base64.urlsafe_b64encode(key).decode().rstrip("="),
                enc_std=base64.b64encode(key).decode(),
                note="short stays",  # too short to redact safely: left alone
            )
        )
        assert "sk-secret-value-123" not in out
        assert base64.b64encode(key).decode().rstrip("=") not in out
        assert base64.urlsafe_b64encode(key).decode().rstrip("=") not in out
        assert out.count(REDACTED) >= 5
        assert "short stays" in out


def test_json_formatter_one_object_with_extras() -> None:
    try:
        raise RuntimeError("why")
    except RuntimeError as e:
        line = JsonFormatter().format(
            record("hello %s", "world", exc=e, session="c1", duration_s=1.5, path=Path("/x"))
        )
    assert "\n" not in line
    obj = json.loads(line)
    assert obj["msg"] == "hello world"
    assert obj["level"] == "warning"
    assert obj["logger"] == "relay.test"
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z", obj["ts"])
    assert obj["session"] == "c1" and obj["duration_s"] == 1.5 and obj["path"] == "/x"
    assert "RuntimeError: why" in obj["exc"]


def test_json_lines_stream_turns_printed_text_into_objects() -> None:
    target = io.StringIO()
    stream = JsonLinesStream(target, "stderr", "error", Redactor(["hunter2-hunter2"]))
    stream.write("partial ")
    assert target.getvalue() == ""
    stream.write("line\nsecond hunter2-hunter2\n\nthird")
    stream.flush()
    objs = [json.loads(line) for line in target.getvalue().splitlines()]
    assert [o["msg"] for o in objs] == ["partial line", f"second {REDACTED}", "third"]
    assert {o["logger"] for o in objs} == {"stderr"}
    assert {o["level"] for o in objs} == {"error"}


def test_refusal_flood_is_bounded_and_summarised(caplog: pytest.LogCaptureFixture) -> None:
    now = [0.0]
    refusals = RefusalLog(burst=20, interval=60.0, clock=lambda: now[0])
    caplog.set_level(logging.WARNING, logger="relay.refusals")
    for i in range(10_000):
        refusals.note("token" if i % 2 else "origin", f"198.51.100.{i % 250}", "token invalid")
    one_by_one = [r for r in caplog.records if r.getMessage().startswith("refused:")]
    assert len(one_by_one) == 20
    assert len(caplog.records) == 20
    now[0] = 61.0
    refusals.note("token", "198.51.100.1", "token invalid")  # the next window's first
    summaries = [r for r in caplog.records if "more requests" in r.getMessage()]
    assert len(summaries) == 1
    assert "refused 9980 more requests" in summaries[0].getMessage()
    assert summaries[0].__dict__["by_reason"] == {"token": 4990, "origin": 4990}
    assert len(caplog.records) == 22


def test_refusal_flood_over_many_windows_stays_bounded(caplog: pytest.LogCaptureFixture) -> None:
    """100 000 refusals spread over 10 minutes: at most burst + 1 lines per minute."""
    now = [0.0]
    refusals = RefusalLog(burst=20, interval=60.0, clock=lambda: now[0])
    caplog.set_level(logging.WARNING, logger="relay.refusals")
    for i in range(100_000):
        now[0] = i * 0.006
        refusals.note("http_rate", "198.51.100.1", "rate limited")
    windows = 10
    assert len(caplog.records) <= windows * 21
    logged = sum(1 for r in caplog.records if r.getMessage().startswith("refused:"))
    summarised = sum(
        r.__dict__["by_reason"]["http_rate"]
        for r in caplog.records
        if "more requests" in r.getMessage()
    )
    # Every refusal is accounted for except those of the window still open.
    assert logged + summarised > 100_000 - 60 / 0.006 - 1


# -- logs: end to end ----------------------------------------------------------------------

# Loaded by the daemon as sitecustomize: once hypercorn binds its listener, provoke
# every kind of output Python or a library can make on its own.
NOISY_SITE = r"""
import logging, sys, threading, warnings

_done = []

def _provoke(event, args):
    # Some imports bind a socket too (urllib3 probes for IPv6): wait for the
    # first bind after `relay serve` has set up logging, i.e. hypercorn's.
    if event != "socket.bind" or _done or not logging.getLogger().handlers:
        return
    _done.append(True)
    warnings.warn("a library warning after startup", UserWarning)

    class Finalizer:
        def __del__(self):
            raise RuntimeError("an exception in __del__")

    Finalizer()
    thread = threading.Thread(target=lambda: 1 / 0, name="noisy-thread")
    thread.start()
    thread.join()
    print("a library printing to stdout")
    print("a library printing to stderr\nover two lines", file=sys.stderr)

sys.addaudithook(_provoke)
"""


@pytest.fixture
def noisy_env(tmp_path: Path) -> dict[str, str]:
    site = tmp_path / "site"
    site.mkdir()
    (site / "sitecustomize.py").write_text(NOISY_SITE)
    return daemon_env(PYTHONPATH=str(site))


def json_lines(text: str) -> list[dict[str, Any]]:
    objs = []
    for line in text.splitlines():
        try:
            obj = orjson.loads(line)
        except orjson.JSONDecodeError:
            raise AssertionError(f"not a JSON line: {line!r}") from None
        assert isinstance(obj, dict), line
        assert {"ts", "level", "logger", "msg"} <= set(obj), line
        objs.append(obj)
    return objs


async def exercise_everything(d: Daemon, fake: FakeRealtime) -> list[str]:
    """HTTP and WebSocket routes, accepted and refused, with every secret on the wire.
    Returns the dynamic secrets used (tokens, signatures)."""
    good, spare = token_for(d), token_for(d, 30)
    expired = mint(decode_encryption_key(d.env["ENCRYPTION_KEY"]), -3600)
    convo_form = {
        "EventType": "onMessageAdded",
        "ConversationSid": "CH" + "1" * 32,
        "Author": "+15550001111",
        "Body": "hi",
        "MessageSid": "IM" + "2" * 32,
    }
    convo_sig = RequestValidator(TEST_TWILIO_TOKEN).compute_signature(
        f"{PUBLIC}/twilio/convo", convo_form
    )
    voice_form = {"CallSid": "CA" + "3" * 32, "From": "+15550002222"}
    voice_sig = RequestValidator(TEST_TWILIO_TOKEN).compute_signature(
        f"{PUBLIC}/twilio/voice", voice_form
    )
    wrong_sig = base64.b64encode(b"not-the-signature-of-anything!!").decode()
    async with httpx.AsyncClient(base_url=d.http_url) as http:
        for path in (
            "/healthz",
            "/readyz",
            "/metrics",
            f"/token/{good}",
            f"/auth/{spare}",
            f"/anything?auth={good}",
            "/",
        ):
            await http.get(path, headers={"Authorization": f"Bearer {good}"})
        await http.post("/twilio/voice", data=voice_form, headers={"X-Twilio-Signature": voice_sig})
        await http.post("/twilio/voice", data=voice_form, headers={"X-Twilio-Signature": wrong_sig})
        await http.post("/twilio/convo", data=convo_form, headers={"X-Twilio-Signature": wrong_sig})
        await http.post(
            "/twilio/convo",
            data={**convo_form, "Author": "gateframes-bot"},
            headers={
                "X-Twilio-Signature": RequestValidator(TEST_TWILIO_TOKEN).compute_signature(
                    f"{PUBLIC}/twilio/convo", {**convo_form, "Author": "gateframes-bot"}
                )
            },
        )
    fake.echo = True
    for url, headers in [
        (f"{d.ws_url}/token/{good}/realtime", ORIGIN),  # accepted
        (f"{d.ws_url}/realtime?auth={spare}", ORIGIN),  # accepted, token in query
        (f"{d.ws_url}/token/{expired}", ORIGIN),  # refused: expired
        (f"{d.ws_url}/realtime?auth={good}x", ORIGIN),  # refused: tampered
        (f"{d.ws_url}/token/{good}", [(b"Origin", b"https://evil.example")]),  # refused: origin
        (f"{d.ws_url}/token/{good}?model=gpt-9", ORIGIN),  # refused: model
    ]:
        try:
            async with trio_websocket.open_websocket_url(url, extra_headers=headers) as ws:
                await ws.send_message(f"hello {good}")
                await ws.get_message()
        except trio_websocket.HandshakeError:
            pass
    fake.echo = False
    media = f"{d.ws_url}/twilio/media"
    with pytest.raises(trio_websocket.ConnectionRejected):
        async with twilio_call(
            media,
            public_url="ws://localhost:8787/twilio/media",
            auth_token=TEST_TWILIO_TOKEN,
            sign="wrong",
        ):
            pass
    async with twilio_call(
        media, public_url="ws://localhost:8787/twilio/media", auth_token=TEST_TWILIO_TOKEN
    ) as call:
        await call.start()
        with trio.fail_after(10):
            await call.wait_until(lambda: bool(call.received_media))
        await call.stop()
    media_sig = RequestValidator(TEST_TWILIO_TOKEN).compute_signature(
        "ws://localhost:8787/twilio/media", {}
    )
    return [good, spare, expired, convo_sig, voice_sig, wrong_sig, media_sig]


def assert_no_secret(log: str, d: Daemon, dynamic: list[str]) -> None:
    fixed = {
        "OPENAI_API_KEY": TEST_OPENAI_KEY,
        "ENCRYPTION_KEY": d.env["ENCRYPTION_KEY"],
        "TWILIO_AUTH_TOKEN": TEST_TWILIO_TOKEN,
        "TWILIO_ACCOUNT_SID": TEST_TWILIO_SID,
    }
    for name, value in fixed.items():
        assert value not in log, f"{name} in the log"
    for value in dynamic:
        assert value not in log, f"a token or signature in the log: {value[:12]}..."
        # A token is also a prefix of a tampered one; a URL-quoted form would hide it.
        assert value.replace("=", "%3D").replace("+", "%2B").replace("/", "%2F") not in log
    # The redactor is the last line of defence: the code must not even try.
    assert REDACTED not in log


async def test_json_logs_only_json_and_no_secrets(noisy_env: dict[str, str]) -> None:
    async with echo_fake() as fake:
        fake.echo = False
        config = {
            "server": {"log_format": "json", "log_level": "debug"},
            "openai": {"realtime_url": fake.url},
        }
        async with running_daemon(config, env=noisy_env) as d:
            dynamic = await exercise_everything(d, fake)
            d.signal(signal.SIGTERM)
            assert await d.wait() == 0
            log = d.log_text()
    objs = json_lines(log)
    assert_no_secret(log, d, dynamic)
    by_logger: dict[str, list[dict[str, Any]]] = {}
    for obj in objs:
        by_logger.setdefault(obj["logger"], []).append(obj)
    msgs = [o["msg"] for o in objs]
    # Startup and shutdown, ours and hypercorn's.
    assert any(m.startswith("listening on http://127.0.0.1:") for m in msgs)
    assert any("Running on" in o["msg"] for o in by_logger["hypercorn.error"])
    assert any(m.startswith("received SIGTERM") for m in msgs)
    assert msgs[-1] == "stopped"
    # What Python and libraries would otherwise write raw.
    assert any("a library warning" in o["msg"] for o in by_logger["py.warnings"])
    assert any("an exception in __del__" in o.get("exc", "") for o in objs)
    assert any("noisy-thread" in o["msg"] and "ZeroDivisionError" in o.get("exc", "") for o in objs)
    assert [o["msg"] for o in by_logger["stdout"]] == ["a library printing to stdout"]
    assert [o["msg"] for o in by_logger["stderr"]] == [
        "a library printing to stderr",
        "over two lines",
    ]
    # One line per session start and end, with what an operator needs.
    ends = [o for o in objs if o["msg"] == "session end"]
    client_end = next(o for o in ends if o["kind"] == "client")
    for key in (
        "session",
        "client_ip",
        "model",
        "duration_s",
        "close_code",
        "messages_up",
        "messages_down",
    ):
        assert key in client_end, key
    twilio_end = next(o for o in ends if o["kind"] == "twilio")
    assert "call_sid" in twilio_end or "stream_sid" in twilio_end, twilio_end
    # Refusals are logged with their reason.
    reasons = {o.get("reason") for o in by_logger.get("relay.refusals", [])}
    assert {"token", "origin", "model", "twilio_signature"} <= reasons


async def test_text_logs_are_readable_and_hold_no_secrets() -> None:
    line = re.compile(
        r"^\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3} (DEBUG|INFO|WARNING|ERROR|CRITICAL)"
        r" [\w.\-]+: "
    )
    async with echo_fake() as fake:
        fake.echo = False
        config = {"server": {"log_level": "debug"}, "openai": {"realtime_url": fake.url}}
        async with running_daemon(config) as d:
            dynamic = await exercise_everything(d, fake)
            d.signal(signal.SIGTERM)
            assert await d.wait() == 0
            log = d.log_text()
    assert_no_secret(log, d, dynamic)
    for text in log.splitlines():
        assert line.match(text), text
    assert re.search(r" INFO relay\.server: listening on http://127\.0\.0\.1:\d+$", log, re.M)
    assert re.search(r" INFO relay\.server: stopped$", log, re.M)
    assert re.search(r" INFO relay\.client: session end .*kind=client", log, re.M)


def test_json_mode_crash_is_json_too(tmp_path: Path) -> None:
    """An operator mistake found after logging is set up (the port is taken) still
    leaves nothing but JSON on stdout and stderr."""
    import socket

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        config = tmp_path / "config.toml"
        config.write_text(
            toml_dumps({"server": {"bind": [f"127.0.0.1:{port}"], "log_format": "json"}})
        )
        result = subprocess.run(
            [sys.executable, "-m", "relay", "serve", "--config", str(config)],
            env=daemon_env(),
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
    assert result.returncode == 1
    objs = json_lines(result.stdout + result.stderr)
    assert objs
    assert any("Address already in use" in o["msg"] + o.get("exc", "") for o in objs)


@pytest.fixture(autouse=True)
def _no_stray_handlers() -> Iterator[None]:
    """setup_logging is only ever called in the daemon subprocess, never here."""
    before = list(logging.getLogger().handlers)
    yield
    assert logging.getLogger().handlers == before
