"""The shipped unit: `systemd-analyze verify` is silent, the exposure score is at most 1.5,
and the daemon really works inside the sandbox the unit asks for.

How `verify` is made meaningful: it checks that ExecStart= exists, and
/opt/relay/venv/bin/relay does not on a build machine. Instead of editing
the unit, the test builds a throwaway root (``--root=``) holding the shipped
file byte for byte in /etc/systemd/system, the host's own units (for
sysinit.target and friends) and an executable stand-in at the ExecStart path.
Everything else `verify` checks (every directive's syntax, dependencies) is
checked on the real file. The same root proves the check is live: a missing
ExecStart binary or a typo in a directive makes it speak.

systemd is a Debian package (`apt-get install systemd`); without
systemd-analyze these tests skip and say so.
"""

from __future__ import annotations

import re
import signal
import subprocess
import sys
from pathlib import Path

import httpx
import pytest
import trio
import trio_websocket

from relay.admission.tokens import mint
from relay.config import decode_encryption_key
from relay.testing.daemon import TEST_OPENAI_KEY, daemon_env, running_daemon
from relay.testing.fake_realtime import fake_realtime
from tests.conftest import needs_analyze, require_tool
from tests.system import units
from tests.system.units import ANALYZE, EXEC_START, UNIT, analyze, unit_settings

MAX_EXPOSURE = 1.5


@pytest.fixture
def verify_root(tmp_path: Path) -> Path:
    """A root with the shipped unit, the host's units and a stand-in for ExecStart."""
    return units.verify_root(tmp_path, {"relay.service": UNIT})


@needs_analyze
def test_verify_prints_nothing(verify_root: Path) -> None:
    result = analyze("verify", f"--root={verify_root}", "--man=no", "relay.service")
    print(f"systemd-analyze verify (--root with the shipped unit): rc={result.returncode}")
    assert result.stdout + result.stderr == ""
    assert result.returncode == 0


@needs_analyze
def test_verify_is_live_for_this_root(verify_root: Path) -> None:
    """The root is not so fake that verify checks nothing."""
    unit = verify_root / "etc" / "systemd" / "system" / "relay.service"
    unit.write_text(unit.read_text().replace("NotifyAccess=main", "NotifyAccess=mian"))
    (verify_root / EXEC_START.lstrip("/")).unlink()
    result = analyze("verify", f"--root={verify_root}", "--man=no", "relay.service")
    output = result.stdout + result.stderr
    assert "mian" in output
    assert EXEC_START in output


@needs_analyze
def test_security_exposure_at_most_1_5() -> None:
    result = analyze("security", "--offline=true", "--no-pager", str(UNIT))
    match = re.search(r"Overall exposure level for relay\.service: (\d+(?:\.\d+)?)", result.stdout)
    assert match, result.stdout + result.stderr
    exposure = float(match.group(1))
    print(f"systemd-analyze security --offline=true systemd/relay.service: exposure {exposure}")
    assert exposure <= MAX_EXPOSURE, result.stdout


def test_unit_has_what_the_operator_relies_on() -> None:
    """Cheap checks that stay on even without systemd-analyze."""
    s = unit_settings(UNIT.read_text())
    assert s["Type"] == ["notify"]
    assert s["NotifyAccess"] == ["main"]
    assert s["WatchdogSec"]
    assert s["ExecStart"] == [f"{EXEC_START} serve --config /etc/relay/config.toml"]
    assert s["Restart"] == ["on-failure"]
    # Exit 2 is a bad config or a missing secret: restarting cannot fix it.
    assert s["RestartPreventExitStatus"] == ["2"]
    creds = {v.split(":", 1)[0]: v.split(":", 1)[1] for v in s["LoadCredential"]}
    names = ("OPENAI_API_KEY", "ENCRYPTION_KEY", "TWILIO_ACCOUNT_SID", "TWILIO_AUTH_TOKEN")
    assert creds == {n: f"/etc/relay/credentials/{n}" for n in names}
    # Optional Twilio pair: the fallback is one newline, which relay reads as unset.
    assert sorted(s["SetCredential"]) == ["TWILIO_ACCOUNT_SID:\\n", "TWILIO_AUTH_TOKEN:\\n"]
    assert s["CapabilityBoundingSet"] == [""]
    assert s["MemoryDenyWriteExecute"] == ["yes"]
    assert "AF_NETLINK" not in s["RestrictAddressFamilies"][0]


def _bytes(size: str) -> int:
    """A systemd size (``768M``, ``1G``, plain bytes) in bytes."""
    units = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}
    if size[-1:] in units:
        return int(float(size[:-1]) * units[size[-1]])
    return int(size)


