"""Connection mechanics in-process: the open-files limit, the accept-error filter, and the
shielded end of a Quart response (end to end: tests/attacks/test_connections.py)."""

from __future__ import annotations

import errno
import logging
import resource
import sys

import pytest
import trio

from relay.edge.app import _ending_shielded
from relay.edge.asgi_ws import Message
from relay.ops.nofile import AcceptErrors, raise_nofile


def accept_error(code: int = errno.EMFILE) -> logging.LogRecord:
    try:
        raise OSError(code, "Too many open files")
    except OSError:
        exc_info = sys.exc_info()
    return logging.LogRecord(
        "trio.serve_listeners",
        logging.ERROR,
        __file__,
        1,
        "accept returned %s (%s); retrying in %s seconds",
        ("EMFILE", "Too many open files", 0.1),
        exc_info,
    )


def test_a_burst_of_accept_errors_is_one_warning_line_without_traceback() -> None:
    now = [100.0]
    quiet = AcceptErrors(gap=5.0, clock=lambda: now[0])
    first = accept_error()
    assert quiet.filter(first)
    assert first.levelno == logging.WARNING
    assert first.exc_info is None
    assert first.getMessage().startswith("accept failed (EMFILE): new connections wait")
    assert "\n" not in logging.Formatter().format(first)
    for _ in range(100):  # Trio retries every 0.1 s while it lasts
        now[0] += 0.1
        assert not quiet.filter(accept_error())
    now[0] += 5.0  # quiet for the gap: the next one starts a new burst
    again = accept_error(errno.ENFILE)
    assert quiet.filter(again)
    assert "(ENFILE)" in again.getMessage()


def test_raise_nofile_lifts_the_soft_limit_to_the_hard_one(
    caplog: pytest.LogCaptureFixture,
) -> None:
    old = resource.getrlimit(resource.RLIMIT_NOFILE)
    hard = old[1]
    assert hard == resource.RLIM_INFINITY or hard > 256
    try:
        resource.setrlimit(resource.RLIMIT_NOFILE, (256, hard))
        with caplog.at_level(logging.INFO, "relay.server"):
            figure = raise_nofile(max_connections=10)
        assert resource.getrlimit(resource.RLIMIT_NOFILE)[0] == figure > 256
        assert f"open files limit raised from 256 to {figure}" in caplog.text
        caplog.clear()
        with caplog.at_level(logging.INFO, "relay.server"):
            raise_nofile(max_connections=figure)  # already raised; too small for the cap
        assert f"open files limit: {figure}" in caplog.text
        assert f"cannot hold limits.max_connections = {figure}" in caplog.text
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, old)


async def test_only_the_last_body_message_outlives_a_cancellation() -> None:
    """Quart-Trio cancels the request's nursery while Hypercorn is still inside the
    last ``send``; that send must finish, the others may be cancelled."""
    done: list[str] = []

    async def send(message: Message) -> None:
        await trio.lowlevel.checkpoint()  # Hypercorn's end-of-response work awaits
        done.append(f"{message['type']} more={message.get('more_body', False)}")

    shielded = _ending_shielded(send)
    with trio.CancelScope() as scope:
        scope.cancel()
        with pytest.raises(trio.Cancelled):
            await shielded({"type": "http.response.start", "status": 200, "headers": []})
        with pytest.raises(trio.Cancelled):
            await shielded({"type": "http.response.body", "body": b"a", "more_body": True})
        await shielded({"type": "http.response.body", "body": b"b"})
    assert done == ["http.response.body more=False"]
