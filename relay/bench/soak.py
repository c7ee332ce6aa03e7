"""``relay soak``: hold phone calls and browser sessions through a real ``relay serve``
for minutes, with barge-ins all along, and watch the relay for leaks and faults.

Processes, all started here and stopped by handle on every exit path: the fake
upstream (``soak_fake``), ``relay serve`` (started as ``relay bench`` starts it,
pinned to the first CPU), and load processes (``soak_load``: calls, and one for
the browser clients) sharing the other CPUs with the fake, as in the bench.

Every ``--interval`` seconds the relay's RSS, open fds (``/proc/<pid>/fd``) and
live trio tasks (``relay_trio_tasks`` from its ``/metrics``) are sampled. At the
end the generators stop sending, in-flight frames are let through, every
stream is matched end to end (sequence numbers both ways), the sessions are
hung up as Twilio and a browser would, and the relay must come back to the fds
and tasks it had before (measured after one primer call and client, so what it
starts once on first use is not taken for a leak). Slopes are least squares per
minute over the samples after the warm-up, judged only when that window is long
enough to mean something (``--min-window``).

Exit status 0: nothing lost, no error or protocol violation anywhere, no session
ended unexpectedly, every barge-in answered, the relay back to idle, every slope
under its threshold. 1: any of those failed. 2: the soak could not run (the relay
did not start, a generator failed).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from relay.bench import run as bench_run
from relay.bench import soak_fake, soak_load
from relay.testing.fuzz import http_get
from relay.testing.metrics import sample_value

EXIT_OK, EXIT_FAILED, EXIT_NOT_RUN = 0, 1, 2
SETTLE_TIMEOUT_S = 20.0  # after the generators stop, in-flight frames get this long
HANGUP_TIMEOUT_S = 10.0
IDLE_TIMEOUT_S = 15.0  # for the relay to report no session after the hang-up
CONTROL_TIMEOUT_S = 30.0  # for a generator process to answer a command
CLIENT_NUMBER0 = 9_000_000  # stream numbers of browser clients; calls are below
PRIMER_NUMBER = 800_000  # stream numbers of the primer's call (and client, + CLIENT_NUMBER0)
# A barge-in that drew no clear and no truncate is excused when the caller had less than
# this much audio left when the cut response's last frame reached it: the fake only
# barges in with >= soak_fake.MIN_UNPLAYED_MS surely unplayed, so a nearly dry caller
# means delivery ran late (an overloaded host), and the relay, seeing every mark
# confirmed, rightly sent nothing (docs/contract.md §6: no truncate without unplayed audio).
DRY_MS = 100


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="relay soak",
        description="Hold Twilio calls and browser sessions through a real `relay serve` for "
        "minutes, with barge-ins; fail on any loss, error, unexpected end or growing RSS, fds "
        "or trio tasks.",
    )
    p.add_argument("--calls", type=int, default=50, help="Twilio calls held (default 50)")
    p.add_argument("--clients", type=int, default=20, help="browser sessions held (default 20)")
    p.add_argument("--minutes", type=float, default=10.0, help="how long (default 10)")
    p.add_argument(
        "--warmup",
        type=float,
        help="seconds of samples left out of the slopes (default: a quarter of the run, "
        "at most 120)",
    )
    p.add_argument("--interval", type=float, default=5.0, help="seconds between samples")
    p.add_argument("--barge-min", type=float, default=2.0, help="shortest answer before a "
                   "barge-in, seconds")  # fmt: skip
    p.add_argument("--barge-max", type=float, default=5.0, help="longest, seconds")
    p.add_argument("--open-rate", type=float, default=25.0, help="sessions opened per second")
    p.add_argument("--max-rss-slope", type=float, default=1.0, help="MiB/min (default 1)")
    p.add_argument("--max-fd-slope", type=float, default=0.5, help="fds/min (default 0.5)")
    p.add_argument("--max-task-slope", type=float, default=1.0, help="tasks/min (default 1)")
    p.add_argument(
        "--min-window",
        type=float,
        default=60.0,
        help="seconds of samples after the warm-up needed to judge slopes (default 60)",
    )
    p.add_argument("--loaders", type=int, default=0, help="call load processes (default: auto)")
    p.add_argument("--seed", type=int, default=1, help="seed of the barge-in timing")
    p.add_argument("--json", dest="json_path", help="write every figure here")
    args = p.parse_args(argv)
    if args.calls < 0 or args.clients < 0 or args.calls + args.clients == 0:
        p.error("--calls and --clients must be >= 0, and not both 0")
    if not 0 < args.barge_min <= args.barge_max:
        p.error("need 0 < --barge-min <= --barge-max")
    if args.minutes <= 0 or args.interval <= 0:
        p.error("--minutes and --interval must be > 0")
    if args.warmup is None:
        args.warmup = min(120.0, args.minutes * 60 / 4)
    return args


def _recv(child: bench_run.Child, timeout: float) -> Any:
    """A generator's answer; RuntimeError if it is dead or silent (so the soak stops and
    cleans up rather than waiting forever)."""
    if not child.ctrl.poll(timeout):
        raise RuntimeError(f"generator process {child.pid} did not answer in {timeout:.0f} s")
    return child.ctrl.recv()


# -- measuring the relay -----------------------------------------------------------
def _fd_count(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


def _runqueue_wait_ms(pid: int) -> float:
    """How long ``pid`` has waited for a CPU while runnable, in ms (/proc/<pid>/schedstat).

    Tells a relay starved by other processes from a relay stuck on its own: both answer
    slowly, only the first has waited for a CPU meanwhile."""
    try:
        return int(Path(f"/proc/{pid}/schedstat").read_text().split()[1]) / 1e6
    except (OSError, IndexError, ValueError):
        return 0.0


def _metrics(port: int) -> dict[str, float]:
    """The few relay metrics the soak follows, keyed by name plus label text."""
    status, text = http_get(port, "/metrics")
    if status != 200:
        raise RuntimeError(f"/metrics answered {status}")
    return {
        "relay_trio_tasks": sample_value(text, "relay_trio_tasks"),
        'relay_sessions_active{kind="twilio"}': sample_value(
            text, "relay_sessions_active", kind="twilio"
        ),
        'relay_sessions_active{kind="client"}': sample_value(
            text, "relay_sessions_active", kind="client"
        ),
        "relay_bargeins_total": sample_value(text, "relay_bargeins_total"),
    }


def _sessions(m: dict[str, float]) -> tuple[int, int]:
    return (
        int(m.get('relay_sessions_active{kind="twilio"}', 0)),
        int(m.get('relay_sessions_active{kind="client"}', 0)),
    )


def slope_per_minute(points: list[tuple[float, float]]) -> float | None:
    """Least-squares slope of (seconds, value) points, per minute; None under 3 points."""
    if len(points) < 3:
        return None
    xs = [t / 60.0 for t, _ in points]
    ys = [v for _, v in points]
    mx, my = sum(xs) / len(xs), sum(ys) / len(ys)
    sxx = sum((x - mx) ** 2 for x in xs)
    if sxx == 0:
        return None
    return sum((x - mx) * (y - my) for x, y in zip(xs, ys, strict=True)) / sxx


def _relay_log(path: Path) -> dict[str, Any]:
    """Errors and tracebacks the relay logged (text format: ``time LEVEL name: msg``)."""
    if not path.exists():  # nothing to judge is a failure, not a clean log
        return {"path": str(path), "errors": 1, "tracebacks": 0, "warnings": 0,
                "samples": ["the relay's log is missing"]}  # fmt: skip
    text = path.read_text(errors="replace")
    bad = [ln for ln in text.splitlines() if re.search(r" (ERROR|CRITICAL) ", ln)]
    warnings = [ln for ln in text.splitlines() if " WARNING " in ln]
    return {
        "path": str(path),
        "errors": len(bad),
        "tracebacks": text.count("Traceback (most recent call last)"),
        "warnings": len(warnings),
        "samples": (bad + warnings)[:20],
    }


# -- the soak ------------------------------------------------------------------
@dataclass
class Sample:
    t_s: float
    rss_kib: int
    fds: int
    tasks: float | None  # None: /metrics did not answer
    scrape_ms: float | None  # how long /metrics took to answer
    relay_cpu: float  # share of one CPU since the previous sample
    relay_wait: float  # share of the time since the previous sample it was runnable, not running
    gen_cpu: float  # the generator processes' share of their CPUs, likewise
    other_cpu: float  # CPUs' worth used by other processes on the host, likewise
    sessions_twilio: int
    sessions_client: int
    bargeins: int
    up_frames: int
    down_frames: int
    problems: int


class Soak:
    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        # The bench's placement and target helpers, for a Twilio-mode relay.
        self.bench = bench_run.Bench(
            argparse.Namespace(
                mode="twilio",
                loaders=args.loaders,
                fake_port=0,
                url=None,
                token=None,
                public_url=None,
                auth_token="",
            )
        )
        self.fake: bench_run.Child | None = None
        self.loaders: list[bench_run.Child] = []
        self.served: bench_run.Served | None = None
        self.samples: list[Sample] = []
        self.scrape_failures: list[str] = []
        # (monotonic s, relay, generator, host busy CPU ms, relay run-queue wait ms) at the
        # previous sample
        self.last_cpu: tuple[float, float, float, float, float] | None = None

    # -- processes ---------------------------------------------------------------
    def start(self) -> None:
        a = self.args
        self.fake = bench_run._spawn(
            soak_fake.process_main,
            (self.bench.load_cpus, 0, (a.barge_min, a.barge_max), a.seed),
        )
        port = int(_recv(self.fake, CONTROL_TIMEOUT_S))
        self.served = bench_run.start_relay("relay", port, "twilio", self.bench.relay_cpu)

    def call_specs(self, numbers: range) -> list[soak_load.Spec]:
        served = self.served
        assert served is not None
        twilio = self.bench.target(served)  # signed as Twilio signs
        return [soak_load.Spec(k, "call", twilio.resource, tuple(twilio.headers)) for k in numbers]

    def client_specs(self, numbers: range) -> list[soak_load.Spec]:
        served = self.served
        assert served is not None
        specs = []
        for k in numbers:
            token = bench_run.Bench._mint(served)
            # The model marks the connection as a client's for the fake; every other
            # session also asks for a voice, so the relay's own update is checked too.
            query = f"?model={soak_fake.CLIENT_MODEL}" + ("&voice=alloy" if k % 2 else "")
            headers = (("Origin", bench_run.ORIGIN),)
            specs.append(soak_load.Spec(k, "client", f"/token/{token}{query}", headers))
        return specs

    def specs(self) -> list[list[soak_load.Spec]]:
        """The streams of each load process: calls split over the call loaders, then
        one process for every browser client."""
        a = self.args
        groups: list[list[soak_load.Spec]] = []
        if a.calls:
            n = max(1, min(self.bench.n_loaders, a.calls))
            for i in range(n):
                first = i * 1_000_000
                groups.append(
                    self.call_specs(range(first, first + a.calls // n + (i < a.calls % n)))
                )
        if a.clients:
            groups.append(self.client_specs(range(CLIENT_NUMBER0, CLIENT_NUMBER0 + a.clients)))
        return groups

    def prime(self) -> dict[str, Any]:
        """One call and one client through the relay, hung up, before its idle figures are
        read: what the relay starts once, on first use and for good (the WebSocket
        liveness sweeper task), is then part of "idle" rather than counted as a leak.
        Returns the primer's figures, which count in the totals like any other."""
        a = self.args
        first_client = CLIENT_NUMBER0 + PRIMER_NUMBER
        specs = self.call_specs(range(PRIMER_NUMBER, PRIMER_NUMBER + (a.calls > 0)))
        specs += self.client_specs(range(first_client, first_client + (a.clients > 0)))
        served = self.served
        assert served is not None and self.fake is not None
        primer = bench_run._spawn(
            soak_load.process_main, (served.host, served.port, specs, self.bench.load_cpus)
        )
        fake = self.fake
        try:
            # Quiet on both sides before the hang-up, so no frame is in flight when it
            # comes: the primer's streams are then matched end to end like any other.
            fake.ctrl.send(("quiesce", True))
            _recv(fake, CONTROL_TIMEOUT_S)
            primer.ctrl.send(("open", 10.0))
            _recv(primer, CONTROL_TIMEOUT_S)
            primer.ctrl.send(("quiesce",))
            _recv(primer, CONTROL_TIMEOUT_S)
            time.sleep(0.5)
            fake.ctrl.send(("expect_close", True))
            _recv(fake, CONTROL_TIMEOUT_S)
            primer.ctrl.send(("hangup", HANGUP_TIMEOUT_S))
            figures: dict[str, Any] = _recv(primer, HANGUP_TIMEOUT_S + CONTROL_TIMEOUT_S)
            self.wait_upstream_closed()  # the relay closes that side a moment later
            for cmd in (("expect_close", False), ("quiesce", False)):
                fake.ctrl.send(cmd)
                _recv(fake, CONTROL_TIMEOUT_S)
        finally:
            primer.stop()
        return figures

    def open_sessions(self) -> None:
        served = self.served
        assert served is not None
        groups = self.specs()
        for group in groups:
            self.loaders.append(
                bench_run._spawn(
                    soak_load.process_main, (served.host, served.port, group, self.bench.load_cpus)
                )
            )
        rate = self.args.open_rate / len(self.loaders)
        for child in self.loaders:
            child.ctrl.send(("open", rate))
        most = max(len(g) for g in groups)
        for child in self.loaders:
            _recv(child, most / rate + CONTROL_TIMEOUT_S)

    def stop(self) -> int | None:
        """Stop every process (the generators first, so the relay drains nothing); the
        relay's exit status on SIGTERM (-9 if it had to be killed)."""
        for child in self.loaders:
            child.stop()
        code: int | None = None
        if self.served is not None and self.served.popen is not None:
            popen = self.served.popen
            self.served.stop()
            code = popen.returncode
        if self.fake is not None:
            self.fake.stop()
        return code

    def run(self) -> tuple[dict[str, Any], list[dict[str, Any]]]:
        """Sample until the time is up, then wind down; the last figures of everyone."""
        a = self.args
        t0 = time.monotonic()
        end = t0 + a.minutes * 60
        print(HEADER, flush=True)
        next_at = t0
        while True:
            print(_row(self.sample(t0)), flush=True)
            next_at += a.interval
            if next_at > end:
                break
            time.sleep(max(0.0, next_at - time.monotonic()))
        time.sleep(max(0.0, end - time.monotonic()))
        # The end: no more frames, let the last ones through, then hang up.
        self._command(("quiesce", True))
        self.settle()
        assert self.fake is not None
        self.fake.ctrl.send(("expect_close", True))
        _recv(self.fake, CONTROL_TIMEOUT_S)
        for child in self.loaders:
            child.ctrl.send(("hangup", HANGUP_TIMEOUT_S))
        for child in self.loaders:
            _recv(child, HANGUP_TIMEOUT_S + CONTROL_TIMEOUT_S)
        self.wait_upstream_closed()
        return self.collect()

    def wait_upstream_closed(self) -> None:
        """Wait (a while) until the relay has closed every upstream socket."""
        assert self.fake is not None
        deadline = time.monotonic() + HANGUP_TIMEOUT_S
        while time.monotonic() < deadline:
            self.fake.ctrl.send(("collect",))
            if not _recv(self.fake, CONTROL_TIMEOUT_S)["open"]:
                return
            time.sleep(0.1)

    def collect(self) -> tuple[dict[str, Any], list[dict[str, Any]]]:
        assert self.fake is not None
        self.fake.ctrl.send(("collect",))
        fake = _recv(self.fake, CONTROL_TIMEOUT_S)
        loads = []
        for child in self.loaders:
            child.ctrl.send(("collect",))
            loads.append(_recv(child, CONTROL_TIMEOUT_S))
        return fake, loads

    def _command(self, cmd: tuple[Any, ...]) -> list[Any]:
        children = [c for c in (self.fake, *self.loaders) if c is not None]
        for child in children:
            child.ctrl.send(cmd)
        return [_recv(child, CONTROL_TIMEOUT_S) for child in children]

    # -- sampling ----------------------------------------------------------------
    def scrape(self, t0: float) -> tuple[dict[str, float], float | None]:
        """The relay's metrics and how long it took to answer, in ms; ``({}, None)`` and a
        recorded failure if it did not answer in time (itself a finding: a relay that
        cannot answer /metrics for seconds is not serving its calls either)."""
        served = self.served
        assert served is not None
        start = time.monotonic()
        try:
            m = _metrics(served.port)
        except (OSError, RuntimeError, ValueError) as exc:
            self.scrape_failures.append(f"t={start - t0:.1f} s: /metrics: {exc!r}")
            return {}, None
        return m, (time.monotonic() - start) * 1000

    def sample(self, t0: float) -> Sample:
        served = self.served
        assert served is not None and served.pid is not None
        pid = served.pid
        # fds and RSS before the scrape: its own connection would add an fd.
        fds = _fd_count(pid)
        rss = bench_run._rss_kib(pid)
        now, cpu = time.monotonic(), bench_run._proc_cpu_ms(pid)
        gen = sum(bench_run._proc_cpu_ms(c.pid) for c in (self.fake, *self.loaders) if c)
        host = bench_run._host_busy_ms()
        wait = _runqueue_wait_ms(pid)
        util = gen_util = other = wait_util = 0.0
        if self.last_cpu is not None:
            ms = (now - self.last_cpu[0]) * 1000
            util = (cpu - self.last_cpu[1]) / ms
            gen_ms = gen - self.last_cpu[2]
            gen_util = gen_ms / ms / max(1, len(self.bench.load_cpus or ()))
            # Whatever else ran on the host meanwhile, in CPUs: it skews every figure.
            other = max(0.0, (host - self.last_cpu[3]) - gen_ms - (cpu - self.last_cpu[1])) / ms
            wait_util = (wait - self.last_cpu[4]) / ms
        self.last_cpu = (now, cpu, gen, host, wait)
        m, scrape_ms = self.scrape(t0)
        fake, loads = self.collect()
        twilio, client = _sessions(m)
        s = Sample(
            t_s=round(now - t0, 2),
            rss_kib=rss,
            fds=fds,
            tasks=m.get("relay_trio_tasks"),
            scrape_ms=None if scrape_ms is None else round(scrape_ms, 1),
            relay_cpu=round(util, 3),
            relay_wait=round(wait_util, 3),
            gen_cpu=round(gen_util, 3),
            other_cpu=round(other, 3),
            sessions_twilio=twilio,
            sessions_client=client,
            bargeins=fake["bargeins"],
            up_frames=sum(fake["up_recv"].values()),
            down_frames=sum(sum(ld["down_recv"].values()) for ld in loads),
            problems=_problem_count(fake, loads),
        )
        self.samples.append(s)
        return s

    def settle(self) -> None:
        """Wait until nothing moves any more: in-flight frames, marks, truncates."""
        deadline = time.monotonic() + SETTLE_TIMEOUT_S
        earliest = time.monotonic() + soak_fake.TRUNCATE_GRACE_NS / 1e9
        last: tuple[int, ...] | None = None
        while time.monotonic() < deadline:
            time.sleep(0.5)
            fake, loads = self.collect()
            state = (
                sum(fake["up_recv"].values()),
                fake["truncates"],
                fake["error_total"],
                *(sum(ld["down_recv"].values()) + ld["marks_echoed"] + ld["clears"]
                  for ld in loads),
            )  # fmt: skip
            if state == last and time.monotonic() >= earliest:
                return
            last = state

    def idle_figures(self, baseline: dict[str, Any] | None = None) -> dict[str, Any]:
        """The relay at rest: waits for its sessions to end and, given the figures from
        before the soak, for its fds and tasks to come back down to them (as
        ``relay.testing.fuzz.Watch`` does), then keeps the least of a few readings (each
        scrape briefly adds a task and an fd of its own)."""
        served = self.served
        assert served is not None and served.pid is not None
        pid = served.pid
        start = time.monotonic()
        deadline = start + IDLE_TIMEOUT_S
        m, _ = self.scrape(start)
        while (not m or any(_sessions(m))) and time.monotonic() < deadline:
            time.sleep(0.25)
            m, _ = self.scrape(start)

        def settled() -> tuple[int, float | None]:
            # Spaced out: a scrape's connection outlives its answer by a few hundred ms
            # (measured: back-to-back scrapes of an idle relay read one task more).
            fds, tasks = [], []
            for _ in range(4):
                time.sleep(0.5)
                fds.append(_fd_count(pid))
                count = self.scrape(start)[0].get("relay_trio_tasks")
                if count is not None:
                    tasks.append(count)
            return min(fds), (min(tasks) if tasks else None)

        fds, tasks = settled()
        while baseline is not None and time.monotonic() < deadline:
            if fds <= baseline["fds"] and (tasks is None or tasks <= (baseline["tasks"] or 0)):
                break
            fds, tasks = settled()
        twilio, client = _sessions(m)
        return {
            "rss_kib": bench_run._rss_kib(pid),
            "fds": fds,
            "tasks": tasks,
            "sessions_twilio": twilio,
            "sessions_client": client,
            "bargeins_metric": m.get("relay_bargeins_total", 0),
            "waited_s": round(time.monotonic() - start, 1),
        }


