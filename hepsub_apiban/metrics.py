"""Prometheus metrics, one registry per application.

Counters that the domain objects already keep (APIBAN requests, lookup answers, registration
attempts) are read at scrape time by a custom collector instead of being mirrored into
prometheus-client objects on the hot path.
"""

from __future__ import annotations

from bisect import bisect_left
from collections import Counter
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.registry import Collector

from .apiban.client import ApibanClient
from .apiban.lookups import LookupService
from .apiban.mirror import MirrorSync
from .core.access import Refusals
from .detection.book import Detections
from .detection.detector import Detector, rule_name
from .homer.registration import Registrar
from .ingest.collector import HepCollector
from .ingest.sightings import Sightings
from .ingest.workers import WorkerPool
from .store.budget import SharedBudget
from .store.detections import SharedDetections
from .store.mirror import StoreLink
from .store.sightings import SharedSightings

PREFIX = "hepsub_apiban"
REGISTRATION_STATES = ("disabled", "starting", "registered", "failing", "unregistered")


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


def _labelled_counter(
    name: str, documentation: str, labels: list[str], counts: Mapping[Any, int]
) -> CounterMetricFamily:
    """A counter family from a Counter keyed by one label value, or by a tuple of them, in a stable order."""
    family = CounterMetricFamily(name, documentation, labels=labels)
    for values, count in sorted(counts.items()):
        family.add_metric([str(v) for v in values] if isinstance(values, tuple) else [str(values)], count)
    return family


