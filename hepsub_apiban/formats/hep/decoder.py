"""The fast HEP decoder on the ingest path: ``decode``, a hand-written ``struct`` loop.

About 3 us a packet, 60x the construct reference; the layouts senders write most are read with
one compiled pattern and one ``struct`` (about half that). Rules for malformed input follow
``docs/peers/hep.md#edge-cases``: a packet is kept or dropped whole, and ``decode`` never raises,
since nothing a sender does may crash the collector. Everything a packet touches is a global of
this module, so the split into a package adds no lookup per packet.
"""

from __future__ import annotations

import operator
import re
import socket
import struct
from collections.abc import Callable
from typing import Any

from .models import (
    AF_INET,
    AF_INET6,
    KNOWN_TYPES,
    PROTO_SIP,
    BadPacket,
    HepPacket,
    _inflate,
    _pick_time,
    _split_time,
)

_unpack_chunk = struct.Struct("!HHH").unpack_from
_unpack_u16 = struct.Struct("!H").unpack_from
_unpack_u32 = struct.Struct("!I").unpack_from
_unpack_v12 = struct.Struct("!BBBBHH").unpack_from
_unpack_time_le = struct.Struct("<IIH").unpack_from
_unpack_time_be = struct.Struct(">IIH").unpack_from
_inet_ntoa = socket.inet_ntoa
_inet_ntop = socket.inet_ntop
_AF6 = socket.AF_INET6


def decode(data: bytes | memoryview | bytearray, received_at: float) -> HepPacket | BadPacket:
    """One UDP datagram (or one framed TCP packet) as a HepPacket, or BadPacket. Never raises.

    ``received_at`` (epoch seconds) stands in for a missing or zero capture time.
    """
    if type(data) is not bytes:
        data = bytes(data)
    try:
        if not data:
            return BadPacket("empty datagram")
        if data[0] in (1, 2):
            return _decode_v2(data, received_at)
        return _decode_layout(data, received_at) or _decode_v3(data, received_at)
    except Exception as error:  # a bug, not the sender's: still never take the collector down
        return BadPacket(f"decoder error: {type(error).__name__}")


# The chunk layouts senders write most, read at once: the fixed-size chunks in one of these orders
# (``build_hep3`` and heplify: by type; captagent, Kamailio, sofia-sip, Asterisk: addresses after
# the capture id), IPv4 or IPv6, then an optional auth key, then the payload, ending the packet.
# One compiled pattern recognises the layout, one struct reads its values; any other packet, or
# any doubt (a length that does not fit, trailing chunks, a zero time), takes ``_decode_v3``,
# which gives the same packet for these, as tests/test_hep.py checks.
_FIXED_BODY = {
    1: "B",
    2: "B",
    3: "4s",
    4: "4s",
    5: "16s",
    6: "16s",
    7: "H",
    8: "H",
    9: "I",
    10: "I",
    11: "B",
    12: "I",
}
_LAYOUT_ORDERS = [
    (1, 2, 3, 4, 7, 8, 9, 10, 11, 12),
    (1, 2, 7, 8, 9, 10, 11, 12, 3, 4),
    (1, 2, 5, 6, 7, 8, 9, 10, 11, 12),
    (1, 2, 7, 8, 9, 10, 11, 12, 5, 6),
]


# (unpack, getter, ntop, size): getter(unpack(data)) gives the header's total length, the fields
# of _FIELDS in that order, then the header of the chunk after the fixed ones, which starts at size.
_Layout = tuple[
    Callable[[bytes], tuple[Any, ...]],
    Callable[[tuple[Any, ...]], tuple[Any, ...]],
    Callable[[bytes], str],
    int,
]
_FIELDS = {  # family, IP protocol, source, destination, ports, time, protocol type, capture id
    False: (1, 2, 3, 4, 7, 8, 9, 10, 11, 12),
    True: (1, 2, 5, 6, 7, 8, 9, 10, 11, 12),
}


