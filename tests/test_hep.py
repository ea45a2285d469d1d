"""HEP codec: the public HEP fixtures (tests/fixtures/hep), build/decode round trips, the fast path
against the construct declaration, corrupted input, the edge-case rules (docs/peers/hep.md#edge-cases), and
the TCP stream splitter."""

from __future__ import annotations

import dataclasses
import gzip
import hashlib
import re
import socket
import struct
import zlib
from collections.abc import Callable

import pytest
from hypothesis import HealthCheck, assume, event, given, settings
from hypothesis import strategies as st

from hepsub_apiban.formats.hep import (
    MAX_INFLATED,
    MAX_PACKET,
    BadPacket,
    HepPacket,
    HepStream,
    build_hep2,
    build_hep3,
    decode,
    parse_with_construct,
)
from hepsub_apiban.formats.hep.decoder import _decode_layout, _decode_v3

from . import HEP_FIXTURES

FIXTURES = HEP_FIXTURES
RECEIVED = 1_700_000_000.25  # receive time used for packets without one
RECEIVED_SPLIT = (1_700_000_000, 250_000)
FAST = settings(deadline=None, suppress_health_check=[HealthCheck.too_slow])


def fixture(name: str) -> bytes:
    path = FIXTURES / name
    return bytes.fromhex(path.read_text())


def both(data: bytes, received_at: float = RECEIVED) -> HepPacket | BadPacket:
    """Decodes with the fast path and the construct declaration; they must agree."""
    fast = decode(data, received_at)
    reference = parse_with_construct(data, received_at)
    assert type(fast) is type(reference), (fast, reference)
    if isinstance(fast, HepPacket):
        assert fast == reference
    return fast


def accepted(data: bytes) -> HepPacket:
    packet = both(data)
    assert isinstance(packet, HepPacket), packet
    return packet


def rejected(data: bytes) -> str:
    bad = both(data)
    assert isinstance(bad, BadPacket), bad
    return bad.reason


def raw_hep3(chunks: list[tuple[int, int, bytes]], *, chunk_lengths: dict[int, int] | None = None) -> bytes:
    """A HEPv3 packet from raw chunks, with optional lying chunk lengths (by index): for bad input."""
    body = b""
    for index, (vendor, chunk_type, chunk_body) in enumerate(chunks):
        length = (chunk_lengths or {}).get(index, len(chunk_body) + 6)
        body += struct.pack("!HHH", vendor, chunk_type, length) + chunk_body
    return b"HEP3" + struct.pack("!H", len(body) + 6) + body


SAMPLE = HepPacket(
    version=3,
    family=2,
    ip_proto=17,
    src_ip="203.0.113.7",
    dst_ip="198.51.100.1",
    src_port=5062,
    dst_port=5060,
    ts_sec=1_720_000_000,
    ts_usec=123_456,
    proto_type=1,
    capture_id=2001,
    payload=b"REGISTER sip:example.com SIP/2.0\r\n\r\n",
)

# Core chunks of SAMPLE, for hand-made variants.
CORE = [
    (0, 1, b"\x02"),
    (0, 2, b"\x11"),
    (0, 3, socket.inet_aton("203.0.113.7")),
    (0, 4, socket.inet_aton("198.51.100.1")),
    (0, 7, struct.pack("!H", 5062)),
    (0, 8, struct.pack("!H", 5060)),
    (0, 9, struct.pack("!I", 1_720_000_000)),
    (0, 10, struct.pack("!I", 123_456)),
    (0, 11, b"\x01"),
    (0, 12, struct.pack("!I", 2001)),
    (0, 15, SAMPLE.payload),
]


# --- fixtures -------------------------------------------------------------------------------------


def test_spec_example() -> None:
    data = fixture("spec-rev37-example.hex")
    assert len(data) == 113
    packet = accepted(data)
    assert packet == HepPacket(
        version=3,
        family=2,
        ip_proto=17,
        src_ip="212.202.0.1",
        dst_ip="82.116.0.211",
        src_port=12010,
        dst_port=5060,
        ts_sec=1313440459,
        ts_usec=120000,
        proto_type=1,
        capture_id=228,
        payload=b"INVITE sip:bob",
    )
    assert data[99 : 99 + 14] == packet.payload


