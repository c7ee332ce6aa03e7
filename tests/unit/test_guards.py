from __future__ import annotations

import pytest

from relay.admission.guards import OriginPolicy
from relay.config import AuthSettings


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
