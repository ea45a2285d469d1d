"""HEP (Homer Encapsulation Protocol) codec: HEPv3, legacy HEPv1/v2, and a TCP stream splitter.

The wire format is declared once, with construct (``CHUNK``, ``HEP3``, ``HEP2``, ``BODIES``). That
declaration builds packets (``build_hep3``, ``build_hep2``: replay, tests, benchmarks) and is a slow
reference decoder (``parse_with_construct``, ~5,000 packets/s). Ingest uses ``decode``, a
hand-written ``struct`` loop (~3 us a packet, 60x faster), which reads the layouts senders write
most with one compiled pattern and one ``struct`` (about half that); the tests hold it equal to
the declaration on generated and corrupted packets. Rules for malformed input follow
``docs/peers/hep.md#edge-cases``: a packet is kept or dropped whole, and ``decode`` never raises, since
nothing a sender does may crash the collector.
"""

from __future__ import annotations

import operator
import re
import socket
import struct
import time
import zlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Literal

from construct import (
    Bytes,
    Const,
    ConstructError,
    ExprAdapter,
    FixedSized,
    FocusedSeq,
    GreedyBytes,
    GreedyRange,
    If,
    IfThenElse,
    Int8ub,
    Int16ub,
    Int16ul,
    Int32ub,
    Int32ul,
    OneOf,
    Padding,
    RawCopy,
    Rebuild,
    Struct,
    Terminated,
    len_,
    this,
)

MAGIC = b"HEP3"
MAX_PACKET = 65535  # header and chunk lengths are u16
# A 0x0010 chunk inflates to at most this; an uncompressed payload can't exceed 65529 bytes either,
# so anything bigger is a bomb or garbage, not a SIP message.
MAX_INFLATED = 65536
AF_INET, AF_INET6 = 2, 10  # the sender's raw Linux values, as carried in chunk 0x0001 and v1/v2
PROTO_SIP = 1

# Generic chunk types (vendor 0) that the decoder keeps.
FAMILY, IP_PROTO, SRC_IP4, DST_IP4, SRC_IP6, DST_IP6 = 0x01, 0x02, 0x03, 0x04, 0x05, 0x06
SRC_PORT, DST_PORT, TS_SEC, TS_USEC, PROTO_TYPE, CAPTURE_ID = 0x07, 0x08, 0x09, 0x0A, 0x0B, 0x0C
AUTH_KEY, PAYLOAD, COMPRESSED_PAYLOAD, CORRELATION_ID, NODE_NAME = 0x0E, 0x0F, 0x10, 0x11, 0x13
# Types defined by spec rev 37 (0x19-0x1f reserved). Known types the decoder doesn't use (keep-alive,
# VLAN, MAC, MOS...) are skipped silently and not size-checked; anything else counts as unknown.
KNOWN_TYPES = frozenset(range(0x01, 0x19)) | frozenset(range(0x20, 0x2A))

# Plausible epoch seconds for the v2 time header, whose byte order depends on the sender's host.
_EPOCH_MIN, _EPOCH_MAX = 946_684_800, 4_102_444_800  # 2000-01-01 .. 2100-01-01


@dataclass(slots=True)
class HepPacket:
    version: int  # 1, 2 or 3
    family: int  # AF_INET (2) or AF_INET6 (10) as the sender wrote it
    ip_proto: int  # 17 UDP, 6 TCP, 132 SCTP, 22 "TLS/WS" (Kamailio)...
    src_ip: str  # canonical text (inet_ntop)
    dst_ip: str
    src_port: int
    dst_port: int
    ts_sec: int  # capture time, or receive time when the packet has none
    ts_usec: int
    proto_type: int  # 1 SIP; anything else is kept opaque
    capture_id: int
    payload: bytes  # inflated if it came in a 0x0010 chunk
    correlation_id: bytes | None = None
    node_name: bytes | None = None
    auth_key: bytes | None = None
    vendor_chunks: int = 0  # chunks with vendor id != 0, skipped
    unknown_chunks: int = 0  # vendor-0 chunks of undefined types, skipped
    compressed: bool = False  # payload came from a 0x0010 chunk
    trailing_bytes: int = 0  # datagram bytes after the header's total length (tolerated)


@dataclass(frozen=True, slots=True)
class BadPacket:
    reason: str


# ---------------------------------------------------------------------------------------------
# The declaration (construct). Building and the reference decoder use it; ``decode`` mirrors it.
# ---------------------------------------------------------------------------------------------

