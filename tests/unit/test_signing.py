from __future__ import annotations

import hashlib
import hmac

import pytest
from hypothesis import given
from hypothesis import strategies as st

from relay.calls.signing import signature_header, verify

KEY = "whsec-test-key"
NOW = 1_800_000_000.0
BODY = b'{"type":"call.ended","call_sid":"CA00"}'


def mac(t: int, body: bytes = BODY, key: str = KEY) -> str:
    return hmac.new(key.encode(), f"{t}.".encode() + body, hashlib.sha256).hexdigest()


def test_header_shape_is_the_documented_one() -> None:
    header = signature_header(KEY, BODY, now=NOW + 0.9)
    # t is whole seconds; v1 is the HMAC of "<t>.<body>", as a receiver computes it.
    assert header == f"t={int(NOW)},v1={mac(int(NOW))}"


def test_round_trip() -> None:
    assert verify(signature_header(KEY, BODY, now=NOW), BODY, KEY, now=NOW)


def test_default_now_is_the_clock() -> None:
    assert verify(signature_header(KEY, BODY), BODY, KEY)


def test_tampered_body_is_refused() -> None:
    header = signature_header(KEY, BODY, now=NOW)
    assert not verify(header, BODY.replace(b"CA00", b"CA01"), KEY, now=NOW)
    assert not verify(header, BODY + b" ", KEY, now=NOW)
    assert not verify(header, b"", KEY, now=NOW)


def test_wrong_key_is_refused() -> None:
    header = signature_header(KEY, BODY, now=NOW)
    assert not verify(header, BODY, KEY + "x", now=NOW)
    assert not verify(header, BODY, "", now=NOW)


def test_tampered_t_is_refused() -> None:
    # Moving t (to slip an old event past the window) breaks the MAC.
    header = signature_header(KEY, BODY, now=NOW - 1000)
    forged = header.replace(f"t={int(NOW) - 1000}", f"t={int(NOW)}")
    assert forged != header
    assert not verify(forged, BODY, KEY, now=NOW)


@pytest.mark.parametrize(
    ("age", "ok"),
    [(0, True), (299, True), (300, True), (301, False), (3600, False), (-300, True), (-301, False)],
)
def test_old_and_future_t(age: int, ok: bool) -> None:
    header = signature_header(KEY, BODY, now=NOW - age)
    assert verify(header, BODY, KEY, now=NOW) is ok


def test_tolerance_is_a_parameter() -> None:
    header = signature_header(KEY, BODY, now=NOW - 60)
    assert verify(header, BODY, KEY, now=NOW, tolerance=60)
    assert not verify(header, BODY, KEY, now=NOW, tolerance=59)


def test_several_v1_entries_any_match_is_enough() -> None:
    t = int(NOW)
    good = mac(t)
    other = mac(t, key="old-key")
    assert verify(f"t={t},v1={other},v1={good}", BODY, KEY, now=NOW)
    assert verify(f"t={t},v1={good},v1={other}", BODY, KEY, now=NOW)
    assert verify(f"t={t},v1=nothex,v1={good}", BODY, KEY, now=NOW)
    assert not verify(f"t={t},v1={other},v1={other}", BODY, KEY, now=NOW)


def test_order_spaces_and_unknown_schemes() -> None:
    t = int(NOW)
    assert verify(f"v1={mac(t)},t={t}", BODY, KEY, now=NOW)
    assert verify(f"t={t}, v1={mac(t)}", BODY, KEY, now=NOW)
    # A v0 (Stripe's test scheme) or a future v2 is skipped, never trusted.
    assert verify(f"t={t},v0=abc,v1={mac(t)},v2=def", BODY, KEY, now=NOW)
    assert not verify(f"t={t},v0={mac(t)}", BODY, KEY, now=NOW)
    assert not verify(f"t={t},v2={mac(t)}", BODY, KEY, now=NOW)


@pytest.mark.parametrize(
    "header",
    [
        None,
        "",
        ",",
        "t=1800000000",  # no signature
        f"v1={mac(int(NOW))}",  # no t
        f"t=,v1={mac(int(NOW))}",
        f"t=1800000000,v1={mac(int(NOW))},garbage",  # a part without "="
        f"t=1800000000;v1={mac(int(NOW))}",
        f"t=1800000000,t=1800000000,v1={mac(int(NOW))}",  # two t
        f"t=-1800000000,v1={mac(int(NOW))}",
        f"t=+1800000000,v1={mac(int(NOW))}",
        f"t=1800000000.0,v1={mac(int(NOW))}",
        f"t=1e9,v1={mac(int(NOW))}",
        "t=\uff11\uff18\uff10\uff10000000,v1=" + mac(int(NOW)),  # fullwidth: int() takes them
        f"t=00000000000001800000000,v1={mac(int(NOW))}",  # too many digits
        f"T=1800000000,v1={mac(int(NOW))}",
        f"t=1800000000,V1={mac(int(NOW))}",
        "t=1800000000,v1=",
        "t=1800000000,v1=zz" + "0" * 62,  # non-hex, right length
        f"t=1800000000,v1={mac(int(NOW))[:-1]}",  # short
        f"t=1800000000,v1={mac(int(NOW))}0",  # long
        f"t=1800000000,v1={mac(int(NOW)).upper()}",
        f"t=1800000000,v1={mac(int(NOW))[:-1]}\udcff",  # lone surrogate, must not raise
    ],
)
def test_malformed_headers_are_refused(header: str | None) -> None:
    assert not verify(header, BODY, KEY, now=NOW)


def test_huge_header_is_refused_without_work() -> None:
    t = int(NOW)
    good = mac(t)
    # The good signature is there, but the header is far past any real one's size.
    huge = f"t={t}," + ",".join(["v1=" + "0" * 64] * 10_000) + f",v1={good}"
    assert not verify(huge, BODY, KEY, now=NOW)
    # Just under the cap, the same idea still works (the cap is not a parsing bug).
    small = f"t={t}," + ",".join(["v1=" + "0" * 64] * 40) + f",v1={good}"
    assert len(small) < 4096
    assert verify(small, BODY, KEY, now=NOW)


def test_unicode_key_and_binary_body() -> None:
    key = "clé-ü"
    body = bytes(range(256))
    assert verify(signature_header(key, body, now=NOW), body, key, now=NOW)
    assert not verify(signature_header(key, body, now=NOW), body, "cle-u", now=NOW)


@given(body=st.binary(max_size=256), flip=st.integers(min_value=0, max_value=255))
def test_any_changed_body_is_refused(body: bytes, flip: int) -> None:
    header = signature_header(KEY, body, now=NOW)
    assert verify(header, body, KEY, now=NOW)
    if body:
        changed = bytearray(body)
        changed[flip % len(body)] ^= 1
        assert not verify(header, bytes(changed), KEY, now=NOW)


@given(header=st.text(max_size=200))
def test_arbitrary_text_never_raises(header: str) -> None:
    assert verify(header, BODY, KEY, now=NOW) is False
