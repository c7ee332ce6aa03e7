"""`relay soak`, in miniature: a few calls and clients for 9 s (about 20 s in all), only
to prove the soak runs end to end and judges correctly. The real run (50 calls, 20
clients, 10 minutes) is on demand: `relay soak --json soak.json`."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from relay.bench.soak import _relay_log, slope_per_minute


def test_slope_per_minute_is_least_squares() -> None:
    # 3 units per minute with noise that cancels out; too few points: no slope at all.
    points = [(0.0, 10.0), (30.0, 11.6), (60.0, 12.9), (90.0, 14.6), (120.0, 15.9)]
    slope = slope_per_minute(points)
    assert slope is not None and abs(slope - 3.0) < 0.1
    assert slope_per_minute(points[:2]) is None


def test_soak_help_is_registered() -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "relay", "soak", "--help"], capture_output=True, text=True
    )
    assert proc.returncode == 0, proc.stderr
    assert "--minutes" in proc.stdout and "--calls" in proc.stdout


@pytest.mark.slow
@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
def test_short_soak_passes_with_barge_ins_and_no_loss(tmp_path: Path) -> None:
    out = tmp_path / "soak.json"
    args = "--minutes 0.15 --calls 3 --clients 2 --interval 1.5 --barge-min 1 --barge-max 2"
    proc = subprocess.run(
        [sys.executable, "-m", "relay", "soak", *args.split(), "--json", str(out)],
        capture_output=True,
        text=True,
        timeout=90,
        env={**os.environ, "TMPDIR": str(tmp_path)},  # where the soak keeps the relay's log
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "SOAK PASSED" in proc.stdout
    report = json.loads(out.read_text())
    t = report["totals"]
    assert t["bargeins"] > 0
    assert t["clears"] == t["truncates"] == t["bargeins"]
    for direction in ("up", "down"):
        assert t[direction]["received"] > 0
        assert t[direction]["lost"] == 0 and t[direction]["gaps"] == 0
        assert t[direction]["calls"]["received"] > 0 and t[direction]["clients"]["received"] > 0
    assert t["upstream_errors"] == 0 and t["violations"] == 0
    # 3 calls and 2 clients, plus the primer's call and client
    assert t["sessions"]["opened"] == 7 and t["sessions"]["ended_by_relay"] == 0
    assert len(report["samples"]) >= 4
    assert all(s["tasks"] is not None for s in report["samples"])
    assert report["passed"] is True and report["failures"] == []
    # The log was judged, not missing (a missing log counts as an error).
    log = report["relay_log"]
    assert Path(log["path"]).is_file() and "listening on" in Path(log["path"]).read_text()


def test_a_missing_relay_log_is_an_error_not_a_clean_log(tmp_path: Path) -> None:
    assert _relay_log(tmp_path / "nope.log")["errors"] == 1
    (tmp_path / "relay.log").write_text("t INFO relay: listening on http://127.0.0.1:1\n")
    assert _relay_log(tmp_path / "relay.log")["errors"] == 0
