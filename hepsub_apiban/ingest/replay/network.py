"""Network reassembly: HEP out of the IP packets of a capture, over UDP and over TCP.

``_Extractor`` takes frames through the link layer, joins IP fragments (large SIP over HEP/UDP
relies on them), walks IPv6 extension headers, keeps UDP payloads that look like HEP (v3 or
v1/v2) and hands TCP segments to ``streams`` per direction. Packets come out in the order the
capture completed them; everything else is skipped and counted for the notes.
"""

from __future__ import annotations

import itertools
from collections import Counter

from .base import _HEP3, _HEP3_HEADER, _u16, _u32
from .link import _LINK_TYPES
from .streams import _Flow, _flow_packets, _Segment

_IPV6_SKIPPABLE = frozenset({0, 43, 60})  # hop-by-hop, routing, destination options: (len+1)*8 bytes
_IPV6_FRAGMENT, _IPV6_AH = 44, 51
_TCP, _UDP = 6, 17
_SYN = 0x02


_FragmentKey = tuple[int, bytes, bytes, int, int]  # IP version, src, dst, protocol, identification
_FlowKey = tuple[bytes, bytes, int, int]  # src, dst, sport, dport: one direction of a connection


class _Defragmenter:
    """Joins IP fragments; a datagram is complete when its bytes run from 0 to the last fragment."""

    def __init__(self) -> None:
        self._pending: dict[_FragmentKey, list[tuple[int, bytes, bool]]] = {}

    def add(self, key: _FragmentKey, offset: int, data: bytes, more: bool) -> bytes | None:
        parts = self._pending.setdefault(key, [])
        parts.append((offset, data, more))
        whole = _join_fragments(parts)
        if whole is not None:
            del self._pending[key]
        return whole

    @property
    def incomplete(self) -> int:
        return len(self._pending)


def _join_fragments(parts: list[tuple[int, bytes, bool]]) -> bytes | None:
    ends = [offset + len(data) for offset, data, more in parts if not more]
    if not ends:
        return None
    total, out = ends[0], bytearray()
    for offset, data, _ in sorted(parts, key=lambda part: part[0]):
        if offset > len(out):
            return None  # a hole: wait for more fragments
        out += data[len(out) - offset :]  # overlaps and duplicates add nothing
    return bytes(out[:total]) if len(out) >= total else None


