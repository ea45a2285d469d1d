"""The HEP worker's packet path: its reading of UDP in bursts and the parts that fill a batch.

``BurstReader`` reads a worker's UDP socket in bounded bursts, with a short pause after a thin
turn, and hands each datagram to ``WorkerCollector`` (the single-process collector, its kernel
drop counter read from the worker's own socket). ``WorkerDetector`` is the local detector that
also notes the HEP senders it meets, and ``EvidenceBatch`` keeps the packets of protected
addresses since the last batch, bounded per address and in bytes. ``hep_worker.Worker`` builds
them; none of them writes to the control socket.
"""

from __future__ import annotations

import asyncio
import logging
import socket
import struct
from collections import deque
from collections.abc import Sequence

from ..detection.detector import Detector
from ..formats.hep import HepPacket
from . import worker_wire as _wire
from .collector import HepCollector, _proc_udp_drops
from .evidence import PER_ADDRESS

# Its name before the wings: operators' log filters use it.
log = logging.getLogger("hepsub_apiban.hep_worker")

EVIDENCE_BYTES = 8 << 20  # payload bytes per batch
MAX_NEW_SENDERS = 4096  # HEP senders reported per batch
MAX_BURST = 256  # datagrams read in one turn of the event loop (it is not held longer)
FEW = 32  # a turn that found fewer waiting pauses the reading for PAUSE
PAUSE = 0.002  # seconds: the next turn then finds a burst, and one wake-up serves it
MAX_DATAGRAM = 65535
# Called per packet: bound here by assignment rather than imported.
evidence_record = _wire.evidence_record


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
