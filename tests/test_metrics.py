"""The hand-kept enrichment histogram exports what Prometheus expects of a histogram."""

from __future__ import annotations

from hepsub_apiban.metrics import LatencyHistogram


def test_buckets_are_cumulative_and_inclusive() -> None:
    histogram = LatencyHistogram((0.001, 0.01, 0.1))
    for seconds in (0.0005, 0.001, 0.002, 0.05, 3.0):
        histogram.observe(seconds)
    family = histogram.family("h", "doc")
    buckets = {s.labels["le"]: s.value for s in family.samples if s.name == "h_bucket"}
    assert buckets == {"0.001": 2.0, "0.01": 3.0, "0.1": 4.0, "+Inf": 5.0}
    count = next(s.value for s in family.samples if s.name == "h_count")
    total = next(s.value for s in family.samples if s.name == "h_sum")
    assert count == 5.0
    assert abs(total - 3.0535) < 1e-9