def test_heplify_hep3_fixture() -> None:
    data = fixture("heplify-server-decoder-test-hep3.hex")
    assert len(data) == 778
    packet = accepted(data)
    assert (packet.version, packet.family, packet.ip_proto) == (3, 2, 17)
    assert (packet.src_ip, packet.src_port) == ("192.168.247.250", 5060)
    assert (packet.dst_ip, packet.dst_port) == ("192.168.245.250", 5060)
    assert (packet.ts_sec, packet.ts_usec) == (1520606104, 119540)
    assert (packet.proto_type, packet.capture_id) == (1, 0)
    assert packet.auth_key == b""  # the empty 0x000e chunk (length 6)
    assert packet.correlation_id is None
    assert packet.node_name is None
    assert len(packet.payload) == 673
    assert data[105 : 105 + 673] == packet.payload
    assert packet.payload.startswith(b"SIP/2.0 200 OK\r\nCall-ID: BC099884@6dfcffe8\r\n")
    assert packet.payload.endswith(b"m=audio 0 RTP/AVP 8")
    assert (packet.vendor_chunks, packet.unknown_chunks, packet.trailing_bytes) == (0, 0, 0)
    assert not packet.compressed


def test_heplify_hep3_fixture_reencodes_identically() -> None:
    # heplify-server's TestDecodeEncodeHEP: decode, encode, same bytes (numeric chunk order, the
    # empty auth key kept as a field).
    data = fixture("heplify-server-decoder-test-hep3.hex")
    packet = accepted(data)
    assert build_hep3(packet) == data
    assert build_hep3(fixture_packet("spec-rev37-example.hex")) == fixture("spec-rev37-example.hex")


def fixture_packet(name: str) -> HepPacket:
    return accepted(fixture(name))


def test_heplify_hepv1_fixture() -> None:
    data = fixture("heplify-server-decoder-test-hepv1.hex")
    assert len(data) == 535
    packet = accepted(data)
    assert (packet.version, packet.family, packet.ip_proto) == (1, 2, 17)
    assert (packet.src_ip, packet.src_port) == ("10.0.1.100", 5060)
    assert (packet.dst_ip, packet.dst_port) == ("192.168.0.254", 5060)
    assert (packet.ts_sec, packet.ts_usec) == RECEIVED_SPLIT  # no time in v1: receive time
    assert (packet.proto_type, packet.capture_id) == (1, 0)
    assert len(packet.payload) == 519
    assert data[16:] == packet.payload
    assert packet.payload.startswith(
        b"SIP/2.0 200 OK\r\nFrom: <sip:mod_sofia@44.122.111.112:5060>;tag=aXS1c0rtSgrgD\r\n"
    )
    assert packet.payload.endswith(b"\r\n\r\n")
    # build_hep2 writes hp_l = 16 like Kamailio, so the fixture re-encodes identically too.
    assert build_hep2(packet) == data  # version from the packet


def test_memoryview_and_bytearray_input() -> None:
    data = build_hep3(SAMPLE)
    assert decode(memoryview(data), RECEIVED) == SAMPLE
    assert decode(bytearray(data), RECEIVED) == SAMPLE
    assert decode(memoryview(b"xx" + data)[2:], RECEIVED) == SAMPLE


# --- generated packets ----------------------------------------------------------------------------

V4 = st.binary(min_size=4, max_size=4).map(socket.inet_ntoa)
V6 = st.binary(min_size=16, max_size=16).map(lambda b: socket.inet_ntop(socket.AF_INET6, b))
U16 = st.integers(0, 0xFFFF)
U32 = st.integers(0, 0xFFFF_FFFF)
UNKNOWN_TYPES = st.one_of(st.just(0), st.integers(0x19, 0x1F), st.integers(0x2A, 0xFFFF))


