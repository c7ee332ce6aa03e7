"""What the systemd tests share: systemd-analyze, a unit's settings, and a root
directory to verify a unit in (the host's units plus a stand-in ExecStart)."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

SYSTEMD = Path(__file__).resolve().parents[2] / "systemd"
UNIT = SYSTEMD / "relay.service"
EXEC_START = "/opt/relay/venv/bin/relay"
ANALYZE = shutil.which("systemd-analyze")


def analyze(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    assert ANALYZE is not None
    # SYSTEMD_LOG_COLOR/PAGER: plain text, no pager, whatever the terminal.
    env = dict(os.environ, SYSTEMD_COLORS="0", SYSTEMD_PAGER="", SYSTEMD_LOG_COLOR="0")
    return subprocess.run(
        [ANALYZE, *args], capture_output=True, text=True, env=env, cwd=cwd, timeout=60, check=False
    )


def unit_settings(text: str) -> dict[str, list[str]]:
    """``Key=value`` lines of a unit file (all sections), values in file order."""
    out: dict[str, list[str]] = {}
    for line in text.splitlines():
        line = line.strip()
        if not line or line.startswith(("#", ";", "[")):
            continue
        key, _, value = line.partition("=")
        out.setdefault(key.strip(), []).append(value.strip())
    return out


def verify_root(tmp_path: Path, files: dict[str, Path]) -> Path:
    """A root for ``systemd-analyze verify --root``: ``files`` (a path under
    /etc/systemd/system → the file to put there), the host's units, and an
    executable stand-in for the unit's ExecStart."""
    root = tmp_path / "root"
    units = root / "etc" / "systemd" / "system"
    for name, source in files.items():
        (units / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(source, units / name)
    for system_units in ("/usr/lib/systemd/system", "/lib/systemd/system"):
        if Path(system_units).is_dir():
            shutil.copytree(
                system_units, root / system_units.lstrip("/"), symlinks=True, dirs_exist_ok=True
            )
            break
    binary = root / EXEC_START.lstrip("/")
    binary.parent.mkdir(parents=True)
    binary.write_text("#!/bin/sh\nexit 0\n")
    binary.chmod(0o755)
    return root
