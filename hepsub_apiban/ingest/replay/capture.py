"""Capture files: reading a hex dump, a pcap or a pcapng file (gzip or not) into HEP packets.

Files are recognised by their content, not their name: classic pcap (microsecond or nanosecond,
either byte order), pcapng (several sections and interfaces), or a hex dump of one packet (the
format of the test fixtures). Frames go to ``network`` for the IP, UDP and TCP layers; what it
skipped is logged as one warning per reason. A truncated or corrupt file is a ``ReplayError``.
"""

from __future__ import annotations

import logging
import struct
import zlib
from collections.abc import Iterator
from pathlib import Path

from .base import ReplayError
from .network import _Extractor

# Its name before the split and the wings: operators' log filters use it.
log = logging.getLogger("hepsub_apiban.replay")
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