_IPV4: Any = ExprAdapter(
    Bytes(4),
    decoder=lambda obj, ctx: socket.inet_ntop(socket.AF_INET, obj),
    encoder=lambda obj, ctx: socket.inet_pton(socket.AF_INET, obj),
)
_IPV6: Any = ExprAdapter(
    Bytes(16),
    decoder=lambda obj, ctx: socket.inet_ntop(socket.AF_INET6, obj),
    encoder=lambda obj, ctx: socket.inet_pton(socket.AF_INET6, obj),
)


def _exact(subcon: Any) -> Any:
    """A fixed-size body that must fill its chunk: a 0x0003 chunk of 5 bytes is an error."""
    return FocusedSeq("value", "value" / subcon, Terminated)


# Chunk framing: the length includes the 6-byte chunk header. A length < 6 makes Bytes() negative,
# which raises; inside GreedyRange that ends the walk early (see HEP3).
CHUNK: Any = Struct(
    "vendor" / Int16ub,
    "type" / Int16ub,
    "length" / Rebuild(Int16ub, len_(this.body) + 6),
    "body" / Bytes(this.length - 6),
)

# GreedyRange stops *silently* at the first chunk that fails to parse, so a reader must check that
# the chunks fill the header's length exactly (docs/peers/hep.md#python); ``parse_with_construct`` does.
HEP3: Any = Struct(
    "magic" / Const(MAGIC),
    "length" / Rebuild(Int16ub, lambda ctx: 6 + sum(6 + len(c["body"]) for c in ctx.chunks)),
    "chunks" / FixedSized(this.length - 6, GreedyRange(CHUNK)),
)

# Bodies of the vendor-0 chunk types the decoder interprets, keyed by type.
BODIES: dict[int, Any] = {
    FAMILY: _exact(Int8ub),
    IP_PROTO: _exact(Int8ub),
    SRC_IP4: _exact(_IPV4),
    DST_IP4: _exact(_IPV4),
    SRC_IP6: _exact(_IPV6),
    DST_IP6: _exact(_IPV6),
    SRC_PORT: _exact(Int16ub),
    DST_PORT: _exact(Int16ub),
    TS_SEC: _exact(Int32ub),
    TS_USEC: _exact(Int32ub),
    PROTO_TYPE: _exact(Int8ub),
    CAPTURE_ID: _exact(Int32ub),
    AUTH_KEY: GreedyBytes,
    PAYLOAD: GreedyBytes,
    COMPRESSED_PAYLOAD: GreedyBytes,
    CORRELATION_ID: GreedyBytes,
    NODE_NAME: GreedyBytes,
}

# v2 time header: host byte order (little-endian on x86) as Kamailio, captagent and OpenSIPS write
# it, and 12 bytes because the C struct is not packed (2 trailing pad bytes).
TIME_LE: Any = Struct("sec" / Int32ul, "usec" / Int32ul, "capture_id" / Int16ul, Padding(2))
TIME_BE: Any = Struct("sec" / Int32ub, "usec" / Int32ub, "capture_id" / Int16ub, Padding(2))

_ADDR_SIZE = {AF_INET: 4, AF_INET6: 16}

# HEPv1/v2. hp_l is unreliable on the wire (senders disagree), so the reader ignores it and derives
# offsets from version + family; the builder writes Kamailio's value, 8 + both addresses.
HEP2: Any = Struct(
    "version" / OneOf(Int8ub, (1, 2)),
    "hp_l" / Rebuild(Int8ub, lambda ctx: 8 + 2 * _ADDR_SIZE[ctx.family]),
    "family" / OneOf(Int8ub, (AF_INET, AF_INET6)),
    "ip_proto" / Int8ub,
    "src_port" / Int16ub,
    "dst_port" / Int16ub,
    "src_ip" / IfThenElse(this.family == AF_INET, _IPV4, _IPV6),
    "dst_ip" / IfThenElse(this.family == AF_INET, _IPV4, _IPV6),
    "time" / If(this.version == 2, RawCopy(TIME_LE)),
    "payload" / GreedyBytes,
)


# ---------------------------------------------------------------------------------------------
# Builders
# ---------------------------------------------------------------------------------------------


