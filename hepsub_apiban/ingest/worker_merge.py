"""The worker pool's merge of a worker's batch into the agent's own state.

``PoolMerge`` is the part of ``workers.WorkerPool`` that takes a batch in: per address the counts
are added to the agent's ``Sightings`` (in slices of ``MERGE_SLICE``, so enrichment keeps its
deadline), the findings go to the detections book, the packets of protected addresses to the
``Evidence``, the counters that grew into the collector's stats and the refusals, and the HEP
senders the worker met to the pool's own bounded list (``MAX_SENDERS``). It reads only what
``worker_wire.read_report`` made of the frame, and never writes to a worker.
"""

from __future__ import annotations

import asyncio
from collections import Counter, OrderedDict
from typing import Any

from ..detection.detector import Finding, Report
from .collector import HepCollector
from .evidence import Evidence
from .worker_slots import Slot
from .worker_wire import DETECTOR_COUNTERS, TCP_COUNTERS, evidence_packets

MAX_SENDERS = 4096  # HEP senders remembered (as the detector's own bound)
MERGE_SLICE = 2000  # addresses merged between two yields to the event loop


class PoolMerge(HepCollector):
    """The merging half of ``WorkerPool``, which builds every attribute declared here."""

    _report: Report | None
    _evidence_store: Evidence | None
    slots: list[Slot]
    senders: OrderedDict[str, None]
    _senders_version: int
    dropped: Counter[str]
    batches: int

    async def _merge(self, slot: Slot, batch: dict[str, Any], evidence: bytes) -> None:
        self.batches += 1
        slot.batches += 1
        self._count(slot, batch["counts"])
        slot.gauges = batch["gauges"]
        self._gauges()
        add = self.sightings.add
        rows = batch.get("rows", ())
        for start in range(0, len(rows), MERGE_SLICE):
            if start:
                await asyncio.sleep(0)
            for row in rows[start : start + MERGE_SLICE]:
                add(*row)
        report = self._report
        if report is not None:
            for ip, rule, words, proof, at in batch.get("findings", ()):
                report(Finding(ip, rule, words, proof, at))
        store = self._evidence_store
        if store is not None:
            for packet in evidence_packets(evidence):
                store.keep(packet)
        self._learn_senders(batch["senders"])
        if "authenticated" in batch and self._detector is not None:
            self._detector.restore_authenticated(batch["authenticated"], self._clock())

    def _count(self, slot: Slot, counts: list[list[Any]]) -> None:
        """The worker's counters so far: what grew since its last batch goes to the totals."""
        stats, refusals = self.stats, self.refusals
        detector = self._detector
        for item in counts:
            key, value = tuple(item[:-1]), int(item[-1])
            grown = value - slot.counts.get(key, 0)
            slot.counts[key] = value
            if grown <= 0:
                continue
            kind = key[0]
            if kind == "packets":
                stats.packets[key[1]] += grown
                slot.packets += grown
            elif kind == "version":
                stats.by_version[(key[1], key[2])] += grown
            elif kind == "bad":
                stats.bad[key[1]] += grown
            elif kind == "non_sip":
                stats.non_sip[int(key[1])] += grown
            elif kind == "unparsable_sip":
                stats.unparsable_sip += grown
            elif kind == "tcp" and key[1] in TCP_COUNTERS:
                setattr(stats, key[1], getattr(stats, key[1]) + grown)
            elif kind == "refused":
                refusals.counts[(key[1], key[2])] += grown
            elif kind == "detector" and detector is not None and key[1] in DETECTOR_COUNTERS:
                setattr(detector.stats, key[1], getattr(detector.stats, key[1]) + grown)
            elif kind == "dropped":
                self.dropped[key[1]] += grown

    def _gauges(self) -> None:
        self.stats.tcp_open = sum(int(slot.gauges.get("tcp_open", 0)) for slot in self.slots if slot.up)

    def _learn_senders(self, ips: list[str]) -> None:
        for ip in ips:
            if ip not in self.senders:
                self.senders[ip] = None
                self._senders_version += 1
                if len(self.senders) > MAX_SENDERS:
                    self.senders.popitem(last=False)
