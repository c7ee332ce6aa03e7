"""The Prometheus registry and the metrics docs/contract.md §9 names, created once per daemon."""

from __future__ import annotations

import time
from collections.abc import Iterator

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
from prometheus_client.core import CounterMetricFamily
from prometheus_client.registry import Collector

__all__ = ["CONTENT_TYPE", "DIRECTIONS", "KINDS", "Metrics", "ProcessMetrics", "Tally"]

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


class Tally:
    """One session's relayed messages, as plain ints: ``relay_messages_total`` adds
    them up at scrape time. Why not a Counter child per session pump: its ``inc``
    takes a lock, and per relayed frame that was ~4% of the relay's CPU."""

    __slots__ = ("down", "kind", "up")

    def __init__(self, kind: str) -> None:
        self.kind = kind
        self.up = 0  # messages relayed upstream
        self.down = 0  # and downstream


def _add(totals: dict[tuple[str, str], int], tally: Tally) -> None:
    """Add ``tally``'s counts into ``totals`` by (kind, direction)."""
    for direction, count in (("upstream", tally.up), ("downstream", tally.down)):
        totals[tally.kind, direction] = totals.get((tally.kind, direction), 0) + count


class _Messages(Collector):
    """``relay_messages_total{kind,direction}``: what ended sessions relayed plus
    what the live ones have relayed so far (monotonic: a session's counts move
    from the live tally to the ended totals in one step)."""

    def __init__(self) -> None:
        self.ended = {(kind, direction): 0 for kind in KINDS for direction in DIRECTIONS}
        self.live: set[Tally] = set()

    def collect(self) -> Iterator[CounterMetricFamily]:
        totals = dict(self.ended)
        for tally in self.live:
            _add(totals, tally)
        family = CounterMetricFamily(
            "relay_messages", "Relayed messages", labels=["kind", "direction"]
        )
        for (kind, direction), value in sorted(totals.items()):
            family.add_metric([kind, direction], value)
        yield family


class Metrics:
    """One registry per daemon (no global state); per-message counts are plain ints."""

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
        self._messages = _Messages()
        r.register(self._messages)
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
        # docs/contract.md §11: usage from every response.done, tools, call events.
        self.openai_tokens_total = Counter(
            "relay_openai_tokens_total",
            "OpenAI Realtime tokens from response.done usage",
            ["kind", "direction", "modality"],
            registry=r,
        )
        self.tool_calls_total = Counter(
            "relay_tool_calls_total",
            "Tool calls answered on phone calls",
            ["tool", "outcome"],
            registry=r,
        )
        self.call_events_total = Counter(
            "relay_call_events_total",
            "call.ended events delivered or given up",
            ["outcome"],
            registry=r,
        )
        # docs/contract.md §12: Twilio's status callbacks, by what became of each.
        self.call_status_total = Counter(
            "relay_call_status_total",
            "Twilio call status callbacks (POST /twilio/status)",
            ["outcome"],
            registry=r,
        )
        self.store_degraded = Gauge(
            "relay_store_degraded", "1 while the shared store is unreachable", registry=r
        )
        # Known label values exist from the first scrape (a series that appears
        # only on its first event breaks rate() and alerting on absence).
        for kind in KINDS:
            self.sessions_active.labels(kind=kind).set(0)

    def track(self, tally: Tally) -> None:
        """A live session's message counts, read by every scrape until :meth:`retire`."""
        self._messages.live.add(tally)

    def retire(self, tally: Tally) -> None:
        """The session is over: its counts join the ended sessions' totals."""
        if tally in self._messages.live:
            self._messages.live.remove(tally)
            _add(self._messages.ended, tally)

    def reject(self, reason: str) -> None:
        self.rejected_total.labels(reason=reason).inc()

    def render(self) -> bytes:
        return generate_latest(self.registry)


def count_tokens(metrics: Metrics, kind: str, added: tuple[int, int, int, int] | None) -> None:
    """Add one ``response.done``'s usage (``relay.calls.usage.Usage.add``) to the metric."""
    if added is None:
        return
    counter = metrics.openai_tokens_total
    for (direction, modality), value in zip(
        (("input", "text"), ("input", "audio"), ("output", "text"), ("output", "audio")),
        added,
        strict=True,
    ):
        if value:
            counter.labels(kind=kind, direction=direction, modality=modality).inc(value)
