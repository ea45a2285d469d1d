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
import struct
import sys
import time
from collections import OrderedDict, deque
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import orjson

from ..apiban.lookups import LookupService
from ..apiban.mirror import Mirror
from ..core.addresses import NetworkSet
from ..core.config import Settings
from ..core.logs import Redactor, setup_logging
from ..detection.detector import Detector, Finding
from ..formats.hep import HepPacket
from .collector import HepCollector, _proc_udp_drops
from .evidence import PER_ADDRESS
from .sightings import Sightings

# Its name before the wings: operators' log filters use it.
log = logging.getLogger("hepsub_apiban.hep_worker")
FRAME = struct.Struct("!I")
MAX_FRAME = 512 << 20  # bytes; a longer length is a broken stream, not a batch
FLUSH_EVERY = 0.5  # seconds between batches
MAX_BUFFERED = 32 << 20  # bytes waiting for the main process before batches are dropped
MAX_FINDINGS = 10_000  # per batch
EVIDENCE_BYTES = 8 << 20  # payload bytes per batch
MAX_NEW_SENDERS = 4096  # HEP senders reported per batch
MAX_OWN_FINDINGS = 4096  # addresses this worker detected, whose packets it keeps at once
LAST_BATCH_TIMEOUT = 4.0  # seconds the last batch may take to reach the main process
UPKEEP_EVERY = 10.0  # seconds between forgetting idle detector counters
NO_FD = -1
MAX_BURST = 256  # datagrams read in one turn of the event loop (it is not held longer)
FEW = 32  # a turn that found fewer waiting pauses the reading for PAUSE
PAUSE = 0.002  # seconds: the next turn then finds a burst, and one wake-up serves it
MAX_DATAGRAM = 65535
# Container allocations (net) between two young-generation collections; Python's default is 700.
# A batch's tally lives half a second, so at 700 it survives into the old generation and its
# growth sets off full collections over the detector's heap (50-90 ms, every few seconds).
GC_YOUNG = 20_000
# What a worker counts as not handed over: addresses forgotten within a batch, findings and
# evidence over a batch's bounds, and batches dropped whole while the main process lagged.
DROPPED = ("sightings", "findings", "evidence", "batches")

Message = dict[str, Any]


# An evidence record: capture time (s, us), ports, IP protocol, the lengths of the source and
# destination address texts and of the payload; then those three.
EVIDENCE = struct.Struct("!IIHHBBBI")


def frame(body: bytes) -> bytes:
    return FRAME.pack(len(body)) + body


def report(message: Message, evidence: bytes = b"") -> bytes:
    """A frame from a worker: the JSON message, then the evidence records."""
    body = orjson.dumps(message)
    return frame(FRAME.pack(len(body)) + body + evidence)


def read_report(body: bytes) -> tuple[Message, bytes]:
    """The JSON message and the evidence records of a worker's frame."""
    (length,) = FRAME.unpack_from(body)
    message = orjson.loads(body[FRAME.size : FRAME.size + length])
    if not isinstance(message, dict):
        raise ValueError("a worker's message is not a JSON object")
    return message, body[FRAME.size + length :]


def evidence_record(packet: HepPacket) -> bytes:
    src, dst, payload = packet.src_ip.encode(), packet.dst_ip.encode(), packet.payload
    head = EVIDENCE.pack(
        packet.ts_sec, packet.ts_usec, packet.src_port, packet.dst_port, packet.ip_proto,
        len(src), len(dst), len(payload),
    )  # fmt: skip
    return head + src + dst + payload


def evidence_packets(records: bytes) -> Iterator[HepPacket]:
    """The packets of a frame's evidence records (what ``Evidence.keep`` needs of them)."""
    offset, end, unpack, size = 0, len(records), EVIDENCE.unpack_from, EVIDENCE.size
    while offset < end:
        ts_sec, ts_usec, sport, dport, proto, src_len, dst_len, length = unpack(records, offset)
        offset += size
        src = records[offset : offset + src_len].decode()
        offset += src_len
        dst = records[offset : offset + dst_len].decode()
        offset += dst_len
        payload = records[offset : offset + length]
        offset += length
        family = socket.AF_INET6 if ":" in src else socket.AF_INET
        yield HepPacket(3, family, proto, src, dst, sport, dport, ts_sec, ts_usec, 1, 0, payload)


async def read_frame(reader: asyncio.StreamReader) -> bytes | None:
    """The next frame's body; None at a clean end of the stream."""
    try:
        head = await reader.readexactly(FRAME.size)
    except asyncio.IncompleteReadError as exc:
        if exc.partial:
            raise ValueError("the control stream ended inside a frame") from None
        return None
    (length,) = FRAME.unpack(head)
    if length > MAX_FRAME:
        raise ValueError(f"a frame of {length} bytes")
    try:
        return await reader.readexactly(length)
    except asyncio.IncompleteReadError:
        raise ValueError("the control stream ended inside a frame") from None