def test_memory_and_tasks_are_bounded() -> None:
    """docs/contract.md §10: the unit bounds memory and tasks, with room for the defaults."""
    from relay.config import Settings

    s = unit_settings(UNIT.read_text())
    memory_max, memory_high = _bytes(s["MemoryMax"][0]), _bytes(s["MemoryHigh"][0])
    assert 0 < memory_high < memory_max
    assert s["MemorySwapMax"] == ["0"]
    # ~70 MiB idle and under 100 KiB per live call (README, "Performance"), with the
    # default max_sessions all live: the throttle must not start before that.
    limits = Settings().limits
    assert memory_high > (70 << 20) + limits.max_sessions * (100 << 10)
    tasks_max = int(s["TasksMax"][0])
    # The event loop's thread plus the worker-thread limiters (Trio's and AnyIO's, 40
    # each), with headroom; a bound, not "infinity".
    assert 1 + 40 + 40 < tasks_max <= 512


@needs_analyze
def test_verify_sees_the_bounds(verify_root: Path) -> None:
    """The bounds are directives systemd knows, not comments or typos it would skip."""
    unit = verify_root / "etc" / "systemd" / "system" / "relay.service"
    text = unit.read_text()
    assert "TasksMax=128\n" in text and "MemoryMax=1G\n" in text
    unit.write_text(
        text.replace("TasksMax=128", "TasksMax=lots").replace("MemoryMax=1G", "MemoryMax=1Q")
    )
    result = analyze("verify", f"--root={verify_root}", "--man=no", "relay.service")
    output = result.stdout + result.stderr
    assert "'lots'" in output and "1Q" in output, output


def test_stop_timeout_outlasts_the_drain() -> None:
    """TimeoutStopSec= must cover drain_seconds plus the graces that follow it (the
    1001 closes, hypercorn's shutdown, background jobs, cleanups: CLOSE_GRACE each at
    worst), or systemd SIGKILLs a daemon that is still closing sessions politely."""
    from relay.config import Settings
    from relay.daemon.server import CLOSE_GRACE

    timeout = unit_settings(UNIT.read_text())["TimeoutStopSec"][0]
    assert timeout.endswith("s")
    needed = Settings().server.drain_seconds + 4 * CLOSE_GRACE
    assert float(timeout[:-1]) > needed


# -- the daemon inside the unit's sandbox -------------------------------------------------
#
# systemd cannot run here (no PID 1), so the sandbox is rebuilt from the unit's own
# settings with the same kernel features systemd uses, applied by a sitecustomize
# before relay is imported: a private mount namespace with /proc mounted
# subset=pid,hidepid=invisible (ProcSubset=pid, ProtectProc=invisible) and every
# mount read-only (ProtectSystem=strict); no capabilities (CapabilityBoundingSet=);
# NoNewPrivileges=; PR_SET_MDWE (MemoryDenyWriteExecute=; systemd >= 254 uses the
# same prctl); a seccomp allow-list of exactly the syscalls systemd-analyze lists
# for the unit's SystemCallFilter=, EPERM otherwise (SystemCallErrorNumber=), and
# socket() only for AF_UNIX/AF_INET/AF_INET6, EAFNOSUPPORT otherwise
# (RestrictAddressFamilies=). Not emulated: the dynamic user (the interpreter here
# lives under /root) and PrivateTmp=/PrivateDevices= (nothing of ours uses them).

