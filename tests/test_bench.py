"""`relay bench` smoke tests: tiny loads for a few seconds; the figures are not checked,
only that the bench runs end to end, prints its table and writes its JSON."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from relay.bench.fake import read_stamp, stamp_frame
from relay.bench.wire import OP_TEXT, Reader, frame


def _bench(tmp_path: Path, *args: str) -> tuple[str, dict[str, object]]:
    out = tmp_path / "bench.json"
    proc = subprocess.run(
        [sys.executable, "-m", "relay", "bench", *args, "--json", str(out)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return proc.stdout, json.loads(out.read_text())


def test_wire_frames_round_trip() -> None:
    reader = Reader()
    data = frame(b"x" * 300) + frame(b"hello", masked=True)
    got = reader.feed(data[:7]) + reader.feed(data[7:])
    assert got == [(OP_TEXT, b"x" * 300), (OP_TEXT, b"hello")]
    assert read_stamp(stamp_frame(7, 123456789, 3)) == (7, 123456789)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
def test_bench_twilio_prints_table_and_writes_json(tmp_path: Path) -> None:
    stdout, report = _bench(
        tmp_path, "--mode", "twilio", "--calls", "2", "--seconds", "1.5", "--warmup", "0.5"
    )
    assert "[relay] N=   2" in stdout
    assert "| relay | N |" in stdout
    results = report["results"]
    assert isinstance(results, dict)
    step = results["relay"]["steps"][0]
    assert step["calls"] == 2
    assert step["up_frames"] > 0 and step["down_frames"] > 0
    assert step["failed_calls"] == 0


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
def test_bench_client_mode(tmp_path: Path) -> None:
    stdout, report = _bench(tmp_path, "--mode", "client", "--seconds", "1", "--warmup", "0.5")
    assert "client relay, one session" in stdout
    results = report["results"]
    assert isinstance(results, dict)
    step = results["relay"]["steps"][0]
    assert step["up_msgs_per_s"] > 0 and step["down_msgs_per_s"] > 0
