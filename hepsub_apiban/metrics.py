"""Prometheus metrics, one registry per application.

Counters that the domain objects already keep (APIBAN requests, lookup answers, registration
attempts) are read at scrape time by a custom collector instead of being mirrored into
prometheus-client objects on the hot path; the families each source turns into are in
metrics_families.py. The enrichment handler's own counters (EnrichmentStats) are kept here.
"""

from __future__ import annotations

from bisect import bisect_left
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import HistogramMetricFamily, Metric
from prometheus_client.registry import Collector

from .apiban.client import ApibanClient
from .apiban.lookups import LookupService
from .apiban.mirror import MirrorSync
from .core.access import Refusals
from .detection.book import Detections
from .detection.detector import Detector
from .homer.registration import Registrar
from .ingest.collector import HepCollector
from .ingest.sightings import Sightings
from .metrics_families import (
    PREFIX,
    _labelled_counter,
    apiban_families,
    detection_families,
    hep_families,
    lookup_families,
    mirror_families,
    refusal_families,
    registration_families,
    store_detection_families,
    store_families,
)
from .store.detections import SharedDetections
from .store.link import StoreLink
from .store.sightings import SharedSightings


class LatencyHistogram:
    """Plain counters behind a Prometheus histogram: observing is one bisect and two additions,
    where prometheus-client's Histogram takes a lock and walks its buckets on every request."""

    def __init__(self, bounds: tuple[float, ...]) -> None:
        self.bounds = bounds
        self.counts = [0] * (len(bounds) + 1)  # the last slot is +Inf
        self.sum = 0.0

    def observe(self, seconds: float) -> None:
        self.counts[bisect_left(self.bounds, seconds)] += 1
        self.sum += seconds

    def family(self, name: str, documentation: str) -> HistogramMetricFamily:
        cumulative, buckets = 0, []
        for bound, count in zip((*map(str, self.bounds), "+Inf"), self.counts, strict=True):
            cumulative += count
            buckets.append((bound, float(cumulative)))
        return HistogramMetricFamily(name, documentation, buckets=buckets, sum_value=self.sum)


@dataclass(slots=True)
class EnrichmentStats:
    outcomes: Counter[str] = field(default_factory=Counter)
    latency: LatencyHistogram = field(
        default_factory=lambda: LatencyHistogram(
            (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.0)
        )
    )


@dataclass(frozen=True, slots=True)
class Sources:
    """The domain objects metrics are read from at scrape time; None: not running in this agent."""

    client: ApibanClient | None = None
    lookups: LookupService | None = None
    registrar: Registrar | None = None
    sync: MirrorSync | None = None
    sightings: Sightings | None = None
    collector: HepCollector | None = None
    refusals: Refusals | None = None
    detections: Detections | None = None
    detector: Detector | None = None
    store: StoreLink | None = None
    shared_sightings: SharedSightings | None = None
    shared_detections: SharedDetections | None = None
    enrichment: EnrichmentStats = field(default_factory=EnrichmentStats)


class _AgentCollector(Collector):
    def __init__(self, sources: Sources) -> None:
        self._sources = sources

    def collect(self) -> Iterator[Metric]:
        sources = self._sources
        yield from apiban_families(sources.client)
        yield from lookup_families(sources.lookups)
        yield from registration_families(sources.registrar)
        yield from mirror_families(sources.sync)
        yield from self._enrichment()
        yield from hep_families(sources.collector, sources.sightings)
        yield from refusal_families(sources.refusals)
        yield from store_families(sources.store, sources.shared_sightings)
        yield from store_detection_families(sources.shared_detections)
        yield from detection_families(sources.detections, sources.detector, sources.collector)

    def _enrichment(self) -> Iterator[Metric]:
        stats = self._sources.enrichment
        yield _labelled_counter(
            f"{PREFIX}_enrichment_requests",
            "HOMER enrichment requests answered, by outcome",
            ["outcome"],
            stats.outcomes,
        )
        yield stats.latency.family(
            f"{PREFIX}_enrichment_seconds", "Time to answer a HOMER enrichment request"
        )


class Metrics:
    """One Prometheus registry per application, read from its domain objects at scrape time.

    Built by the application factory once every source exists (``Sources``, handed over whole);
    the enrichment handler counts into ``enrichment``. Keeps no copy of a domain counter and never
    costs the packet path anything: all the work happens when /metrics is scraped.
    """

    def __init__(self, sources: Sources) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        self.sources = sources
        self.registry.register(_AgentCollector(sources))

    @property
    def enrichment(self) -> EnrichmentStats:
        return self.sources.enrichment

    def render(self) -> bytes:
        return generate_latest(self.registry)