def _layout(order: tuple[int, ...]) -> tuple[bytes, _Layout]:
    """The pattern that recognises the fixed chunks in ``order``, and how to read them."""
    pattern, fmt = b"", "!4xH"
    for chunk_type in order:
        body = _FIXED_BODY[chunk_type]
        width = struct.calcsize("!" + body)
        pattern += re.escape(struct.pack("!HHH", 0, chunk_type, 6 + width)) + b"." * width
        fmt += "6x" + body
    size = struct.calcsize(fmt)
    ipv6 = 5 in order
    columns = [1 + order.index(chunk_type) for chunk_type in _FIELDS[ipv6]]
    getter = operator.itemgetter(0, *columns, len(order) + 1, len(order) + 2, len(order) + 3)
    ntop: Callable[[bytes], str] = (lambda raw: _inet_ntop(_AF6, raw)) if ipv6 else _inet_ntoa
    return b"(" + pattern + b")", (struct.Struct(fmt + "HHH").unpack_from, getter, ntop, size)


def _decode_layout(data: bytes, received_at: float) -> HepPacket | None:
    """``data`` as a HepPacket if it has one of the common layouts, else None."""
    found = _KNOWN_LAYOUT(data)
    if found is None or len(data) < found.end() + 6:
        return None
    unpack, getter, ntop, off = _LAYOUTS[found.lastindex or 0]
    (
        end, family, ip_proto, src, dst, src_port, dst_port, ts_sec, ts_usec, proto_type, capture_id,
        vendor, chunk_type, length,
    ) = getter(unpack(data))  # fmt: skip
    size = len(data)
    if end > size or vendor:
        return None
    auth_key = None
    if chunk_type == 14 and length >= 6 and off + length + 6 <= end:
        auth_key = data[off + 6 : off + length]
        off += length
        vendor, chunk_type, length = _unpack_chunk(data, off)
    if chunk_type != 15 or vendor or length < 6 or off + length != end or not ts_sec:
        return None
    return HepPacket(
        3, family, ip_proto, ntop(src), ntop(dst), src_port, dst_port, ts_sec, ts_usec, proto_type,
        capture_id, data[off + 6 : end], None, None, auth_key, 0, 0, False, size - end,
    )  # fmt: skip


_LAYOUTS: dict[int, _Layout] = {}
_patterns = []
for _index, _order in enumerate(_LAYOUT_ORDERS, 1):
    _pattern, _LAYOUTS[_index] = _layout(_order)
    _patterns.append(_pattern)
_KNOWN_LAYOUT = re.compile(b"HEP3..(?:" + b"|".join(_patterns) + b")", re.DOTALL).match


