"""``relay bench``: the orchestrator. Plain blocking code; every process it starts is
its own (the relay under test, the fake upstream, the load processes) and is
stopped by handle on every exit path.

Placement: the relay gets the first CPU of this process's affinity set, the
fake and the load processes share the others, so the relay's figures are one
core's worth and the generator never competes with it.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import multiprocessing
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.parse
from dataclasses import dataclass, field
from multiprocessing.connection import Connection
from multiprocessing.context import SpawnProcess
from pathlib import Path
from typing import Any

from relay.bench import fake as fake_mod
from relay.bench import load as load_mod

PUBLIC_URL = "https://relay.bench.invalid"
ORIGIN = "https://bench.example"
LATENCY_TARGET_MS = 20.0
CLK_TCK = os.sysconf("SC_CLK_TCK")
GRACE_S = 1.0  # frames still in flight this long after a window are counted lost


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="relay bench",
        description=(
            "Measure what one relay process carries per core (docs/contract.md §6 load profile)."
        ),
    )
    p.add_argument("--mode", choices=("twilio", "client"), default="twilio")
    group = p.add_mutually_exclusive_group()
    group.add_argument("--calls", type=int, help="hold this many calls (one step)")
    group.add_argument(
        "--ladder", default="10,25,50,100,150,200", help="comma-separated call counts, in order"
    )
    p.add_argument("--seconds", type=float, default=10.0, help="measurement window per step")
    p.add_argument("--warmup", type=float, default=2.0, help="seconds before each window")
    p.add_argument("--repeat", type=int, default=1, help="windows per step; medians are shown")
    p.add_argument("--baseline", action="store_true", help="also run the naive same-stack relay")
    p.add_argument("--json", dest="json_path", help="write the results here")
    p.add_argument("--loaders", type=int, default=0, help="load processes (default: auto)")
    p.add_argument("--open-rate", type=float, default=100.0, help="calls opened per second")
    p.add_argument("--keep-going", action="store_true", help="do not stop at saturation")
    p.add_argument(
        "--plain-calls",
        action="store_true",
        help="twilio mode: run our relay without its [calls] tools and transcripts "
        "(by default they are configured, as in production, and never called)",
    )
    ext = p.add_argument_group("external relay")
    ext.add_argument("--url", help="ws://host:port/twilio/media of a relay already running")
    ext.add_argument("--fake-port", type=int, default=0, help="port of the fake upstream")
    ext.add_argument("--relay-pid", type=int, help="its pid, for CPU and RSS figures")
    ext.add_argument("--public-url", help="URL Twilio signs (default: --url)")
    ext.add_argument("--auth-token", default=os.environ.get("TWILIO_AUTH_TOKEN", ""))
    ext.add_argument("--token", help="client mode: a client token for the relay")
    return p.parse_args(argv)


# -- processes -----------------------------------------------------------------
def _proc_cpu_ms(pid: int) -> float:
    """utime + stime of ``pid`` so far, in ms."""
    stat = Path(f"/proc/{pid}/stat").read_text()
    fields = stat[stat.rindex(")") + 2 :].split()
    return (int(fields[11]) + int(fields[12])) * 1000.0 / CLK_TCK


def _host_busy_ms() -> float:
    """CPU time all of the host's CPUs spent busy so far (ms), from /proc/stat."""
    fields = [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    idle = fields[3] + fields[4]
    return (sum(fields[:8]) - idle) * 1000.0 / CLK_TCK


def _rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    return 0


@dataclass
class Served:
    """A relay under test: ours, the baseline, or an external one (no process)."""

    name: str
    host: str
    port: int
    pid: int | None
    popen: subprocess.Popen[bytes] | None = None
    workdir: Path | None = None

    def stop(self) -> None:
        if self.popen is not None and self.popen.poll() is None:
            self.popen.send_signal(signal.SIGTERM)
            try:
                self.popen.wait(10)
            except subprocess.TimeoutExpired:
                self.popen.kill()
                self.popen.wait()

    def remove_workdir(self) -> None:
        """Its config, key and log (a failed start already reported the log's tail)."""
        if self.workdir is not None:
            shutil.rmtree(self.workdir, ignore_errors=True)


def _wait_listening(popen: subprocess.Popen[bytes], log: Path, timeout: float = 30) -> int:
    deadline = time.monotonic() + timeout
    marker = "listening on http://"
    while time.monotonic() < deadline:
        text = log.read_text(errors="replace")
        idx = text.find(marker)
        if idx >= 0:
            return int(text[idx + len(marker) :].split()[0].rsplit(":", 1)[1])
        if popen.poll() is not None:
            raise RuntimeError(f"relay exited with {popen.returncode}:\n{text[-2000:]}")
        time.sleep(0.05)
    raise RuntimeError(f"relay did not start in {timeout}s:\n{log.read_text()[-2000:]}")


# What a production phone line configures (docs/contract.md §11): the built-ins, a
# transfer target, one HTTP tool and transcripts. The bench's model never calls a
# tool and its endless answer never ends, so this measures what having them
# costs each call, not what calling them does. No events_url: calls end between
# steps, and their events' retries would land in the next window.
ACTING_CALLS: dict[str, Any] = {
    "tools": ["end_call", "transfer_call"],
    "transfer_targets": {"front_desk": "+14155550100"},
    "dtmf": True,
    "transcripts": True,
    "http_tools": [
        {
            "name": "lookup_order",
            "description": "Look up an order by its number",
            "parameters": {
                "type": "object",
                "properties": {"order": {"type": "string"}},
                "required": ["order"],
            },
            "url": "http://127.0.0.1:9/lookup_order",  # never called
            "timeout_seconds": 5,
        }
    ],
}


def start_relay(
    name: str, fake_port: int, mode: str, cpu: int | None, *, acting: bool = True
) -> Served:
    from relay.testing.daemon import daemon_config, daemon_env, toml_dumps

    workdir = Path(tempfile.mkdtemp(prefix=f"relay-bench-{name}-"))
    log = workdir / "relay.log"
    upstream = f"ws://127.0.0.1:{fake_port}/v1/realtime"
    # An HTTP tool needs the signing key (serve exits 2 without it).
    env = daemon_env(EVENTS_SIGNING_KEY=os.urandom(32).hex())
    if name == "baseline":
        cmd = [sys.executable, "-m", "relay.bench.baseline", "--upstream", upstream]
    else:
        config = daemon_config(
            {
                "server": {"public_url": PUBLIC_URL, "log_level": "info", "drain_seconds": 1},
                "openai": {"realtime_url": upstream, "connect_timeout_seconds": 10},
                "limits": {
                    "session_seconds": 86400,
                    "ws_upgrades_per_minute": 10**6,
                    "http_per_minute": 10**6,
                    "sessions_per_ip": 10**6,
                    "max_sessions": 10**6,
                },
                "auth": {"allowed_origins": [ORIGIN], "sessions_per_token": 0},
            }
        )
        if mode == "twilio" and acting:
            config["calls"] = dict(ACTING_CALLS)
        (workdir / "config.toml").write_text(toml_dumps(config))
        (workdir / "env.json").write_text(json.dumps({"ENCRYPTION_KEY": env["ENCRYPTION_KEY"]}))
        cmd = [sys.executable, "-m", "relay", "serve", "--config", str(workdir / "config.toml")]
    with open(log, "wb") as out:
        popen = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=env)
    if cpu is not None:
        os.sched_setaffinity(popen.pid, {cpu})
    try:
        port = _wait_listening(popen, log)
    except BaseException:
        popen.kill()
        popen.wait()
        shutil.rmtree(workdir, ignore_errors=True)  # the error carries the log's tail
        raise
    return Served(name, "127.0.0.1", port, popen.pid, popen, workdir)


