"""HTTP tools against real servers on 127.0.0.1 (docs/contract.md §11 "HTTP tools"):
what the tool receives, and every way a tool can fail turned into a speakable output."""

from __future__ import annotations

import gzip
import hashlib
import hmac
import json
import socket
from collections.abc import Awaitable, Callable
from typing import Any

import httpx
import trio

from relay.calls.http_tools import MAX_ANSWER, call_http_tool
from relay.calls.signing import verify
from relay.config import HttpToolSettings
from relay.testing.scripted_http import Request, ScriptedServer, respond, scripted_http

KEY = "test-signing-key-0123456789"
JSON = {"Content-Type": "application/json"}

Handler = Callable[[Request, trio.SocketStream], Awaitable[None]]


def answering(status: int, body: bytes, headers: dict[str, str] | None = None) -> Handler:
    async def handler(request: Request, stream: trio.SocketStream) -> None:
        del request
        await respond(stream, status, body, headers)

    return handler


async def call(
    url: str, timeout: float = 5.0, arguments: dict[str, Any] | None = None
) -> tuple[bool, str]:
    tool = HttpToolSettings(name="lookup_order", url=url, timeout_seconds=timeout)
    async with httpx.AsyncClient(follow_redirects=False) as http:
        return await call_http_tool(
            http,
            tool,
            KEY,
            call_id="call_1",
            arguments={"order": "A-17"} if arguments is None else arguments,
            call_sid="CA123",
            stream_sid="MZ456",
        )


async def call_server(handler: Handler, **kw: Any) -> tuple[tuple[bool, str], ScriptedServer]:
    async with scripted_http(handler) as server:
        result = await call(server.url + "/tools/lookup", **kw)
    return result, server


def why(output: str) -> str:
    parsed = json.loads(output)
    assert parsed["ok"] is False and set(parsed) == {"ok", "error"}
    error: str = parsed["error"]
    return error


async def test_ok_answer_and_what_the_tool_receives() -> None:
    answer = b'{"status": "shipped", "eta": "Tuesday"}'
    with trio.fail_after(10):
        (ok, output), server = await call_server(answering(200, answer, JSON))
    assert ok and json.loads(output) == {"status": "shipped", "eta": "Tuesday"}
    [request] = server.requests
    assert request.method == "POST" and request.target == "/tools/lookup"
    assert request.headers["content-type"] == "application/json"
    assert json.loads(request.body) == {
        "tool": "lookup_order",
        "call_id": "call_1",
        "arguments": {"order": "A-17"},
        "call_sid": "CA123",
        "stream_sid": "MZ456",
    }
    # The signature, checked as a receiver in any language would: HMAC-SHA256 of "<t>.<body>".
    header = request.headers["x-relay-signature"]
    parts = dict(p.split("=", 1) for p in header.split(","))
    expected = hmac.new(
        KEY.encode(), parts["t"].encode() + b"." + request.body, hashlib.sha256
    ).hexdigest()
    assert hmac.compare_digest(parts["v1"], expected)
    assert verify(header, request.body, KEY)
    assert not verify(header, request.body + b" ", KEY)
    assert not verify(header, request.body, KEY + "x")


async def test_any_json_value_of_at_most_16_kib_is_the_output() -> None:
    with trio.fail_after(10):
        (ok, output), _ = await call_server(answering(201, b"  42\n"))
        assert (ok, output) == (True, "42")
        exactly = b'"' + b"x" * (MAX_ANSWER - 2) + b'"'
        (ok, output), _ = await call_server(answering(200, exactly, JSON))
        assert ok and output == exactly.decode()


async def test_error_status() -> None:
    with trio.fail_after(10):
        (ok, output), _ = await call_server(answering(500, b'{"ok": true}', JSON))
    assert not ok and why(output) == "tool answered HTTP 500"
    assert output == '{"ok": false, "error": "tool answered HTTP 500"}'


async def test_a_server_that_never_answers_times_out() -> None:
    async def silent(request: Request, stream: trio.SocketStream) -> None:
        await trio.sleep_forever()

    with trio.fail_after(10):
        start = trio.current_time()
        (ok, output), _ = await call_server(silent, timeout=0.5)
        elapsed = trio.current_time() - start
    assert not ok and why(output) == "tool timed out after 0.5 s"
    assert 0.45 <= elapsed < 2


async def test_a_trickling_body_does_not_hold_the_call_past_the_timeout() -> None:
    """Each byte arrives well within any per-read timeout; the whole answer never does."""

    async def trickle(request: Request, stream: trio.SocketStream) -> None:
        await stream.send_all(b"HTTP/1.1 200 OK\r\nContent-Length: 1000\r\n\r\n")
        for _ in range(1000):
            await stream.send_all(b" ")
            await trio.sleep(0.05)

    with trio.fail_after(10):
        start = trio.current_time()
        (ok, output), _ = await call_server(trickle, timeout=1)
        elapsed = trio.current_time() - start
    assert not ok and why(output) == "tool timed out after 1 s"
    assert elapsed < 2.5


