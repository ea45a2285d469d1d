"""The link layer of a capture: from a frame of a given link type to the IP packet it carries.

Ethernet (with any number of VLAN tags), Linux cooked capture v1 and v2, raw IP and BSD loopback;
``_LINK_TYPES`` maps the pcap link type numbers to them. A frame that carries no IP is None.
"""

from __future__ import annotations

from collections.abc import Callable

from .base import _u16

_ETHERTYPE_IPV4, _ETHERTYPE_IPV6 = 0x0800, 0x86DD
_VLAN_TAGS = frozenset({0x8100, 0x88A8, 0x9100})  # 802.1Q, 802.1ad and the old QinQ value


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
