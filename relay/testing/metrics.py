"""Reading a /metrics scrape in the tests and the soak.

The Prometheus text goes through ``prometheus_client``'s own parser, not a line split:
label values may hold commas, quotes and escapes, which a split on "," gets wrong.
"""

from __future__ import annotations

from prometheus_client.parser import text_string_to_metric_families


def sample_value(text: str, name: str, **labels: str) -> float:
    """The value of the sample ``name`` whose labels are exactly ``labels`` in the
    Prometheus text ``text``; 0.0 when there is none (a labelled counter has no sample
    before its first increment).

    ``name`` is the sample's own name, as on the wire: ``relay_rejected_total``,
    ``relay_upstream_connect_seconds_count``, ``relay_sessions_active``. The same
    semantics as ``CollectorRegistry.get_sample_value``, on a scrape.
    """
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == name and sample.labels == labels:
                return float(sample.value)
    return 0.0