def _generic_chunks(packet: HepPacket, compress: bool) -> list[tuple[int, int, bytes]]:
    """The packet's vendor-0 chunks in numeric type order, bodies built from BODIES."""
    fields: list[tuple[int, object]] = [
        (FAMILY, packet.family),
        (IP_PROTO, packet.ip_proto),
        (SRC_IP6 if ":" in packet.src_ip else SRC_IP4, packet.src_ip),
        (DST_IP6 if ":" in packet.dst_ip else DST_IP4, packet.dst_ip),
        (SRC_PORT, packet.src_port),
        (DST_PORT, packet.dst_port),
        (TS_SEC, packet.ts_sec),
        (TS_USEC, packet.ts_usec),
        (PROTO_TYPE, packet.proto_type),
        (CAPTURE_ID, packet.capture_id),
    ]
    if packet.auth_key is not None:
        fields.append((AUTH_KEY, packet.auth_key))
    if compress:
        fields.append((COMPRESSED_PAYLOAD, zlib.compress(packet.payload)))
    else:
        fields.append((PAYLOAD, packet.payload))
    if packet.correlation_id is not None:
        fields.append((CORRELATION_ID, packet.correlation_id))
    if packet.node_name is not None:
        fields.append((NODE_NAME, packet.node_name))
    fields.sort(key=lambda field: field[0])
    return [(0, chunk_type, bytes(BODIES[chunk_type].build(value))) for chunk_type, value in fields]


def build_hep3(
    packet: HepPacket,
    *,
    chunk_order: Sequence[int] | None = None,
    extra_chunks: Sequence[tuple[int, int, bytes]] = (),
    compress: bool = False,
) -> bytes:
    """``packet`` as a HEPv3 packet.

    Chunks are the packet's generic chunks in numeric type order (auth key, correlation id and node
    name only when not None), then ``extra_chunks`` as (vendor, type, body). ``chunk_order`` lists
    chunk keys ``vendor << 16 | type`` (the type alone for vendor 0): chunks are stably sorted by
    the position of their key in it, unlisted ones last. The payload goes into a zlib 0x0010 chunk
    if ``compress`` or ``packet.compressed``. The counters (vendor/unknown chunks, trailing bytes)
    describe a decoded packet and are not encoded. Raises ValueError for values that don't fit.
    """
    try:
        chunks = _generic_chunks(packet, compress or packet.compressed)
        chunks.extend((vendor, chunk_type, bytes(body)) for vendor, chunk_type, body in extra_chunks)
        if chunk_order is not None:
            rank = {key: index for index, key in enumerate(chunk_order)}
            chunks.sort(key=lambda chunk: rank.get(chunk[0] << 16 | chunk[1], len(rank)))
        return bytes(HEP3.build({"chunks": [{"vendor": v, "type": t, "body": b} for v, t, b in chunks]}))
    except (ConstructError, OSError) as error:  # OSError: inet_pton of a bad address
        raise ValueError(f"cannot encode HEPv3 packet: {error}") from error


def build_hep2(
    packet: HepPacket, version: int | None = None, *, time_byte_order: Literal["little", "big"] = "little"
) -> bytes:
    """``packet`` as HEPv1 (no time, no capture id) or HEPv2 (12-byte time header, u16 capture id).

    ``version`` defaults to ``packet.version`` if that is 1 or 2, else 2. ``packet.family`` (2 or 10)
    selects the address size. ``time_byte_order="big"`` writes the time header as heplify-server
    reads it, which real v2 senders on x86 don't. Raises ValueError for values that don't fit.
    """
    if version is None:
        version = packet.version if packet.version in (1, 2) else 2
    time_header = {"sec": packet.ts_sec, "usec": packet.ts_usec, "capture_id": packet.capture_id}
    try:
        raw = HEP2.build(
            {
                "version": version,
                "family": packet.family,
                "ip_proto": packet.ip_proto,
                "src_port": packet.src_port,
                "dst_port": packet.dst_port,
                "src_ip": packet.src_ip,
                "dst_ip": packet.dst_ip,
                "time": {"value": time_header},
                "payload": packet.payload,
            }
        )
        if version == 2 and time_byte_order == "big":
            offset = 8 + 2 * _ADDR_SIZE[packet.family]
            header = TIME_BE.build(time_header)
            raw = raw[:offset] + header + raw[offset + 12 :]
        return bytes(raw)
    except (ConstructError, OSError, KeyError) as error:  # KeyError: a family other than 2 or 10
        raise ValueError(f"cannot encode HEPv{version} packet: {error!r}") from error


# ---------------------------------------------------------------------------------------------
# Helpers shared by both decoders (rules, not format)
# ---------------------------------------------------------------------------------------------


def _split_time(received_at: float) -> tuple[int, int]:
    sec = int(received_at)
    return sec, min(int((received_at - sec) * 1_000_000), 999_999)


