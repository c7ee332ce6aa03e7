"""relay.ws.frames: the RFC 6455 codec, against wsproto as the reference peer."""

from __future__ import annotations

import os

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from wsproto.frame_protocol import FrameProtocol, Opcode

from relay.ws.frames import (
    BINARY,
    CLOSE,
    CONT,
    CONTROL_BUDGET,
    CONTROL_WINDOW,
    FRAGMENT_COST,
    PING,
    PONG,
    TEXT,
    FrameParser,
    ProtocolError,
    encode,
    parse_close,
    unmask,
    unmask_py,
)


def wsproto_frames(messages: list[str | bytes], *, client: bool) -> bytes:
    """The same messages framed by wsproto (fragmented into 3 pieces when long)."""
    proto = FrameProtocol(client=client, extensions=[])
    out = b""
    for m in messages:
        if len(m) > 9:
            third = len(m) // 3
            parts = [m[:third], m[third : 2 * third], m[2 * third :]]
            for i, part in enumerate(parts):
                out += proto.send_data(part, fin=i == 2)
        else:
            out += proto.send_data(m, fin=True)
    return out


messages = st.lists(st.text(max_size=300) | st.binary(max_size=70_000), max_size=6)


@settings(max_examples=150, deadline=None)
@given(messages, st.integers(1, 4096), st.booleans())
def test_parses_what_wsproto_frames_in_any_chunking(
    msgs: list[str | bytes], chunk: int, from_client: bool
) -> None:
    wire = wsproto_frames(msgs, client=from_client)
    parser = FrameParser(masked=from_client, max_message=1 << 20)
    for i in range(0, len(wire), chunk):
        assert parser.feed(wire[i : i + chunk]) == []
    assert list(parser.messages) == msgs
    assert parser.buffered == 0


@settings(max_examples=100, deadline=None)
@given(messages, st.booleans())
def test_wsproto_parses_what_we_encode(msgs: list[str | bytes], mask: bool) -> None:
    wire = b"".join(
        encode(TEXT, m.encode(), mask=mask) if isinstance(m, str) else encode(BINARY, m, mask=mask)
        for m in msgs
    )
    proto = FrameProtocol(client=not mask, extensions=[])
    proto.receive_bytes(wire)
    got: list[str | bytes] = []
    for frame in proto.received_frames():
        got.append(frame.payload)  # type: ignore[arg-type]
        assert frame.opcode in (Opcode.TEXT, Opcode.BINARY)
    assert got == msgs


def test_unmask_is_its_own_inverse() -> None:
    for xor in (unmask, unmask_py):
        for n in (0, 1, 3, 4, 5, 125, 4096, 70_001):
            data, key = os.urandom(n), os.urandom(4)
            for payload in (data, bytearray(data)):  # the parser passes either
                assert xor(xor(payload, key), key) == data
                assert xor(payload, key) == bytes(b ^ key[i % 4] for i, b in enumerate(data))


def test_masking_runs_in_c() -> None:
    # Not a speed test: the C XOR must still load from `websockets` (a rename
    # there would silently put the relay back on the slower Python fallback).
    from websockets.speedups import apply_mask

    assert unmask is apply_mask


def test_oversize_is_refused_from_the_header_alone() -> None:
    parser = FrameParser(masked=False, max_message=100)
    header_only = encode(BINARY, b"x" * 101, mask=False)[:4]
    with pytest.raises(ProtocolError) as info:
        parser.feed(header_only)
    assert info.value.code == 1009


def test_exact_limit_passes_one_more_byte_does_not() -> None:
    parser = FrameParser(masked=True, max_message=1000)
    parser.feed(encode(TEXT, "é".encode() * 500, mask=True))  # 1000 UTF-8 bytes
    assert parser.messages.popleft() == "é" * 500
    with pytest.raises(ProtocolError) as info:
        parser.feed(encode(TEXT, b"a" * 1001, mask=True))
    assert info.value.code == 1009


def test_fragments_count_toward_the_limit() -> None:
    proto = FrameProtocol(client=True, extensions=[])
    parser = FrameParser(masked=True, max_message=10)
    parser.feed(proto.send_data(b"123456", fin=False))
    with pytest.raises(ProtocolError) as info:
        parser.feed(proto.send_data(b"78901", fin=True))
    assert info.value.code == 1009


def fragmented(opcode: int, parts: list[bytes]) -> bytes:
    """One message as masked frames with these payloads (the first carries the opcode)."""
    out = bytearray()
    for i, part in enumerate(parts):
        frame = bytearray(encode(opcode if i == 0 else CONT, part, mask=True))
        if i < len(parts) - 1:
            frame[0] &= 0x7F  # not the final frame
        out += frame
    return bytes(out)


