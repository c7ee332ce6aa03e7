"""The ``call.ended`` event (docs/contract.md §11 "Call events"): POSTed signed to
``calls.events_url`` after every call, in the background, retried on failure,
and given up 30 s after the call's end.

Each attempt is signed afresh (a receiver refuses an old ``t``). A receiver that
refuses the event outright (a 4xx other than 408 and 429, or a redirect) is not
asked again: the same body would be refused the same way. The answer's body is
never read, so a receiver cannot make the relay buffer anything.

A 429 or 503 may say when to come back (``Retry-After``, seconds or an HTTP
date): the next attempt waits at least that long, and one that would fall past
the budget is not waited for at all; the event is given up at once, so a
receiver cannot hold a job slot with a far-off date.
"""

from __future__ import annotations

import json
import logging
import random
import re
import time
from email.utils import parsedate_to_datetime

import httpx
import trio

from relay.calls.report import CallReport
from relay.calls.signing import HEADER, signature_header
from relay.ops.metrics import Metrics

log = logging.getLogger("relay.calls")

# docs/contract.md §11: delivered within 30 s of the call's end, or given up.
BUDGET_SECONDS = 30.0
# One attempt may not eat the whole budget: a receiver that hangs once gets retried.
ATTEMPT_SECONDS = 10.0
# Pauses between attempts (then the last one again), each ±20 % so that many
# calls ending together do not retry in lockstep after a receiver's outage.
BACKOFF = (1.0, 2.0, 4.0, 8.0)
RETRY_STATUSES = frozenset({408, 429})
# Where a receiver's Retry-After is heeded (RFC 9110 §10.2.3).
RETRY_AFTER_STATUSES = frozenset({429, 503})
_SECONDS = re.compile(r"\A[0-9]{1,9}\Z")


def retry_after(value: str | None, now: float) -> float | None:
    """The seconds a ``Retry-After`` value asks for (whole seconds or an HTTP
    date; a date in the past is 0); None when absent or unreadable."""
    if value is None or len(value) > 64:  # no header date is longer; no parse of junk
        return None
    value = value.strip()
    if _SECONDS.match(value):
        return float(value)
    try:
        when = parsedate_to_datetime(value)
    except (TypeError, ValueError, IndexError, OverflowError):
        return None
    if when.tzinfo is None:  # RFC 9110 dates are GMT; a zoneless one is read so
        return None
    return max(0.0, when.timestamp() - now)


class _Refused(Exception):
    """The receiver refused the event; retrying would not change its mind."""


async def _attempt(
    http: httpx.AsyncClient, url: str, key: str, body: bytes
) -> tuple[str | None, float | None]:
    """One signed POST: (None when the receiver took it, else why not, without
    secrets; the seconds its ``Retry-After`` asks for, if any). Raises
    :class:`_Refused` when retrying is pointless."""
    headers = {"Content-Type": "application/json", HEADER: signature_header(key, body)}
    with trio.move_on_after(ATTEMPT_SECONDS):
        try:
            async with http.stream(
                "POST",
                url,
                content=body,
                headers=headers,
                timeout=ATTEMPT_SECONDS,
                follow_redirects=False,
            ) as response:
                status = response.status_code
                asked = response.headers.get("retry-after")
        except httpx.TimeoutException:
            return f"no answer within {ATTEMPT_SECONDS:g} s", None
        except httpx.HTTPError as exc:
            return f"could not be reached ({exc.__class__.__name__})", None
        if 200 <= status < 300:
            return None, None
        if status < 500 and status not in RETRY_STATUSES:
            raise _Refused(f"answered HTTP {status}")
        wait = retry_after(asked, time.time()) if status in RETRY_AFTER_STATUSES else None
        return f"answered HTTP {status}", wait
    return f"no answer within {ATTEMPT_SECONDS:g} s", None


async def deliver_call_event(
    http: httpx.AsyncClient, url: str, key: str, report: CallReport, metrics: Metrics
) -> bool:
    """POST ``report``'s event until the receiver takes it or 30 s after the call
    ended; True when delivered. Counted once in ``relay_call_events_total``."""
    # ensure_ascii: transcript text may hold a lone surrogate, which UTF-8 cannot encode.
    body = json.dumps(report.event()).encode("ascii")
    budget = min(BUDGET_SECONDS, max(0.0, report.ended_at + BUDGET_SECONDS - time.time()))
    attempts = 0
    why = "no answer in time"
    delivered = False
    try:
        with trio.move_on_after(budget) as scope:
            while True:
                attempts += 1
                failed, wait = await _attempt(http, url, key, body)
                if failed is None:
                    delivered = True
                    return True
                why = failed
                pause = BACKOFF[min(attempts, len(BACKOFF)) - 1] * random.uniform(0.8, 1.2)
                if wait is not None:
                    if trio.current_time() + wait >= scope.deadline:
                        why += (
                            f"; gave up: it asked to wait {wait:.0f} s, past "
                            f"{BUDGET_SECONDS:g} s after the call's end"
                        )
                        return False
                    pause = max(pause, wait)
                await trio.sleep(pause)
        why += f"; gave up {BUDGET_SECONDS:g} s after the call's end"
        return False
    except _Refused as refused:
        why = str(refused)
        return False
    except trio.Cancelled:
        # The daemon stops (the drain's time is up): still counted and said, once.
        why += "; cut off: relay is stopping"
        raise
    finally:
        metrics.call_events_total.labels(outcome="sent" if delivered else "failed").inc()
        if not delivered:
            log.warning(
                "call.ended event for %s not delivered after %d attempt%s: %s",
                report.call_sid,
                attempts,
                "" if attempts == 1 else "s",
                why,
            )
