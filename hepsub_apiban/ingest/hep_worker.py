"""A HEP worker process (``hep.workers`` > 1): one of N processes serving the same HEP ports.

The agent (``workers.WorkerPool``) binds one UDP and one TCP socket per worker on the HEP ports
with ``SO_REUSEPORT`` and starts ``python -m hepsub_apiban.ingest.hep_worker CONTROL UDP TCP`` with those
file descriptors and one end of a socket pair (CONTROL). The kernel hands each worker the packets
of the HEP senders it hashes to it. A worker does the per-packet work of the single-process
collector, on the same code: the allow-list and key checks, decoding, SIP parsing, the sightings
bookkeeping (a ``Sightings`` of its own, fresh for every batch, so it holds what the batch adds)
and local detection (a ``Detector`` of its own). It reads its UDP socket in bursts
(``BurstReader``) and collects garbage rarely (``tune_gc``): its batches die young, and full
collections paused it for 40-70 ms. About twice a second it sends the main process one batch:
per address what ``Sightings.record`` counted (the columns the store's sightings rows have), the
detector's findings, the packets of protected addresses, HEP senders it learned, and its
counters so far (cumulative, so a lost batch loses no count).

Everything is bounded: a batch's addresses by ``sightings.max`` (an address forgotten within one
batch is counted, its counts lost), findings by ``MAX_FINDINGS``, evidence by ``PER_ADDRESS``
packets per address and ``EVIDENCE_BYTES``; while more than ``MAX_BUFFERED`` bytes wait for the
main process, a batch's addresses, findings and evidence are dropped and counted (its counters
are not: the next batch carries them).

Frames on CONTROL are a 4-byte length and a body. From the worker: a 4-byte length, a JSON
message, then the evidence packets as binary records (``EVIDENCE``: JSON would escape every line
break of a SIP message, which took the main process most of its time per batch); the main process
reads nothing else from a process that parses hostile input. From the main process: pickle (the
settings object, which only the agent itself writes). The worker stops on ``{"stop": true}``, on SIGTERM
(after one last batch, with the authentication exemptions the detector learned) and when CONTROL
closes: the main process is gone, so no worker outlives the agent. SIGINT is left to the main
process, which stops the workers itself.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
import pickle
import signal
import socket
import sys
import time
from collections import OrderedDict
from collections.abc import Callable, Sequence
from typing import Any

from ..apiban.lookups import LookupService
from ..apiban.mirror import Mirror
from ..core.addresses import NetworkSet
from ..core.config import Settings
from ..core.logs import Redactor, setup_logging
from ..detection.detector import Finding
from .sightings import Sightings
from .worker_packets import MAX_BURST, BurstReader, EvidenceBatch, WorkerCollector, WorkerDetector
from .worker_wire import (
    DETECTOR_COUNTERS,
    DROPPED,
    EVIDENCE,
    FRAME,
    MAX_FRAME,
    NO_FD,
    TCP_COUNTERS,
    Message,
    evidence_packets,
    evidence_record,
    frame,
    read_frame,
    read_report,
    report,
)

# What moved to worker_wire and worker_packets, still importable from here.
__all__ = [
    "DETECTOR_COUNTERS",
    "DROPPED",
    "EVIDENCE",
    "FRAME",
    "MAX_BURST",
    "MAX_FRAME",
    "NO_FD",
    "TCP_COUNTERS",
    "BurstReader",
    "EvidenceBatch",
    "Message",
    "Worker",
    "WorkerCollector",
    "WorkerDetector",
    "evidence_packets",
    "evidence_record",
    "frame",
    "main",
    "read_frame",
    "read_report",
    "report",
    "serve",
    "tune_gc",
]

# Its name before the wings: operators' log filters use it.
log = logging.getLogger("hepsub_apiban.hep_worker")
FLUSH_EVERY = 0.5  # seconds between batches
MAX_BUFFERED = 32 << 20  # bytes waiting for the main process before batches are dropped
MAX_FINDINGS = 10_000  # per batch
MAX_OWN_FINDINGS = 4096  # addresses this worker detected, whose packets it keeps at once
LAST_BATCH_TIMEOUT = 4.0  # seconds the last batch may take to reach the main process
UPKEEP_EVERY = 10.0  # seconds between forgetting idle detector counters
# Container allocations (net) between two young-generation collections; Python's default is 700.
# A batch's tally lives half a second, so at 700 it survives into the old generation and its
# growth sets off full collections over the detector's heap (50-90 ms, every few seconds).
GC_YOUNG = 20_000


class Worker:
    """One HEP worker process' state: its own sightings tally, detector and evidence for one batch.

    Owns what the worker counted since its last batch; built by the worker's ``serve`` from the pickled
    settings the agent sends. Talks to nothing but its sockets and the agent's control socket.

    Never asks APIBAN (an empty, complete mirror answers "not listed"), and never lets a batch grow
    past its bounds while the agent is slow to read.
    """

    def __init__(self, settings: Settings, index: int, clock: Callable[[], float] = time.time) -> None:
        self.settings = settings
        self.index = index
        self._clock = clock
        # Verdicts are the main process' business: an empty, complete mirror answers "not listed"
        # with one dict probe and never asks APIBAN.
        mirror = Mirror()
        mirror.last_full_sync = clock()
        self._lookups = LookupService(None, NetworkSet(), mirror=mirror)
        self.findings: list[Finding] = []
        self.own_findings: OrderedDict[str, None] = OrderedDict()
        self.detector: WorkerDetector | None = None
        if settings.detect.enabled:
            self.detector = WorkerDetector(
                settings.detect, self._found, allow=NetworkSet(settings.allow.cidrs)
            )
            self.detector.new_senders = []
        self.evidence = EvidenceBatch(set())
        self.collector = WorkerCollector(
            self._tally(), settings.hep, clock, detector=self.detector, evidence=self.evidence
        )
        self.dropped = dict.fromkeys(DROPPED, 0)
        self.kernel_drops: int | None = None

    def _tally(self) -> Sightings:
        return Sightings(self._lookups, capacity=self.settings.sightings.max, clock=self._clock)

    def _found(self, finding: Finding) -> None:
        if len(self.findings) >= MAX_FINDINGS:
            self.dropped["findings"] += 1
        else:
            self.findings.append(finding)
        # Its packets are kept from now on, before the main process' next list of protected
        # addresses says so.
        self.own_findings[finding.ip] = None
        self.own_findings.move_to_end(finding.ip)
        if len(self.own_findings) > MAX_OWN_FINDINGS:
            self.own_findings.popitem(last=False)
        self.evidence.protected.add(finding.ip)

    def protect(self, ips: Sequence[str]) -> None:
        self.evidence.protected = {*ips, *self.own_findings}

    def batch(self, room: bool, final: bool = False) -> tuple[Message, bytes]:
        """What happened since the last batch, and its evidence records; ``room``: False drops
        the bulk (counted)."""
        tally, self.collector.sightings = self.collector.sightings, self._tally()
        findings, self.findings = self.findings, []
        evidence = self.evidence.take()
        self.dropped["sightings"] += tally.evicted
        self.dropped["evidence"] += self.evidence.dropped
        self.evidence.dropped = 0
        senders: list[str] = []
        if self.detector is not None:
            senders, self.detector.new_senders = self.detector.new_senders, []
        message: Message = {"gauges": self.gauges(), "senders": senders}
        if room:
            message["rows"] = [
                (s.ip, s.first_seen, s.last_seen, s.packets, s.methods, s.user_agents, s.users, s.call_ids)
                for s in tally.values()
            ]
            message["findings"] = [(f.ip, f.rule, f.evidence, f.proof, f.at) for f in findings]
        else:
            self.dropped["batches"] += 1
            self.dropped["sightings"] += len(tally)
            self.dropped["findings"] += len(findings)
            self.dropped["evidence"] += len(evidence)
            evidence = []
        if final and self.detector is not None:
            message["authenticated"] = list(self.detector.authenticated().items())
        message["counts"] = self.counts()  # last: with this batch's drops
        return message, b"".join(evidence)

    def counts(self) -> list[tuple[Any, ...]]:
        """Every counter so far, as (kind, key..., count)."""
        stats = self.collector.stats
        rows: list[tuple[Any, ...]] = []
        rows += [("packets", t, n) for t, n in stats.packets.items()]
        rows += [("version", t, v, n) for (t, v), n in stats.by_version.items()]
        rows += [("bad", reason, n) for reason, n in stats.bad.items()]
        rows += [("non_sip", proto, n) for proto, n in stats.non_sip.items()]
        rows.append(("unparsable_sip", stats.unparsable_sip))
        for name in TCP_COUNTERS:
            rows.append(("tcp", name, getattr(stats, name)))
        rows += [("refused", ch, reason, n) for (ch, reason), n in self.collector.refusals.counts.items()]
        if self.detector is not None:
            for name in DETECTOR_COUNTERS:
                rows.append(("detector", name, getattr(self.detector.stats, name)))
        rows += [("dropped", what, n) for what, n in self.dropped.items()]
        return rows

    def gauges(self) -> Message:
        drops = self.collector.kernel_drops()
        if drops is not None:  # None once the socket is closed: the last batch keeps the last count
            self.kernel_drops = drops
        return {
            "tcp_open": self.collector.stats.tcp_open,
            "tracked": self.detector.tracked() if self.detector is not None else 0,
            "kernel_drops": self.kernel_drops,
        }


async def serve(control: socket.socket, udp: socket.socket | None, tcp: socket.socket | None) -> int:
    reader, writer = await asyncio.open_unix_connection(sock=control)
    body = await read_frame(reader)
    if body is None:
        return 0  # the agent went away before it said anything
    init: Message = pickle.loads(body)  # written by the agent that started us
    settings: Settings = init["settings"]
    setup_logging(settings.log.level, Redactor(settings.secrets()), settings.log.format)
    _name_the_worker(init["index"])
    worker = Worker(settings, init["index"])
    worker.protect(init["protected"])
    if worker.detector is not None:
        worker.detector.learn_senders(init["senders"])
        worker.detector.restore_authenticated(init["authenticated"], time.time())
    tune_gc()
    try:
        await worker.collector.listen(udp, tcp)
    except OSError as exc:
        writer.write(report({"error": f"cannot serve the HEP sockets: {exc.strerror}"}))
        await writer.drain()
        return 1
    writer.write(report({"ready": True}))
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    loop.add_signal_handler(signal.SIGTERM, stop.set)
    tasks = [
        asyncio.create_task(_control(reader, worker, stop)),
        asyncio.create_task(_flush(writer, worker)),
        asyncio.create_task(_upkeep(worker)),
    ]
    await stop.wait()
    await worker.collector.stop()
    for task in tasks:
        task.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)
    if not writer.is_closing():
        _send(writer, worker, final=True)
        writer.close()  # after what is buffered is written: wait_closed waits for that
        with contextlib.suppress(OSError, TimeoutError):
            await asyncio.wait_for(writer.wait_closed(), LAST_BATCH_TIMEOUT)
    return 0


async def _control(reader: asyncio.StreamReader, worker: Worker, stop: asyncio.Event) -> None:
    """The main process' messages; its end of CONTROL closing stops the worker."""
    try:
        while (body := await read_frame(reader)) is not None:
            message: Message = pickle.loads(body)  # from the agent
            if message.get("stop"):
                break
            if "protected" in message:
                worker.protect(message["protected"])
            if "senders" in message and worker.detector is not None:
                worker.detector.learn_senders(message["senders"])
    except (OSError, ValueError) as exc:
        log.warning("HEP worker %d: control stream broken (%s); stopping", worker.index, exc)
    stop.set()


