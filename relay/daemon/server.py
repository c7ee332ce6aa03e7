"""The daemon's whole lifecycle, top to bottom: start, serve, drain, stop.

trio.run(main)
├── ws liveness      (system task) pings silent WebSockets, aborts stalled ones
├── ws reactor       (system task) one epoll set for every WebSocket; runs the
│                      sessions' fast paths (media relayed without a task switch)
├── signal watcher     first SIGTERM/SIGINT drains, a second stops at once
├── refusal summary    once a minute, the count of refusals not logged one by one
├── task dump          on SIGUSR1, every live task and where it waits, to the log
├── sd_notify watchdog WATCHDOG=1 from the main loop, so a wedged loop misses it
├── store              prunes idle keys; with Redis also holds the connections and
│                      watches its health (degraded ⇄ shared)
└── background jobs    webhook work after its 200 ok; waited for on drain
    └── hypercorn      listeners; each connection enters relay.edge.router.Router:
        ├── WebSocket upgrade → FrontDoor.serve on the socket (relay.ws), one nursery per session
        └── anything else     → Hypercorn's HTTP/1.1 server and the ASGI app
"""

from __future__ import annotations

import logging
import signal
from functools import partial
from typing import Any, cast

import hypercorn.trio
import trio
from hypercorn.config import Config as HypercornConfig
from prometheus_client import Gauge

from relay.config import Settings
from relay.daemon.call_services import CallServices
from relay.daemon.handlers import client_runner, twilio_routes, twilio_runner
from relay.daemon.outbound import Outbound
from relay.daemon.state import DaemonState
from relay.edge import hypercorn_fix
from relay.edge.app import combine, create_http_app
from relay.edge.front_door import FrontDoor
from relay.edge.router import Router
from relay.ops import nofile, task_dump
from relay.ops.risky import log_risky_settings
from relay.ops.sd_notify import Notifier
from relay.store.select import create_store
from relay.ws import liveness, reactor

log = logging.getLogger("relay.server")

# After drain_seconds, sessions close themselves with 1001; this is how long the
# closes (and any job still finishing) get before everything is cancelled.
CLOSE_GRACE = 3.0
# A new connection has this long to send its request head (slowloris guard).
HEAD_SECONDS = 10.0


def hypercorn_config(settings: Settings) -> HypercornConfig:
    config = HypercornConfig()
    config.bind = list(settings.server.bind)
    config.accesslog = None  # a client token can sit in the path: never log request lines
    config.errorlog = logging.getLogger("hypercorn.error")
    config.websocket_max_message_size = settings.limits.max_message_bytes
    config.graceful_timeout = CLOSE_GRACE
    config.keep_alive_timeout = 5
    config.websocket_ping_interval = None
    return config


