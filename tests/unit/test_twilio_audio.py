"""is_audio: exactly standard base64 with padding, non-empty (docs/contract.md §6: audio that
either side would refuse is never relayed)."""

from __future__ import annotations

import base64
import re

from hypothesis import given, settings
from hypothesis import strategies as st

from relay.sessions.twilio_session import is_audio

# The reference: the regular expression is_audio replaced (same language, slower).
REFERENCE = re.compile(r"(?:[A-Za-z0-9+/]{4})*(?:[A-Za-z0-9+/]{2}==|[A-Za-z0-9+/]{3}=)?")
ALPHABET = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/=-_ \n\u00e9"


@settings(max_examples=5000, deadline=None)
@given(st.text(ALPHABET, max_size=24) | st.text(max_size=12))
def test_is_audio_matches_the_reference_language(text: str) -> None:
    assert is_audio(text) == (bool(text) and REFERENCE.fullmatch(text) is not None)


@settings(max_examples=300, deadline=None)
@given(st.binary(min_size=1, max_size=400))
def test_every_encoding_is_audio(data: bytes) -> None:
    assert is_audio(base64.b64encode(data).decode())


def test_non_strings_and_empty_are_not_audio() -> None:
    for value in (None, 1, b"YQ==", ["YQ=="], ""):
        assert not is_audio(value)
