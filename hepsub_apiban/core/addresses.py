"""IP address parsing and classification, done once per address and cheaply.

Every address is parsed once into an ``Addr``: its canonical text (IPv6 has many spellings, and
``::ffff:a.b.c.d`` is an IPv4 address in disguise), its version and its integer value. Dotted
IPv4, by far the common case, takes a fast path: ``inet_pton`` rejects every non-canonical
spelling (leading zeros, short forms), so text it accepts is already canonical. Network
membership (non-routable ranges, the allow-list) is a binary search over merged integer ranges.
Python's ``ipaddress`` costs ~3 us to parse and ~1 us per ``is_*`` property, which would be most
of an enrichment answer's budget.
"""

from __future__ import annotations

import ipaddress
import socket
from bisect import bisect_right
from collections.abc import Iterable
from typing import NamedTuple

IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network

_AF_INET = socket.AF_INET
_inet_pton = socket.inet_pton
# NamedTuple's generated __new__ is a Python-level function; tuple.__new__ builds the same object
# several times faster, and parsing runs for every IP of every enrichment request.
_tuple_new = tuple.__new__


class Addr(NamedTuple):
    text: str  # canonical form
    version: int
    value: int


def parse_ip(text: object) -> Addr | None:
    """The address in ``text`` (``1.2.3.4``, ``2001:db8::1``, ``[2001:db8::1]``), or None."""
    if not isinstance(text, str):
        return None
    try:
        return _tuple_new(Addr, (text, 4, int.from_bytes(_inet_pton(_AF_INET, text), "big")))
    except OSError:
        return _parse_slow(text)
    except ValueError:  # inet_pton refuses an embedded NUL with ValueError, not OSError
        return None


def _parse_slow(text: str) -> Addr | None:
    candidate = text.strip()
    if candidate.startswith("[") and candidate.endswith("]"):
        candidate = candidate[1:-1]
    if not candidate or len(candidate) > 45 or "%" in candidate:
        return None
    try:
        address = ipaddress.ip_address(candidate)
    except ValueError:
        return None
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        address = address.ipv4_mapped
    return Addr(str(address), address.version, int(address))


def canonical(text: object) -> str | None:
    address = parse_ip(text)
    return None if address is None else address.text


class NetworkSet:
    """A set of IPv4/IPv6 networks; membership is a binary search on merged integer ranges."""

    def __init__(self, networks: Iterable[IPNetwork] = ()) -> None:
        self.networks = tuple(networks)
        self._starts: dict[int, list[int]] = {}
        self._ends: dict[int, list[int]] = {}
        for version in (4, 6):
            merged: list[list[int]] = []
            for start, end in sorted(
                (int(n.network_address), int(n.broadcast_address))
                for n in self.networks
                if n.version == version
            ):
                if merged and start <= merged[-1][1] + 1:
                    merged[-1][1] = max(merged[-1][1], end)
                else:
                    merged.append([start, end])
            self._starts[version] = [start for start, _ in merged]
            self._ends[version] = [end for _, end in merged]

    def __contains__(self, address: Addr) -> bool:
        index = bisect_right(self._starts[address.version], address.value) - 1
        return index >= 0 and address.value <= self._ends[address.version][index]

    def __len__(self) -> int:
        return len(self.networks)


# Addresses no attacker on the internet can send from: IANA special-purpose blocks, multicast,
# reserved space, and for IPv6 everything outside global unicast 2000::/3. This is Python's
# ``not is_global or is_multicast or is_reserved`` as one table, with 192.0.0.0/24 taken whole
# (Python's answer for it changed between 3.11 patch releases).
NON_ROUTABLE = NetworkSet(
    ipaddress.ip_network(n)
    for n in (
        "0.0.0.0/8",
        "10.0.0.0/8",
        "100.64.0.0/10",
        "127.0.0.0/8",
        "169.254.0.0/16",
        "172.16.0.0/12",
        "192.0.0.0/24",
        "192.0.2.0/24",
        "192.168.0.0/16",
        "198.18.0.0/15",
        "198.51.100.0/24",
        "203.0.113.0/24",
        "224.0.0.0/4",
        "240.0.0.0/4",
        "::/3",
        "4000::/2",
        "8000::/1",
        "2001::/23",
        "2001:db8::/32",
    )
)


# First octets of every IPv4 block in NON_ROUTABLE: an address outside them is routable
# without a search. That is most addresses an attacker sends from.
_V4_LOCAL_FIRST_OCTETS = frozenset(
    octet
    for n in NON_ROUTABLE.networks
    if n.version == 4
    for octet in range(int(n.network_address) >> 24, (int(n.broadcast_address) >> 24) + 1)
)


def is_non_routable(address: Addr) -> bool:
    if address.version == 4 and (address.value >> 24) not in _V4_LOCAL_FIRST_OCTETS:
        return False
    return address in NON_ROUTABLE