SANDBOX_SITE = r"""
import ctypes, errno, os

def _sandbox():
    libc = ctypes.CDLL(None, use_errno=True)
    libc.mount.argtypes = [ctypes.c_char_p] * 3 + [ctypes.c_ulong, ctypes.c_char_p]

    def ok(rc, what):
        if rc != 0:
            e = ctypes.get_errno()
            raise OSError(e, f"sandbox: {what}: {os.strerror(e)}")

    ok(libc.unshare(0x00020000), "unshare(CLONE_NEWNS)")
    ok(libc.mount(b"none", b"/", None, 0x4000 | 0x40000, None), "make / private")
    ok(libc.mount(b"proc", b"/proc", b"proc", 0, b"subset=pid,hidepid=invisible"),
       "mount /proc subset=pid")

    class MountAttr(ctypes.Structure):
        _fields_ = [("attr_set", ctypes.c_uint64), ("attr_clr", ctypes.c_uint64),
                    ("propagation", ctypes.c_uint64), ("userns_fd", ctypes.c_uint64)]
    attr = MountAttr(1, 0, 0, 0)  # MOUNT_ATTR_RDONLY
    # mount_setattr(AT_FDCWD, "/", AT_RECURSIVE, &attr, sizeof attr)
    ok(libc.syscall(442, -100, b"/", 0x8000, ctypes.byref(attr), ctypes.sizeof(attr)),
       "mount_setattr(/, RDONLY, AT_RECURSIVE)")

    ok(libc.prctl(38, 1, 0, 0, 0), "PR_SET_NO_NEW_PRIVS")
    for cap in range(64):
        libc.prctl(24, cap, 0, 0, 0)  # PR_CAPBSET_DROP; EINVAL past the last cap
    header = (ctypes.c_uint32 * 2)(0x20080522, 0)
    data = (ctypes.c_uint32 * 6)()
    ok(libc.capset(header, data), "capset(empty)")
    ok(libc.prctl(65, 1, 0, 0, 0), "PR_SET_MDWE")

    scmp = ctypes.CDLL("libseccomp.so.2", use_errno=True)
    scmp.seccomp_init.restype = ctypes.c_void_p
    scmp.seccomp_init.argtypes = [ctypes.c_uint32]
    scmp.seccomp_syscall_resolve_name.argtypes = [ctypes.c_char_p]

    class ArgCmp(ctypes.Structure):
        _fields_ = [("arg", ctypes.c_uint), ("op", ctypes.c_int),
                    ("datum_a", ctypes.c_uint64), ("datum_b", ctypes.c_uint64)]
    scmp.seccomp_rule_add_array.argtypes = [ctypes.c_void_p, ctypes.c_uint32, ctypes.c_int,
                                            ctypes.c_uint, ctypes.POINTER(ArgCmp)]
    scmp.seccomp_load.argtypes = [ctypes.c_void_p]
    allow, eperm = 0x7FFF0000, 0x00050000 | errno.EPERM
    eafnosupport = 0x00050000 | errno.EAFNOSUPPORT
    ctx = scmp.seccomp_init(eperm)

    def rule(action, name, *cmps):
        nr = scmp.seccomp_syscall_resolve_name(name.encode())
        if nr < 0:
            return  # not a syscall on this architecture
        array = (ArgCmp * max(len(cmps), 1))(*[ArgCmp(*c) for c in cmps])
        rc = scmp.seccomp_rule_add_array(ctx, action, nr, len(cmps), array)
        if rc < 0:
            raise OSError(-rc, f"sandbox: seccomp rule for {name}")

    for name in os.environ["RELAY_SANDBOX_SYSCALLS"].split(","):
        if name != "socket":
            rule(allow, name)
    EQ, GT = 4, 6
    for family in (1, 2, 10):  # AF_UNIX, AF_INET, AF_INET6
        rule(allow, "socket", (0, EQ, family, 0))
    for family in (0, 3, 4, 5, 6, 7, 8, 9):
        rule(eafnosupport, "socket", (0, EQ, family, 0))
    rule(eafnosupport, "socket", (0, GT, 10, 0))
    ok(scmp.seccomp_load(ctx), "seccomp_load")

if os.environ.get("RELAY_SANDBOX_SYSCALLS"):
    try:
        _sandbox()
    except Exception as exc:
        # Python would report a failing sitecustomize and carry on unsandboxed.
        os.write(2, f"sandbox: {exc}\n".encode())
        os._exit(99)
"""

# Checks, run inside the sandbox, that each emulated restriction is in force.
SANDBOX_PROBE = r"""
import errno, mmap, os, socket
assert not os.path.exists("/proc/stat"), "ProcSubset=pid"
try:
    open("/tmp/relay-sandbox-probe", "w")
    raise AssertionError("ProtectSystem=strict")
except OSError as e:
    assert e.errno == errno.EROFS, e
try:
    socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, 0)
    raise AssertionError("RestrictAddressFamilies=")
except OSError as e:
    assert e.errno == errno.EAFNOSUPPORT, e
try:
    mmap.mmap(-1, 4096, prot=mmap.PROT_READ | mmap.PROT_WRITE | mmap.PROT_EXEC)
    raise AssertionError("MemoryDenyWriteExecute=")
except OSError as e:
    assert e.errno in (errno.EPERM, errno.EACCES), e
try:
    os.setuid(0)  # @privileged is denied even though we are uid 0
    raise AssertionError("SystemCallFilter=~@privileged")
except OSError as e:
    assert e.errno == errno.EPERM, e
assert open("/proc/self/status").read().count("CapEff:\t0000000000000000") == 1
print("sandboxed")
"""


def expand_syscall_groups(*groups: str) -> set[str]:
    """The syscalls systemd-analyze lists for ``@group``s, nested groups expanded."""
    seen: set[str] = set()
    names: set[str] = set()
    pending = list(groups)
    while pending:
        group = pending.pop()
        if group in seen:
            continue
        seen.add(group)
        listing = analyze("syscall-filter", group)
        assert listing.returncode == 0, listing.stderr
        for line in listing.stdout.splitlines()[1:]:
            item = line.strip()
            if not item or item.startswith("#"):
                continue
            (pending.append if item.startswith("@") else names.add)(item)
    return names


