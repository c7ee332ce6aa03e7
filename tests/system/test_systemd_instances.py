"""Many processes per host as systemd template instances (README, "Scaling out").

relay@.service is the shipped relay.service installed under the template name,
plus the drop-in systemd/relay@.service.d/instance.conf that points each
instance at its own config. `systemd-analyze verify` checks the pair in a
throwaway root (as tests/system/test_systemd.py does for the plain unit), and the
same root proves the drop-in is really read. That two such instances share
limits and dedupe through Redis is tests/e2e/test_redis.py.

systemd is a Debian package (`apt-get install systemd`); without
systemd-analyze these tests skip and say so.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from tests.conftest import needs_analyze
from tests.system.units import EXEC_START, SYSTEMD, UNIT, analyze, unit_settings, verify_root

DROP_IN = SYSTEMD / "relay@.service.d" / "instance.conf"


@pytest.fixture
def root(tmp_path: Path) -> Path:
    """relay.service installed as relay@.service with the drop-in, as the README says."""
    return verify_root(
        tmp_path,
        {"relay@.service": UNIT, "relay@.service.d/instance.conf": DROP_IN},
    )


@needs_analyze
def test_instances_verify_silently(root: Path) -> None:
    for instance in ("8787", "8788"):
        result = analyze("verify", f"--root={root}", "--man=no", f"relay@{instance}.service")
        assert result.stdout + result.stderr == ""
        assert result.returncode == 0


@needs_analyze
def test_the_drop_in_is_what_verify_reads(root: Path) -> None:
    conf = root / "etc" / "systemd" / "system" / "relay@.service.d" / "instance.conf"
    conf.write_text(conf.read_text().replace(f"ExecStart={EXEC_START}", "ExecStart=/nowhere/relay"))
    result = analyze("verify", f"--root={root}", "--man=no", "relay@8788.service")
    assert "/nowhere/relay" in result.stdout + result.stderr


@needs_analyze
def test_instances_keep_the_sandbox(root: Path) -> None:
    result = analyze(
        "security", "--offline=true", f"--root={root}", "--no-pager", "relay@8788.service"
    )
    match = re.search(
        r"Overall exposure level for relay@8788\.service: (\d+(?:\.\d+)?)", result.stdout
    )
    assert match, result.stdout + result.stderr
    assert float(match.group(1)) <= 1.5


def test_each_instance_reads_its_own_config() -> None:
    """Cheap checks that stay on without systemd-analyze."""
    drop_in = unit_settings(DROP_IN.read_text())
    base = unit_settings(UNIT.read_text())
    # An empty ExecStart= first: a drop-in that only added one would give two.
    assert drop_in["ExecStart"] == ["", f"{EXEC_START} serve --config /etc/relay/%i.toml"]
    assert base["ExecStart"] == [f"{EXEC_START} serve --config /etc/relay/config.toml"]
    assert "%i" in drop_in["Description"][0]
    # Everything else (sandbox, Type=notify, watchdog, credentials) comes from relay.service.
    assert set(drop_in) == {"Description", "ExecStart"}