async def _flush(writer: asyncio.StreamWriter, worker: Worker) -> None:
    while not writer.is_closing():
        await asyncio.sleep(FLUSH_EVERY)
        _send(writer, worker)


def _send(writer: asyncio.StreamWriter, worker: Worker, final: bool = False) -> None:
    room = writer.transport.get_write_buffer_size() <= MAX_BUFFERED
    writer.write(report(*worker.batch(room, final)))


async def _upkeep(worker: Worker) -> None:
    while worker.detector is not None:
        await asyncio.sleep(UPKEEP_EVERY)
        worker.detector.forget_idle(time.time())


def tune_gc() -> None:
    """What exists after start-up (modules, settings, the agent's mirror) lives about as long as
    the process: frozen, the collector never scans it again; and young collections are rarer
    (``GC_YOUNG``). For the processes of ``hep.workers`` > 1: the workers and the agent merging
    their batches."""
    gc.freeze()
    gc.set_threshold(GC_YOUNG, *gc.get_threshold()[1:])


def _name_the_worker(index: int) -> None:
    """Every log line says which worker wrote it: they share the agent's stderr."""
    prefix = f"HEP worker {index}: "

    def named(record: logging.LogRecord) -> bool:
        record.msg = prefix + str(record.msg)
        return True

    for handler in logging.getLogger().handlers:
        handler.addFilter(named)


def _socket(fd: int) -> socket.socket | None:
    return None if fd == NO_FD else socket.socket(fileno=fd)


def main(argv: Sequence[str]) -> int:
    # Ctrl-C reaches the whole process group: the agent stops its workers in order.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    control, udp, tcp = (_socket(int(fd)) for fd in argv)
    assert control is not None
    try:
        import uvloop
    except ImportError:
        return asyncio.run(serve(control, udp, tcp))
    return uvloop.run(serve(control, udp, tcp))


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