@dataclass
class Child:
    proc: SpawnProcess
    ctrl: Connection

    @property
    def pid(self) -> int:
        assert self.proc.pid is not None
        return self.proc.pid

    def stop(self) -> None:
        if self.proc.is_alive():
            with contextlib.suppress(OSError):
                self.ctrl.send(("stop",))
            self.proc.join(5)
        if self.proc.is_alive():
            self.proc.terminate()
            self.proc.join(5)


def _spawn(target: Any, args: tuple[Any, ...]) -> Child:
    ctx = multiprocessing.get_context("spawn")
    parent, child = ctx.Pipe()
    proc = ctx.Process(target=target, args=(child, *args), daemon=True)
    proc.start()
    return Child(proc, parent)


# -- statistics ----------------------------------------------------------------
def _pct(values: list[float], q: float) -> float | None:
    if not values:
        return None
    values = sorted(values)
    return values[min(len(values) - 1, int(q * len(values)))]


def _floats(blob: bytes) -> list[float]:
    from array import array

    a = array("d")
    a.frombytes(blob)
    return a.tolist()


def _median(values: list[Any]) -> Any:
    present = sorted(v for v in values if v is not None)
    return present[len(present) // 2] if present else None


@dataclass
class Step:
    calls: int
    figures: list[dict[str, Any]] = field(default_factory=list)

    def summary(self) -> dict[str, Any]:
        """Each figure's median over the step's windows."""
        keys = self.figures[0].keys()
        out: dict[str, Any] = {"calls": self.calls, "windows": len(self.figures)}
        for k in keys:
            if k == "calls":
                continue
            vals = [f[k] for f in self.figures]
            out[k] = _median(vals) if not isinstance(vals[0], bool) else all(vals)
        return out


# -- one target through the ladder -----------------------------------------------
class Bench:
    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        cpus = sorted(os.sched_getaffinity(0))
        self.relay_cpu: int | None = cpus[0] if len(cpus) > 1 else None
        self.load_cpus: set[int] | None = set(cpus[1:]) if len(cpus) > 1 else None
        n_load_cpus = max(1, len(cpus) - 1)
        # One load process per spare core, less one for the fake when there are several.
        self.n_loaders = args.loaders or max(1, n_load_cpus - 1)
        if args.mode == "client":
            self.n_loaders = 1
        self.fake: Child | None = None
        self.fake_port = 0

    def start_fake(self) -> None:
        profile = self.args.mode
        self.fake = _spawn(fake_mod.process_main, (profile, self.load_cpus, self.args.fake_port))
        self.fake_port = int(self.fake.ctrl.recv())

    def target(self, served: Served) -> load_mod.Target:
        a = self.args
        if a.mode == "client":
            token = a.token or self._mint(served)
            resource = f"/token/{token}"
            if a.url:
                resource = urllib.parse.urlsplit(a.url).path or resource
            return load_mod.Target(served.host, served.port, resource, [("Origin", ORIGIN)])
        from twilio.request_validator import RequestValidator

        from relay.testing.daemon import TEST_TWILIO_TOKEN

        if a.url:
            parts = urllib.parse.urlsplit(a.url)
            resource = parts.path + (f"?{parts.query}" if parts.query else "")
            signed, token = a.public_url or a.url, a.auth_token
        else:
            resource = "/twilio/media"
            signed, token = "wss://relay.bench.invalid/twilio/media", TEST_TWILIO_TOKEN
        headers = [("User-Agent", "Twilio.TmeWs/1.0")]
        if token:
            headers.append(("X-Twilio-Signature", RequestValidator(token).compute_signature(
                signed, {})))  # fmt: skip
        return load_mod.Target(served.host, served.port, resource, headers)

    @staticmethod
    def _mint(served: Served) -> str:
        from relay.admission.tokens import b64url_decode, mint

        assert served.workdir is not None
        key = json.loads((served.workdir / "env.json").read_text())["ENCRYPTION_KEY"]
        return mint(b64url_decode(key), 300)  # auth.token_max_ttl_seconds

    def serve(self, name: str) -> Served:
        a = self.args
        if name == "relay" and a.url:
            parts = urllib.parse.urlsplit(a.url)
            return Served("external", parts.hostname or "127.0.0.1", parts.port or 80, a.relay_pid)
        return start_relay(name, self.fake_port, a.mode, self.relay_cpu, acting=not a.plain_calls)

    def run_target(self, name: str, ladder: list[int]) -> dict[str, Any]:
        served = self.serve(name)
        loaders: list[Child] = []
        try:
            target = self.target(served)
            loaders = [
                _spawn(load_mod.process_main, (target, i, self.args.mode, self.load_cpus))
                for i in range(self.n_loaders)
            ]
            time.sleep(1.0)  # let the relay settle before its idle RSS is read
            idle = _rss_kib(served.pid) if served.pid else None
            if self.args.mode == "client":
                steps = [self._client_step(served, loaders)]
            else:
                steps = self._ladder(name, served, loaders, ladder, idle)
            return {"name": served.name, "pid": served.pid, "idle_rss_kib": idle, "steps": steps}
        finally:
            for child in loaders:
                child.stop()
            served.stop()
            served.remove_workdir()

    def _ladder(
        self, name: str, served: Served, loaders: list[Child], ladder: list[int], idle: int | None
    ) -> list[dict[str, Any]]:
        steps = []
        for n in ladder:
            per = [n // len(loaders) + (1 if i < n % len(loaders) else 0)
                   for i in range(len(loaders))]  # fmt: skip
            for child, k in zip(loaders, per, strict=True):
                child.ctrl.send(("set", k, self.args.open_rate / len(loaders)))
            for child in loaders:
                child.ctrl.recv()
            time.sleep(self.args.warmup)
            step = Step(n)
            for _ in range(max(1, self.args.repeat)):
                step.figures.append(self._window(served, loaders, n, idle))
            summary = step.summary()
            steps.append(summary)
            print(_progress(name, summary), flush=True)
            if not self.args.keep_going and _saturated(summary):
                print(f"[{name}] saturated at {n} calls: ladder stopped", flush=True)
                break
        return steps

    def _window(
        self, served: Served, loaders: list[Child], n: int, idle: int | None
    ) -> dict[str, Any]:
        assert self.fake is not None
        secs = self.args.seconds
        t0 = time.monotonic_ns() + 200_000_000
        t1 = t0 + int(secs * 1e9)
        for child in (self.fake, *loaders):
            child.ctrl.send(("window", t0, t1))
        gen_pids = [self.fake.pid, *(c.pid for c in loaders)]
        time.sleep(max(0.0, (t0 - time.monotonic_ns()) / 1e9))
        relay0 = _proc_cpu_ms(served.pid) if served.pid else None
        gen0 = sum(_proc_cpu_ms(p) for p in gen_pids)
        host0 = _host_busy_ms()
        time.sleep(max(0.0, (t1 - time.monotonic_ns()) / 1e9))
        relay1 = _proc_cpu_ms(served.pid) if served.pid else None
        gen1 = sum(_proc_cpu_ms(p) for p in gen_pids)
        host1 = _host_busy_ms()
        rss = _rss_kib(served.pid) if served.pid else None
        # Whatever else ran on the host meanwhile: other work skews every figure.
        relay_ms = relay1 - relay0 if relay0 is not None and relay1 is not None else None
        foreign = (host1 - host0) - (gen1 - gen0) - (relay_ms or 0.0)
        time.sleep(GRACE_S)
        self.fake.ctrl.send(("collect",))
        fk = self.fake.ctrl.recv()
        lds = []
        for child in loaders:
            child.ctrl.send(("collect",))
            lds.append(child.ctrl.recv())
        up = _floats(fk["up_lat"])
        down = [x for ld in lds for x in _floats(ld["down_lat"])]
        lag = [x for ld in lds for x in _floats(ld["lag"])]
        up_sent = sum(ld["up_sent"] for ld in lds)
        arrived = fk["up_arrived"] + sum(ld["down_arrived"] for ld in lds)
        down_recv = sum(ld["down_recv"] for ld in lds)
        n_load_cpus = len(self.load_cpus) if self.load_cpus else 1
        gen_util = (gen1 - gen0) / (secs * 1000) / n_load_cpus
        lag_p99 = _pct(lag, 0.99)
        return {
            "calls": n,
            "calls_up": sum(ld["calls"] for ld in lds),
            "up_p50_ms": _pct(up, 0.5),
            "up_p99_ms": _pct(up, 0.99),
            "down_p50_ms": _pct(down, 0.5),
            "down_p99_ms": _pct(down, 0.99),
            "up_frames": up_sent,
            "down_frames": fk["down_sent"],
            "up_lost": up_sent - fk["up_recv"],
            "down_lost": fk["down_sent"] - down_recv,
            "reordered": fk["reordered"] + sum(ld["reordered"] for ld in lds),
            "failed_calls": sum(ld["failed"] for ld in lds),
            "dropped_calls": sum(ld["dropped"] for ld in lds),
            "relay_cpu_util": None if relay_ms is None else relay_ms / (secs * 1000),
            "cpu_ms_per_call_s": None if relay_ms is None else relay_ms / (n * secs),
            # Robust when the relay falls behind: cost per frame it actually relayed.
            "cpu_us_per_frame": None
            if relay_ms is None or not arrived
            else relay_ms * 1000 / arrived,
            "frames_per_s": arrived / secs,
            "rss_kib": rss,
            "rss_kib_per_call": None if rss is None or idle is None else (rss - idle) / n,
            "gen_cpu_util": gen_util,
            "gen_lag_p99_ms": lag_p99,
            "gen_bound": gen_util > 0.9 or (lag_p99 or 0) > 5.0,
            "foreign_cpu_util": max(0.0, foreign / (secs * 1000)),
            "loadavg": os.getloadavg()[0],
        }

    def _client_step(self, served: Served, loaders: list[Child]) -> dict[str, Any]:
        assert self.fake is not None
        loader = loaders[0]
        loader.ctrl.send(("client",))
        reply = loader.ctrl.recv()
        if reply[0] != "ready":
            raise RuntimeError(f"client session failed: {reply[1]}")
        time.sleep(self.args.warmup)
        figures = []
        for _ in range(max(1, self.args.repeat)):
            secs = self.args.seconds
            t0 = time.monotonic_ns() + 200_000_000
            t1 = t0 + int(secs * 1e9)
            for child in (self.fake, loader):
                child.ctrl.send(("window", t0, t1))
            time.sleep(max(0.0, (t0 - time.monotonic_ns()) / 1e9))
            relay0 = _proc_cpu_ms(served.pid) if served.pid else None
            gen_pids = [self.fake.pid, loader.pid]
            gen0 = sum(_proc_cpu_ms(p) for p in gen_pids)
            time.sleep(max(0.0, (t1 - time.monotonic_ns()) / 1e9))
            relay1 = _proc_cpu_ms(served.pid) if served.pid else None
            gen1 = sum(_proc_cpu_ms(p) for p in gen_pids)
            self.fake.ctrl.send(("collect",))
            fk = self.fake.ctrl.recv()
            loader.ctrl.send(("collect",))
            ld = loader.ctrl.recv()
            n_load_cpus = len(self.load_cpus) if self.load_cpus else 1
            gen_util = (gen1 - gen0) / (secs * 1000) / n_load_cpus
            fig = {
                "calls": 1,
                "up_msgs_per_s": fk["msgs_in"] / secs,
                "down_msgs_per_s": ld["msgs_in"] / secs,
                "relay_cpu_util": None
                if relay0 is None or relay1 is None
                else (relay1 - relay0) / (secs * 1000),
                "gen_cpu_util": gen_util,
                "gen_bound": gen_util > 0.9,
                "dropped": ld["dropped"],
            }
            figures.append(fig)
            print(
                f"[client] up {fig['up_msgs_per_s']:,.0f} msg/s  "
                f"down {fig['down_msgs_per_s']:,.0f} msg/s  "
                f"relay cpu {_fmt(fig['relay_cpu_util'], 0, 100)}%  "
                f"gen cpu {gen_util * 100:.0f}%",
                flush=True,
            )
        step = Step(1, figures)
        return step.summary()


# -- output --------------------------------------------------------------------
def _fmt(v: float | None, digits: int = 1, scale: float = 1.0) -> str:
    return "-" if v is None else f"{v * scale:.{digits}f}"


def _ok(s: dict[str, Any]) -> bool:
    """The capacity criterion: p99 ≤ 20 ms both ways, nothing lost, every call up."""
    return (
        s["up_p99_ms"] is not None
        and s["down_p99_ms"] is not None
        and s["up_p99_ms"] <= LATENCY_TARGET_MS
        and s["down_p99_ms"] <= LATENCY_TARGET_MS
        and s["up_lost"] == 0
        and s["down_lost"] == 0
        and s["failed_calls"] == 0
        and s["dropped_calls"] == 0
        and s["calls_up"] == s["calls"]
    )


def _saturated(s: dict[str, Any]) -> bool:
    worst = max(s["up_p99_ms"] or 1e9, s["down_p99_ms"] or 1e9)
    lost = s["up_lost"] + s["down_lost"]
    frames = max(1, s["up_frames"] + s["down_frames"])
    return worst > 200 or lost / frames > 0.02 or s["failed_calls"] > 0


def _progress(name: str, s: dict[str, Any]) -> str:
    flag = "ok" if _ok(s) else "FAIL"
    warn = "  WARNING: generator-bound, figures untrustworthy" if s["gen_bound"] else ""
    busy = "  WARNING: other processes used the CPUs" if s["foreign_cpu_util"] > 0.15 else ""
    return (
        f"[{name}] N={s['calls']:>4}  up p50/p99 {_fmt(s['up_p50_ms'])}/{_fmt(s['up_p99_ms'])} ms"
        f"  down p50/p99 {_fmt(s['down_p50_ms'])}/{_fmt(s['down_p99_ms'])} ms"
        f"  lost {s['up_lost']}/{s['down_lost']}"
        f"  cpu {_fmt(s['cpu_ms_per_call_s'], 2)} ms/call-s ({_fmt(s['relay_cpu_util'], 0, 100)}%)"
        f" {_fmt(s['cpu_us_per_frame'], 0)} us/frame"
        f"  rss {_fmt(s['rss_kib_per_call'], 0)} KiB/call"
        f"  gen {s['gen_cpu_util'] * 100:.0f}% lag p99 {_fmt(s['gen_lag_p99_ms'], 2)} ms"
        f"  other {s['foreign_cpu_util'] * 100:.0f}%  {flag}{warn}{busy}"
    )


def _table(results: dict[str, Any]) -> str:
    head = (
        "| relay | N | up p50 | up p99 | down p50 | down p99 | lost up/down "
        "| CPU ms/call-s | relay CPU | RSS KiB/call | gen CPU | gen lag p99 | ok |"
    )
    rows = [head, "|" + "---|" * 13]
    for name, res in results.items():
        for s in res["steps"]:
            rows.append(
                f"| {name} | {s['calls']} | {_fmt(s['up_p50_ms'])} | {_fmt(s['up_p99_ms'])} "
                f"| {_fmt(s['down_p50_ms'])} | {_fmt(s['down_p99_ms'])} "
                f"| {s['up_lost']}/{s['down_lost']} | {_fmt(s['cpu_ms_per_call_s'], 2)} "
                f"| {_fmt(s['relay_cpu_util'], 0, 100)}% | {_fmt(s['rss_kib_per_call'], 0)} "
                f"| {s['gen_cpu_util'] * 100:.0f}% | {_fmt(s['gen_lag_p99_ms'], 2)} "
                f"| {'yes' if _ok(s) else 'no'}{' (gen-bound)' if s['gen_bound'] else ''} |"
            )
    return "\n".join(rows)


def cpu_ratio_at_common_step(
    ours: list[dict[str, Any]], theirs: list[dict[str, Any]]
) -> tuple[int, float] | None:
    """(N, our CPU per call-second / theirs) at the largest N both passed: the
    ratio the report can always give, when one relay cannot hold 50 calls."""
    passed = {s["calls"]: s for s in theirs if _ok(s)}
    common = [s for s in ours if _ok(s) and s["calls"] in passed]
    if not common:
        return None
    mine = max(common, key=lambda s: s["calls"])
    other = passed[mine["calls"]]
    if not other["cpu_ms_per_call_s"]:
        return None
    return mine["calls"], mine["cpu_ms_per_call_s"] / other["cpu_ms_per_call_s"]


def _summary(res: dict[str, Any]) -> dict[str, Any]:
    steps = res["steps"]
    passing = [s["calls"] for s in steps if _ok(s)]
    at50 = next((s for s in steps if s["calls"] == 50), None)
    return {
        "calls_per_core": max(passing) if passing else 0,
        "cpu_ms_per_call_s_at_50": at50["cpu_ms_per_call_s"] if at50 else None,
        # Per offered call-second, the figure flatters a relay that fell behind (it
        # did less work than offered); per relayed frame it does not.
        "kept_up_at_50": at50 is not None and at50["up_lost"] == 0 and at50["down_lost"] == 0,
        "cpu_us_per_frame_at_50": at50["cpu_us_per_frame"] if at50 else None,
        "rss_kib_per_call_max_n": steps[-1]["rss_kib_per_call"] if steps else None,
        "any_gen_bound": any(s["gen_bound"] for s in steps),
    }


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    ladder = [args.calls] if args.calls else [int(x) for x in args.ladder.split(",") if x]
    bench = Bench(args)
    results: dict[str, Any] = {}
    started = time.time()
    try:
        bench.start_fake()
        print(
            f"relay bench: mode {args.mode}, relay on CPU {bench.relay_cpu}, "
            f"generator on CPUs {sorted(bench.load_cpus or [])} "
            f"({bench.n_loaders} load process(es) + fake upstream on port {bench.fake_port})",
            flush=True,
        )
        results["relay"] = bench.run_target("relay", ladder)
        if args.baseline and args.mode == "twilio":
            results["baseline"] = bench.run_target("baseline", ladder)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 1
    finally:
        if bench.fake is not None:
            bench.fake.stop()
    report: dict[str, Any] = {
        "mode": args.mode,
        "args": vars(args),
        "started_unix": started,
        "cpus": sorted(os.sched_getaffinity(0)),
        "relay_cpu": bench.relay_cpu,
        # The [calls] section our relay ran with (None: none, as before issue 18).
        "calls_config": ACTING_CALLS if args.mode == "twilio" and not args.plain_calls else None,
        "results": results,
    }
    if args.mode == "twilio":
        summaries = {name: _summary(res) for name, res in results.items()}
        report["summary"] = summaries
        print()
        print(_table(results))
        print()
        for name, s in summaries.items():
            print(
                f"{name}: {s['calls_per_core']} calls per core at p99 ≤ {LATENCY_TARGET_MS:.0f} ms"
                f" with no loss; {_fmt(s['cpu_ms_per_call_s_at_50'], 2)} CPU-ms per call-second"
                f" at 50 calls ({_fmt(s['cpu_us_per_frame_at_50'], 0)} µs per relayed frame);"
                f" {_fmt(s['rss_kib_per_call_max_n'], 0)} KiB RSS per call"
                + ("  (some steps generator-bound)" if s["any_gen_bound"] else "")
            )
        if "baseline" in summaries:
            r, b = summaries["relay"], summaries["baseline"]
            ratio_calls = r["calls_per_core"] / b["calls_per_core"] if b["calls_per_core"] else None
            rc, bc = r["cpu_ms_per_call_s_at_50"], b["cpu_ms_per_call_s_at_50"]
            ratio_cpu = rc / bc if rc is not None and bc else None
            rf, bf = r["cpu_us_per_frame_at_50"], b["cpu_us_per_frame_at_50"]
            ratio_frame = rf / bf if rf is not None and bf else None
            common = cpu_ratio_at_common_step(
                results["relay"]["steps"], results["baseline"]["steps"]
            )
            report["ratio"] = {
                "calls_per_core": ratio_calls,
                "cpu_at_50": ratio_cpu,
                "cpu_per_frame_at_50": ratio_frame,
                "cpu_at_common_step": (
                    {"calls": common[0], "ratio": common[1]} if common else None
                ),
            }
            caveat = (
                ""
                if r["kept_up_at_50"] and b["kept_up_at_50"]
                else " (not comparable: a relay fell behind at 50 calls)"
            )
            print(
                f"ratio relay/baseline: calls per core {_fmt(ratio_calls, 2)}x (target ≥ 3x), "
                f"CPU per call-second at 50 calls {_fmt(ratio_cpu, 2)}x{caveat} "
                f"(target ≤ 0.4x), CPU per relayed frame at 50 calls {_fmt(ratio_frame, 2)}x"
            )
            if common is not None:
                print(
                    f"ratio relay/baseline at {common[0]} calls (the most both held): "
                    f"CPU per call-second {common[1]:.2f}x"
                )
    else:
        s = results["relay"]["steps"][0]
        print(
            f"\nclient relay, one session: {s['up_msgs_per_s']:,.0f} msg/s up, "
            f"{s['down_msgs_per_s']:,.0f} msg/s down (target ≥ 10,000 each way)"
            + ("  WARNING: generator-bound" if s["gen_bound"] else "")
        )
    if args.json_path:
        path = Path(args.json_path)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(report, indent=2, default=str))
        print(f"wrote {path}")
    return 0