@settings(max_examples=300, deadline=None)
@given(
    st.integers(1, 3000),
    st.lists(st.integers(0, 3000), min_size=1, max_size=60),
    st.integers(1, 5000),
    st.booleans(),
)
def test_fragment_budget_is_exact(limit: int, sizes: list[int], chunk: int, text: bool) -> None:
    """A message counts its payload plus FRAGMENT_COST per frame after the first:
    at most the limit passes whole, in any chunking; over it is 1009, however split."""
    parts = [bytes([0x61 + i % 26]) * n for i, n in enumerate(sizes)]
    wire = fragmented(TEXT if text else BINARY, parts)
    parser = FrameParser(masked=True, max_message=limit)
    cost = sum(sizes) + FRAGMENT_COST * (len(sizes) - 1)
    try:
        for i in range(0, len(wire), chunk):
            parser.feed(wire[i : i + chunk])
            assert parser.buffered <= limit + chunk + 14  # a message, one partial frame
    except ProtocolError as err:
        assert err.code == 1009 and cost > limit
        return
    assert cost <= limit
    whole = b"".join(parts)
    assert list(parser.messages) == [whole.decode() if text else whole]
    assert parser.buffered == 0


def test_one_frame_of_exactly_the_limit_passes_fragments_of_it_do_not() -> None:
    parser = FrameParser(masked=True, max_message=1000)
    parser.feed(encode(BINARY, b"x" * 1000, mask=True))
    assert parser.messages.popleft() == b"x" * 1000
    with pytest.raises(ProtocolError) as info:
        parser.feed(fragmented(BINARY, [b"x" * 990, b"", b""]))
    assert info.value.code == 1009
    parser = FrameParser(masked=True, max_message=1000)
    parser.feed(fragmented(BINARY, [b"x" * 984, b""]))  # 984 + 16: exactly the limit
    assert parser.messages.popleft() == b"x" * 984


