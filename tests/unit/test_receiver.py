"""The test backend for HTTP tools and call events (relay.testing.receiver): its
signature check (the receiver's side of docs/contract.md §11) and its scripted
answers, over real loopback HTTP."""

from __future__ import annotations

import hashlib
import hmac
import json
import time
from collections.abc import AsyncIterator

import httpx
import pytest
import trio

from relay.testing.receiver import EventFault, Receiver, ToolAnswer, receiver, verify

KEY = "whsec-test-key-0123456789abcdef"
BODY = b'{"type": "call.ended", "call_sid": "CA1"}'


def sign(body: bytes, key: str = KEY, t: int | None = None) -> str:
    """An independent signer, written from the contract's words."""
    stamp = int(time.time()) if t is None else t
    mac = hmac.new(key.encode(), f"{stamp}.".encode() + body, hashlib.sha256).hexdigest()
    return f"t={stamp},v1={mac}"


def test_a_good_signature_verifies() -> None:
    assert verify(sign(BODY), BODY, KEY) is None


@pytest.mark.parametrize(
    ("header", "problem"),
    [
        (None, "missing"),
        ("", "malformed"),
        ("garbage", "malformed"),
        ("v1=00", "no timestamp"),
        ("t=-5,v1=00", "no timestamp"),
        ("t=١٢٣,v1=00", "no timestamp"),  # Arabic-Indic digits: isdigit() but not ASCII
        (f"t={int(time.time())}", "no v1 signature"),
        (f"t={int(time.time())},t=1,v1=00", "two timestamps"),
        ("t=1," + "v1=0," * 2000, "too long"),
    ],
)
def test_malformed_headers_are_refused(header: str | None, problem: str) -> None:
    assert verify(header, BODY, KEY) == problem


def test_wrong_key_tampered_body_and_non_ascii_mismatch() -> None:
    assert verify(sign(BODY, "another-key"), BODY, KEY) == "mismatch"
    assert verify(sign(BODY), BODY + b" ", KEY) == "mismatch"
    assert verify(sign(BODY) + "é", BODY, KEY) == "mismatch"
    stamp = sign(BODY).split(",")[0]
    assert verify(f"{stamp},v1=", BODY, KEY) == "mismatch"


def test_any_v1_may_match() -> None:
    good = sign(BODY)
    stamp, mac = good.split(",")
    assert verify(f"{stamp},v1={'0' * 64},{mac}", BODY, KEY) is None


def test_old_and_future_timestamps_are_refused() -> None:
    now = 1_800_000_000.0
    assert verify(sign(BODY, t=int(now) - 300), BODY, KEY, now) is None
    assert verify(sign(BODY, t=int(now) - 301), BODY, KEY, now) == "timestamp outside tolerance"
    assert verify(sign(BODY, t=int(now) + 301), BODY, KEY, now) == "timestamp outside tolerance"


@pytest.fixture
async def backend() -> AsyncIterator[Receiver]:
    async with receiver(KEY) as r:
        yield r


async def post(url: str, body: bytes, signature: str | None, timeout: float = 5) -> httpx.Response:
    headers = {"Content-Type": "application/json"}
    if signature is not None:
        headers["X-Relay-Signature"] = signature
    with trio.fail_after(timeout + 1):
        async with httpx.AsyncClient(timeout=timeout) as http:
            return await http.post(url, content=body, headers=headers)


def tool_body(tool: str, arguments: object) -> bytes:
    return json.dumps(
        {
            "tool": tool,
            "call_id": "call_1",
            "arguments": arguments,
            "call_sid": "CA1",
            "stream_sid": "MZ1",
        }
    ).encode()


async def test_events_are_recorded_with_their_signature_check(backend: Receiver) -> None:
    ok = await post(backend.events_url, BODY, sign(BODY))
    forged = await post(backend.events_url, BODY, sign(BODY, "guess"))
    unsigned = await post(backend.events_url, BODY, None)
    old = await post(backend.events_url, BODY, sign(BODY, t=int(time.time()) - 600))
    assert [a.status_code for a in (ok, forged, unsigned, old)] == [200, 401, 401, 401]
    assert [r.signature_problem for r in backend.events] == [
        None,
        "mismatch",
        "missing",
        "timestamp outside tolerance",
    ]
    assert backend.accepted_events == [json.loads(BODY)]
    assert [r.answered for r in backend.events] == [200, 401, 401, 401]