def _problem_count(fake: dict[str, Any], loads: list[dict[str, Any]]) -> int:
    return int(
        fake["error_total"]
        + fake["violations"]
        + fake["closed_early"]
        + sum(ld["violations"] for ld in loads)
    )


# -- figures -------------------------------------------------------------------
def _merge(dicts: list[dict[int, int]]) -> dict[int, int]:
    out: dict[int, int] = {}
    for d in dicts:
        for k, v in d.items():
            out[k] = out.get(k, 0) + v
    return out


def _direction(sent: dict[int, int], received: dict[int, int]) -> dict[str, int]:
    """Frames matched stream by stream: a stream's shortfall is lost, any excess duplicated."""
    keys = sent.keys() | received.keys()
    return {
        "streams": len(keys),
        "sent": sum(sent.values()),
        "received": sum(received.values()),
        "lost": sum(max(0, sent.get(k, 0) - received.get(k, 0)) for k in keys),
        "duplicated": sum(max(0, received.get(k, 0) - sent.get(k, 0)) for k in keys),
    }


def totals(fake: dict[str, Any], loads: list[dict[str, Any]]) -> dict[str, Any]:
    up_sent = _merge([ld["up_sent"] for ld in loads])
    down_recv = _merge([ld["down_recv"] for ld in loads])
    kind: dict[int, str] = fake["kind"]
    up: dict[str, Any] = {}
    down: dict[str, Any] = {}
    for k in ("call", "client"):
        up[k + "s"] = _direction(
            {n: v for n, v in up_sent.items() if (n < CLIENT_NUMBER0) == (k == "call")},
            {n: v for n, v in fake["up_recv"].items() if (n < CLIENT_NUMBER0) == (k == "call")},
        )
        down[k + "s"] = _direction(
            {c: v for c, v in fake["down_sent"].items() if kind.get(c) == k},
            {c: v for c, v in down_recv.items() if kind.get(c, "call") == k},
        )
    for d in (up, down):
        for key in ("sent", "received", "lost", "duplicated"):
            d[key] = d["calls"][key] + d["clients"][key]
    up.update(gaps=fake["up_gaps"], reordered=fake["up_reordered"], corrupt=fake["up_corrupt"])
    up["gap_samples"] = fake["gap_samples"]
    down.update(gaps=sum(ld["down_gaps"] for ld in loads),
                reordered=sum(ld["down_reordered"] for ld in loads),
                gap_samples=[g for ld in loads for g in ld["gap_samples"]][:50])  # fmt: skip
    clears = _merge([ld["clears_by_conn"] for ld in loads])
    barges: dict[int, int] = dict(fake["bargeins_by_conn"])
    unclear_ends: dict[str, int] = {k: v for ld in loads for k, v in ld["unclear_ends"].items()}
    missed: dict[str, int | None] = {key: unclear_ends.get(key) for key in fake["missed"]}
    dry = {k: v for k, v in missed.items() if v is not None and v < DRY_MS}
    for key in dry:  # no clear was due for these
        conn = int(key.split(":")[0])
        barges[conn] -= 1
    unplayed = sorted(fake["unplayed_ms"])
    violation_samples = list(fake["samples"]) + [s for ld in loads for s in ld["samples"]]
    return {
        "up": up,
        "down": down,
        "bargeins": fake["bargeins"],
        "clears": sum(clears.values()),
        "truncates": fake["truncates"],
        # "<conn>:<response>" -> ms the caller had left to play (None: unknown)
        "missed_truncates": {k: v for k, v in missed.items() if k not in dry},
        "bargeins_on_dry_caller": dry,
        "extra_truncates": fake["extra_truncates"],
        # Per call: every barge-in due must have been answered by exactly one clear.
        "clear_mismatch": sum(
            abs(barges.get(c, 0) - clears.get(c, 0)) for c in barges.keys() | clears.keys()
        ),
        "unplayed_ms_at_truncate": {
            "min": unplayed[0] if unplayed else None,
            "p50": unplayed[len(unplayed) // 2] if unplayed else None,
            "max": unplayed[-1] if unplayed else None,
        },
        "marks_received": sum(ld["marks_in"] for ld in loads),
        "marks_echoed": sum(ld["marks_echoed"] for ld in loads),
        "upstream_errors": fake["error_total"],
        "upstream_errors_by_code": fake["errors"],
        "client_error_events": sum(ld["errors_seen"] for ld in loads),
        "violations": fake["violations"] + sum(ld["violations"] for ld in loads),
        "violation_samples": violation_samples[:50],
        "sessions": {
            "opened": sum(ld["opened"] for ld in loads),
            "failed_to_open": sum(ld["failed"] for ld in loads),
            "ended_by_relay": sum(ld["dropped"] for ld in loads),
            "upstream_ended_early": fake["closed_early"],
            "not_closed_after_hangup": sum(ld["not_closed"] for ld in loads),
            "hangup_close_codes": _merge_str([ld["hangup_codes"] for ld in loads]),
            "upstream_close_codes": fake["close_codes"],
            "upstream_still_open": fake["open"],
        },
        "generator": {
            "late_ticks": fake["late_ticks"] + sum(ld["late_ticks"] for ld in loads),
            "ticks": fake["ticks"] + sum(ld["ticks"] for ld in loads),
            "max_lag_ms": max([fake["max_lag_ms"], *(ld["max_lag_ms"] for ld in loads)]),
            # Bytes a generator socket held because the relay was not reading it.
            "backlog_peak_to_relay_upstream_side": fake["backlog_peak"],
            "backlog_peak_to_relay_client_side": max([0, *(ld["backlog_peak"] for ld in loads)]),
        },
    }


def _merge_str(dicts: list[dict[str, int]]) -> dict[str, int]:
    out: dict[str, int] = {}
    for d in dicts:
        for k, v in d.items():
            out[k] = out.get(k, 0) + v
    return out


def verdict(report: dict[str, Any], args: argparse.Namespace) -> list[str]:
    """Every reason the soak failed; empty when it passed."""
    t = report["totals"]
    why = []
    for name in ("up", "down"):
        d = t[name]
        if d["lost"] or d["duplicated"] or d["gaps"] or d["reordered"] or d.get("corrupt"):
            why.append(f"{name}: {d['lost']} lost, {d['duplicated']} duplicated, {d['gaps']} "
                       f"skipped, {d['reordered']} out of order, {d.get('corrupt', 0)} corrupt "
                       "frames")  # fmt: skip
        if d["sent"] == 0:
            why.append(f"{name}: no frame moved at all")
    if args.calls and t["bargeins"] == 0:
        why.append("no barge-in happened")
    due = t["bargeins"] - len(t["bargeins_on_dry_caller"])
    if t["missed_truncates"] or t["extra_truncates"] or t["truncates"] != due:
        missing = dict(list(t["missed_truncates"].items())[:10])
        why.append(f"{due} barge-ins due drew {t['truncates']} good truncates "
                   f"({len(t['missed_truncates'])} missing, {t['extra_truncates']} extra); "
                   f"missing, as connection:response -> ms left to play at the caller: "
                   f"{missing}")  # fmt: skip
    if t["clear_mismatch"] or t["clears"] != due:
        why.append(f"{due} barge-ins due drew {t['clears']} clears")
    if t["upstream_errors"] or t["client_error_events"]:
        why.append(f"the fake upstream sent {t['upstream_errors']} error events "
                   f"{t['upstream_errors_by_code']}")  # fmt: skip
    if t["violations"]:
        why.append(f"{t['violations']} protocol violations, e.g. {t['violation_samples'][:3]}")
    s = t["sessions"]
    expected = args.calls + args.clients + (args.calls > 0) + (args.clients > 0)  # and primer
    if s["failed_to_open"] or s["opened"] != expected:
        why.append(f"{s['opened']} of {expected} sessions opened")
    if s["ended_by_relay"] or s["upstream_ended_early"]:
        why.append(f"sessions ended unexpectedly: {s['ended_by_relay']} by the relay, "
                   f"{s['upstream_ended_early']} upstream sockets")  # fmt: skip
    if s["not_closed_after_hangup"] or s["upstream_still_open"]:
        why.append(f"after the hang-up {s['not_closed_after_hangup']} sessions and "
                   f"{s['upstream_still_open']} upstream sockets were still open")  # fmt: skip
    bad_codes = {c: n for c, n in s["hangup_close_codes"].items() if c != "1000"}
    bad_codes |= {f"upstream {c}": n for c, n in s["upstream_close_codes"].items() if c != "1000"}
    if bad_codes:
        why.append(f"close codes other than 1000 at the hang-up: {bad_codes}")
    idle, before = report["after_hangup"], report["idle_before"]
    if idle["sessions_twilio"] or idle["sessions_client"]:
        why.append(f"the relay still reports sessions after the hang-up: {idle}")
    # What every session took must come back once all have ended: anything left is a leak.
    extra_fds = idle["fds"] - before["fds"]
    extra_tasks = (idle["tasks"] or 0) - (before["tasks"] or 0)
    if extra_fds > 0 or extra_tasks > 0:
        why.append(f"{idle['waited_s']} s after the hang-up the relay still holds "
                   f"{extra_fds} more fds and {extra_tasks:.0f} more trio tasks than before "
                   "the soak")  # fmt: skip
    if report["relay_bargeins_metric"] != due:
        why.append(f"relay_bargeins_total is {report['relay_bargeins_metric']}, "
                   f"{due} barge-ins were due")  # fmt: skip
    if report["scrape_failures"]:
        why.append(f"/metrics did not answer {len(report['scrape_failures'])} times: "
                   f"{report['scrape_failures'][:3]}")  # fmt: skip
    log = report["relay_log"]
    if log["errors"] or log["tracebacks"]:
        why.append(f"the relay logged {log['errors']} errors, {log['tracebacks']} tracebacks")
    if report["relay_exit"] != 0:
        why.append(f"relay serve exited with {report['relay_exit']} on SIGTERM")
    for name, sl in report["slopes"].items():
        if sl["judged"] and sl["per_min"] is not None and sl["per_min"] > sl["max"]:
            why.append(f"{name} grows {sl['per_min']:.2f} {sl['unit']}/min "
                       f"(threshold {sl['max']})")  # fmt: skip
    return why


def slopes(samples: list[Sample], args: argparse.Namespace) -> dict[str, Any]:
    after = [s for s in samples if s.t_s >= args.warmup]
    window = after[-1].t_s - after[0].t_s if len(after) >= 2 else 0.0
    judged = window >= args.min_window
    series: dict[str, list[float | None]] = {
        "rss": [s.rss_kib / 1024 for s in after],
        "fds": [float(s.fds) for s in after],
        "tasks": [s.tasks for s in after],  # None where /metrics did not answer
    }
    out: dict[str, Any] = {}
    for name, unit, limit in (
        ("rss", "MiB", args.max_rss_slope),
        ("fds", "fds", args.max_fd_slope),
        ("tasks", "tasks", args.max_task_slope),
    ):
        points = [(s.t_s, v) for s, v in zip(after, series[name], strict=True) if v is not None]
        out[name] = {
            "per_min": slope_per_minute(points),
            "unit": unit,
            "max": limit,
            "judged": judged,
            "window_s": round(window, 1),
            "points": len(points),
        }
    return out


# -- output --------------------------------------------------------------------
HEADER = (
    f"{'t s':>7} {'RSS MiB':>8} {'fds':>5} {'tasks':>6} {'scrape ms':>9} {'CPU%':>5} "
    f"{'wait%':>5} {'gen%':>5} {'other%':>6} {'calls':>5} {'clients':>7} {'barge-ins':>9} "
    f"{'up frames':>10} {'down frames':>11} {'problems':>8}"
)


def _num(v: float | None, width: int, digits: int) -> str:
    return f"{'-':>{width}}" if v is None else f"{v:{width}.{digits}f}"


def _row(s: Sample) -> str:
    return (
        f"{s.t_s:7.1f} {s.rss_kib / 1024:8.1f} {s.fds:5d} {_num(s.tasks, 6, 0)} "
        f"{_num(s.scrape_ms, 9, 0)} {s.relay_cpu * 100:5.0f} {s.relay_wait * 100:5.0f} "
        f"{s.gen_cpu * 100:5.0f} {s.other_cpu * 100:6.0f} {s.sessions_twilio:5d} "
        f"{s.sessions_client:7d} {s.bargeins:9d} {s.up_frames:10d} {s.down_frames:11d} "
        f"{s.problems:8d}"
    )


def _summary(report: dict[str, Any], samples: list[Sample]) -> str:
    t, idle, before = report["totals"], report["after_hangup"], report["idle_before"]
    lines = ["", "slopes after the warm-up (least squares):"]
    for name, sl in report["slopes"].items():
        value = "-" if sl["per_min"] is None else f"{sl['per_min']:+.3f}"
        note = "" if sl["judged"] else f"  (not judged: window {sl['window_s']} s < --min-window)"
        lines.append(f"  {name:6} {value:>9} {sl['unit']}/min  (threshold {sl['max']}, "
                     f"{sl['points']} samples over {sl['window_s']} s){note}")  # fmt: skip
    for name in ("up", "down"):
        d = t[name]
        lines.append(
            f"{name + ' frames':12} sent {d['sent']:,}  received {d['received']:,}  "
            f"lost {d['lost']}  duplicated {d['duplicated']}  skipped {d['gaps']}  "
            f"out of order {d['reordered']}"
            + (f"  corrupt {d['corrupt']}" if "corrupt" in d else "")
            + f"  (calls {d['calls']['sent']:,}/{d['calls']['received']:,}, "
            f"clients {d['clients']['sent']:,}/{d['clients']['received']:,})"
        )
        lines += [f"  {g}" for g in d["gap_samples"][:10]]
    u = t["unplayed_ms_at_truncate"]
    lines += [
        f"barge-ins {t['bargeins']} ({len(t['bargeins_on_dry_caller'])} on a caller already "
        f"out of audio, no truncate due)  clears {t['clears']}  truncates {t['truncates']} "
        f"(missing {len(t['missed_truncates'])}, extra {t['extra_truncates']}, per-call "
        f"mismatch {t['clear_mismatch']})  relay_bargeins_total "
        f"{report['relay_bargeins_metric']:.0f}  unplayed at truncate min/p50/max "
        f"{u['min']}/{u['p50']}/{u['max']} ms",
        f"marks received {t['marks_received']:,}  echoed {t['marks_echoed']:,}",
        f"upstream error events {t['upstream_errors']} {t['upstream_errors_by_code'] or ''}  "
        f"error events at clients {t['client_error_events']}  protocol violations "
        f"{t['violations']}",
    ]
    lines += [f"  violation: {v}" for v in t["violation_samples"][:10]]
    s = t["sessions"]
    lines += [
        f"sessions opened {s['opened']}  failed {s['failed_to_open']}  ended by the relay "
        f"{s['ended_by_relay']}  upstream ended early {s['upstream_ended_early']}  not closed "
        f"after hang-up {s['not_closed_after_hangup']}  close codes {s['hangup_close_codes']} "
        f"upstream {s['upstream_close_codes']}",
        f"relay idle before: RSS {before['rss_kib'] / 1024:.1f} MiB, {before['fds']} fds, "
        f"{_num(before['tasks'], 0, 0)} tasks;  after hang-up: RSS "
        f"{idle['rss_kib'] / 1024:.1f} MiB, {idle['fds']} fds, {_num(idle['tasks'], 0, 0)} "
        "tasks, sessions "
        f"{idle['sessions_twilio']}/{idle['sessions_client']}",
        f"relay log: {report['relay_log']['errors']} errors, "
        f"{report['relay_log']['tracebacks']} tracebacks, {report['relay_log']['warnings']} "
        f"warnings ({report['relay_log']['path']});  exit status {report['relay_exit']}",
    ]
    g = t["generator"]
    mean_cpu = statistics.fmean([x.relay_cpu for x in samples[1:]] or [0.0])
    mean_wait = statistics.fmean([x.relay_wait for x in samples[1:]] or [0.0])
    gen_cpu = statistics.fmean([x.gen_cpu for x in samples[1:]] or [0.0])
    late = g["late_ticks"] / max(1, g["ticks"])
    lines.append(
        f"CPU: relay {mean_cpu * 100:.0f}% of its core (and {mean_wait * 100:.0f}% of the time "
        f"waiting for it), generator {gen_cpu * 100:.0f}% of its "
        f"CPUs;  generator ticks > 5 ms late: {late * 100:.1f}%, worst {g['max_lag_ms']:.1f} ms;"
        f"  most bytes the relay left unread on a socket: "
        f"{g['backlog_peak_to_relay_client_side']:,} (Twilio/browser side), "
        f"{g['backlog_peak_to_relay_upstream_side']:,} (upstream side)"
    )
    # Overload does not fail the soak by itself, but it changes what the figures mean.
    if mean_cpu > 0.9:
        lines.append(
            "WARNING: the relay was CPU-saturated: queues, latency and RSS reflect overload"
        )
    if t["bargeins_on_dry_caller"]:
        lines.append(
            f"WARNING: {len(t['bargeins_on_dry_caller'])} barge-in(s) found the caller out of "
            f"audio (connection:response -> ms left: {t['bargeins_on_dry_caller']}): audio "
            "reached it too late, so the relay rightly truncated nothing; the host was too busy"
        )
    if gen_cpu > 0.85:
        lines.append("WARNING: the generator was CPU-bound: frames went out late, in bursts")
    other = statistics.fmean([x.other_cpu for x in samples[1:]] or [0.0])
    if other > 0.15:
        lines.append(f"WARNING: other processes used {other:.1f} CPUs on average: they compete "
                     "with the relay and the generator, and skew every figure")  # fmt: skip
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    soak = Soak(args)
    report: dict[str, Any] = {"args": vars(args), "started_unix": time.time()}
    try:
        try:
            soak.start()
            served = soak.served
            assert served is not None and served.pid is not None
            primer = soak.prime()
            time.sleep(1.0)  # let the relay settle before its idle figures are read
            report["idle_before"] = soak.idle_figures()
            print(
                f"relay soak: {args.calls} calls + {args.clients} browser sessions for "
                f"{args.minutes:g} min (warm-up {args.warmup:g} s), relay pid {served.pid} on "
                f"CPU {soak.bench.relay_cpu}, generator on CPUs "
                f"{sorted(soak.bench.load_cpus or [])}, log {served.workdir}",
                flush=True,
            )
            soak.open_sessions()
        except (RuntimeError, OSError, EOFError) as exc:
            print(f"relay soak: could not start: {exc}", file=sys.stderr)
            return EXIT_NOT_RUN
        fake, loads = soak.run()
        report["after_hangup"] = soak.idle_figures(report["idle_before"])
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return EXIT_FAILED
    finally:
        relay_exit = soak.stop()
    served = soak.served
    assert served is not None and served.workdir is not None
    report["relay_exit"] = relay_exit
    report["relay_bargeins_metric"] = report["after_hangup"]["bargeins_metric"]
    report["relay_log"] = _relay_log(served.workdir / "relay.log")
    report["totals"] = totals(fake, [primer, *loads])
    report["slopes"] = slopes(soak.samples, args)
    report["scrape_failures"] = soak.scrape_failures
    report["samples"] = [vars(s) for s in soak.samples]
    print(_summary(report, soak.samples))
    failures = verdict(report, args)
    report["failures"] = failures
    report["passed"] = not failures
    print("\nSOAK PASSED" if not failures else "\nSOAK FAILED:\n  " + "\n  ".join(failures))
    if args.json_path:
        path = Path(args.json_path)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(report, indent=2, default=str))
        print(f"wrote {path}")
    return EXIT_OK if not failures else EXIT_FAILED