def test_a_run_of_empty_fragments_is_refused_without_growing() -> None:
    """What the issue saw: millions of empty continuation frames, never a 1009."""
    limit = 1 << 20
    parser = FrameParser(masked=True, max_message=limit)
    parser.feed(fragmented(TEXT, [b"", b""])[:-6])  # a text frame, not final
    empty = bytes([0x00, 0x80]) + bytes(4)  # a masked empty continuation, not final
    batch = empty * 4096
    with pytest.raises(ProtocolError) as info:
        for _ in range(limit // FRAGMENT_COST // 4096 + 2):
            parser.feed(batch)
            assert parser.buffered <= len(batch)
    assert info.value.code == 1009


def test_after_an_error_the_peers_close_is_found_without_keeping_payloads() -> None:
    parser = FrameParser(masked=True, max_message=100)
    big = encode(BINARY, b"y" * 70_000, mask=True)
    after = encode(TEXT, b"z" * 300, mask=True) + encode(PING, b"p", mask=True)
    close = encode(CLOSE, b"\x03\xe8", mask=True)
    with pytest.raises(ProtocolError) as info:
        parser.feed(big[:1000])  # 1009 from the header; the payload is still coming
    assert info.value.code == 1009
    wire = big[1000:] + after + close
    found = [parser.skim_for_close(wire[i : i + 777]) for i in range(0, len(wire), 777)]
    assert found[-1] is True and not any(found[:-1])
    assert parser.buffered < 16  # at most a frame header between reads


def test_after_a_framing_error_there_is_no_close_to_find() -> None:
    parser = FrameParser(masked=True, max_message=100)
    with pytest.raises(ProtocolError):
        parser.feed(bytes([0x81 | 0x40, 0x80, 0, 0, 0, 0]))  # RSV1: nothing after is framed
    assert parser.skim_for_close(encode(CLOSE, b"", mask=True)) is None


def pings(n: int, opcode: int = PING) -> bytes:
    return encode(opcode, b"", mask=True) * n


def test_control_frame_budget_is_a_sliding_window() -> None:
    now = [100.0]
    parser = FrameParser(masked=True, max_message=100, clock=lambda: now[0])
    assert len(parser.feed(pings(CONTROL_BUDGET // 2))) == CONTROL_BUDGET // 2
    now[0] += CONTROL_WINDOW / 2
    assert len(parser.feed(pings(CONTROL_BUDGET // 2, PONG))) == CONTROL_BUDGET // 2
    now[0] += CONTROL_WINDOW / 2  # the first half is a whole window old: it no longer counts
    assert len(parser.feed(pings(CONTROL_BUDGET // 2))) == CONTROL_BUDGET // 2
    with pytest.raises(ProtocolError) as info:  # the second half is not
        parser.feed(pings(1, PONG))
    assert info.value.code == 1008


@pytest.mark.parametrize("opcode", [PING, PONG])
def test_one_control_frame_over_the_budget_is_1008(opcode: int) -> None:
    now = [0.0]
    parser = FrameParser(masked=True, max_message=100, clock=lambda: now[0])
    for _ in range(CONTROL_BUDGET):  # one per feed, spread over just under a window
        assert parser.feed(pings(1, opcode)) == [(opcode, b"")]
        now[0] += (CONTROL_WINDOW - 0.01) / CONTROL_BUDGET
    with pytest.raises(ProtocolError) as info:
        parser.feed(pings(1, opcode))
    assert info.value.code == 1008
    # A peer that keeps to the budget is never refused: one a window later passes.
    parser = FrameParser(masked=True, max_message=100, clock=lambda: now[0])
    for _ in range(3):
        assert len(parser.feed(pings(CONTROL_BUDGET))) == CONTROL_BUDGET
        now[0] += CONTROL_WINDOW


@pytest.mark.parametrize(
    ("wire", "code"),
    [
        (bytes([0x81 | 0x40, 0x80, 0, 0, 0, 0]), 1002),  # RSV1 without an extension
        (bytes([0x81, 0x00]), 1002),  # unmasked frame from a client
        (bytes([0x83, 0x80, 0, 0, 0, 0]), 1002),  # reserved data opcode
        (bytes([0x8B, 0x80, 0, 0, 0, 0]), 1002),  # reserved control opcode
        (bytes([0x09, 0x80, 0, 0, 0, 0]), 1002),  # fragmented ping
        (bytes([0x80, 0x80, 0, 0, 0, 0]), 1002),  # continuation of nothing
        (bytes([0x81, 0x82, 0, 0, 0, 0, 0xC3, 0x28]), 1007),  # invalid UTF-8
        (bytes([0x89, 0xFE, 0, 126]) + bytes(4) + bytes(126), 1002),  # ping > 125
        (bytes([0x82, 0xFF]) + (1 << 63).to_bytes(8, "big") + bytes(4), 1002),
    ],
)
def test_protocol_violations_name_their_close_code(wire: bytes, code: int) -> None:
    parser = FrameParser(masked=True, max_message=1 << 20)
    with pytest.raises(ProtocolError) as info:
        parser.feed(wire)
    assert info.value.code == code


def test_new_message_inside_a_fragmented_one_is_refused() -> None:
    proto = FrameProtocol(client=True, extensions=[])
    parser = FrameParser(masked=True, max_message=1 << 20)
    parser.feed(proto.send_data("ab", fin=False))
    raw = encode(TEXT, b"cd", mask=True)
    with pytest.raises(ProtocolError):
        parser.feed(raw)


def test_control_frames_are_returned_and_close_stops_parsing() -> None:
    parser = FrameParser(masked=True, max_message=100)
    wire = (
        encode(PING, b"hi", mask=True)
        + encode(TEXT, b"msg", mask=True)
        + encode(CLOSE, b"\x03\xe8bye", mask=True)
        + encode(TEXT, b"after", mask=True)
    )
    assert parser.feed(wire) == [(PING, b"hi"), (CLOSE, b"\x03\xe8bye")]
    assert list(parser.messages) == ["msg"]


def test_close_payloads() -> None:
    assert parse_close(b"") == (1005, "")
    assert parse_close(b"\x0f\xa0gone") == (4000, "gone")
    for bad in (b"\x03", b"\x03\xed", b"\x03\xee", b"\x00\x10", b"\x13\x88"):
        with pytest.raises(ProtocolError):
            parse_close(bad)
    with pytest.raises(ProtocolError) as info:
        parse_close(b"\x03\xe8\xff")
    assert info.value.code == 1007


def test_masking_keys_vary_across_refills_of_the_key_buffer() -> None:
    """Keys come from a CSPRNG buffer of 1024; 3000 frames cross it twice."""
    keys = [encode(TEXT, b"x", mask=True)[2:6] for _ in range(3000)]
    assert all(len(k) == 4 for k in keys)
    # 3000 random 32-bit keys collide with probability ~0.1%; a repeating or
    # constant buffer would give at most 1024 distinct ones.
    assert len(set(keys)) >= 2990