async def test_a_trickling_head_times_out_too() -> None:
    async def trickle(request: Request, stream: trio.SocketStream) -> None:
        await stream.send_all(b"HTTP/1.1 200 OK\r\n")
        for _ in range(1000):
            await stream.send_all(b"X-Pad: 1\r\n")
            await trio.sleep(0.05)

    with trio.fail_after(10):
        (ok, output), _ = await call_server(trickle, timeout=1)
    assert not ok and why(output) == "tool timed out after 1 s"


async def test_answers_over_16_kib_are_refused() -> None:
    big = b'"' + b"x" * (17 * 1024) + b'"'
    with trio.fail_after(10):
        (ok, output), _ = await call_server(answering(200, big, JSON))
        assert not ok and why(output) == "tool answer larger than 16 KiB"
        # One byte over, no Content-Length announced (read until close): still refused.
        over = b'"' + b"x" * (MAX_ANSWER - 1) + b'"'

        async def unannounced(request: Request, stream: trio.SocketStream) -> None:
            await stream.send_all(b"HTTP/1.1 200 OK\r\nConnection: close\r\n\r\n" + over)

        (ok, output), _ = await call_server(unannounced)
        assert not ok and why(output) == "tool answer larger than 16 KiB"


async def test_an_endless_answer_is_cut_off_without_reading_the_rest() -> None:
    sent = 0

    async def endless(request: Request, stream: trio.SocketStream) -> None:
        nonlocal sent
        await stream.send_all(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n")
        chunk = b"x" * 4096
        while True:
            await stream.send_all(b"1000\r\n" + chunk + b"\r\n")
            sent += len(chunk)

    with trio.fail_after(10):
        start = trio.current_time()
        (ok, output), _ = await call_server(endless, timeout=5)
        elapsed = trio.current_time() - start
    assert not ok and why(output) == "tool answer larger than 16 KiB"
    assert elapsed < 2
    # The relay stopped reading early: only what the socket buffers took got out.
    assert sent < 16 * 1024 * 1024


async def test_answers_that_are_not_json() -> None:
    bodies = [
        b"<html>oops</html>",
        b"",  # 204-style empty 200
        b"NaN",
        b'{"x": Infinity}',
        b"[" * 5000 + b"]" * 5000,  # nesting deep enough to exhaust a recursive parser
        b'{"a": 1} {"b": 2}',
        b'"\xff\xfe"',  # not UTF-8
        b'\xef\xbb\xbf{"a": 1}',  # a BOM
        gzip.compress(b'{"a": 1}'),  # compressed although identity was asked for
    ]
    with trio.fail_after(20):
        for body in bodies:
            headers = {"Content-Encoding": "gzip"} if body.startswith(b"\x1f\x8b") else None
            (ok, output), _ = await call_server(answering(200, body, headers))
            assert not ok, body[:20]
            assert why(output) == "tool answer is not JSON", body[:20]


async def test_connection_refused() -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with trio.fail_after(10):
        ok, output = await call(f"http://127.0.0.1:{port}/tool")
    assert not ok and why(output) == "tool could not be reached"


async def test_connection_reset_mid_answer() -> None:
    async def cut(request: Request, stream: trio.SocketStream) -> None:
        await stream.send_all(b'HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\n{"a"')

    with trio.fail_after(10):
        (ok, output), _ = await call_server(cut)
    assert not ok and why(output) == "tool connection failed"


async def test_redirects_are_not_followed() -> None:
    with trio.fail_after(10):
        async with scripted_http(answering(200, b'{"stolen": true}', JSON)) as elsewhere:
            moved = answering(307, b"", {"Location": elsewhere.url + "/collect"})
            (ok, output), _ = await call_server(moved)
    assert not ok and why(output) == "tool answered HTTP 307"
    assert elsewhere.requests == []  # the signed body went nowhere else


async def test_no_output_holds_the_key_or_the_urls_credentials() -> None:
    handlers = [
        answering(500, b""),
        answering(200, b"not json"),
        answering(302, b"", {"Location": "http://user:url-password@127.0.0.1:1/"}),
    ]
    with trio.fail_after(10):
        for handler in handlers:
            async with scripted_http(handler) as server:
                url = server.url.replace("http://", "http://user:url-password@") + "/t"
                ok, output = await call(url)
            assert not ok
            assert "url-password" not in output and KEY not in output
            assert "127.0.0.1" not in output


async def test_hostile_arguments() -> None:
    """A lone surrogate from the model's text is escaped, not an encoding crash; a NaN
    has no JSON form and is refused before anything is sent."""
    with trio.fail_after(10):
        async with scripted_http(answering(200, b"{}", JSON)) as server:
            ok, output = await call(server.url, arguments={"order": "A\ud800"})
            assert ok and output == "{}"
            [request] = server.requests
            assert json.loads(request.body)["arguments"] == {"order": "A\ud800"}
            ok, output = await call(server.url, arguments={"n": float("nan")})
            assert not ok and why(output) == "tool arguments have no JSON form"
            assert len(server.requests) == 1
