from __future__ import annotations

import ipaddress

import pytest

from relay.config import AuthSettings
from relay.guards import OriginPolicy, client_ip

TRUSTED = (ipaddress.ip_network("10.0.0.0/8"), ipaddress.ip_network("::1/128"))


@pytest.mark.parametrize(
    ("peer", "xff", "expected"),
    [
        ("1.2.3.4", "9.9.9.9", "1.2.3.4"),  # untrusted peer: header ignored
        ("10.0.0.1", None, "10.0.0.1"),
        ("10.0.0.1", "9.9.9.9", "9.9.9.9"),
        ("10.0.0.1", "6.6.6.6, 9.9.9.9", "9.9.9.9"),  # client can prepend lies; rightmost wins
        ("10.0.0.1", "9.9.9.9, 10.0.0.7", "9.9.9.9"),  # chain of trusted proxies
        ("10.0.0.1", "garbage", "10.0.0.1"),
        ("::1", "2001:db8::1", "2001:db8::1"),
    ],
)
def test_client_ip(peer: str, xff: str | None, expected: str) -> None:
    assert client_ip(peer, xff, TRUSTED) == expected


def test_no_trusted_proxies_means_peer() -> None:
    assert client_ip("10.0.0.1", "9.9.9.9", ()) == "10.0.0.1"


@pytest.mark.parametrize(
    ("origin", "ok"),
    [
        ("https://gateframes.com", True),
        ("https://GateFrames.com", True),
        ("https://gateframes.com:443", True),
        ("https://gateframes.com:8443", False),
        ("http://gateframes.com", False),
        ("https://evil.gateframes.com", False),
        ("https://gateframes.com.evil.com", False),
        ("http://localhost:5173", True),
        ("http://localhost", True),
        ("https://localhost:5173", False),
        ("http://127.0.0.1:5173", False),
        ("null", False),
        ("", False),
        (None, False),
        ("https://gateframes.com/path", False),
    ],
)
def test_origins(origin: str | None, ok: bool) -> None:
    assert OriginPolicy(AuthSettings()).allows(origin) is ok


def test_localhost_can_be_turned_off() -> None:
    assert not OriginPolicy(AuthSettings(allow_localhost=False)).allows("http://localhost:3000")