@st.composite
def hep3_cases(draw: st.DrawFn) -> tuple[HepPacket, list[tuple[int, int, bytes]], list[int]]:
    """A packet, the vendor/unknown chunks to insert, and a chunk order."""
    family = draw(st.sampled_from([2, 10]))
    address = V4 if family == 2 else V6
    vendor = draw(st.lists(st.tuples(st.integers(1, 0xFFFF), U16, st.binary(max_size=30)), max_size=3))
    unknown = draw(st.lists(st.tuples(st.just(0), UNKNOWN_TYPES, st.binary(max_size=30)), max_size=3))
    packet = HepPacket(
        version=3,
        family=family,
        ip_proto=draw(st.integers(0, 255)),
        src_ip=draw(address),
        dst_ip=draw(address),
        src_port=draw(U16),
        dst_port=draw(U16),
        ts_sec=draw(st.integers(1, 0xFFFF_FFFF)),
        ts_usec=draw(U32),
        proto_type=draw(st.sampled_from([1, 5, 34, 35, 53, 100])),
        capture_id=draw(U32),
        payload=draw(st.binary(max_size=1200) | st.just(b"INVITE sip:a\x00\xff\xfe SIP/2.0\r\n")),
        correlation_id=draw(st.none() | st.binary(max_size=60)),
        node_name=draw(st.none() | st.binary(max_size=20)),
        auth_key=draw(st.none() | st.binary(max_size=20)),
        vendor_chunks=len(vendor),
        unknown_chunks=len(unknown),
        compressed=draw(st.booleans()),
    )
    extras = vendor + unknown
    order = draw(st.permutations(list(range(0x01, 0x14)) + [v << 16 | t for v, t, _ in extras]))
    return packet, extras, order


@FAST
@given(hep3_cases())
def test_build_decode_round_trip(case: tuple[HepPacket, list[tuple[int, int, bytes]], list[int]]) -> None:
    packet, extras, order = case
    data = build_hep3(packet, chunk_order=order, extra_chunks=extras)
    assert decode(data, RECEIVED) == packet
    assert parse_with_construct(data, RECEIVED) == packet


@st.composite
def hep2_packets(draw: st.DrawFn) -> HepPacket:
    family = draw(st.sampled_from([2, 10]))
    address = V4 if family == 2 else V6
    version = draw(st.sampled_from([1, 2]))
    ts_sec, ts_usec = RECEIVED_SPLIT
    capture_id = 0
    if version == 2:  # a capture time near the receive time, as from a sender with a working clock
        ts_sec = draw(st.integers(int(RECEIVED) - 366 * 86400, int(RECEIVED) + 366 * 86400))
        ts_usec, capture_id = draw(st.integers(0, 999_999)), draw(U16)
    return HepPacket(
        version=version,
        family=family,
        ip_proto=draw(st.integers(0, 255)),
        src_ip=draw(address),
        dst_ip=draw(address),
        src_port=draw(U16),
        dst_port=draw(U16),
        ts_sec=ts_sec,
        ts_usec=ts_usec,
        proto_type=1,
        capture_id=capture_id,
        payload=draw(st.binary(max_size=600)),
    )


@FAST
@given(hep2_packets(), st.sampled_from(["little", "big"]))
def test_hep2_round_trip(packet: HepPacket, byte_order: str) -> None:
    # The other byte order, if it also reads as a time at least as near the receive time, makes the
    # header ambiguous for any reader (needs e.g. usec 0 and a near-palindromic seconds value).
    swapped = struct.unpack("<II", struct.pack(">II", packet.ts_sec, packet.ts_usec))
    assume(
        packet.version == 1
        or not (
            946_684_800 <= swapped[0] < 4_102_444_800
            and swapped[1] < 1_000_000
            and abs(swapped[0] - RECEIVED) <= abs(packet.ts_sec - RECEIVED)
        )
    )
    data = build_hep2(packet, packet.version, time_byte_order="big" if byte_order == "big" else "little")
    assert both(data) == packet


# The layouts ``decode`` reads at once: fixed chunks by type (build_hep3, heplify) or with the
# addresses after the capture id (captagent, Kamailio), an optional auth key, the payload last.
COMMON_ORDERS = [
    [0x01, 0x02, 0x03, 0x04, 0x05, 0x06, 0x07, 0x08, 0x09, 0x0A, 0x0B, 0x0C, 0x0E, 0x0F],
    [0x01, 0x02, 0x07, 0x08, 0x09, 0x0A, 0x0B, 0x0C, 0x03, 0x04, 0x05, 0x06, 0x0E, 0x0F],
]