async def test_a_replay_is_flagged(backend: Receiver) -> None:
    header = sign(BODY)
    await post(backend.events_url, BODY, header)
    await post(backend.events_url, BODY, header)
    assert [r.replayed for r in backend.events] == [False, True]


async def test_event_faults_answer_the_next_events(backend: Receiver) -> None:
    backend.event_faults = [EventFault(503, times=2)]
    codes = [(await post(backend.events_url, BODY, sign(BODY))).status_code for _ in range(3)]
    assert codes == [503, 503, 200]
    assert len(backend.accepted_events) == 1


async def test_tools_echo_by_default_and_follow_their_script(backend: Receiver) -> None:
    body = tool_body("lookup", {"order": "42"})
    echo = await post(backend.tool_url("lookup"), body, sign(body))
    assert echo.json() == {"ok": True, "tool": "lookup", "arguments": {"order": "42"}}
    backend.script(
        "lookup",
        ToolAnswer(body={"status": "shipped"}),
        ToolAnswer(status=500, body={"error": "db down"}),
        ToolAnswer(body=b"<html>not json</html>", content_type="text/html"),
    )
    answers = [await post(backend.tool_url("lookup"), body, sign(body)) for _ in range(4)]
    assert [(a.status_code, a.content) for a in answers] == [
        (200, b'{"status": "shipped"}'),
        (500, b'{"error": "db down"}'),
        (200, b"<html>not json</html>"),
        (200, b"<html>not json</html>"),  # the last answer stays
    ]
    assert [r.json["arguments"] for r in backend.tool_requests("lookup")] == [{"order": "42"}] * 5
    assert all(r.signature_ok for r in backend.tool_requests())
    assert backend.tool_requests("other") == []


async def test_oversize_delay_and_trickle(backend: Receiver) -> None:
    body = tool_body("big", {})
    backend.script("big", ToolAnswer.oversize())
    big = await post(backend.tool_url("big"), body, sign(body))
    assert len(big.content) == 16 * 1024 + 1 and big.json()["pad"].startswith("x")
    backend.script("slow", ToolAnswer(delay=0.5))
    started = trio.current_time()
    await post(backend.tool_url("slow"), body, sign(body))
    assert trio.current_time() - started >= 0.5
    backend.script("drip", ToolAnswer(body={"ok": True, "pad": "x" * 50}, trickle=0.05))
    # Each read of the slow body succeeds: only an overall deadline ends it.
    started = trio.current_time()
    with trio.move_on_after(0.5):
        async with (
            httpx.AsyncClient(timeout=0.3) as http,
            http.stream(
                "POST",
                backend.tool_url("drip"),
                content=body,
                headers={"X-Relay-Signature": sign(body)},
            ) as answer,  # fmt: skip
        ):
            async for _ in answer.aiter_bytes():
                pass
    assert trio.current_time() - started >= 0.5


async def test_a_tool_request_with_a_bad_signature_is_refused(backend: Receiver) -> None:
    body = tool_body("lookup", {})
    other = tool_body("lookup", {"order": "1"})
    answer = await post(backend.tool_url("lookup"), body, sign(other))
    assert answer.status_code == 401
    assert backend.tool_requests("lookup")[0].signature_problem == "mismatch"


async def test_a_huge_body_is_refused_not_kept(backend: Receiver) -> None:
    huge = b"x" * (2 << 20)
    answer = await post(backend.events_url, huge, sign(huge))
    assert answer.status_code == 413
    assert backend.requests == []


async def test_wait_for_wakes_on_a_request(backend: Receiver) -> None:
    async with trio.open_nursery() as nursery:
        nursery.start_soon(post, backend.events_url, BODY, sign(BODY))
        with trio.fail_after(5):
            await backend.wait_for(lambda: len(backend.accepted_events) == 1)
