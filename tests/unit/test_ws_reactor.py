"""relay.ws.reactor and the WebSocket fast path, over real socket pairs."""

from __future__ import annotations

import socket
from collections import deque

import pytest
import trio

from relay.ws import reactor
from relay.ws.connection import WebSocket
from relay.ws.errors import Disconnected
from tests.helpers import closing, pair


class Taker:
    """A fast path that handles messages starting with "fast" and leaves the rest."""

    def __init__(self, expect: int) -> None:
        self.taken: list[str | bytes] = []
        self.expect = expect
        self.done = trio.Event()

    def __call__(self, messages: deque[str | bytes]) -> None:
        while messages:
            m = messages[0]
            if isinstance(m, str) and m == "boom":
                raise RuntimeError("a fast path bug")
            if not (isinstance(m, str) and m.startswith("fast")):
                return
            self.taken.append(messages.popleft())
            if len(self.taken) >= self.expect:
                self.done.set()


async def _read_into(ws: WebSocket, got: list[str | bytes]) -> None:
    try:
        while True:
            got.append(await ws.receive())
    except Disconnected:
        pass


async def test_fast_path_takes_what_it_can_and_the_reader_gets_the_rest_in_order() -> None:
    client, server = pair()
    taker = Taker(expect=2)
    server.fast_path = taker
    got: list[str | bytes] = []
    async with closing(client, server), trio.open_nursery() as n:
        n.start_soon(_read_into, server, got)
        await trio.testing.wait_all_tasks_blocked()
        await client.send("fast1")
        await client.send("fast2")
        with trio.fail_after(5):
            await taker.done.wait()
        assert got == []  # the parked reader was never handed those
        # Left to the reader: the first message the fast path declines, and what
        # arrived behind it in the same read (order is never broken).
        await client.send_texts((b"slow3", b"fast4"))
        with trio.fail_after(5):
            while len(got) < 2:
                await trio.sleep(0.01)
        assert got == ["slow3", "fast4"]
        taker.done, taker.expect = trio.Event(), 3
        await client.send("fast5")  # the reader is parked again: the fast path has it
        with trio.fail_after(5):
            await taker.done.wait()
        assert taker.taken == ["fast1", "fast2", "fast5"]
        assert got == ["slow3", "fast4"]
        n.cancel_scope.cancel()


async def test_send_now_leftover_is_pushed_by_the_reactor_without_any_waiting_task() -> None:
    client, server = pair()  # 16 KiB socket buffers
    big = b"\x07" * 1_000_000
    async with closing(client, server):
        assert server.can_send_now()
        server.send_now(big)
        # The kernel took part of it; the rest waits in our queue, and no other
        # frame may be sent without waiting until it is gone.
        assert not server.can_send_now()
        with trio.fail_after(10):
            assert await client.receive() == big
        with trio.fail_after(5):
            while not server.can_send_now():
                await trio.sleep(0.01)
        server.send_now("after", "both")
        assert await client.receive() == "after"
        assert await client.receive() == "both"


async def test_input_that_arrived_while_the_reader_was_busy_is_not_lost() -> None:
    """Edge-triggered readiness: an event seen while nobody is parked must be
    remembered, or the next receive would wait forever."""
    client, server = pair()
    async with closing(client, server):
        await client.send("one")
        assert await server.receive() == "one"
        # The reader is busy (not in receive) while these arrive.
        await client.send("two")
        await client.send("three")
        await trio.sleep(0.1)
        with trio.fail_after(5):
            assert await server.receive() == "two"
            assert await server.receive() == "three"


async def test_more_input_than_one_read_is_all_delivered() -> None:
    client, server = pair()
    messages = [bytes([i]) * 40_000 for i in range(10)]  # 400 KB: many full reads
    async with closing(client, server), trio.open_nursery() as n:

        async def send() -> None:
            for m in messages:
                await client.send(m)

        n.start_soon(send)
        with trio.fail_after(10):
            got = [await server.receive() for _ in messages]
        assert got == messages


