"""relay.testing.metrics.sample_value: what the tests and the soak read /metrics with."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, generate_latest

from relay.testing.metrics import sample_value


def test_exact_labels_escapes_and_absence() -> None:
    r = CollectorRegistry()
    c = Counter("relay_rejected", "Refused", ["reason", "detail"], registry=r)
    c.labels(reason="a,b", detail='say "x=1, y=2"').inc(3)
    c.labels(reason="a", detail="b").inc()
    Gauge("relay_trio_tasks", "Tasks", registry=r).set(7)
    text = generate_latest(r).decode()
    # A split on "," reads the first as four labels; the parser reads two.
    assert sample_value(text, "relay_rejected_total", reason="a,b", detail='say "x=1, y=2"') == 3
    assert sample_value(text, "relay_rejected_total", reason="a", detail="b") == 1
    assert sample_value(text, "relay_rejected_total", reason="a") == 0  # labels are exact
    assert sample_value(text, "relay_rejected_total", reason="c", detail="b") == 0
    assert sample_value(text, "relay_trio_tasks") == 7
    assert sample_value(text, "relay_missing") == 0
