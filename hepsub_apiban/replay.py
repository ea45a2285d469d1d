"""``hepsub-apiban replay``: send HEP packets from files to a HEP collector.

Input files are recognised by their content, not their name: classic pcap (microsecond or
nanosecond, either byte order, optionally gzip-compressed), pcapng, or a hex dump of one packet
(the format of the shared test fixtures). From a capture, HEP is taken out of UDP datagrams
(HEPv3 and HEPv1/v2) and out of reassembled TCP streams (back-to-back HEPv3); everything else is
skipped, so a capture taken with a loose filter still replays only HEP. IP fragments are
reassembled because large SIP messages sent as HEP over UDP rely on IP fragmentation.

This module does not use the HEP codec: it only needs the framing, and it must keep working on
captures the codec would reject (replaying broken packets at a collector is a legitimate test).
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import math
import re
import socket
import struct
import sys
import time
import zlib
from bisect import bisect_left
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TextIO

log = logging.getLogger(__name__)

EXIT_USAGE = 2
CONNECT_TIMEOUT = 10.0
LATE_REFUSAL_WAIT = 0.25  # seconds: an ICMP port unreachable comes back within a round trip

_HEP3 = b"HEP3"
_HEP3_HEADER = 6
_PCAP_MAGICS = {  # first four bytes -> struct byte order; the ns variants only change the timestamp unit
    b"\xa1\xb2\xc3\xd4": ">",
    b"\xd4\xc3\xb2\xa1": "<",
    b"\xa1\xb2\x3c\x4d": ">",
    b"\x4d\x3c\xb2\xa1": "<",
}
_PCAPNG_SHB = b"\x0a\x0d\x0d\x0a"  # a palindrome, so readable before the byte order is known
_GZIP_MAGIC = b"\x1f\x8b"
_MAX_INFLATED = 1 << 31  # a replay file is held in memory anyway; this only stops a gzip bomb

_IDB, _OPB, _SPB, _EPB = 1, 2, 3, 6  # pcapng block types we read; obsolete packet block included
_MIN_BLOCK = {0x0A0D0D0A: 28, _IDB: 20, _OPB: 32, _SPB: 16, _EPB: 32}

_ETHERTYPE_IPV4, _ETHERTYPE_IPV6 = 0x0800, 0x86DD
_VLAN_TAGS = frozenset({0x8100, 0x88A8, 0x9100})  # 802.1Q, 802.1ad and the old QinQ value
_IPV6_SKIPPABLE = frozenset({0, 43, 60})  # hop-by-hop, routing, destination options: (len+1)*8 bytes
_IPV6_FRAGMENT, _IPV6_AH = 44, 51
_TCP, _UDP = 6, 17
_SYN = 0x02

_TARGET = re.compile(
    r"(?P<proto>udp|tcp):(?:\[(?P<ipv6>[0-9A-Fa-f:.%\w]+)\]|(?P<host>[^:\[\]\s]+)):(?P<port>\d{1,5})"
)
_MIN_SLEEP = 0.002  # below this, sending a little early beats a sleep the event loop cannot honour anyway


class ReplayError(Exception):
    """A problem the user can fix: unreadable file, bad target, refused connection."""


# ---------------------------------------------------------------------------------------- reading


def read_packets(path: Path) -> list[bytes]:
    """HEP packets in ``path`` (hex dump, pcap or pcapng), in capture order."""
    name = str(path)
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise ReplayError(f"cannot read {name}: {exc.strerror or exc}") from None
    if data.startswith(_GZIP_MAGIC):
        data = _gunzip(data, name)
    if data[:4] in _PCAP_MAGICS:
        return _from_frames(_pcap_frames(data, name), name)
    if data.startswith(_PCAPNG_SHB):
        return _from_frames(_pcapng_frames(data, name), name)
    return [_parse_hex(data, name)]


def _gunzip(data: bytes, name: str) -> bytes:
    inflater = zlib.decompressobj(wbits=zlib.MAX_WBITS | 16)
    try:
        out = inflater.decompress(data, _MAX_INFLATED)
    except zlib.error as exc:
        raise ReplayError(f"{name}: broken gzip data ({exc})") from None
    if not inflater.eof:
        raise ReplayError(f"{name}: gzip data is truncated or inflates beyond {_MAX_INFLATED} bytes")
    return out


def _parse_hex(data: bytes, name: str) -> bytes:
    try:
        text = "".join(data.decode("ascii").split())
    except UnicodeDecodeError:
        raise ReplayError(f"{name}: not a pcap or pcapng capture nor a hex dump of a HEP packet") from None
    if not text:
        raise ReplayError(f"{name}: empty hex file")
    bad = next((i for i, char in enumerate(text) if char not in "0123456789abcdefABCDEF"), None)
    if bad is not None:
        raise ReplayError(f"{name}: not hex: unexpected {text[bad]!r} at hex digit {bad + 1}")
    if len(text) % 2:
        raise ReplayError(f"{name}: odd number of hex digits ({len(text)})")
    return bytes.fromhex(text)


_Frames = Iterator[tuple[int, bytes]]  # (link type, captured bytes) per packet record


def _pcap_frames(data: bytes, name: str) -> _Frames:
    endian = _PCAP_MAGICS[data[:4]]
    if len(data) < 24:
        raise ReplayError(f"{name}: truncated pcap file header ({len(data)} of 24 bytes)")
    # The upper bits of the link type field carry FCS information, not the type.
    linktype = struct.unpack_from(endian + "I", data, 20)[0] & 0xFFFF
    record = struct.Struct(endian + "IIII")
    offset = 24
    while offset < len(data):
        if offset + record.size > len(data):
            raise ReplayError(f"{name}: truncated pcap: record header at byte {offset} is cut short")
        caplen = record.unpack_from(data, offset)[2]
        start = offset + record.size
        if start + caplen > len(data):
            left = len(data) - start
            raise ReplayError(
                f"{name}: truncated pcap: packet at byte {offset} claims {caplen} bytes, {left} are left"
            )
        yield linktype, data[start : start + caplen]
        offset = start + caplen


def _pcapng_frames(data: bytes, name: str) -> _Frames:
    offset, endian = 0, "<"
    links: list[int] = []  # link type per interface id; each section starts its own list
    while offset < len(data):
        if len(data) - offset < 12:
            raise ReplayError(f"{name}: truncated pcapng: block at byte {offset} is cut short")
        if data[offset : offset + 4] == _PCAPNG_SHB:
            endian, links = _section_byte_order(data, offset, name), []
        kind, length = struct.unpack_from(endian + "II", data, offset)
        _check_block(data, offset, kind, length, endian, name)
        if kind == _IDB:
            links.append(struct.unpack_from(endian + "H", data, offset + 8)[0])
        elif kind in (_EPB, _OPB, _SPB):
            yield _pcapng_packet(data, offset, kind, length, endian, links, name)
        offset += length  # name resolution, statistics, custom and unknown blocks: skipped


def _section_byte_order(data: bytes, offset: int, name: str) -> str:
    magic = data[offset + 8 : offset + 12]
    if magic == b"\x1a\x2b\x3c\x4d":
        return ">"
    if magic == b"\x4d\x3c\x2b\x1a":
        return "<"
    raise ReplayError(f"{name}: corrupt pcapng: bad byte-order magic in the section header at byte {offset}")


def _check_block(data: bytes, offset: int, kind: int, length: int, endian: str, name: str) -> None:
    fits = _MIN_BLOCK.get(kind, 12) <= length <= len(data) - offset and length % 4 == 0
    if not fits:
        if length > len(data) - offset:
            raise ReplayError(f"{name}: truncated pcapng: block at byte {offset} claims {length} bytes")
        raise ReplayError(f"{name}: corrupt pcapng: block at byte {offset} has a bad length ({length})")
    # The length is repeated at the end of every block; a mismatch means we lost the framing.
    if struct.unpack_from(endian + "I", data, offset + length - 4)[0] != length:
        raise ReplayError(f"{name}: corrupt pcapng: block at byte {offset} does not end with its length")


def _pcapng_packet(
    data: bytes, offset: int, kind: int, length: int, endian: str, links: list[int], name: str
) -> tuple[int, bytes]:
    if kind == _SPB:  # no interface id (always 0) and no captured length: the block size tells
        interface, start = 0, offset + 12
        caplen = min(struct.unpack_from(endian + "I", data, offset + 8)[0], length - 16)
    else:
        interface = struct.unpack_from(endian + ("I" if kind == _EPB else "H"), data, offset + 8)[0]
        caplen, start = struct.unpack_from(endian + "I", data, offset + 20)[0], offset + 28
        if caplen > length - 32:
            raise ReplayError(f"{name}: corrupt pcapng: packet at byte {offset} overruns its block")
    if interface >= len(links):
        raise ReplayError(
            f"{name}: corrupt pcapng: packet at byte {offset} names unknown interface {interface}"
        )
    return links[interface], data[start : start + caplen]


def _from_frames(frames: _Frames, name: str) -> list[bytes]:
    extractor = _Extractor()
    for linktype, frame in frames:
        extractor.frame(linktype, frame)
    packets = extractor.finish()
    for note in extractor.notes():
        log.warning("%s: %s", name, note)
    return packets


# ------------------------------------------------------------------------------------ link layer

_Network = tuple[int, bytes] | None  # (IP version, IP packet), or None when the frame is not IP


def _by_ethertype(ethertype: int, payload: bytes) -> _Network:
    if ethertype == _ETHERTYPE_IPV4:
        return 4, payload
    if ethertype == _ETHERTYPE_IPV6:
        return 6, payload
    return None


def _ethernet(frame: bytes) -> _Network:
    offset = 12
    while len(frame) >= offset + 2:
        ethertype = _u16(frame, offset)
        if ethertype not in _VLAN_TAGS:
            return _by_ethertype(ethertype, frame[offset + 2 :])
        offset += 4  # a VLAN tag: TCI, then the next ethertype
    return None


def _linux_sll(frame: bytes) -> _Network:
    return _by_ethertype(_u16(frame, 14), frame[16:]) if len(frame) >= 16 else None


def _linux_sll2(frame: bytes) -> _Network:
    return _by_ethertype(_u16(frame, 0), frame[20:]) if len(frame) >= 20 else None


def _raw_ip(frame: bytes) -> _Network:
    version = frame[0] >> 4 if frame else 0
    return (version, frame) if version in (4, 6) else None


def _bsd_null(frame: bytes) -> _Network:
    # The 4-byte address family is in the writer's byte order and differs per OS for IPv6;
    # the IP version nibble says the same thing without either problem.
    return _raw_ip(frame[4:])


_LINK_TYPES: dict[int, Callable[[bytes], _Network]] = {
    0: _bsd_null,
    1: _ethernet,
    12: _raw_ip,  # DLT_RAW as some old writers stored it
    14: _raw_ip,  # DLT_RAW on OpenBSD
    101: _raw_ip,
    108: _bsd_null,  # OpenBSD loopback: same header, network byte order
    113: _linux_sll,
    228: _raw_ip,
    229: _raw_ip,
    276: _linux_sll2,
}


def _u16(data: bytes | bytearray, offset: int) -> int:
    return int.from_bytes(data[offset : offset + 2], "big")


def _u32(data: bytes | bytearray, offset: int) -> int:
    return int.from_bytes(data[offset : offset + 4], "big")


# ------------------------------------------------------------------------------ IP, UDP and TCP

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


@dataclass(slots=True)
class _Segment:
    seq: int
    data: bytes
    index: int  # capture position of the frame that carried it


@dataclass(slots=True)
class _Flow:
    segments: list[_Segment] = field(default_factory=list)
    syn_seq: int | None = None  # known when the capture saw the connection open


@dataclass(slots=True)
class _Run:
    """Contiguous stream bytes; ``marks`` maps stream offsets to when they were all captured."""

    data: bytearray = field(default_factory=bytearray)
    at_start: bool = False  # begins right after the SYN, so it must begin with a HEP3 header
    marks: list[tuple[int, int]] = field(default_factory=list)  # (bytes so far, last frame index)


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


# --------------------------------------------------------------------------------- TCP streams


def _flow_packets(flow: _Flow) -> tuple[list[tuple[int, bytes]], list[str]]:
    """HEP3 packets of one TCP direction as (completing frame index, packet), and what went wrong."""
    found: list[tuple[int, bytes]] = []
    problems: list[str] = []
    runs = _assemble(flow)
    for number, run in enumerate(runs):
        if number:
            problems.append("TCP stream gaps (segments missing from the capture)")
        start = (0 if run.data.startswith(_HEP3) else None) if run.at_start else _find_sync(run.data)
        if start is None:
            continue
        packets, problem = _split_hep3(run.data, start)
        ends = [end for end, _ in run.marks]
        found.extend((run.marks[bisect_left(ends, end)][1], packet) for end, packet in packets)
        if problem:
            problems.append(problem)
    return found, problems


def _assemble(flow: _Flow) -> list[_Run]:
    """Orders segments by sequence number, drops retransmitted bytes, splits at holes."""
    if not flow.segments:
        return []
    reference = flow.syn_seq + 1 if flow.syn_seq is not None else flow.segments[0].seq

    def relative(seq: int) -> int:  # signed distance modulo 2**32, so wrap-around is harmless
        return (seq - reference + 2**31) % 2**32 - 2**31

    runs: list[_Run] = []
    cursor, latest = 0, 0
    for segment in sorted(flow.segments, key=lambda s: (relative(s.seq), s.index)):
        start = relative(segment.seq)
        if not runs or start > cursor:
            runs.append(_Run(at_start=flow.syn_seq is not None and start == 0))
            cursor, latest = start, 0
        end = start + len(segment.data)
        if end <= cursor:
            continue  # a retransmission of bytes we already have
        run = runs[-1]
        run.data += segment.data[cursor - start :]
        cursor, latest = end, max(latest, segment.index)
        run.marks.append((len(run.data), latest))
    return runs


def _split_hep3(data: bytearray, start: int) -> tuple[list[tuple[int, bytes]], str | None]:
    """Back-to-back HEP3 packets as (end offset, packet), and why the framing stopped, if it did."""
    packets: list[tuple[int, bytes]] = []
    offset = start
    while offset < len(data):
        if len(data) - offset < _HEP3_HEADER:
            return packets, "incomplete HEP3 packets at the end of TCP streams"
        length = _u16(data, offset + 4)
        if data[offset : offset + 4] != _HEP3 or length < _HEP3_HEADER:
            return packets, "TCP streams stopped at bad HEP3 framing"
        if offset + length > len(data):
            return packets, "incomplete HEP3 packets at the end of TCP streams"
        packets.append((offset + length, bytes(data[offset : offset + length])))
        offset += length
    return packets, None


def _find_sync(data: bytearray) -> int | None:
    """Where HEP3 framing starts in a stream captured mid-connection, if anywhere.

    A persistent HEP connection is usually already open when the capture starts. "HEP3" counts
    as a packet start only if its length leads to another "HEP3" (or exactly to the end), which
    makes a false start inside some payload, or inside a non-HEP flow, very unlikely.
    """
    limit = 0x10000 + _HEP3_HEADER  # a real packet boundary comes within one maximum packet
    offset = data.find(_HEP3, 0, limit)
    while offset >= 0:
        length = _u16(data, offset + 4) if offset + _HEP3_HEADER <= len(data) else 0
        end = offset + length
        if length >= _HEP3_HEADER and end <= len(data) and _HEP3.startswith(data[end : end + 4]):
            return offset
        offset = data.find(_HEP3, offset + 1, limit)
    return None


# ------------------------------------------------------------------------------------- sending


def parse_target(target: str) -> tuple[str, str, int]:
    """``udp:HOST:PORT`` or ``tcp:HOST:PORT`` (IPv6 in brackets) -> (transport, host, port)."""
    match = _TARGET.fullmatch(target)
    port = int(match["port"]) if match else 0
    if match is None or not 0 < port < 65536:
        raise ReplayError(
            f"bad target {target!r}: expected udp:HOST:PORT or tcp:HOST:PORT (IPv6: udp:[::1]:9060)"
        )
    return match["proto"], match["ipv6"] or match["host"], port


def _check_rate(rate: float | None) -> None:
    if rate is not None and not (math.isfinite(rate) and rate > 0):
        raise ReplayError(f"bad rate {rate}: give a positive number of packets per second")


class _Pacer:
    """Spreads packets at ``rate`` per second against a monotonic clock.

    Each packet has a due time from the start, so sleeping late never accumulates drift; at high
    rates several packets go out between sleeps, because one sleep per packet cannot keep up.
    """

    def __init__(self, rate: float | None, clock: Callable[[], float]) -> None:
        self._interval = 1.0 / rate if rate else 0.0
        self._clock = clock
        self._start = 0.0

    async def wait(self, number: int) -> None:
        if not self._interval:
            return
        if number == 0:
            self._start = self._clock()  # the connection setup is not part of the schedule
            return
        delay = self._start + number * self._interval - self._clock()
        if delay >= _MIN_SLEEP:
            await asyncio.sleep(delay)


async def send(packets: Sequence[bytes], target: str, rate: float | None) -> int:
    """Sends ``packets`` to ``target``; returns how many were sent."""
    transport, host, port = parse_target(target)
    _check_rate(rate)
    pacer = _Pacer(rate, asyncio.get_running_loop().time)
    if transport == "tcp":
        return await _send_tcp(packets, host, port, target, pacer)
    return await _send_udp(packets, host, port, target, pacer)


_SocketAddress = tuple[Any, ...]  # what getaddrinfo gives and connect takes: 2-tuple IPv4, 4-tuple IPv6


async def _resolve(host: str, port: int, kind: int, target: str) -> list[tuple[int, _SocketAddress]]:
    try:
        infos = await asyncio.get_running_loop().getaddrinfo(host, port, type=kind)
    except OSError as exc:
        raise ReplayError(f"cannot resolve {host!r} in {target}: {exc.strerror or exc}") from None
    return [(family, tuple(address)) for family, _, _, _, address in infos]


async def _send_udp(packets: Sequence[bytes], host: str, port: int, target: str, pacer: _Pacer) -> int:
    loop = asyncio.get_running_loop()
    addresses = await _resolve(host, port, socket.SOCK_DGRAM, target)
    # UDP cannot try one address and fall back; collectors mostly listen on IPv4 (0.0.0.0:9060),
    # so "localhost" goes to 127.0.0.1 rather than ::1. Literal addresses are unaffected.
    family, address = min(addresses, key=lambda item: item[0] != socket.AF_INET)
    refused = 0
    with socket.socket(family, socket.SOCK_DGRAM) as sock:
        sock.setblocking(False)
        try:
            # Connected, so the kernel reports an ICMP port unreachable on a later send.
            sock.connect(address)
        except OSError as exc:
            raise ReplayError(f"cannot send to {target}: {exc.strerror or exc}") from None
        for number, packet in enumerate(packets):
            await pacer.wait(number)
            try:
                await loop.sock_sendall(sock, packet)
            except ConnectionRefusedError:
                refused += 1  # that datagram was not sent; the error belongs to an earlier one
            except OSError as exc:
                what = f"packet {number + 1} ({len(packet)} bytes)"
                raise ReplayError(f"cannot send {what} to {target}: {exc.strerror or exc}") from None
        if not refused:
            refused += await _late_refusal(sock)
    if refused:
        raise ReplayError(
            f"{target} refused the packets (ICMP port unreachable {refused} times while sending "
            f"{len(packets)}): is a HEP collector listening there?"
        )
    return len(packets)


async def _late_refusal(sock: socket.socket) -> int:
    """1 if the kernel reports a refusal of the last datagrams within a moment, else 0.

    A refusal is reported on the socket's next operation: without this wait a file of one packet
    sent to a port where nothing listens would count as sent.
    """
    try:
        async with asyncio.timeout(LATE_REFUSAL_WAIT):
            await asyncio.get_running_loop().sock_recv(sock, 1)
    except ConnectionRefusedError:
        return 1
    except (TimeoutError, OSError):
        pass
    return 0


async def _send_tcp(packets: Sequence[bytes], host: str, port: int, target: str, pacer: _Pacer) -> int:
    legacy = next((number for number, packet in enumerate(packets) if not packet.startswith(_HEP3)), None)
    if legacy is not None:
        raise ReplayError(
            f"packet {legacy + 1} is not HEPv3, and HEPv1/v2 only work over UDP; use udp:HOST:PORT"
        )
    addresses = await _resolve(host, port, socket.SOCK_STREAM, target)
    writer = await _connect(addresses, target)
    sent = 0
    try:
        for number, packet in enumerate(packets):
            await pacer.wait(number)
            writer.write(packet)
            await writer.drain()  # keeps the buffer bounded when the collector reads slowly
            sent += 1
        if writer.can_write_eof():
            writer.write_eof()
        await writer.drain()
    except OSError as exc:
        raise ReplayError(
            f"connection to {target} lost after {sent} packets: {exc.strerror or exc}"
        ) from None
    finally:
        writer.close()
        # Everything was handed over already, or the error above says what went wrong.
        with contextlib.suppress(OSError):
            await writer.wait_closed()
    return sent


async def _connect(addresses: list[tuple[int, _SocketAddress]], target: str) -> asyncio.StreamWriter:
    """Tries each resolved address in turn, so "localhost" works whichever of ::1/127.0.0.1 listens."""
    loop = asyncio.get_running_loop()
    errors: list[OSError] = []
    for family, address in addresses:
        sock = socket.socket(family, socket.SOCK_STREAM)
        sock.setblocking(False)
        try:
            async with asyncio.timeout(CONNECT_TIMEOUT):
                await loop.sock_connect(sock, address)
        except OSError as exc:  # TimeoutError is an OSError too
            sock.close()
            errors.append(exc)
            continue
        _, writer = await asyncio.open_connection(sock=sock)
        return writer
    raise ReplayError(f"cannot connect to {target}: {_connect_failure(errors)}")


def _connect_failure(errors: list[OSError]) -> str:
    if errors and all(isinstance(exc, ConnectionRefusedError) for exc in errors):
        return "connection refused (is a HEP collector listening there?)"
    if any(isinstance(exc, TimeoutError) for exc in errors):
        return f"no answer within {CONNECT_TIMEOUT:g} s"
    last = errors[-1] if errors else None
    return (last.strerror or str(last)) if last else "no address"


# ---------------------------------------------------------------------------------------- main


def main(files: Sequence[str], to: str, rate: float | None, out: TextIO) -> int:
    """The ``replay`` command: read every file, send, print one summary line."""
    try:
        parse_target(to)  # a typo in the target should not wait for a big capture to load
        _check_rate(rate)
        if not files:
            raise ReplayError("no input files")
        packets = _read_all(files)
        started = time.monotonic()
        sent = asyncio.run(send(packets, to, rate))
        elapsed = time.monotonic() - started
    except ReplayError as exc:
        print(f"hepsub-apiban: {exc}", file=sys.stderr)
        return EXIT_USAGE
    noun = "file" if len(files) == 1 else "files"
    print(f"sent {sent} HEP packets from {len(files)} {noun} to {to} in {elapsed:.2f} s", file=out)
    return 0


def _read_all(files: Sequence[str]) -> list[bytes]:
    packets: list[bytes] = []
    empty: list[str] = []
    for name in files:
        found = read_packets(Path(name))
        packets.extend(found)
        if not found:
            empty.append(name)
    if not packets:
        raise ReplayError(f"no HEP packets found in {', '.join(files)}")
    for name in empty:  # worth a word, but the other files are still worth sending
        log.warning("%s: no HEP packets found", name)
    return packets
