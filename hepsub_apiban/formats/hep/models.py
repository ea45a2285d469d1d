"""What a decoded HEP packet is, and the rules both decoders share.

``HepPacket`` and ``BadPacket`` are what every decoder returns and every builder takes; the
constants name the generic chunk types and the bounds (``MAX_PACKET``, ``MAX_INFLATED``). The
helpers are rules rather than format: the receive time standing in for a missing capture time,
inflating a 0x0010 chunk within its bound, and picking the byte order of a v2 time header. They
live here so that the fast decoder (``decoder``) and the reference decoder (``declaration``) apply
exactly the same ones.
"""

from __future__ import annotations

import zlib
from dataclasses import dataclass

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
