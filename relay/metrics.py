"""The Prometheus registry and the metrics SPEC §9 names, created once per daemon."""

from __future__ import annotations

import time

from prometheus_client import (
    CONTENT_TYPE_LATEST as CONTENT_TYPE,
)
from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    ProcessCollector,
    generate_latest,
)

__all__ = ["CONTENT_TYPE", "DIRECTIONS", "KINDS", "Metrics", "ProcessMetrics"]

KINDS = ("client", "twilio")
DIRECTIONS = ("upstream", "downstream")


class ProcessMetrics(ProcessCollector):
    """``process_*`` metrics that survive ``ProcSubset=pid`` in the systemd unit.

    prometheus_client reads the boot time from ``/proc/stat`` and, when that
    file is hidden (as it is under ``ProcSubset=pid``), silently exports no
    process metrics at all. The boot time is also "wall clock now minus time
    since boot", which needs no file.
    """

    def _boot_time(self) -> float:
        try:
            btime: float | None = super()._boot_time()  # type: ignore[no-untyped-call]
        except OSError:
            btime = None
        if btime:
            return btime
        return time.time() - time.clock_gettime(time.CLOCK_BOOTTIME)


class Metrics:
    """One registry per daemon (no global state), with per-frame children bound up front."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        ProcessMetrics(registry=r)
        self.sessions_active = Gauge(
            "relay_sessions_active", "Live WebSocket sessions", ["kind"], registry=r
        )
        self.sessions_total = Counter(
            "relay_sessions_total", "Ended WebSocket sessions", ["kind", "outcome"], registry=r
        )
        self.messages_total = Counter(
            "relay_messages_total", "Relayed messages", ["kind", "direction"], registry=r
        )
        self.rejected_total = Counter(
            "relay_rejected_total", "Refused requests and upgrades", ["reason"], registry=r
        )
        self.bargeins_total = Counter("relay_bargeins_total", "Caller barge-ins", registry=r)
        self.upstream_connect_seconds = Histogram(
            "relay_upstream_connect_seconds",
            "Time to open the OpenAI Realtime socket",
            buckets=(0.05, 0.1, 0.25, 0.5, 1, 2, 5, 10, 30),
            registry=r,
        )
        self.convo_events_total = Counter(
            "relay_convo_events_total", "Conversations webhook events", ["outcome"], registry=r
        )
        self.jobs_failed_total = Counter(
            "relay_jobs_failed_total", "Background webhook jobs that failed", ["stage"], registry=r
        )
        self.store_degraded = Gauge(
            "relay_store_degraded", "1 while the shared store is unreachable", registry=r
        )
        # Known label values exist from the first scrape (a series that appears
        # only on its first event breaks rate() and alerting on absence), and
        # the per-frame counters are bound here once, never looked up per frame.
        for kind in KINDS:
            self.sessions_active.labels(kind=kind).set(0)
        self._messages: dict[tuple[str, str], Counter] = {
            (kind, direction): self.messages_total.labels(kind=kind, direction=direction)
            for kind in KINDS
            for direction in DIRECTIONS
        }

    def messages(self, kind: str, direction: str) -> Counter:
        """The bound child for one session's pump: the hot path calls ``.inc()`` on
        it with no label lookup (a session asks once, not per frame)."""
        child = self._messages.get((kind, direction))
        if child is None:  # a kind or direction added later; bound on first use
            child = self._messages[kind, direction] = self.messages_total.labels(
                kind=kind, direction=direction
            )
        return child

    def reject(self, reason: str) -> None:
        self.rejected_total.labels(reason=reason).inc()

    def render(self) -> bytes:
        return generate_latest(self.registry)