@st.composite
def common_layouts(draw: st.DrawFn) -> HepPacket:
    packet, _, _ = draw(hep3_cases())
    return dataclasses.replace(
        packet, vendor_chunks=0, unknown_chunks=0, compressed=False, correlation_id=None, node_name=None
    )


@FAST
@given(common_layouts(), st.sampled_from(COMMON_ORDERS), st.binary(max_size=3))
def test_common_layouts_are_read_at_once(packet: HepPacket, order: list[int], trailing: bytes) -> None:
    data = build_hep3(packet, chunk_order=order) + trailing
    expected = dataclasses.replace(packet, trailing_bytes=len(trailing))
    assert _decode_layout(data, RECEIVED) == expected  # the fast path took it
    assert both(data) == expected
    zero_time = build_hep3(dataclasses.replace(packet, ts_sec=0), chunk_order=order)
    assert _decode_layout(zero_time, RECEIVED) is None  # the receive time is the general path's rule
    assert both(zero_time).ts_sec == RECEIVED_SPLIT[0]


# --- corrupted input ------------------------------------------------------------------------------


@st.composite
def corrupted(draw: st.DrawFn) -> bytes:
    case = draw(hep3_cases())
    base = draw(st.sampled_from(["hep3", "hep3", "common", "common", "hep2", "random"]))
    if base == "hep3":
        packet, extras, order = case
        data = bytearray(build_hep3(packet, chunk_order=order, extra_chunks=extras))
    elif base == "common":  # damage where decode reads a packet at once
        order = draw(st.sampled_from(COMMON_ORDERS))
        data = bytearray(build_hep3(draw(common_layouts()), chunk_order=order))
    elif base == "hep2":
        data = bytearray(build_hep2(draw(hep2_packets())))
    else:
        data = bytearray(draw(st.binary(max_size=200)))
    for _ in range(draw(st.integers(1, 3))):
        if not data:
            break
        kind = draw(st.sampled_from(["flip", "truncate", "splice", "u16", "append"]))
        # hypothesis favours small offsets (the magic); past the header is where the chunks are
        at = draw(st.integers(0, len(data) - 1) | st.integers(min(6, len(data) - 1), len(data) - 1))
        if kind == "flip":
            data[at] ^= 1 << draw(st.integers(0, 7))
        elif kind == "truncate":
            del data[max(at, 1) :]
        elif kind == "splice":
            data[at : at + draw(st.integers(0, 8))] = draw(st.binary(max_size=8))
        elif kind == "u16":  # a length field (or anything else) set to a random value
            data[at : at + 2] = struct.pack("!H", draw(st.sampled_from([0, 1, 5, 6, 7, 0xFFFF]) | U16))
        else:
            data += draw(st.binary(min_size=1, max_size=8))
    return bytes(data)


@settings(FAST, max_examples=300)
@given(corrupted())
def test_corrupted_input_never_raises_and_paths_agree(data: bytes) -> None:
    fast = decode(data, RECEIVED)
    assert isinstance(fast, HepPacket | BadPacket)
    event("accepted" if isinstance(fast, HepPacket) else fast.reason)
    if isinstance(fast, BadPacket):
        assert not fast.reason.startswith("decoder error"), fast  # a bug, not a rejection
    both(data)  # same accept/reject, same packet when accepted
    if data[:4] == b"HEP3":
        assert fast == _decode_v3(data, RECEIVED)  # the common layouts' path changes nothing


@pytest.mark.parametrize(
    "data",
    [b"", b"\x01", b"\x02\x10\x02", b"HEP", b"HEP3", b"HEP3\x00", b"\x00" * 40, b"\xff" * 7, b"EEP1\x00\x06"],
)
def test_short_and_junk_datagrams(data: bytes) -> None:
    rejected(data)


# --- edge-case rules (docs/peers/hep.md#edge-cases) -----------------------------------------------------


def test_hep2_little_endian_time_header() -> None:
    packet = dataclasses.replace(SAMPLE, version=2, capture_id=2001, proto_type=1)
    data = build_hep2(packet, version=2)
    assert data[1] == 16  # hp_l as Kamailio writes it
    assert struct.unpack_from("<IIH", data, 16) == (1_720_000_000, 123_456, 2001)
    assert data[26:28] == b"\x00\x00"  # padding of the unpacked C struct
    assert data[28:] == SAMPLE.payload
    assert accepted(data) == packet