class _AgentCollector(Collector):
    def __init__(self, sources: Sources) -> None:
        self._sources = sources

    def collect(self) -> Iterator[Metric]:
        yield from self._apiban()
        yield from self._lookups()
        yield from self._registration()
        yield from self._mirror()
        yield from self._enrichment()
        yield from self._hep()
        yield from self._refusals()
        yield from self._store()
        yield from self._store_detections()
        yield from self._detections()

    def _detections(self) -> Iterator[Metric]:
        book, detector = self._sources.detections, self._sources.detector
        if book is None or detector is None:
            return
        findings = {(rule_name(rule), outcome): n for (rule, outcome), n in book.stats.findings.items()}
        yield _labelled_counter(
            f"{PREFIX}_detections",
            "Times a detection rule fired, by rule and outcome (serve, flag, simulated)",
            ["rule", "action"],
            findings,
        )
        active = GaugeMetricFamily(
            f"{PREFIX}_detections_active", "Addresses detected locally now, by action", labels=["action"]
        )
        counts = book.counts()
        for action in ("serve", "flag"):
            active.add_metric([action], counts[action])
        yield active
        yield CounterMetricFamily(
            f"{PREFIX}_detection_breaker_trips",
            "Detections flagged instead of served because detect.max_new_served was reached",
            book.stats.breaker_trips,
        )
        collector = self._sources.collector
        tracked = detector.tracked() + (collector.tracked() if isinstance(collector, WorkerPool) else 0)
        yield GaugeMetricFamily(
            f"{PREFIX}_detection_tracked", "Remote addresses whose counters are kept", tracked
        )
        yield CounterMetricFamily(
            f"{PREFIX}_detection_exempted",
            "Findings dropped because the address authenticated in the last 24 h",
            detector.stats.exempted,
        )

    def _refusals(self) -> Iterator[Metric]:
        refusals = self._sources.refusals
        if refusals is None:
            return
        yield _labelled_counter(
            f"{PREFIX}_refused",
            "Input turned away, by channel (hep_udp, hep_tcp, http, site) and reason",
            ["channel", "reason"],
            refusals.counts,
        )

    def _hep(self) -> Iterator[Metric]:
        collector, sightings = self._sources.collector, self._sources.sightings
        if collector is None or sightings is None:
            return
        stats = collector.stats
        yield _labelled_counter(
            f"{PREFIX}_hep_packets", "HEP packets decoded", ["transport", "version"], stats.by_version
        )
        yield _labelled_counter(
            f"{PREFIX}_hep_bad_packets", "HEP packets dropped as malformed", ["reason"], stats.bad
        )
        yield _labelled_counter(
            f"{PREFIX}_hep_non_sip_packets",
            "HEP packets of other protocol types",
            ["proto_type"],
            stats.non_sip,
        )
        drops = collector.kernel_drops()
        if drops is not None:
            yield CounterMetricFamily(
                f"{PREFIX}_hep_udp_kernel_drops", "Datagrams the kernel dropped on the HEP UDP socket", drops
            )
        yield GaugeMetricFamily(f"{PREFIX}_hep_tcp_connections", "HEP TCP connections open", stats.tcp_open)
        if isinstance(collector, WorkerPool):
            yield from _workers(collector)
        closed = CounterMetricFamily(
            f"{PREFIX}_hep_tcp_closed",
            "HEP TCP connections the agent closed, by why (refusals at accept are in refused_total)",
            labels=["reason"],
        )
        closed.add_metric(["idle"], stats.tcp_idle_closed)
        closed.add_metric(["bad stream"], stats.tcp_closed_bad)
        closed.add_metric(["no complete packet in time"], stats.tcp_packet_timeouts)
        closed.add_metric(["to make room"], stats.tcp_evicted)
        yield closed
        yield GaugeMetricFamily(f"{PREFIX}_sightings", "IPs remembered from HEP traffic", len(sightings))
        yield GaugeMetricFamily(
            f"{PREFIX}_sightings_listed", "Remembered IPs that APIBAN lists", sightings.listed_count()
        )
        yield CounterMetricFamily(
            f"{PREFIX}_listed_packets", "SIP packets from or to an APIBAN-listed IP", sightings.listed_packets
        )
        yield CounterMetricFamily(
            f"{PREFIX}_sightings_evicted", "IPs forgotten to keep the sightings bounded", sightings.evicted
        )
        yield CounterMetricFamily(
            f"{PREFIX}_sightings_evicted_protected",
            "Listed or flagged IPs forgotten because every remembered IP was protected",
            sightings.evicted_protected,
        )

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

    def _apiban(self) -> Iterator[Metric]:
        client = self._sources.client
        if client is None:
            return
        yield _labelled_counter(
            f"{PREFIX}_upstream_requests",
            "APIBAN requests by endpoint and outcome (budget_spent: not sent, our budget was spent)",
            ["endpoint", "outcome"],
            client.requests,
        )
        yield GaugeMetricFamily(
            f"{PREFIX}_budget_used", "APIBAN requests spent in the current window", client.budget.used()
        )
        yield GaugeMetricFamily(
            f"{PREFIX}_budget_limit", "APIBAN requests allowed per window", client.budget.limit.requests
        )
        yield GaugeMetricFamily(
            f"{PREFIX}_budget_remaining",
            "APIBAN requests still allowed in the current window",
            max(0, client.budget.limit.requests - client.budget.used()),
        )
        if client.last_success is not None:
            yield GaugeMetricFamily(
                f"{PREFIX}_upstream_last_success_timestamp_seconds",
                "Unix time of the last usable APIBAN answer",
                client.last_success,
            )

    def _lookups(self) -> Iterator[Metric]:
        lookups = self._sources.lookups
        if lookups is None:
            return
        yield _labelled_counter(
            f"{PREFIX}_lookups",
            "IP verdicts given, by where the answer came from and what it was",
            ["source", "verdict"],
            lookups.answers,
        )
        yield GaugeMetricFamily(
            f"{PREFIX}_cache_entries", "Verdicts in the check-mode cache", lookups.cache_size()
        )

    def _registration(self) -> Iterator[Metric]:
        registrar = self._sources.registrar
        state = GaugeMetricFamily(
            f"{PREFIX}_registration_state",
            "HOMER registration state (1 for the current one)",
            labels=["state"],
        )
        current = registrar.status.state if registrar else "disabled"
        for name in REGISTRATION_STATES:
            state.add_metric([name], 1.0 if name == current else 0.0)
        yield state
        if registrar is not None:
            yield CounterMetricFamily(
                f"{PREFIX}_registration_attempts", "HOMER subscribe attempts", registrar.status.attempts
            )

    def _store(self) -> Iterator[Metric]:
        link = self._sources.store
        if link is None:
            return
        yield GaugeMetricFamily(
            f"{PREFIX}_store_connected",
            "1 while the store (store.url) is reachable",
            float(link.status.connected),
        )
        yield GaugeMetricFamily(
            f"{PREFIX}_store_apiban_puller",
            "1 while this agent pulls the APIBAN list for all agents of its key",
            float(link.status.role == "puller"),
        )
        yield from _shared_budget(link.shared_budget)
        sharing = self._sources.shared_sightings
        if sharing is not None:
            stats = sharing.stats
            yield CounterMetricFamily(
                f"{PREFIX}_store_sightings_rows", "Sighting rows written to the store", stats.rows_written
            )
            yield CounterMetricFamily(
                f"{PREFIX}_store_sightings_failures",
                "Sighting writes that failed (their addresses are written by a later one)",
                stats.failures,
            )
            yield CounterMetricFamily(
                f"{PREFIX}_store_sightings_read_failures",
                "Store reads of sightings that timed out or failed (answered from memory)",
                stats.read_failures,
            )
            yield GaugeMetricFamily(
                f"{PREFIX}_store_sightings_waiting",
                "Addresses touched since the last write",
                sharing.pending(),
            )

    def _store_detections(self) -> Iterator[Metric]:
        sharing = self._sources.shared_detections
        if sharing is None:
            return
        stats = sharing.stats
        yield CounterMetricFamily(
            f"{PREFIX}_store_detections_rows", "Served detections written to the store", stats.rows_written
        )
        yield CounterMetricFamily(
            f"{PREFIX}_store_detections_adopted",
            "Shared detection rows applied to this agent's book (its own and other agents')",
            stats.adopted,
        )
        yield CounterMetricFamily(
            f"{PREFIX}_store_detections_failures",
            "Detection writes or follows that failed (retried; nothing is lost)",
            stats.failures,
        )
        yield GaugeMetricFamily(
            f"{PREFIX}_store_detections_waiting", "Detections marked for the next write", sharing.pending()
        )

    def _mirror(self) -> Iterator[Metric]:
        sync = self._sources.sync
        if sync is None:
            return
        mirror = sync.mirror
        yield GaugeMetricFamily(
            f"{PREFIX}_mirror_entries", "APIBAN entries held locally", len(mirror.entries)
        )
        yield GaugeMetricFamily(
            f"{PREFIX}_mirror_loaded", "1 once a complete APIBAN list is held", 1.0 if mirror.loaded else 0.0
        )
        if mirror.last_sync is not None:
            yield GaugeMetricFamily(
                f"{PREFIX}_mirror_last_sync_timestamp_seconds",
                "Unix time APIBAN last confirmed the local list is current",
                mirror.last_sync,
            )
        if sync.status.next_sync is not None:
            yield GaugeMetricFamily(
                f"{PREFIX}_mirror_next_sync_timestamp_seconds",
                "Unix time of the next planned pull",
                sync.status.next_sync,
            )
        yield CounterMetricFamily(f"{PREFIX}_mirror_pages", "APIBAN list pages received", sync.status.pages)
        yield _labelled_counter(
            f"{PREFIX}_mirror_dropped",
            "APIBAN entries not held, by reason (not_an_address, non_routable)",
            ["reason"],
            mirror.dropped,
        )
        yield CounterMetricFamily(
            f"{PREFIX}_mirror_full_pulls_rejected",
            "Full pulls not accepted because they reported under half of the last complete one",
            sync.status.full_pulls_rejected,
        )


