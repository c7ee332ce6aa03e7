from __future__ import annotations

import os

import orjson
import pytest
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from hypothesis import given
from hypothesis import strategies as st

from relay.admission.tokens import b64url_decode, b64url_encode, mint, new_key, token_id, verify

KEY = os.urandom(32)
NOW = 1_800_000_000.0


def check(token: str, key: bytes = KEY, now: float = NOW) -> str | None:
    return verify(key, token, max_ttl_seconds=300, skew_seconds=30, now=now)


def craft(claims: object, key: bytes = KEY) -> str:
    nonce = os.urandom(12)
    return b64url_encode(nonce + AESGCM(key).encrypt(nonce, orjson.dumps(claims), None))


def test_round_trip() -> None:
    assert check(mint(KEY, 60, now=NOW)) is None


@pytest.mark.parametrize("size", [16, 24, 32])
def test_all_key_sizes(size: int) -> None:
    key = os.urandom(size)
    assert check(mint(key, 60, now=NOW), key) is None


def test_tampered_truncated_wrong_key() -> None:
    token = mint(KEY, 60, now=NOW)
    raw = bytearray(b64url_decode(token))
    raw[20] ^= 1
    assert check(b64url_encode(bytes(raw))) == "token does not decrypt"
    assert check(token[:-4]) is not None
    assert check(token[:10]) == "token too short"
    assert check(token, os.urandom(32)) == "token does not decrypt"


def test_claims() -> None:
    assert check(craft({"origin": "server", "exp": int(NOW) + 10})) == "token origin is not client"
    assert check(craft({"exp": int(NOW) + 10})) == "token origin is not client"
    assert check(craft({"origin": "client", "exp": "soon"})) == "token exp is not an integer"
    assert check(craft({"origin": "client", "exp": True})) == "token exp is not an integer"
    assert check(craft([1, 2])) == "token origin is not client"
    assert check(craft({"origin": "client", "exp": int(NOW) + 10, "extra": 1})) is None
    nonce = os.urandom(12)
    not_json = b64url_encode(nonce + AESGCM(KEY).encrypt(nonce, b"\xff not json", None))
    assert check(not_json) == "token claims are not JSON"


def test_expiry_and_skew_edges() -> None:
    exp = int(NOW)
    token = craft({"origin": "client", "exp": exp})
    assert check(token, now=exp + 30) is None
    assert check(token, now=exp + 30.001) == "token expired"
    far = craft({"origin": "client", "exp": exp + 330})
    assert check(far, now=exp) is None
    too_far = craft({"origin": "client", "exp": exp + 331})
    assert check(too_far, now=exp) == "token lifetime too long"


@given(st.text(max_size=200))
def test_garbage_never_raises(text: str) -> None:
    assert check(text) is not None


@given(st.binary(max_size=120))
def test_random_bytes_never_validate(data: bytes) -> None:
    assert check(b64url_encode(data)) is not None


def test_new_key_is_32_bytes_base64url() -> None:
    key = new_key()
    assert "=" not in key and "+" not in key and "/" not in key
    assert len(b64url_decode(key)) == 32


def test_token_id_is_the_nonce_whatever_the_spelling() -> None:
    token = mint(KEY, 60, now=NOW)
    nonce = b64url_decode(token)[:12].hex()
    padded = token + "=" * (-len(token) % 4)
    standard = token.replace("-", "+").replace("_", "/")
    for spelling in (token, padded, standard):
        assert check(spelling) is None
        assert token_id(spelling) == nonce
    assert token_id(mint(KEY, 60, now=NOW)) != nonce
    assert token_id("") is None and token_id("abc") is None and token_id("é" * 40) is None