def test_hep2_big_endian_time_header_decoded_plausibly() -> None:
    packet = dataclasses.replace(SAMPLE, version=2)
    data = build_hep2(packet, version=2, time_byte_order="big")
    assert struct.unpack_from(">IIH", data, 16) == (1_720_000_000, 123_456, 2001)
    assert accepted(data) == packet


def test_hep2_both_orders_plausible_nearest_receive_time_wins() -> None:
    # 0x6553f180 big-endian reads as 0x80f15365 (2038) little-endian; with usec 0 both look valid.
    packet = dataclasses.replace(SAMPLE, version=2, ts_sec=0x6553F180, ts_usec=0, capture_id=0x0100)
    assert accepted(build_hep2(packet, version=2, time_byte_order="big")) == packet
    swapped = dataclasses.replace(packet, ts_sec=0x80F15365, capture_id=1)
    assert decode(build_hep2(swapped, version=2), 0x80F15365) == swapped


def test_hep2_implausible_time_uses_receive_time() -> None:
    packet = dataclasses.replace(SAMPLE, version=2, ts_sec=0, ts_usec=0, capture_id=7)
    decoded = accepted(build_hep2(packet, version=2))
    assert (decoded.ts_sec, decoded.ts_usec, decoded.capture_id) == (*RECEIVED_SPLIT, 7)


def test_hep2_ignores_hp_l() -> None:
    data = bytearray(build_hep2(dataclasses.replace(SAMPLE, version=2)))
    data[1] = 28  # sofia-sip's value; sngrep even writes a truncated total length
    assert accepted(bytes(data)).payload == SAMPLE.payload


def test_hep1_ipv6() -> None:
    packet = dataclasses.replace(
        SAMPLE, version=1, family=10, src_ip="2001:db8::7", dst_ip="2a01:4f8::5", capture_id=0
    )
    data = build_hep2(packet, version=1)
    assert data[1] == 40
    decoded = accepted(data)
    assert decoded == dataclasses.replace(packet, ts_sec=RECEIVED_SPLIT[0], ts_usec=RECEIVED_SPLIT[1])
    assert decoded.payload == data[40:]


def test_hep2_unknown_family_and_truncation() -> None:
    data = build_hep2(SAMPLE)
    assert rejected(data[:2] + b"\x07" + data[3:]) == "unknown address family"
    assert rejected(data[:20]) == "truncated v2 time header"
    assert rejected(data[:12]) == "truncated v1/v2 header"


def test_ipv6_chunks() -> None:
    packet = dataclasses.replace(SAMPLE, family=10, src_ip="2001:db8::1", dst_ip="::ffff:1.2.3.4")
    data = build_hep3(packet)
    assert struct.unpack_from("!HHH", data, 6 + 7 + 7) == (0, 5, 22)
    assert accepted(data) == packet  # IPv4-mapped is kept as sent


@pytest.mark.parametrize("proto_type", [5, 100, 0x57])
def test_non_sip_types_keep_their_proto_type(proto_type: int) -> None:
    packet = dataclasses.replace(SAMPLE, proto_type=proto_type, payload=b'{"type":"log"}')
    assert accepted(build_hep3(packet)).proto_type == proto_type


def test_chunk_length_below_6() -> None:
    for length in (0, 5):
        assert rejected(raw_hep3(CORE, chunk_lengths={4: length})) == "chunk length < 6"
    assert decode(raw_hep3(CORE, chunk_lengths={10: 3}), RECEIVED) == BadPacket("chunk length < 6")


def test_chunk_overrun() -> None:
    assert rejected(raw_hep3(CORE, chunk_lengths={10: len(SAMPLE.payload) + 7})) == "chunk overruns packet"
    # chunk headers cut by the header length
    data = raw_hep3(CORE)
    short = data[:4] + struct.pack("!H", len(data) - len(SAMPLE.payload) - 6 + 3) + data[6:]
    assert rejected(short) == "truncated chunk header"


