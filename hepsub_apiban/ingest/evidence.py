"""Evidence: the last raw SIP packets of every APIBAN-listed or locally detected address.

What the HOMER tab's Download button and ``GET /api/v1/evidence/{ip}.pcap`` hand out, and what
an abuse report needs: the packets themselves, with the capture's metadata.

Only protected addresses (see ``Sightings``: listed, or flagged by detection) cost anything: the
collector probes the live mapping of protected sightings for the packet's two addresses, and
every other packet goes on. A packet is kept from the moment its address is protected; in check
mode that is once APIBAN's answer is in, so the very first packets of a new address are not.

Everything is bounded: ``per_address`` packets per address (the oldest leaves), each cut to
``MAX_PACKET_BYTES`` (the pcap records the real length), at most ``max_addresses`` addresses and
``max_bytes`` of payload in all, the least recently touched address leaving first. A packet
between two protected addresses is one object in both rings and counted once per ring.
"""

from __future__ import annotations

from collections import OrderedDict, deque
from collections.abc import Container, Iterable
from dataclasses import dataclass
from typing import Final

from ..formats.hep import HepPacket

MAX_PACKET_BYTES = 4096
PER_ADDRESS = 20
MAX_ADDRESSES = 4096
MAX_BYTES = 16 * 1024 * 1024


@dataclass(frozen=True, slots=True)
class EvidencePacket:
    time: float  # capture time, unix seconds
    src_ip: str
    dst_ip: str
    src_port: int
    dst_port: int
    ip_proto: int
    payload: bytes  # at most MAX_PACKET_BYTES
    length: int  # the payload's length before the cut


# What a ring holds: EvidencePacket's fields as a plain tuple, because keeping is on the packet
# path: a tuple is built in C, and one of strings, numbers and bytes leaves the garbage collector's
# tracking once it survives a collection, so thousands of kept packets do not slow every collection.
_Kept = tuple[float, str, str, int, int, int, bytes, int]
_PAYLOAD: Final = 6  # the payload in a _Kept


def _kept(packet: HepPacket) -> _Kept:
    payload = packet.payload
    return (
        packet.ts_sec + packet.ts_usec / 1e6,
        packet.src_ip,
        packet.dst_ip,
        packet.src_port,
        packet.dst_port,
        packet.ip_proto,
        payload if len(payload) <= MAX_PACKET_BYTES else payload[:MAX_PACKET_BYTES],
        len(payload),
    )


class Evidence:
    """The last raw SIP packets of every protected address (listed or detected), for the pcap download.

    Owns the packet rings, bounded in packets per address, addresses and bytes. The collector (or a
    ``WorkerPool`` batch) keeps packets in it; ``GET /api/v1/evidence/{ip}.pcap`` and the HOMER tab read it.

    An ordinary packet costs two hash probes of ``protected`` (a live view of the sightings) and
    nothing else; nothing a sender sends can grow it past its bounds.
    """

    def __init__(
        self,
        protected: Container[str],
        *,
        per_address: int = PER_ADDRESS,
        max_addresses: int = MAX_ADDRESSES,
        max_bytes: int = MAX_BYTES,
    ) -> None:
        # A live view: the collector probes it on every packet, so it must stay a hash lookup.
        self.protected = protected
        self._per_address = per_address
        self._max_addresses = max_addresses
        self._max_bytes = max_bytes
        self._rings: OrderedDict[str, deque[_Kept]] = OrderedDict()  # least recently touched first
        self.bytes = 0
        self.evicted = 0  # addresses forgotten for room

    def __len__(self) -> int:
        return len(self._rings)

    def keep(self, packet: HepPacket) -> None:
        """Keep ``packet`` for whichever of its addresses is protected (the caller probed)."""
        kept = _kept(packet)
        protected = self.protected
        if packet.src_ip in protected:
            self._add(packet.src_ip, kept)
        if packet.dst_ip in protected and packet.dst_ip != packet.src_ip:
            self._add(packet.dst_ip, kept)

    def _add(self, ip: str, kept: _Kept) -> None:
        rings = self._rings
        ring = rings.get(ip)
        if ring is None:
            if len(rings) >= self._max_addresses:
                self._evict()
            ring = rings[ip] = deque()
        else:
            rings.move_to_end(ip)
            if len(ring) >= self._per_address:
                self.bytes -= len(ring.popleft()[_PAYLOAD])
        ring.append(kept)
        self.bytes += len(kept[_PAYLOAD])
        while self.bytes > self._max_bytes and len(rings) > 1:
            self._evict()

    def _evict(self) -> None:
        _, ring = self._rings.popitem(last=False)
        self.bytes -= sum(len(kept[_PAYLOAD]) for kept in ring)
        self.evicted += 1

    def packets(self, ips: Iterable[str], max_bytes: int = MAX_BYTES) -> list[EvidencePacket]:
        """The kept packets of ``ips`` in capture order, each once; the newest that fit ``max_bytes``."""
        seen: set[int] = set()
        found: list[EvidencePacket] = []
        for ip in ips:
            for kept in self._rings.get(ip, ()):
                if id(kept) not in seen:
                    seen.add(id(kept))
                    found.append(EvidencePacket(*kept))
        found.sort(key=lambda p: p.time)
        total, start = 0, len(found)
        while start > 0 and total + len(found[start - 1].payload) <= max_bytes:
            start -= 1
            total += len(found[start].payload)
        return found[start:]
