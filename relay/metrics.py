"""The Prometheus registry and the metrics SPEC §9 names, created once per daemon."""

from __future__ import annotations

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    ProcessCollector,
    generate_latest,
)
from prometheus_client import (
    CONTENT_TYPE_LATEST as CONTENT_TYPE,
)

__all__ = ["CONTENT_TYPE", "Metrics"]


class Metrics:
    """One registry per daemon (no global state), with per-frame children bound up front."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        ProcessCollector(registry=r)
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
        for kind in ("client", "twilio"):
            self.sessions_active.labels(kind=kind).set(0)

    def messages(self, kind: str, direction: str) -> Counter:
        """A pre-bound child: hot paths call ``.inc()`` on it with no label lookup."""
        return self.messages_total.labels(kind=kind, direction=direction)

    def reject(self, reason: str) -> None:
        self.rejected_total.labels(reason=reason).inc()

    def render(self) -> bytes:
        return generate_latest(self.registry)
