"""Property: the HEP decoders never raise. Whatever bytes arrive, ``hep.decode`` and
``hep.parse_with_construct`` return a ``HepPacket`` or the module's own error type, ``BadPacket``,
and ``HepStream.feed`` returns a list of those, however the bytes are split; never an exception.

``decode`` ends in a catch-all that turns a bug into ``BadPacket("decoder error: ...")`` so the
collector survives one; such a result counts as a failure here, so "never an exception" is tested
for the code itself, not for that safety net. The reference decoder must also agree with the fast
one on accept/reject and on every packet accepted.

What ``tests/test_hep.py`` already covers (build/decode round trips, valid packets corrupted by
flips, cuts and splices, up to 200 random bytes, valid packets split anywhere on a stream) is not
repeated. Added here: well-framed HEP3 with random chunk headers and bodies (so the walk reaches
every chunk type, lying lengths and payload inflation rather than stopping at the magic), random
HEPv1/v2 headers of every family and length, and random bytes on a TCP stream, where splitting
must not change what comes out.
"""

from __future__ import annotations

import socket
import struct
import zlib

from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from hepsub_apiban.formats.hep import (
    MAX_PACKET,
    BadPacket,
    HepPacket,
    HepStream,
    decode,
    parse_with_construct,
)

RECEIVED = 1_700_000_000.25
PROPERTY = settings(deadline=None, suppress_health_check=[HealthCheck.too_slow], max_examples=300)

U8 = st.integers(0, 0xFF)
U16 = st.integers(0, 0xFFFF)
# Every generic type the decoders treat specially, the reserved and unknown ones, and the extremes.
CHUNK_TYPES = st.sampled_from([*range(0x00, 0x2B), 0xFFFF]) | U16
# Bodies of the sizes the fixed-size types expect, and of any other size.
BODIES = st.sampled_from(
    [b"\x02", b"\x0a", b"\x01\x01", bytes(4), b"\x7f\x00\x00\x01", bytes(16)]
) | st.binary(max_size=48)
ZLIB_SIP = zlib.compress(b"OPTIONS sip:a SIP/2.0\r\nCall-ID: x\r\n\r\n")


def one_in(n: int) -> st.SearchStrategy[bool]:
    """True about once in ``n`` draws (integers() would favour its bounds)."""
    return st.sampled_from([True] + [False] * (n - 1))


def chunk(vendor: int, chunk_type: int, body: bytes, length: int | None = None) -> bytes:
    return struct.pack("!HHH", vendor, chunk_type, len(body) + 6 if length is None else length) + body


# The chunks a packet needs to be accepted (docs/peers/hep.md#edge-cases: addresses, ports, payload).
REQUIRED = [
    chunk(0, 3, socket.inet_aton("203.0.113.7")),
    chunk(0, 4, socket.inet_aton("198.51.100.1")),
    chunk(0, 7, b"\x13\xc4"),
    chunk(0, 8, b"\x13\xc4"),
    chunk(0, 15, b"OPTIONS sip:a SIP/2.0\r\n\r\n"),
]


@st.composite
def random_chunks(draw: st.DrawFn) -> bytes:
    vendor = draw(st.sampled_from([0, 0, 0, 2, 0xFFFF]))
    chunk_type = draw(CHUNK_TYPES)
    body = draw(st.just(ZLIB_SIP) | BODIES if chunk_type == 0x10 else BODIES)
    lying = None
    if draw(one_in(10)):  # a chunk that lies about its length
        lying = draw(st.sampled_from([0, 1, 5, 6, 7, 0xFFFF]) | U16)
    return chunk(vendor, chunk_type, body, lying)