async def main(settings: Settings, *, notifier: Notifier | None = None) -> None:
    """Serve until a signal; return once drained (exit status 0)."""
    hypercorn_fix.apply()  # before any connection: see the module for why
    nofile.raise_nofile(settings.limits.max_connections)
    nofile.quiet_accept_errors()
    liveness.sweeper()  # WebSocket liveness: one system task for every socket
    reactor.reactor()  # WebSocket readiness: one epoll set, one system task
    notifier = notifier or Notifier()
    log_risky_settings(settings)  # docs/contract.md §10: named at start, one line each
    store = create_store(settings.store, settings.secrets.redis_url)
    rt = DaemonState(settings, store)
    # Read at scrape time, so the gauge can never disagree with the store.
    rt.metrics.store_degraded.set_function(lambda: 1.0 if store.degraded else 0.0)
    shutdown = trio.Event()
    rt.on_change = partial(_status, notifier, rt)
    # Live Trio tasks, read at scrape time: a leak of session tasks shows up here.
    Gauge(
        "relay_trio_tasks", "Live Trio tasks in the process", registry=rt.metrics.registry
    ).set_function(task_dump.count)
    out = Outbound(rt)  # the daemon's outgoing clients, shared
    desk = CallServices(rt, out)
    gate_app = FrontDoor(rt, client_runner, partial(twilio_runner, desk=desk))
    # WebSocket upgrades are served on the socket itself; Hypercorn gets the rest.
    router = Router(
        gate_app.serve,
        max_message=settings.limits.max_message_bytes,
        stall_seconds=settings.limits.stall_seconds,
        head_seconds=HEAD_SECONDS,
        max_connections=settings.limits.max_connections,
        refused=partial(_refused_connection, rt),
    )
    router.install()
    # Against limits.max_connections (and process_open_fds against process_max_fds).
    Gauge(
        "relay_connections_open",
        "Live TCP connections, HTTP and WebSocket",
        registry=rt.metrics.registry,
    ).set_function(lambda: router.live)
    http_app = create_http_app(rt, *twilio_routes(rt, gate_app.gate, out))
    asgi = combine(rt, http_app, gate_app)
    try:
        async with trio.open_nursery() as root:
            root.start_soon(_watch_signals, rt, notifier, shutdown)
            # Before the listeners: the first request already finds Redis (or
            # knows it is unreachable); the start never waits more than ~1 s on it.
            await root.start(store.run)
            root.start_soon(_flush_refusals, rt)
            root.start_soon(task_dump.dump_on_signal)
            async with trio.open_nursery() as jobs:
                rt.attach_jobs(jobs)
                binds = await jobs.start(
                    partial(
                        hypercorn.trio.serve,
                        cast(Any, asgi),
                        hypercorn_config(settings),
                        shutdown_trigger=shutdown.wait,
                    )
                )
                for bind in binds:
                    log.info("listening on %s", bind)
                notifier.send("READY=1", _status_line(rt))
                if notifier.watchdog_interval is not None:
                    # After READY: systemd ignores pings before start-up completes.
                    root.start_soon(_watchdog, notifier, notifier.watchdog_interval)
                await shutdown.wait()
                # hypercorn is stopping; jobs still in flight had their drain time.
                rt.attach_jobs(None)
                jobs.cancel_scope.deadline = trio.current_time() + CLOSE_GRACE
            root.cancel_scope.cancel()
    finally:
        with trio.CancelScope(shield=True), trio.move_on_after(CLOSE_GRACE):
            for close in rt.closers:
                await close()
        notifier.close()
        rt.refusal_log.flush()
    log.info("stopped")


def _refused_connection(rt: DaemonState, reason: str, detail: str) -> None:
    rt.metrics.reject(reason)
    # No client address: it is not known before the head is read (and at the
    # connection cap the peer is often a proxy); the flood summary is what matters.
    rt.refusal_log.note(reason, "", detail)


async def _watch_signals(rt: DaemonState, notifier: Notifier, shutdown: trio.Event) -> None:
    with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
        async with trio.open_nursery() as nursery:
            first = await signals.__anext__()
            log.info(
                "received %s: draining for up to %ss",
                signal.Signals(first).name,
                rt.settings.server.drain_seconds,
            )
            rt.draining.set()
            notifier.send("STOPPING=1", "STATUS=draining")
            nursery.start_soon(_drain, rt, shutdown)
            await signals.__anext__()
            log.warning("second signal: stopping now")
            rt.drain_expired.set()
            shutdown.set()
            nursery.cancel_scope.cancel()


async def _drain(rt: DaemonState, shutdown: trio.Event) -> None:
    with trio.move_on_after(rt.settings.server.drain_seconds):
        await rt.wait_idle()
    if rt.busy:
        log.info(
            "drain time is up: closing what is left",
            extra={
                "client": rt.active["client"],
                "twilio": rt.active["twilio"],
                "jobs": rt.jobs_in_flight,
            },
        )
    rt.drain_expired.set()
    with trio.move_on_after(CLOSE_GRACE):
        await rt.wait_idle()
    shutdown.set()


async def _flush_refusals(rt: DaemonState) -> None:
    """A flood that simply stops still gets its summary line within a minute."""
    while True:
        await trio.sleep(60)
        rt.refusal_log.flush()


async def _watchdog(notifier: Notifier, interval: float) -> None:
    while True:
        notifier.send("WATCHDOG=1")
        await trio.sleep(interval)


def _status_line(rt: DaemonState) -> str:
    state = "draining" if rt.draining.is_set() else "serving"
    return (
        f"STATUS={state}: {rt.active['client']} client, {rt.active['twilio']} twilio sessions, "
        f"{rt.jobs_in_flight} jobs"
    )


def _status(notifier: Notifier, rt: DaemonState) -> None:
    if notifier.enabled:
        notifier.send(_status_line(rt))


def run(settings: Settings) -> None:
    trio.run(main, settings)
