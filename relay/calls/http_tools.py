"""Operator HTTP tools on phone calls (docs/contract.md §11 "HTTP tools").

The relay POSTs the model's call, signed, to the tool's ``url`` and hands the
answer back to the model. The tool is someone else's server: whatever it does
(answers nothing, trickles its body, sends megabytes, redirects, answers HTML),
the exchange ends within the tool's ``timeout_seconds``, reads at most 16 KiB,
and every failure becomes a short output the model can speak about. No output
and no log line carries the signing key or the URL (its userinfo may be a password).
"""

from __future__ import annotations

import json
import logging
from typing import Any

import httpx
import trio

from relay.calls.signing import HEADER, signature_header
from relay.config import HttpToolSettings

log = logging.getLogger("relay.calls")

MAX_ANSWER = 16 * 1024


def error_output(why: str) -> str:
    """The output for a failed tool: ``{"ok": false, "error": "<why>"}``."""
    return json.dumps({"ok": False, "error": why})


def _refuse_constant(name: str) -> Any:
    raise ValueError(f"{name} is not JSON")  # Python's json takes NaN and Infinity; JSON does not


def _json_text(data: bytes) -> str | None:
    """``data`` as text when it is one JSON value in UTF-8; else None."""
    try:
        text = data.decode("utf-8")
        json.loads(text, parse_constant=_refuse_constant)
    except (UnicodeDecodeError, ValueError, RecursionError):
        return None  # RecursionError: thousands of nested brackets
    return text.strip()


async def call_http_tool(
    http: httpx.AsyncClient,
    tool: HttpToolSettings,
    key: str,
    *,
    call_id: str,
    arguments: dict[str, Any],
    call_sid: str | None,
    stream_sid: str | None,
) -> tuple[bool, str]:
    """POST the call to ``tool.url``; ``(True, the answer's JSON text)`` or
    ``(False, an error output)``. Never raises for the tool's failures."""
    try:
        # ensure_ascii: a lone surrogate from the model's text cannot break the encoding.
        body = json.dumps(
            {
                "tool": tool.name,
                "call_id": call_id,
                "arguments": arguments,
                "call_sid": call_sid,
                "stream_sid": stream_sid,
            },
            allow_nan=False,
        ).encode("ascii")
    except ValueError:
        return False, error_output("tool arguments have no JSON form")
    headers = {
        "Content-Type": "application/json",
        "Accept": "application/json",
        # A compressed answer could inflate far past the cap inside one chunk.
        "Accept-Encoding": "identity",
        HEADER: signature_header(key, body),
    }
    timeout = tool.timeout_seconds
    answer: str | None = None
    why = f"tool timed out after {timeout:g} s"
    # The whole exchange, not each read: a server trickling its body a byte a
    # second would pass every per-read timeout and hold the caller forever.
    with trio.move_on_after(timeout):
        try:
            answer = await _exchange(http, tool.url, body, headers, timeout)
        except ToolFailed as failed:
            why = str(failed)
    if answer is None:
        log.info("http tool %s failed: %s", tool.name, why)
        return False, error_output(why)
    return True, answer


class ToolFailed(Exception):
    """Why a tool gave no usable answer, in words the model can say."""


async def _exchange(
    http: httpx.AsyncClient, url: str, body: bytes, headers: dict[str, str], timeout: float
) -> str:
    try:
        async with http.stream(
            "POST", url, content=body, headers=headers, timeout=timeout, follow_redirects=False
        ) as response:
            status = response.status_code
            if not 200 <= status < 300:
                # A redirect is not followed: the signed body was meant for this URL only.
                raise ToolFailed(f"tool answered HTTP {status}")
            declared = response.headers.get("content-length", "")
            if declared.isdigit() and int(declared) > MAX_ANSWER:
                raise ToolFailed("tool answer larger than 16 KiB")
            data = bytearray()
            async for chunk in response.aiter_raw():
                data += chunk
                if len(data) > MAX_ANSWER:
                    raise ToolFailed("tool answer larger than 16 KiB")
    except httpx.TimeoutException:
        raise ToolFailed(f"tool timed out after {timeout:g} s") from None
    except (httpx.ConnectError, httpx.UnsupportedProtocol, httpx.InvalidURL):
        raise ToolFailed("tool could not be reached") from None
    except httpx.HTTPError as exc:  # reset mid-answer, malformed HTTP, ...
        log.debug("http tool exchange failed: %s", exc.__class__.__name__)
        raise ToolFailed("tool connection failed") from None
    text = _json_text(bytes(data))
    if text is None:
        raise ToolFailed("tool answer is not JSON")
    return text