def _decode_v3(data: bytes, received_at: float) -> HepPacket | BadPacket:
    size = len(data)
    if size < 6:
        return BadPacket("truncated header")
    if data[:4] != b"HEP3":
        return BadPacket("bad magic")
    end = _unpack_u16(data, 4)[0]
    if end < 6:
        return BadPacket("header length < 6")
    if end > size:
        return BadPacket("header length > datagram")
    family = ip_proto = proto_type = capture_id = ts_sec = ts_usec = 0
    has_family = compressed = False
    src_ip = dst_ip = src_port = dst_port = payload = None
    correlation_id = node_name = auth_key = None
    vendor_chunks = unknown_chunks = 0
    off = 6
    # Types are tested roughly in the order senders write them; each fixed-size type checks its
    # chunk length, because a short body would make us read the next chunk's header as a value.
    while off < end:
        if end - off < 6:
            return BadPacket("truncated chunk header")
        vendor, ctype, clen = _unpack_chunk(data, off)
        if clen < 6:
            return BadPacket("chunk length < 6")
        nxt = off + clen
        if nxt > end:
            return BadPacket("chunk overruns packet")
        if vendor:
            vendor_chunks += 1
        elif ctype <= 0x0C:
            if ctype == 1:
                if clen != 7:
                    return BadPacket("family chunk not 1 byte")
                family = data[off + 6]
                has_family = True
            elif ctype == 2:
                if clen != 7:
                    return BadPacket("IP protocol chunk not 1 byte")
                ip_proto = data[off + 6]
            elif ctype == 3:
                if clen != 10:
                    return BadPacket("IPv4 chunk not 4 bytes")
                src_ip = _inet_ntoa(data[off + 6 : nxt])
            elif ctype == 4:
                if clen != 10:
                    return BadPacket("IPv4 chunk not 4 bytes")
                dst_ip = _inet_ntoa(data[off + 6 : nxt])
            elif ctype == 7:
                if clen != 8:
                    return BadPacket("port chunk not 2 bytes")
                src_port = _unpack_u16(data, off + 6)[0]
            elif ctype == 8:
                if clen != 8:
                    return BadPacket("port chunk not 2 bytes")
                dst_port = _unpack_u16(data, off + 6)[0]
            elif ctype == 9:
                if clen != 10:
                    return BadPacket("time chunk not 4 bytes")
                ts_sec = _unpack_u32(data, off + 6)[0]
            elif ctype == 10:
                if clen != 10:
                    return BadPacket("time chunk not 4 bytes")
                ts_usec = _unpack_u32(data, off + 6)[0]
            elif ctype == 11:
                if clen != 7:
                    return BadPacket("protocol type chunk not 1 byte")
                proto_type = data[off + 6]
            elif ctype == 12:
                if clen != 10:
                    return BadPacket("capture id chunk not 4 bytes")
                capture_id = _unpack_u32(data, off + 6)[0]
            elif ctype == 5:
                if clen != 22:
                    return BadPacket("IPv6 chunk not 16 bytes")
                src_ip = _inet_ntop(_AF6, data[off + 6 : nxt])
            elif ctype == 6:
                if clen != 22:
                    return BadPacket("IPv6 chunk not 16 bytes")
                dst_ip = _inet_ntop(_AF6, data[off + 6 : nxt])
            else:  # type 0
                unknown_chunks += 1
        elif ctype == 15:
            payload = data[off + 6 : nxt]
            compressed = False
        elif ctype == 14:
            auth_key = data[off + 6 : nxt]
        elif ctype == 17:
            correlation_id = data[off + 6 : nxt]
        elif ctype == 19:
            node_name = data[off + 6 : nxt]
        elif ctype == 16:
            payload = data[off + 6 : nxt]
            compressed = True
        elif ctype not in KNOWN_TYPES:
            unknown_chunks += 1
        off = nxt
    if src_ip is None:
        return BadPacket("missing source address")
    if dst_ip is None:
        return BadPacket("missing destination address")
    if src_port is None:
        return BadPacket("missing source port")
    if dst_port is None:
        return BadPacket("missing destination port")
    if payload is None:
        return BadPacket("missing payload")
    if compressed:
        inflated = _inflate(payload)
        if isinstance(inflated, BadPacket):
            return inflated
        payload = inflated
    if not ts_sec:
        ts_sec, ts_usec = _split_time(received_at)
    if not has_family:
        family = AF_INET6 if ":" in src_ip else AF_INET
    return HepPacket(
        3,
        family,
        ip_proto,
        src_ip,
        dst_ip,
        src_port,
        dst_port,
        ts_sec,
        ts_usec,
        proto_type,
        capture_id,
        payload,
        correlation_id,
        node_name,
        auth_key,
        vendor_chunks,
        unknown_chunks,
        compressed,
        size - end,
    )


def _decode_v2(data: bytes, received_at: float) -> HepPacket | BadPacket:
    size = len(data)
    if size < 8:
        return BadPacket("truncated v1/v2 header")
    version, _hp_l, family, ip_proto, src_port, dst_port = _unpack_v12(data, 0)
    if family == AF_INET:
        off = 16
        if size < off:
            return BadPacket("truncated v1/v2 header")
        src_ip = _inet_ntoa(data[8:12])
        dst_ip = _inet_ntoa(data[12:16])
    elif family == AF_INET6:
        off = 40
        if size < off:
            return BadPacket("truncated v1/v2 header")
        src_ip = _inet_ntop(_AF6, data[8:24])
        dst_ip = _inet_ntop(_AF6, data[24:40])
    else:
        return BadPacket("unknown address family")
    ts_sec = ts_usec = capture_id = 0
    if version == 2:
        if size < off + 12:
            return BadPacket("truncated v2 time header")
        ts_sec, ts_usec, capture_id = _pick_time(
            _unpack_time_le(data, off), _unpack_time_be(data, off), received_at
        )
        off += 12
    if not ts_sec:
        ts_sec, ts_usec = _split_time(received_at)
    return HepPacket(
        version,
        family,
        ip_proto,
        src_ip,
        dst_ip,
        src_port,
        dst_port,
        ts_sec,
        ts_usec,
        PROTO_SIP,
        capture_id,
        data[off:],
    )
