"""relay.admission.twilio_auth: SID shapes and the checks on a signed form (docs/contract.md §7),
stream tokens (§10). Pure functions; the end-to-end attacks are in tests/attacks/."""

from __future__ import annotations

import os
import string

import pytest
from hypothesis import given
from hypothesis import strategies as st

from relay.admission.tokens import b64url_decode, b64url_encode, mint
from relay.admission.twilio_auth import (
    SID_PREFIXES,
    STREAM_TOKEN_SECONDS,
    form_refusal,
    mint_stream_token,
    sid_shape_ok,
    verify_stream_token,
)

HEX = "0123456789abcdef" * 2
ACCOUNT = "AC" + "0" * 31 + "1"
KEY = os.urandom(32)
NOW = 1_800_000_000.0


@pytest.mark.parametrize(
    ("field", "prefix"),
    [
        ("AccountSid", "AC"),
        ("MessageSid", "IM"),
        ("ConversationSid", "CH"),
        ("ParticipantSid", "MB"),
        ("CallSid", "CA"),
        ("ChatServiceSid", "IS"),
        ("ConversationServiceSid", "IS"),
        ("MessagingServiceSid", "MG"),
        ("WebhookSid", "WH"),
    ],
)
def test_each_known_field_takes_its_own_prefix_only(field: str, prefix: str) -> None:
    assert SID_PREFIXES[field] == prefix
    assert sid_shape_ok(field, prefix + HEX)
    for other in {"AC", "IM", "CH", "MB", "CA", "IS", "ZZ"} - {prefix}:
        assert not sid_shape_ok(field, other + HEX), other


@pytest.mark.parametrize(
    "value",
    [
        "",
        "IM",
        "IM" + HEX[:-1],  # 31 hex
        "IM" + HEX + "0",  # 33 hex
        "IM" + HEX.upper(),  # Twilio writes lower case
        "im" + HEX,
        "IM" + HEX[:-1] + "g",
        "IM" + HEX + "\n",
        " IM" + HEX,
        "IM" + HEX + "ParticipantSidMB" + HEX,  # a neighbour run into it
        "IM" + "٣" * 32,  # digits, but not ASCII
    ],
)
def test_malformed_sids(value: str) -> None:
    assert not sid_shape_ok("MessageSid", value)
    assert not sid_shape_ok("UnknownSid", value)


def test_unknown_sid_fields_take_any_two_capitals() -> None:
    assert sid_shape_ok("ContentSid", "HX" + HEX)
    assert sid_shape_ok("FutureThingSid", "QQ" + HEX)
    assert not sid_shape_ok("FutureThingSid", "Q1" + HEX)


@given(st.text(alphabet=string.printable, max_size=40))
def test_only_the_exact_shape_passes(tail: str) -> None:
    value = "IM" + tail
    expected = len(tail) == 32 and all(c in "0123456789abcdef" for c in tail)
    assert sid_shape_ok("MessageSid", value) == expected


def test_form_refusal() -> None:
    good = {"AccountSid": ACCOUNT, "MessageSid": "IM" + HEX, "Body": "hi", "Author": "x"}
    assert form_refusal(good, ACCOUNT) is None
    assert form_refusal({"Body": "no sids at all"}, ACCOUNT) is None
    assert form_refusal({**good, "ParticipantSid": ""}, ACCOUNT) is None  # empty: absent
    other = form_refusal({**good, "AccountSid": "AC" + "9" * 32}, ACCOUNT)
    assert other is not None and other.status == 403
    # Nothing to compare with (signatures off, no secret): the shape still counts.
    assert form_refusal(good, None) is None
    bad = form_refusal({**good, "AccountSid": "AC1"}, None)
    assert bad is not None and bad.status == 400
    shape = form_refusal({**good, "MessageSid": "IM1"}, ACCOUNT)
    assert shape is not None and (shape.status, shape.reason) == (400, "malformed MessageSid")
    # A made-up field name never reaches the answer (or the log) as it was sent.
    odd = form_refusal({**good, "X\nforged log lineSid": "1"}, ACCOUNT)
    assert odd is not None and odd.reason == "malformed SID"


def test_stream_token_round_trip_and_lifetime() -> None:
    call = "CA" + HEX
    token = mint_stream_token(KEY, call, now=NOW)
    assert verify_stream_token(KEY, token, skew_seconds=30, now=NOW) == (call, "")
    end = NOW + STREAM_TOKEN_SECONDS
    assert verify_stream_token(KEY, token, skew_seconds=30, now=end + 30)[0] == call
    assert verify_stream_token(KEY, token, skew_seconds=30, now=end + 31) == (
        None,
        "stream token expired",
    )
    # Minted in the future (a clock far off): refused as too long-lived.
    assert verify_stream_token(KEY, token, skew_seconds=30, now=NOW - 60)[1] == (
        "stream token lifetime too long"
    )


def test_stream_token_refusals() -> None:
    call = "CA" + HEX
    token = mint_stream_token(KEY, call, now=NOW)
    raw = bytearray(b64url_decode(token))
    raw[-1] ^= 1
    cases = {
        "": "stream token missing or too long",
        "A" * 5000: "stream token missing or too long",
        "!!": "stream token too short",
        "AAAA": "stream token too short",
        b64url_encode(bytes(raw)): "stream token does not decrypt",
        mint_stream_token(os.urandom(32), call, now=NOW): "stream token does not decrypt",
        mint(KEY, 60, now=NOW): "stream token origin is not twilio",
    }
    for bad, reason in cases.items():
        assert verify_stream_token(KEY, bad, skew_seconds=30, now=NOW) == (None, reason), bad


@given(st.text(max_size=200))
def test_stream_token_verification_never_raises(token: str) -> None:
    call, reason = verify_stream_token(KEY, token, skew_seconds=30)
    assert call is None and reason
    assert len(token) < 3 or token not in reason


@given(st.dictionaries(st.text(max_size=12), st.text(max_size=40), max_size=5))
def test_form_refusal_takes_any_form(form: dict[str, str]) -> None:
    """Regression (fuzz): a non-ASCII AccountSid made hmac.compare_digest raise (500)."""
    refusal = form_refusal({**form, "AccountSid": "ACé" + form.get("AccountSid", "")}, ACCOUNT)
    assert refusal is not None and refusal.status == 403