def _workers(pool: WorkerPool) -> Iterator[Metric]:
    yield GaugeMetricFamily(
        f"{PREFIX}_hep_workers_up", "HEP worker processes running (hep.workers)", pool.up()
    )
    yield CounterMetricFamily(
        f"{PREFIX}_hep_worker_restarts", "HEP worker processes started again after one died", pool.restarts
    )
    yield _labelled_counter(
        f"{PREFIX}_hep_worker_dropped",
        "What HEP workers could not hand to the agent (sightings, findings, evidence, batches)",
        ["what"],
        pool.dropped,
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


def _shared_budget(shared: SharedBudget | None) -> Iterator[Metric]:
    """Check mode with a store: the key's APIBAN budget shared by its agents (store/budget.py)."""
    if shared is None:
        return
    yield GaugeMetricFamily(
        f"{PREFIX}_store_budget_shared",
        "1 while /check requests spend the key's budget in the store; 0: this agent's fallback share",
        float(shared.shared),
    )
    outcomes = CounterMetricFamily(
        f"{PREFIX}_store_budget_requests",
        "APIBAN requests asked of the shared budget, by outcome (fallback_*: the store did not answer)",
        labels=["outcome"],
    )
    stats = shared.stats
    for outcome in ("granted", "refused", "fallback_granted", "fallback_refused", "failures"):
        outcomes.add_metric([outcome], getattr(stats, outcome))
    yield outcomes