def unit_syscalls() -> set[str]:
    """The allow-list the unit's SystemCallFilter= lines produce."""
    allowed: set[str] = set()
    for value in unit_settings(UNIT.read_text())["SystemCallFilter"]:
        if value.startswith("~"):
            allowed -= expand_syscall_groups(*value[1:].split())
        else:
            allowed |= expand_syscall_groups(*value.split())
    return allowed


@pytest.fixture
def sandbox_env(tmp_path: Path) -> dict[str, str]:
    if ANALYZE is None:
        require_tool("systemd-analyze", "Debian: apt-get install systemd")
    site = tmp_path / "site"
    site.mkdir()
    (site / "sitecustomize.py").write_text(SANDBOX_SITE)
    env = daemon_env(
        PYTHONPATH=str(site),
        PYTHONDONTWRITEBYTECODE="1",
        RELAY_SANDBOX_SYSCALLS=",".join(sorted(unit_syscalls())),
    )
    probe = subprocess.run(
        [sys.executable, "-c", SANDBOX_PROBE],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    if probe.returncode != 0 and "sandbox:" in probe.stderr:
        # e.g. no CAP_SYS_ADMIN for unshare, kernel < 6.3 for PR_SET_MDWE, no libseccomp
        pytest.skip(
            "cannot build the unit's sandbox here: " + probe.stderr.strip().splitlines()[-1]
        )
    assert probe.returncode == 0, probe.stderr
    assert probe.stdout.strip() == "sandboxed"
    return env


async def test_daemon_works_inside_the_units_sandbox(
    sandbox_env: dict[str, str], tmp_path: Path
) -> None:
    notify_path = str(tmp_path / "notify")
    notify = trio.socket.socket(trio.socket.AF_UNIX, trio.socket.SOCK_DGRAM)
    await notify.bind(notify_path)
    env = dict(sandbox_env, NOTIFY_SOCKET=notify_path, WATCHDOG_USEC="2000000")
    async with fake_realtime(expected_key=TEST_OPENAI_KEY) as fake:
        fake.echo = True
        # "localhost", not 127.0.0.1: name resolution must work without AF_NETLINK.
        config = {"openai": {"realtime_url": f"ws://localhost:{fake.port}/v1/realtime"}}
        async with running_daemon(config, env=env) as d:
            status = Path(f"/proc/{d.pid}/status").read_text()
            assert re.search(r"^Seccomp:\s+2$", status, re.M), "no seccomp filter"
            assert re.search(r"^NoNewPrivs:\s+1$", status, re.M)
            assert re.search(r"^CapEff:\s+0+$", status, re.M)
            with trio.fail_after(10):
                ready = await notify.recv(4096)
                while b"READY=1" not in ready:
                    ready = await notify.recv(4096)
            async with httpx.AsyncClient(base_url=d.http_url) as http:
                assert (await http.get("/healthz")).status_code == 200
                scrape = (await http.get("/metrics")).text
            # prometheus_client drops every process_* metric when /proc/stat is hidden.
            assert "process_resident_memory_bytes" in scrape
            assert "process_start_time_seconds" in scrape
            token = mint(decode_encryption_key(d.env["ENCRYPTION_KEY"]), 60)
            async with trio_websocket.open_websocket_url(
                f"{d.ws_url}/token/{token}", extra_headers=[(b"Origin", b"http://localhost:1")]
            ) as ws:
                await ws.send_message("through the sandbox")
                with trio.fail_after(10):
                    assert await ws.get_message() == "through the sandbox"
            # A session (and its upstream's name lookup) ran: threads stay few.
            status = Path(f"/proc/{d.pid}/status").read_text()
            threads = re.search(r"^Threads:\s+(\d+)$", status, re.M)
            assert threads is not None
            assert int(threads.group(1)) < int(unit_settings(UNIT.read_text())["TasksMax"][0]) // 4
            d.signal(signal.SIGTERM)
            assert await d.wait() == 0
            log = d.log_text()
    notify.close()
    assert "Traceback" not in log, log
    assert "ERROR" not in log and "CRITICAL" not in log, log
    # The reactor paced on its timerfd (ctypes under W^X, timerfd_* in the filter).
    assert "timerfd_settime failed" not in log, log


def test_sandbox_probe_catches_a_missing_restriction() -> None:
    """The probe is not vacuous: outside the sandbox it fails at its first check."""
    result = subprocess.run(
        [sys.executable, "-c", SANDBOX_PROBE],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode != 0
    assert "ProcSubset=pid" in result.stderr
