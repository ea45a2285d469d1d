"""The Prometheus metric families each source of the agent reports, read at scrape time.

One function per source (the APIBAN client, lookups, HOMER registration, the mirror sync, HEP
ingest and its workers, refusals, the store link and its sharing, detection): each takes the
domain objects it reads, None when that part does not run in this agent, and yields their
families. The collector in metrics.py calls them in the order /metrics lists them.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from typing import Any

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric

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
from .store.link import StoreLink
from .store.sightings import SharedSightings

PREFIX = "hepsub_apiban"
REGISTRATION_STATES = ("disabled", "starting", "registered", "failing", "unregistered")


def _labelled_counter(
    name: str, documentation: str, labels: list[str], counts: Mapping[Any, int]
) -> CounterMetricFamily:
    """A counter family from a Counter keyed by one label value, or by a tuple of them, in a stable order."""
    family = CounterMetricFamily(name, documentation, labels=labels)
    for values, count in sorted(counts.items()):
        family.add_metric([str(v) for v in values] if isinstance(values, tuple) else [str(values)], count)
    return family


def detection_families(
    book: Detections | None, detector: Detector | None, collector: HepCollector | None
) -> Iterator[Metric]:
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
    tracked = detector.tracked() + (collector.tracked() if isinstance(collector, WorkerPool) else 0)
    yield GaugeMetricFamily(
        f"{PREFIX}_detection_tracked", "Remote addresses whose counters are kept", tracked
    )
    yield CounterMetricFamily(
        f"{PREFIX}_detection_exempted",
        "Findings dropped because the address authenticated in the last 24 h",
        detector.stats.exempted,
    )


def refusal_families(refusals: Refusals | None) -> Iterator[Metric]:
    if refusals is None:
        return
    yield _labelled_counter(
        f"{PREFIX}_refused",
        "Input turned away, by channel (hep_udp, hep_tcp, http, site) and reason",
        ["channel", "reason"],
        refusals.counts,
    )


def hep_families(collector: HepCollector | None, sightings: Sightings | None) -> Iterator[Metric]:
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


def apiban_families(client: ApibanClient | None) -> Iterator[Metric]:
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


def lookup_families(lookups: LookupService | None) -> Iterator[Metric]:
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


def registration_families(registrar: Registrar | None) -> Iterator[Metric]:
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


def store_families(link: StoreLink | None, sharing: SharedSightings | None) -> Iterator[Metric]:
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


def store_detection_families(sharing: SharedDetections | None) -> Iterator[Metric]:
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


def mirror_families(sync: MirrorSync | None) -> Iterator[Metric]:
    if sync is None:
        return
    mirror = sync.mirror
    yield GaugeMetricFamily(f"{PREFIX}_mirror_entries", "APIBAN entries held locally", len(mirror.entries))
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
