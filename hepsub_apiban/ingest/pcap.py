"""Classic pcap files of kept SIP packets, readable by Wireshark/tshark and tcpdump.

HEP carries the SIP message and its addresses, not the frames, so each packet is rebuilt as raw
IP (LINKTYPE_RAW: no link layer to invent) around a UDP header, with valid IPv4 header and UDP
checksums. UDP for every transport on purpose: a kept packet is one SIP message without the
stream it travelled in; a TCP header would need sequence numbers and a handshake that were never
seen, and tshark would report missing segments or try to reassemble unrelated messages, where
one UDP datagram per message decodes as SIP on its own (on any port, by the SIP heuristics).
A payload cut when it was kept is written cut, with its real length in the record and headers.
"""

from __future__ import annotations

import ipaddress
import struct
from collections.abc import Iterable
from ipaddress import IPv4Address, IPv6Address

from .evidence import EvidencePacket

MAGIC = 0xA1B2C3D4  # microsecond timestamps
LINKTYPE_RAW = 101
SNAPLEN = 65535
UDP = 17
HEADER = struct.pack("<IHHiIII", MAGIC, 2, 4, 0, 0, SNAPLEN, LINKTYPE_RAW)
_RECORD = struct.Struct("<IIII")
_UDP = struct.Struct("!HHHH")
_IPV4 = struct.Struct("!BBHHHBBH4s4s")
_IPV6 = struct.Struct("!IHBB16s16s")
_UNKNOWN = IPv4Address("0.0.0.0")
_Pair = tuple[IPv4Address, IPv4Address] | tuple[IPv6Address, IPv6Address]


def pcap_file(packets: Iterable[EvidencePacket]) -> bytes:
    """A whole pcap file: the header alone when there are no packets."""
    parts = [HEADER]
    for packet in packets:
        frame, length = _frame(packet)
        seconds = int(packet.time)
        micros = min(999_999, round((packet.time - seconds) * 1e6))
        parts.append(_RECORD.pack(seconds, micros, len(frame), length))
        parts.append(frame)
    return b"".join(parts)


def _frame(packet: EvidencePacket) -> tuple[bytes, int]:
    """The packet as raw IP + UDP, and the length it had on the wire (more when it was cut)."""
    src, dst = _addresses(packet.src_ip, packet.dst_ip)
    udp_length = min(0xFFFF, 8 + packet.length)
    payload = packet.payload
    complete = len(payload) == packet.length
    pseudo = (
        src.packed + dst.packed + struct.pack("!BBH", 0, UDP, udp_length)
        if src.version == 4
        else src.packed + dst.packed + struct.pack("!IxxxB", udp_length, UDP)
    )
    udp = _UDP.pack(packet.src_port, packet.dst_port, udp_length, 0)
    checksum = (_checksum(pseudo + udp + payload) or 0xFFFF) if complete else 0
    udp = _UDP.pack(packet.src_port, packet.dst_port, udp_length, checksum)
    if src.version == 4:
        total = min(0xFFFF, 20 + udp_length)
        header = _IPV4.pack(0x45, 0, total, 0, 0x4000, 64, UDP, 0, src.packed, dst.packed)
        header = header[:10] + struct.pack("!H", _checksum(header)) + header[12:]
        return header + udp + payload, 20 + 8 + packet.length
    header = _IPV6.pack(6 << 28, udp_length, UDP, 64, src.packed, dst.packed)
    return header + udp + payload, 40 + 8 + packet.length


def _addresses(src_text: str, dst_text: str) -> _Pair:
    """Both addresses in one family: an IPv4 one beside IPv6 is written IPv4-mapped."""
    src, dst = _address(src_text), _address(dst_text)
    if isinstance(src, IPv4Address) and isinstance(dst, IPv4Address):
        return src, dst
    return _as_v6(src), _as_v6(dst)


def _address(text: str) -> IPv4Address | IPv6Address:
    try:
        return ipaddress.ip_address(text)
    except ValueError:
        return _UNKNOWN


def _as_v6(address: IPv4Address | IPv6Address) -> IPv6Address:
    if isinstance(address, IPv6Address):
        return address
    return IPv6Address(b"\0" * 10 + b"\xff\xff" + address.packed)


def _checksum(data: bytes) -> int:
    """The Internet checksum (RFC 1071)."""
    if len(data) % 2:
        data += b"\0"
    total: int = sum(struct.unpack(f"!{len(data) // 2}H", data))
    while total > 0xFFFF:
        total = (total & 0xFFFF) + (total >> 16)
    return ~total & 0xFFFF