def _inflate(body: bytes) -> bytes | BadPacket:
    """A 0x0010 body: zlib (captagent, OpenSIPS), then gzip (the spec's word), then raw deflate."""
    for wbits in (15, 31, -15):
        inflater = zlib.decompressobj(wbits)
        try:
            out = inflater.decompress(body, MAX_INFLATED + 1)
        except zlib.error:
            continue
        if len(out) > MAX_INFLATED:
            return BadPacket("compressed payload too large")
        if inflater.eof:  # a truncated stream inflates partially without an error
            return out
    return BadPacket("bad compressed payload")


def _plausible(sec: int, usec: int) -> bool:
    return _EPOCH_MIN <= sec < _EPOCH_MAX and usec < 1_000_000


def _pick_time(
    le: tuple[int, int, int], be: tuple[int, int, int], received_at: float
) -> tuple[int, int, int]:
    """(sec, usec, capture id) of a v2 time header in the byte order that gives a plausible time.

    Real senders write host order (little-endian on x86), heplify-server reads big-endian. The usec
    test (< 10**6) alone rejects the wrong order for all but ~0.02% of headers; when both orders
    still look plausible, the one nearer the receive time wins. Neither plausible (a zero or broken
    clock): sec 0, which the caller replaces with the receive time, and the little-endian capture id.
    """
    le_ok, be_ok = _plausible(le[0], le[1]), _plausible(be[0], be[1])
    if be_ok and (not le_ok or abs(be[0] - received_at) < abs(le[0] - received_at)):
        return be
    if le_ok:
        return le
    return 0, 0, le[2]


# ---------------------------------------------------------------------------------------------
# Reference decoder on the declaration
# ---------------------------------------------------------------------------------------------


def parse_with_construct(data: bytes, received_at: float | None = None) -> HepPacket | BadPacket:
    """Slow reference decoder built on the construct declaration; same rules and results as decode.

    Reasons differ (construct reports where it stopped, not why); accept/reject and packets don't.
    """
    data = bytes(data)
    if received_at is None:
        received_at = time.time()
    try:
        if not data:
            return BadPacket("empty datagram")
        if data[0] in (1, 2):
            return _construct_v2(data, received_at)
        return _construct_v3(data, received_at)
    except ConstructError as error:
        return BadPacket(f"construct: {type(error).__name__}")


def _construct_v2(data: bytes, received_at: float) -> HepPacket | BadPacket:
    parsed = HEP2.parse(data)
    sec, usec, capture_id = 0, 0, 0
    if parsed.time is not None:
        le, be = parsed.time.value, TIME_BE.parse(parsed.time.data)
        sec, usec, capture_id = _pick_time(
            (le.sec, le.usec, le.capture_id), (be.sec, be.usec, be.capture_id), received_at
        )
    if not sec:
        sec, usec = _split_time(received_at)
    return HepPacket(
        version=parsed.version,
        family=parsed.family,
        ip_proto=parsed.ip_proto,
        src_ip=parsed.src_ip,
        dst_ip=parsed.dst_ip,
        src_port=parsed.src_port,
        dst_port=parsed.dst_port,
        ts_sec=sec,
        ts_usec=usec,
        proto_type=PROTO_SIP,
        capture_id=capture_id,
        payload=bytes(parsed.payload),
    )


_FIELD_OF_TYPE = {
    FAMILY: "family",
    IP_PROTO: "ip_proto",
    SRC_IP4: "src_ip",
    SRC_IP6: "src_ip",
    DST_IP4: "dst_ip",
    DST_IP6: "dst_ip",
    SRC_PORT: "src_port",
    DST_PORT: "dst_port",
    TS_SEC: "ts_sec",
    TS_USEC: "ts_usec",
    PROTO_TYPE: "proto_type",
    CAPTURE_ID: "capture_id",
    AUTH_KEY: "auth_key",
    PAYLOAD: "payload",
    COMPRESSED_PAYLOAD: "payload",
    CORRELATION_ID: "correlation_id",
    NODE_NAME: "node_name",
}


