"""The HEP wire format declared once with construct, the builders and the reference decoder on it.

``CHUNK``, ``HEP3``, ``HEP2`` and ``BODIES`` declare the format; ``build_hep3`` and ``build_hep2``
build packets from it (replay, the demo, tests, benchmarks), and ``parse_with_construct`` is the
slow reference decoder (~5,000 packets/s) that tests hold the fast ``decode`` equal to. Nothing on
the ingest path calls into this module.
"""

from __future__ import annotations

import socket
import time
import zlib
from collections.abc import Sequence
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

from .models import (
    AF_INET,
    AF_INET6,
    AUTH_KEY,
    CAPTURE_ID,
    COMPRESSED_PAYLOAD,
    CORRELATION_ID,
    DST_IP4,
    DST_IP6,
    DST_PORT,
    FAMILY,
    IP_PROTO,
    KNOWN_TYPES,
    MAGIC,
    NODE_NAME,
    PAYLOAD,
    PROTO_SIP,
    PROTO_TYPE,
    SRC_IP4,
    SRC_IP6,
    SRC_PORT,
    TS_SEC,
    TS_USEC,
    BadPacket,
    HepPacket,
    _inflate,
    _pick_time,
    _split_time,
)

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