class EvidenceBatch:
    """The packets of protected addresses since the last batch: the last ``PER_ADDRESS`` of each,
    at most ``EVIDENCE_BYTES`` of payload (the main process keeps them in its ``Evidence``). A packet
    that leaves a full ring gives its bytes back, so one flooding address keeps its latest packets
    without starving the others; a packet between two protected addresses counts in both."""

    def __init__(self, protected: set[str]) -> None:
        self.protected = protected  # replaced whenever the main process sends a new set
        self.rings: dict[str, deque[tuple[bytes, int]]] = {}  # (record, payload bytes)
        self.bytes = 0
        self.dropped = 0

    def keep(self, packet: HepPacket) -> None:
        protected = self.protected
        src, dst = packet.src_ip, packet.dst_ip
        targets = [ip for ip in (src, dst) if ip in protected]
        if len(targets) == 2 and src == dst:
            del targets[1]
        size = len(packet.payload)
        if not targets:
            return
        if self.bytes + size * len(targets) > EVIDENCE_BYTES:
            self.dropped += 1
            return
        try:
            kept = evidence_record(packet)
        except struct.error:  # a field past its HEP width: the decoder gives none, but never raise here
            self.dropped += 1
            return
        for ip in targets:
            ring = self.rings.get(ip)
            if ring is None:
                ring = self.rings[ip] = deque()
            elif len(ring) >= PER_ADDRESS:
                self.bytes -= ring.popleft()[1]
            ring.append((kept, size))
            self.bytes += size

    def take(self) -> list[bytes]:
        """Each packet's record once (one between two protected addresses is in both rings)."""
        packets = {id(kept): kept for ring in self.rings.values() for kept, _ in ring}
        self.rings, self.bytes = {}, 0
        return list(packets.values())


class WorkerDetector(Detector):
    """The detector, noting the HEP senders it learns so the other workers learn them too."""

    new_senders: list[str]

    def hep_sender(self, ip: str) -> None:
        # Called for every packet: a sender met before costs one probe, no further call.
        if ip in self._local:
            return
        if len(self.new_senders) < MAX_NEW_SENDERS:
            self.new_senders.append(ip)
        super().hep_sender(ip)

    def learn_senders(self, ips: Sequence[str]) -> None:
        """Senders another worker met: local here too, not reported back."""
        for ip in ips:
            super().hep_sender(ip)


class BurstReader:
    """A worker's UDP socket read in bursts. Each worker gets half the packets, so the event loop
    woke for a handful at a time and the wake-ups cost a worker 2-4 us a packet more than the
    single process at twice the rate: after a turn that found fewer than ``FEW`` datagrams waiting,
    the reading pauses for ``PAUSE`` (the kernel buffers them meanwhile). A turn reads at most
    ``MAX_BURST``. Each datagram goes to the collector's datagram handler, checks included."""

    def __init__(self, sock: socket.socket, protocol: asyncio.DatagramProtocol) -> None:
        sock.setblocking(False)
        self.sock = sock
        self._received = protocol.datagram_received
        self._loop = asyncio.get_running_loop()
        self._fd = sock.fileno()
        self._timer: asyncio.TimerHandle | None = None
        self.closed = False
        self._loop.add_reader(self._fd, self._readable)

    def _readable(self) -> None:
        recv, received = self.sock.recvfrom, self._received
        n = 0
        try:
            while n < MAX_BURST:
                data, addr = recv(MAX_DATAGRAM)
                n += 1
                received(data, addr)
        except (BlockingIOError, InterruptedError):
            pass
        except OSError as exc:
            log.debug("HEP UDP socket error: %s", exc)
        if n < FEW and not self.closed:
            self._loop.remove_reader(self._fd)
            self._timer = self._loop.call_later(PAUSE, self._resume)

    def _resume(self) -> None:
        self._timer = None
        if not self.closed:
            self._loop.add_reader(self._fd, self._readable)

    def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        if self._timer is not None:
            self._timer.cancel()
        self._loop.remove_reader(self._fd)
        self.sock.close()


class WorkerCollector(HepCollector):
    """The collector of a worker: its UDP socket is read by a ``BurstReader``."""

    _reader: BurstReader | None = None

    async def _start_udp(self, sock: socket.socket, announce: bool = True) -> None:
        self.stats.rcvbuf_granted = sock.getsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF)
        self._reader = BurstReader(sock, self.udp_protocol())

    def kernel_drops(self) -> int | None:
        reader = self._reader
        if reader is None or reader.closed:
            return None
        return _proc_udp_drops(reader.sock.fileno(), reader.sock.family)

    async def stop(self) -> None:
        if self._reader is not None:
            self._reader.close()
        await super().stop()


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


TCP_COUNTERS = (
    "tcp_accepted",
    "tcp_refused",
    "tcp_closed_bad",
    "tcp_idle_closed",
    "tcp_packet_timeouts",
    "tcp_evicted",
)
DETECTOR_COUNTERS = ("packets", "tracked_evicted", "idle_forgotten", "retransmissions", "exempted")


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