def _construct_v3(data: bytes, received_at: float) -> HepPacket | BadPacket:
    parsed = HEP3.parse(data)
    if sum(6 + len(chunk.body) for chunk in parsed.chunks) != parsed.length - 6:
        return BadPacket("chunks do not fill the packet")
    values: dict[str, Any] = {}
    vendor_chunks = unknown_chunks = 0
    compressed = False
    for chunk in parsed.chunks:
        if chunk.vendor != 0:
            vendor_chunks += 1
        elif chunk.type in BODIES:
            values[_FIELD_OF_TYPE[chunk.type]] = BODIES[chunk.type].parse(chunk.body)
            if chunk.type in (PAYLOAD, COMPRESSED_PAYLOAD):
                compressed = chunk.type == COMPRESSED_PAYLOAD
        elif chunk.type not in KNOWN_TYPES:
            unknown_chunks += 1
    for name in ("src_ip", "dst_ip", "src_port", "dst_port", "payload"):
        if name not in values:
            return BadPacket(f"missing {name}")
    payload = bytes(values["payload"])
    if compressed:
        inflated = _inflate(payload)
        if isinstance(inflated, BadPacket):
            return inflated
        payload = inflated
    sec, usec = values.get("ts_sec", 0), values.get("ts_usec", 0)
    if not sec:
        sec, usec = _split_time(received_at)
    src_ip: str = values["src_ip"]
    return HepPacket(
        version=3,
        family=values.get("family", AF_INET6 if ":" in src_ip else AF_INET),
        ip_proto=values.get("ip_proto", 0),
        src_ip=src_ip,
        dst_ip=values["dst_ip"],
        src_port=values["src_port"],
        dst_port=values["dst_port"],
        ts_sec=sec,
        ts_usec=usec,
        proto_type=values.get("proto_type", 0),
        capture_id=values.get("capture_id", 0),
        payload=payload,
        correlation_id=_opt_bytes(values.get("correlation_id")),
        node_name=_opt_bytes(values.get("node_name")),
        auth_key=_opt_bytes(values.get("auth_key")),
        vendor_chunks=vendor_chunks,
        unknown_chunks=unknown_chunks,
        compressed=compressed,
        trailing_bytes=len(data) - parsed.length,
    )


def _opt_bytes(value: bytes | None) -> bytes | None:
    return None if value is None else bytes(value)


# ---------------------------------------------------------------------------------------------
# Fast decoder for ingest
# ---------------------------------------------------------------------------------------------

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


# ---------------------------------------------------------------------------------------------
# TCP stream splitter
# ---------------------------------------------------------------------------------------------


class HepStream:
    """Splits a TCP/TLS byte stream into back-to-back HEPv3 packets (docs/peers/hep.md#transports).

    A bad packet *header* (magic, length < 6, or a v1/v2 first byte: v1/v2 has no length and can't
    be framed) makes the stream unrecoverable: ``broken`` is set with ``broken_reason`` and later
    data is ignored, and the collector closes the connection. A packet whose header is fine but
    whose chunks are bad is a BadPacket and the stream goes on: its framing is known. At most one
    incomplete packet (< 65535 bytes) stays buffered between feeds.
    """

    __slots__ = ("_buf", "_clock", "broken", "broken_reason")

    def __init__(self, clock: Callable[[], float] = time.time) -> None:
        self._buf = bytearray()
        self._clock = clock
        self.broken = False
        self.broken_reason = ""

    @property
    def pending(self) -> int:
        """Bytes buffered for an incomplete packet."""
        return len(self._buf)

    def feed(
        self, data: bytes | bytearray | memoryview, received_at: float | None = None
    ) -> list[HepPacket | BadPacket]:
        """The packets completed by ``data``, in order. ``received_at`` defaults to the clock."""
        if self.broken:
            return []
        when = self._clock() if received_at is None else received_at
        buf = self._buf
        buf += data
        out: list[HepPacket | BadPacket] = []
        off, size = 0, len(buf)
        with memoryview(buf) as view:
            while off < size:
                reason = _check_header(view, off, size)
                if reason:
                    self._break(reason)
                    return out
                if size - off < 6:
                    break
                length = view[off + 4] << 8 | view[off + 5]
                if size - off < length:
                    break
                out.append(decode(bytes(view[off : off + length]), when))
                off += length
        del buf[:off]  # one move per feed, not per packet
        return out

    def _break(self, reason: str) -> None:
        self.broken = True
        self.broken_reason = reason
        self._buf = bytearray()  # release it: the connection is done


def _check_header(view: memoryview, off: int, size: int) -> str:
    """Why the (possibly partial) header at ``off`` can't start a HEPv3 packet, or ''."""
    have = min(size - off, 6)
    if view[off] in (1, 2):
        return "HEPv1/v2 on a stream"
    if view[off : off + min(have, 4)] != MAGIC[: min(have, 4)]:
        return "bad magic"
    if have == 6 and (view[off + 4] << 8 | view[off + 5]) < 6:
        return "header length < 6"
    return ""
