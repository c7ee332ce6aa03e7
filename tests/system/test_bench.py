"""`relay bench` smoke tests: tiny loads for a few seconds; the figures are not checked,
only that the bench runs end to end, prints its table and writes its JSON."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

from relay.bench.fake import read_stamp, stamp_frame
from relay.bench.run import ACTING_CALLS, cpu_ratio_at_common_step, start_relay
from relay.bench.wire import OP_BINARY, OP_CLOSE, OP_PING, Closed, Reader, frame


def _bench(tmp_path: Path, *args: str) -> tuple[str, dict[str, object]]:
    out = tmp_path / "bench.json"
    scratch = tmp_path / "tmp"  # the bench's TMPDIR: the relays' work directories
    scratch.mkdir()
    proc = subprocess.run(
        [sys.executable, "-m", "relay", "bench", *args, "--json", str(out)],
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "TMPDIR": str(scratch)},
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert not [p.name for p in scratch.iterdir() if p.name.startswith("relay-bench-")]
    return proc.stdout, json.loads(out.read_text())


def test_wire_frames_round_trip() -> None:
    reader = Reader(masked=False)  # a caller's: the relay's frames are not masked
    data = frame(b"x" * 300) + frame(b"\x00\x01", OP_BINARY) + frame(b"hi", OP_PING)
    assert reader.feed(data[:7]) == []
    assert reader.feed(data[7:]) == [(OP_PING, b"hi")]
    assert list(reader.messages) == ["x" * 300, b"\x00\x01"]
    upstream = Reader(masked=True)  # the fake upstream's: the relay's frames are masked
    assert upstream.feed(frame(b"hello", masked=True) + frame(b"", OP_CLOSE, masked=True)) == [
        (OP_CLOSE, b"")
    ]
    assert list(upstream.messages) == ["hello"]
    with pytest.raises(Closed, match="masking"):  # the relay's framing is checked too
        Reader(masked=True).feed(frame(b"hello"))
    assert read_stamp(stamp_frame(7, 123456789, 3)) == (7, 123456789)


@pytest.mark.slow
@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
def test_bench_twilio_prints_table_and_writes_json(tmp_path: Path) -> None:
    stdout, report = _bench(
        tmp_path,
        *("--mode", "twilio", "--calls", "2", "--seconds", "1.5", "--warmup", "0.5"),
        "--baseline",
    )
    assert "[relay] N=   2" in stdout
    assert "[baseline] N=   2" in stdout
    assert "| relay | N |" in stdout
    results = report["results"]
    assert isinstance(results, dict)
    for name in ("relay", "baseline"):
        step = results[name]["steps"][0]
        assert step["calls"] == 2
        assert step["up_frames"] > 0 and step["down_frames"] > 0
        assert step["failed_calls"] == 0
    # Two calls are held by both: the report carries their CPU ratio at that step.
    ratio = report["ratio"]
    assert isinstance(ratio, dict)
    common = ratio["cpu_at_common_step"]
    assert common["calls"] == 2 and common["ratio"] > 0
    assert "ratio relay/baseline at 2 calls (the most both held)" in stdout


def _step(calls: int, cpu: float, p99: float = 5.0, lost: int = 0) -> dict[str, object]:
    return {
        "calls": calls,
        "cpu_ms_per_call_s": cpu,
        "up_p99_ms": p99,
        "down_p99_ms": p99,
        "up_lost": 0,
        "down_lost": lost,
        "failed_calls": 0,
        "dropped_calls": 0,
        "calls_up": calls,
    }


def test_cpu_ratio_is_taken_at_the_largest_step_both_passed() -> None:
    ours = [_step(10, 24.0), _step(25, 18.0), _step(50, 13.0)]
    theirs = [_step(10, 60.0), _step(25, 40.0, p99=300.0), _step(50, 30.0, lost=9)]
    assert cpu_ratio_at_common_step(ours, theirs) == (10, 0.4)
    assert cpu_ratio_at_common_step(ours, [_step(10, 60.0, lost=1)]) is None
    assert cpu_ratio_at_common_step([_step(25, 9.0)], [_step(10, 60.0)]) is None


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
def test_bench_client_mode(tmp_path: Path) -> None:
    stdout, report = _bench(tmp_path, "--mode", "client", "--seconds", "1", "--warmup", "0.5")
    assert "client relay, one session" in stdout
    results = report["results"]
    assert isinstance(results, dict)
    step = results["relay"]["steps"][0]
    assert step["up_msgs_per_s"] > 0 and step["down_msgs_per_s"] > 0


@pytest.mark.parametrize("acting", [True, False])
def test_the_relay_under_test_runs_with_tools_and_transcripts(acting: bool) -> None:
    """By default the twilio bench's relay has [calls] configured as in production
    (issue 18's cost is measured with it); ``--plain-calls`` leaves it out. Either
    way ``serve`` accepts the config (it exits 2 on a bad one)."""
    with socket.socket() as s:  # the fake upstream's port: no call is placed here
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    served = start_relay("relay", port, "twilio", None, acting=acting)
    try:
        assert served.workdir is not None
        config = tomllib.loads((served.workdir / "config.toml").read_text())
        assert config.get("calls") == (ACTING_CALLS if acting else None)
        assert served.popen is not None and served.popen.poll() is None
    finally:
        served.stop()
        served.remove_workdir()
    assert served.popen.returncode == 0
