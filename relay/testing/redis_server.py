"""A throwaway ``redis-server`` for tests and benchmarks.

    async with running_redis() as redis:
        settings = {"store": {"backend": "redis", "redis_url": redis.url}}
        await redis.kill()      # a crash: SIGKILL, the port goes dead
        await redis.start()     # back on the same port, empty

It listens on 127.0.0.1 on a free port, keeps nothing on disk
(``--save '' --appendonly no``) and is killed on exit. ``redis-server`` is
the Debian package of that name; :data:`REDIS_SERVER` is None without it.
"""

from __future__ import annotations

import shutil
import socket
import subprocess
import tempfile
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import trio

REDIS_SERVER = shutil.which("redis-server")


def free_port() -> int:
    """A TCP port nobody listens on right now (the kernel's pick for port 0)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


class RedisServer:
    """One redis-server process at a time on a fixed port; start, kill, start again."""

    def __init__(self, port: int, workdir: Path, executable: str) -> None:
        self.port = port
        self.workdir = workdir
        self.executable = executable
        self.proc: trio.Process | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.returncode is None

    async def start(self, timeout: float = 10) -> None:
        """Start it and return once it answers PING."""
        if self.running:
            return
        self.proc = await trio.lowlevel.open_process(
            [
                self.executable,
                "--port",
                str(self.port),
                "--bind",
                "127.0.0.1",
                "--save",
                "",
                "--appendonly",
                "no",
                "--dir",
                str(self.workdir),
                "--daemonize",
                "no",
                "--loglevel",
                "warning",
            ],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        with trio.fail_after(timeout):
            while not await self.ping():
                if self.proc.returncode is not None:
                    raise RuntimeError(
                        f"redis-server exited with {self.proc.returncode} "
                        f"(is port {self.port} taken?)"
                    )
                await trio.sleep(0.02)

    async def kill(self) -> None:
        """SIGKILL: what a crash or an OOM kill looks like to clients."""
        if self.proc is not None and self.proc.returncode is None:
            self.proc.kill()
            await self.proc.wait()
        self.proc = None

    async def ping(self) -> bool:
        try:
            with trio.move_on_after(1):
                stream = await trio.open_tcp_stream("127.0.0.1", self.port)
                async with stream:
                    await stream.send_all(b"PING\r\n")
                    return (await stream.receive_some(64)).startswith(b"+PONG")
        except OSError:
            pass
        return False

    async def command(self, *args: str | bytes | int) -> bytes:
        """One command in RESP, its raw reply (enough for tests: TTLs, key counts)."""
        parts = [a if isinstance(a, bytes) else str(a).encode() for a in args]
        request = b"*%d\r\n" % len(parts) + b"".join(b"$%d\r\n%s\r\n" % (len(p), p) for p in parts)
        with trio.fail_after(5):
            stream = await trio.open_tcp_stream("127.0.0.1", self.port)
            async with stream:
                await stream.send_all(request)
                return await stream.receive_some(65536)


@asynccontextmanager
async def running_redis(port: int | None = None) -> AsyncIterator[RedisServer]:
    """A started redis-server on ``port`` (default: a free one); killed on exit."""
    if REDIS_SERVER is None:
        raise RuntimeError("redis-server is not installed (Debian: apt-get install redis-server)")
    with tempfile.TemporaryDirectory(prefix="relay-redis-") as workdir:
        server = RedisServer(port or free_port(), Path(workdir), REDIS_SERVER)
        try:
            await server.start()
            yield server
        finally:
            with trio.CancelScope(shield=True):
                await server.kill()