class _Extractor:
    """Turns link-layer frames into HEP packets, kept in the order the capture completed them."""

    def __init__(self) -> None:
        self._found: list[tuple[int, int, bytes]] = []  # (frame index, tie breaker, packet)
        self._order = itertools.count()
        self._index = 0
        self._defrag = _Defragmenter()
        self._flows: dict[_FlowKey, _Flow] = {}
        self._closed_flows: list[_Flow] = []
        self._skipped: Counter[str] = Counter()

    def frame(self, linktype: int, frame: bytes) -> None:
        self._index += 1
        decode = _LINK_TYPES.get(linktype)
        if decode is None:
            self._skipped[f"frames skipped, unsupported link type {linktype}"] += 1
            return
        network = decode(frame)
        if network is not None:
            version, packet = network
            (self._ipv4 if version == 4 else self._ipv6)(packet)

    def _ipv4(self, packet: bytes) -> None:
        header = (packet[0] & 0x0F) * 4 if packet else 0
        if len(packet) < 20 or header < 20:
            return
        total = _u16(packet, 2) or len(packet)  # 0: a TSO segment captured on the sending host
        if total > len(packet):
            self._skipped["packets skipped, cut short by the capture's snap length"] += 1
            return
        proto, src, dst = packet[9], packet[12:16], packet[16:20]
        payload, frag = packet[header:total], _u16(packet, 6)
        offset, more = (frag & 0x1FFF) * 8, bool(frag & 0x2000)
        if offset or more:
            whole = self._defrag.add((4, src, dst, proto, _u16(packet, 4)), offset, payload, more)
            if whole is None:
                return
            payload = whole
        self._transport(proto, src, dst, payload)

    def _ipv6(self, packet: bytes) -> None:
        if len(packet) < 40:
            return
        length = _u16(packet, 4)
        end = 40 + length if length else len(packet)  # 0: jumbogram, take what is there
        if end > len(packet):
            self._skipped["packets skipped, cut short by the capture's snap length"] += 1
            return
        src, dst = packet[8:24], packet[24:40]
        proto, offset, fragment = _ipv6_headers(packet, end)
        if proto is None:
            return
        payload = packet[offset:end]
        if fragment is not None:
            ident, frag_offset, more = fragment
            whole = self._defrag.add((6, src, dst, proto, ident), frag_offset, payload, more)
            if whole is None:
                return
            payload = whole
        self._transport(proto, src, dst, payload)

    def _transport(self, proto: int, src: bytes, dst: bytes, payload: bytes) -> None:
        if proto == _UDP:
            self._udp(payload)
        elif proto == _TCP:
            self._tcp(src, dst, payload)

    def _udp(self, datagram: bytes) -> None:
        if len(datagram) < 8:
            return
        length = _u16(datagram, 4) or len(datagram)  # 0: IPv6 jumbogram
        if length < 8 or length > len(datagram):
            return
        payload = datagram[8:length]
        if _looks_like_hep(payload):
            self._found.append((self._index, next(self._order), payload))

    def _tcp(self, src: bytes, dst: bytes, segment: bytes) -> None:
        header = (segment[12] >> 4) * 4 if len(segment) >= 20 else 0
        if header < 20 or header > len(segment):
            return
        key, seq = (src, dst, _u16(segment, 0), _u16(segment, 2)), _u32(segment, 4)
        flow = self._flows.get(key)
        if segment[13] & _SYN:
            if flow is not None and flow.segments and flow.syn_seq != seq:
                self._closed_flows.append(flow)  # the 4-tuple was reused for a new connection
                flow = None
            if flow is None:
                flow = self._flows[key] = _Flow()
            flow.syn_seq, seq = seq, seq + 1  # the SYN takes one sequence number
        payload = segment[header:]
        if payload:
            if flow is None:
                flow = self._flows[key] = _Flow()
            flow.segments.append(_Segment(seq, payload, self._index))

    def finish(self) -> list[bytes]:
        for flow in [*self._closed_flows, *self._flows.values()]:
            packets, problems = _flow_packets(flow)
            self._found.extend((index, next(self._order), packet) for index, packet in packets)
            if packets:  # a flow that never carried HEP is other traffic, not worth a note
                self._skipped.update(problems)
        self._found.sort(key=lambda item: item[:2])
        return [packet for _, _, packet in self._found]

    def notes(self) -> list[str]:
        notes = [f"{what}: {count}" for what, count in self._skipped.items()]
        if self._defrag.incomplete:
            notes.append(f"IP datagrams skipped for missing fragments: {self._defrag.incomplete}")
        return notes


def _ipv6_headers(packet: bytes, end: int) -> tuple[int | None, int, tuple[int, int, bool] | None]:
    """Walks IPv6 extension headers: (upper protocol, its offset, fragment (id, offset, more))."""
    proto, offset, fragment = packet[6], 40, None
    while offset + 8 <= end:
        if proto in _IPV6_SKIPPABLE:
            proto, offset = packet[offset], offset + (packet[offset + 1] + 1) * 8
        elif proto == _IPV6_AH:
            proto, offset = packet[offset], offset + (packet[offset + 1] + 2) * 4
        elif proto == _IPV6_FRAGMENT:
            field_ = _u16(packet, offset + 2)
            fragment = (_u32(packet, offset + 4), field_ & 0xFFF8, bool(field_ & 1))
            proto, offset = packet[offset], offset + 8
        else:
            break
    return (proto, offset, fragment) if offset <= end else (None, offset, None)


def _looks_like_hep(payload: bytes) -> bool:
    if payload.startswith(_HEP3):
        return len(payload) >= _HEP3_HEADER
    # HEPv1/v2: version byte, then hp_l, then an address family (2 or 10). The family test keeps
    # out DNS and other UDP whose first byte happens to be 1 or 2.
    return len(payload) >= 16 and payload[0] in (1, 2) and payload[2] in (2, 10)