def test_fixed_size_mismatch_drops_packet() -> None:
    core = dict(enumerate(CORE))
    for index, body in [(2, b"\x01\x02\x03\x04\x05"), (4, b"\x13"), (6, b"\x00" * 8), (0, b"")]:
        chunks = [core[i] if i != index else (0, core[i][1], body) for i in range(len(CORE))]
        assert "not" in rejected(raw_hep3(chunks))
    # a 16-byte body in an IPv4 chunk
    assert rejected(raw_hep3([*CORE, (0, 3, bytes(16))])) == "IPv4 chunk not 4 bytes"


def test_header_length_beyond_datagram() -> None:
    data = build_hep3(SAMPLE)
    assert rejected(data[:-1]) == "header length > datagram"
    assert rejected(data[:4] + b"\x00\x05" + data[6:]) == "header length < 6"


def test_trailing_bytes_tolerated_and_counted() -> None:
    data = build_hep3(SAMPLE)
    assert accepted(data + b"\x00" * 5) == dataclasses.replace(SAMPLE, trailing_bytes=5)


def test_gzipped_packet_is_not_hep() -> None:
    # heplify's payload_zip gzips the whole packet.
    assert rejected(gzip.compress(build_hep3(SAMPLE))) == "bad magic"


def test_vendor_chunks_skipped_even_with_generic_types() -> None:
    # heplify-server lets a vendor chunk of type 15 overwrite the payload; we don't.
    extras = [(2, 15, b"vendor payload"), (3, 3, b"\x01\x02\x03\x04"), (1, 0x1234, b"")]
    assert accepted(build_hep3(SAMPLE, extra_chunks=extras)) == dataclasses.replace(SAMPLE, vendor_chunks=3)


def test_unknown_and_known_unused_types() -> None:
    extras = [(0, 0x1A, b"x"), (0, 0x0100, b"yy"), (0, 0, b"")]  # unknown: counted
    unused = [(0, 0x0D, b"\x00\x0a"), (0, 0x12, b"\x00\x01"), (0, 0x29, b"group")]  # known: skipped
    decoded = accepted(build_hep3(SAMPLE, extra_chunks=extras + unused))
    assert decoded == dataclasses.replace(SAMPLE, unknown_chunks=3)


def test_duplicate_chunk_last_wins() -> None:
    extras = [(0, 7, b"\x00\x01"), (0, 3, socket.inet_aton("192.0.2.9")), (0, 15, b"second")]
    decoded = accepted(build_hep3(SAMPLE, extra_chunks=extras))
    assert (decoded.src_port, decoded.src_ip, decoded.payload) == (1, "192.0.2.9", b"second")
    # a later 0x000f replaces an earlier compressed payload, and vice versa
    decoded = accepted(build_hep3(SAMPLE, compress=True, extra_chunks=[(0, 15, b"plain")]))
    assert (decoded.payload, decoded.compressed) == (b"plain", False)
    decoded = accepted(build_hep3(SAMPLE, extra_chunks=[(0, 16, zlib.compress(b"zipped"))]))
    assert (decoded.payload, decoded.compressed) == (b"zipped", True)


def test_chunk_order_and_correlation_id_after_payload() -> None:
    # OpenSIPS can send the correlation id after the payload; captagent puts IPs after capture id.
    packet = dataclasses.replace(SAMPLE, correlation_id=b"abc@host", node_name=b"node1")
    data = build_hep3(packet, chunk_order=[12, 15, 17, 1, 2, 3, 4])
    types = []
    off = 6
    while off < len(data):
        _, chunk_type, length = struct.unpack_from("!HHH", data, off)
        types.append(chunk_type)
        off += length
    assert types == [12, 15, 17, 1, 2, 3, 4, 7, 8, 9, 10, 11, 19]
    assert accepted(data) == packet


@pytest.mark.parametrize("missing", [(3,), (4,), (7,), (8,), (15,), (3, 4, 7, 8, 15)])
def test_required_chunks(missing: tuple[int, ...]) -> None:
    assert "missing" in rejected(raw_hep3([c for c in CORE if c[1] not in missing]))


