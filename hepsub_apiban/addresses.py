"""IP address parsing and classification, done once per address.

IPv6 has many spellings and ``::ffff:a.b.c.d`` is an IPv4 address in disguise, so every
address is parsed and turned into one canonical string before it is compared, cached or
sent anywhere.
"""

from __future__ import annotations

import ipaddress
from bisect import bisect_right
from collections.abc import Iterable

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network


def parse_ip(text: object) -> IPAddress | None:
    """The address in ``text`` (``1.2.3.4``, ``2001:db8::1``, ``[2001:db8::1]``), or None."""
    if not isinstance(text, str):
        return None
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
        return address.ipv4_mapped
    return address


def canonical(text: object) -> str | None:
    address = parse_ip(text)
    return None if address is None else str(address)


def is_non_routable(address: IPAddress) -> bool:
    """True for addresses no attacker on the internet can send from (private, loopback, ...).

    ``is_global`` alone lets multicast and the IPv4 reserved block through, which APIBAN
    cannot list either.
    """
    return (
        not address.is_global
        or address.is_multicast
        or address.is_reserved
        or address.is_unspecified
        or address.is_loopback
        or address.is_link_local
    )


class AllowList:
    """IPs/CIDRs the operator trusts; a membership test is a binary search on merged ranges."""

    def __init__(self, networks: Iterable[IPNetwork] = ()) -> None:
        self.networks = tuple(networks)
        self._starts: dict[int, list[int]] = {}
        self._ends: dict[int, list[int]] = {}
        for version in (4, 6):
            ranges = sorted(
                (int(n.network_address), int(n.broadcast_address))
                for n in self.networks
                if n.version == version
            )
            merged: list[tuple[int, int]] = []
            for start, end in ranges:
                if merged and start <= merged[-1][1] + 1:
                    merged[-1] = (merged[-1][0], max(merged[-1][1], end))
                else:
                    merged.append((start, end))
            self._starts[version] = [start for start, _ in merged]
            self._ends[version] = [end for _, end in merged]

    def __contains__(self, address: IPAddress) -> bool:
        starts = self._starts[address.version]
        index = bisect_right(starts, int(address)) - 1
        return index >= 0 and int(address) <= self._ends[address.version][index]

    def __len__(self) -> int:
        return len(self.networks)