async def test_a_failing_fast_path_is_raised_by_the_reader_and_others_go_on() -> None:
    """A fast path's exception belongs to the session, not the reactor: the parked
    reader (the session's pump, inside its nursery) raises it; other connections
    go on being served."""
    c1, s1 = pair()
    c2, s2 = pair()
    s1.fast_path = Taker(expect=99)
    taker2 = Taker(expect=1)
    s2.fast_path = taker2
    raised: list[BaseException] = []

    async def read_s1() -> None:
        try:
            await s1.receive()
        except RuntimeError as exc:
            raised.append(exc)

    async with closing(c1, s1, c2, s2), trio.open_nursery() as n:
        n.start_soon(read_s1)
        n.start_soon(_read_into, s2, [])
        await trio.testing.wait_all_tasks_blocked()
        await c1.send("boom")
        with trio.fail_after(5):
            while not raised:
                await trio.sleep(0.01)
        assert str(raised[0]) == "a fast path bug"
        assert s1.fast_path is None  # nothing more is relayed fast on it
        assert await s1.receive() == "boom"  # the message is still the reader's
        await c2.send("fast-other")
        with trio.fail_after(5):
            await taker2.done.wait()
        n.cancel_scope.cancel()


async def test_closing_wakes_the_parked_reader_and_the_reactor_forgets_the_socket() -> None:
    client, server = pair()
    server.fast_path = Taker(expect=1)
    watched = reactor.reactor().watched
    async with closing(client, server):
        with trio.fail_after(5):
            async with trio.open_nursery() as n:

                async def read() -> None:
                    with pytest.raises(Disconnected) as info:
                        await server.receive()
                    assert info.value.code == 1006

                n.start_soon(read)
                await trio.testing.wait_all_tasks_blocked()
                server.transport.close()
        assert reactor.reactor().watched == watched - 1


async def test_peer_close_reaches_a_reader_parked_with_a_fast_path() -> None:
    client, server = pair()
    server.fast_path = Taker(expect=99)
    async with closing(client, server), trio.open_nursery() as n:

        async def close_soon() -> None:
            await trio.testing.wait_all_tasks_blocked()
            await client.close(4001, "done")

        n.start_soon(close_soon)
        with trio.fail_after(5), pytest.raises(Disconnected) as info:
            await server.receive()
        assert (info.value.code, info.value.reason) == (4001, "done")


async def test_a_hangup_that_arrived_with_the_last_bytes_is_not_lost() -> None:
    """Half a frame and the FIN in one go: one edge announces both, and after
    reading the byte the end of stream must still be read (found by the fuzzer)."""
    client, server = pair()
    async with closing(client, server):
        client.transport.sock.send(b"\x81")
        client.transport.sock.shutdown(socket.SHUT_WR)
        # The reactor sees the one edge while nobody is parked on the socket.
        await trio.sleep(0.05)
        await trio.testing.wait_all_tasks_blocked()
        with trio.fail_after(5), pytest.raises(Disconnected) as info:
            await server.receive()
        assert info.value.code == 1006


async def test_a_hangup_behind_half_a_frame_reaches_a_reader_parked_with_a_fast_path() -> None:
    client, server = pair()
    server.fast_path = Taker(expect=99)
    async with closing(client, server), trio.open_nursery() as n:

        async def hang_up() -> None:
            await trio.testing.wait_all_tasks_blocked()  # the reader is parked
            client.transport.sock.send(b"\x81")
            client.transport.sock.shutdown(socket.SHUT_WR)

        n.start_soon(hang_up)
        with trio.fail_after(5), pytest.raises(Disconnected) as info:
            await server.receive()
        assert info.value.code == 1006


async def test_send_text_now_sends_prebuilt_utf8_as_text_frames() -> None:
    client, server = pair()
    async with closing(client, server):
        server.send_text_now(b'{"a":"\xc3\xa9"}', b"")
        with trio.fail_after(5):
            assert await client.receive() == '{"a":"é"}'
            assert await client.receive() == ""