def test_optional_chunks_default() -> None:
    decoded = accepted(raw_hep3([c for c in CORE if c[1] in (3, 4, 7, 8, 15)]))
    assert decoded == dataclasses.replace(
        SAMPLE, ip_proto=0, proto_type=0, capture_id=0, ts_sec=RECEIVED_SPLIT[0], ts_usec=RECEIVED_SPLIT[1]
    )
    v6 = raw_hep3([(0, 5, bytes(15) + b"\x01"), *[c for c in CORE if c[1] in (4, 7, 8, 15)]])
    assert accepted(v6).family == 10  # no family chunk: from the source address


def test_time_zero_uses_receive_time() -> None:
    decoded = accepted(build_hep3(dataclasses.replace(SAMPLE, ts_sec=0, ts_usec=77)))
    assert (decoded.ts_sec, decoded.ts_usec) == RECEIVED_SPLIT


def test_empty_payload_chunk_is_a_payload() -> None:
    assert accepted(build_hep3(dataclasses.replace(SAMPLE, payload=b""))).payload == b""


def raw_deflate(data: bytes) -> bytes:
    deflater = zlib.compressobj(wbits=-15)
    return deflater.compress(data) + deflater.flush()


@pytest.mark.parametrize(
    "compress", [zlib.compress, gzip.compress, raw_deflate], ids=["zlib", "gzip", "deflate"]
)
def test_compressed_payload_formats(compress: Callable[[bytes], bytes]) -> None:
    chunks = [c if c[1] != 15 else (0, 16, compress(SAMPLE.payload)) for c in CORE]
    assert accepted(raw_hep3(chunks)) == dataclasses.replace(SAMPLE, compressed=True)


def test_compressed_payload_bomb_and_garbage() -> None:
    def with_body(body: bytes) -> bytes:
        return raw_hep3([c if c[1] != 15 else (0, 16, body) for c in CORE])

    bomb = zlib.compress(b"\x00" * 10_000_000, 9)
    assert len(bomb) < 65_000
    assert rejected(with_body(bomb)) == "compressed payload too large"
    assert rejected(with_body(gzip.compress(b"A" * (MAX_INFLATED + 1)))) == "compressed payload too large"
    assert accepted(with_body(zlib.compress(b"A" * MAX_INFLATED))).payload == b"A" * MAX_INFLATED
    assert rejected(with_body(zlib.compress(SAMPLE.payload)[:-6])) == "bad compressed payload"  # truncated
    assert rejected(with_body(b"\x78\x9c not zlib at all")) == "bad compressed payload"


def test_builders_reject_what_does_not_fit() -> None:
    with pytest.raises(ValueError, match="HEPv3"):
        build_hep3(dataclasses.replace(SAMPLE, payload=b"x" * 65_530))
    with pytest.raises(ValueError, match="HEPv3"):
        build_hep3(dataclasses.replace(SAMPLE, src_ip="not an ip"))
    with pytest.raises(ValueError, match="HEPv2"):
        build_hep2(dataclasses.replace(SAMPLE, capture_id=70_000))
    with pytest.raises(ValueError, match="HEPv1"):
        build_hep2(dataclasses.replace(SAMPLE, family=7), version=1)


def test_largest_packet() -> None:
    overhead = len(build_hep3(dataclasses.replace(SAMPLE, payload=b"")))
    packet = dataclasses.replace(SAMPLE, payload=b"x" * (MAX_PACKET - overhead))
    data = build_hep3(packet)
    assert len(data) == MAX_PACKET
    assert accepted(data) == packet


# --- TCP stream -----------------------------------------------------------------------------------


def feed_all(stream: HepStream, data: bytes, cuts: list[int]) -> list[HepPacket | BadPacket]:
    out: list[HepPacket | BadPacket] = []
    start = 0
    for cut in [*sorted(set(cuts)), len(data)]:
        out += stream.feed(data[start:cut], RECEIVED)
        assert stream.pending < MAX_PACKET
        start = cut
    return out


def chunk_length_broken(packet_bytes: bytes) -> bytes:
    """The packet with its first chunk's length set to 3: header fine, chunks bad."""
    return packet_bytes[:10] + b"\x00\x03" + packet_bytes[12:]