@st.composite
def framed_hep3(draw: st.DrawFn, datagram: bool = True) -> bytes:
    """b"HEP3" + a length + chunks with random headers and bodies (+ maybe the required ones).

    As a datagram, one header length in five is off and trailing bytes may follow; on a stream
    (``datagram=False``) one in twenty is off, since a wrong length ends the stream."""
    chunks = draw(st.lists(random_chunks(), max_size=12))
    if draw(st.booleans()):
        chunks = draw(st.permutations(chunks + REQUIRED))
    body = b"".join(chunks)
    length = len(body) + 6
    if draw(one_in(5 if datagram else 20)):  # off by a little, or by anything
        length = draw(st.integers(max(0, length - 8), length + 8) | U16)
    trailing = draw(st.binary(max_size=6)) if datagram else b""
    return b"HEP3" + struct.pack("!H", length & 0xFFFF) + body + trailing


@st.composite
def hep12(draw: st.DrawFn) -> bytes:
    """A random HEPv1/v2 header: version 1 or 2, any hp_l, family 2/10 or anything, then enough
    bytes (or not) for the addresses, the v2 time header and a payload."""
    version = draw(st.sampled_from([1, 2]))
    family = draw(U8) if draw(one_in(4)) else draw(st.sampled_from([2, 10]))
    head = bytes([version, draw(U8), family, draw(U8)]) + draw(st.binary(min_size=4, max_size=4))
    needed = (8 if family == 2 else 32) + (12 if version == 2 else 0)
    cut = draw(st.integers(0, needed + 1) | st.just(needed))
    return head + draw(st.binary(min_size=cut, max_size=cut)) + draw(st.binary(max_size=40))


@st.composite
def stream_pieces(draw: st.DrawFn) -> bytes:
    """Mostly framed HEP3 (a stream goes on past it), sometimes what breaks a stream."""
    kind = draw(st.sampled_from(["hep3"] * 10 + ["hep12", "junk"]))
    if kind == "hep3":
        return draw(framed_hep3(datagram=False))
    return draw(hep12() if kind == "hep12" else st.binary(max_size=300))


def check_decoders(data: bytes) -> HepPacket | BadPacket:
    fast = decode(data, RECEIVED)
    reference = parse_with_construct(data, RECEIVED)
    assert isinstance(fast, HepPacket | BadPacket)
    assert isinstance(reference, HepPacket | BadPacket)
    if isinstance(fast, BadPacket):
        assert not fast.reason.startswith("decoder error"), fast  # a bug caught by the safety net
    assert type(fast) is type(reference), (fast, reference)
    if isinstance(fast, HepPacket):
        assert fast == reference
    event("accepted" if isinstance(fast, HepPacket) else f"refused: {fast.reason}")
    return fast


@PROPERTY
@given(framed_hep3())
def test_framed_hep3_with_random_chunks_never_raises(data: bytes) -> None:
    check_decoders(data)


@PROPERTY
@given(hep12())
def test_random_hep1_and_hep2_headers_never_raise(data: bytes) -> None:
    result = check_decoders(data)
    if isinstance(result, HepPacket):
        assert result.version == data[0]
        assert result.family in (2, 10)


@PROPERTY
@given(st.lists(stream_pieces(), min_size=1, max_size=6), st.data())
def test_stream_of_random_bytes_never_raises_and_splits_do_not_matter(
    pieces: list[bytes], data: st.DataObject
) -> None:
    blob = b"".join(pieces)
    whole = HepStream()
    expected = whole.feed(blob, RECEIVED)
    cuts = sorted(set(data.draw(st.lists(st.integers(0, len(blob)), max_size=10))))
    split = HepStream()
    got: list[HepPacket | BadPacket] = []
    start = 0
    for cut in [*cuts, len(blob)]:
        got += split.feed(blob[start:cut], RECEIVED)
        assert split.pending < MAX_PACKET
        start = cut
    assert all(isinstance(result, HepPacket | BadPacket) for result in got)
    assert not any(isinstance(r, BadPacket) and r.reason.startswith("decoder error") for r in got)
    assert got == expected
    assert (split.broken, split.broken_reason, split.pending) == (
        whole.broken,
        whole.broken_reason,
        whole.pending,
    )
    if split.broken:
        assert split.pending == 0
        assert split.feed(blob, RECEIVED) == []
    event(f"broken: {split.broken_reason}" if split.broken else f"{len(got)} results")