@settings(FAST, max_examples=100)
@given(st.lists(hep3_cases(), min_size=2, max_size=6), st.data())
def test_stream_split_anywhere(
    cases: list[tuple[HepPacket, list[tuple[int, int, bytes]], list[int]]], data: st.DataObject
) -> None:
    wire = [build_hep3(p, chunk_order=order, extra_chunks=extras) for p, extras, order in cases]
    bad_at = data.draw(st.none() | st.integers(0, len(wire) - 1))
    if bad_at is not None:
        wire[bad_at] = chunk_length_broken(wire[bad_at])
    blob = b"".join(wire)
    cuts = data.draw(st.lists(st.integers(0, len(blob)), max_size=12))
    stream = HepStream()
    got = feed_all(stream, blob, cuts)
    expected: list[HepPacket | BadPacket] = [p for p, _, _ in cases]
    if bad_at is not None:
        expected[bad_at] = BadPacket("chunk length < 6")
    assert got == expected
    assert not stream.broken
    assert stream.pending == 0


def test_stream_one_byte_at_a_time() -> None:
    first = build_hep3(SAMPLE)
    second = build_hep3(dataclasses.replace(SAMPLE, src_port=1, payload=b"BYE"), compress=True)
    blob = first + chunk_length_broken(first) + second
    stream = HepStream()
    got = feed_all(stream, blob, list(range(len(blob))))
    assert got == [
        SAMPLE,
        BadPacket("chunk length < 6"),
        dataclasses.replace(SAMPLE, src_port=1, payload=b"BYE", compressed=True),
    ]


def test_stream_fixture_packets_and_clock() -> None:
    stream = HepStream(clock=lambda: RECEIVED)
    hep3 = fixture("heplify-server-decoder-test-hep3.hex")
    spec = fixture("spec-rev37-example.hex")
    assert stream.feed(hep3 + spec[:50]) == [decode(hep3, 0.0)]
    assert stream.pending == 50
    assert stream.feed(spec[50:]) == [decode(spec, 0.0)]


@pytest.mark.parametrize(
    ("garbage", "reason"),
    [
        (b"GET / HTTP/1.1\r\n", "bad magic"),
        (b"\x01\x10\x02\x11", "HEPv1/v2 on a stream"),
        (b"\x02", "HEPv1/v2 on a stream"),
        (b"HEP3\x00\x05", "header length < 6"),
        (b"HEQ", "bad magic"),
        (b"\x1f\x8b\x08", "bad magic"),
    ],
)
def test_stream_bad_header_breaks_it(garbage: bytes, reason: str) -> None:
    good = build_hep3(SAMPLE)
    stream = HepStream()
    assert stream.feed(good + good[:3], RECEIVED) == [SAMPLE]
    assert stream.feed(good[3:] + garbage + good, RECEIVED) == [SAMPLE]
    assert stream.broken
    assert stream.broken_reason == reason
    assert stream.pending == 0
    assert stream.feed(good, RECEIVED) == []


def test_stream_buffer_is_bounded() -> None:
    big = build_hep3(dataclasses.replace(SAMPLE, payload=b"x" * 60_000))
    stream = HepStream()
    blob = big * 20
    got = feed_all(stream, blob, list(range(0, len(blob), 65_536)))
    assert len(got) == 20
    assert all(p == got[0] for p in got)
    # a header announcing 65535 bytes, then data dribbling in: only that packet is buffered
    stream = HepStream()
    assert stream.feed(b"HEP3\xff\xff", RECEIVED) == []
    got = []
    for _ in range(65):
        got += stream.feed(b"\x00" * 1000, RECEIVED)
        assert stream.pending < MAX_PACKET
    assert got == []
    assert stream.feed(b"\x00" * 529, RECEIVED) == [BadPacket("chunk length < 6")]
    assert stream.pending == 0
    assert stream.feed(b"\x00" * 1000, RECEIVED) == []
    assert stream.broken


def test_fixture_copies_match_their_recorded_digests() -> None:
    """The copies under tests/fixtures/hep are the public bytes their README cites, unchanged."""
    readme = (FIXTURES / "README.md").read_text()
    recorded = {
        name: digest for digest, name in re.findall(r"^- `([0-9a-f]{64})` `([^`]+\.hex)`$", readme, re.M)
    }
    on_disk = {path.name: hashlib.sha256(path.read_bytes()).hexdigest() for path in FIXTURES.glob("*.hex")}
    assert len(on_disk) == 3
    assert on_disk == recorded
