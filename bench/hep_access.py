"""Cost per HEP datagram of hep.allow_from and hep.auth_key on the UDP receive path.

    python bench/hep_access.py

In process, ``timeit`` best of 5 in each of 3 interleaved rounds: the collector's UDP protocol
handles a HEP3 packet carrying a SIP 200 OK with SDP (decode + SIP extraction + sighting update,
mirror verdicts), as ``HepCollector.udp_protocol`` builds it for each configuration. The first row
is the path with neither setting (no check at all, the one ``ingest.py`` measures); the others are
ratios against it, measured in the same run. Refused datagrams are counted in ``Refusals`` (their
log lines are rate-limited, and silenced here).
"""

from __future__ import annotations

import asyncio
import dataclasses
import ipaddress
import logging
import timeit
from collections.abc import Callable

from common import machine, table
from decode import SIP_200

from hepsub_apiban.apiban.lookups import LookupService
from hepsub_apiban.apiban.mirror import Mirror
from hepsub_apiban.core.access import Refusals
from hepsub_apiban.core.addresses import NetworkSet
from hepsub_apiban.core.config import HepSettings
from hepsub_apiban.formats.hep import HepPacket, build_hep2, build_hep3
from hepsub_apiban.ingest.collector import HepCollector
from hepsub_apiban.ingest.sightings import Sightings

KEY = "bench-hep-key-0123456789abcdef"
NUMBER = 20_000
ROUNDS = 3
SENDERS = [f"10.{n >> 8 & 255}.{n & 255}.1" for n in range(10_000)]  # for the spoofed-source rows


def packet(key: str | None) -> bytes:
    hep = HepPacket(
        3, 2, 17, "45.33.2.1", "192.168.245.250", 5060, 5060, 1_520_606_104, 119_540, 1, 0, SIP_200
    )
    return build_hep3(dataclasses.replace(hep, auth_key=None if key is None else key.encode()))


def protocol(settings: HepSettings) -> Callable[[bytes, tuple[str, int]], None]:
    """The datagram callback the collector installs for ``settings``, on a fresh store."""
    mirror = Mirror()
    mirror.last_full_sync = 1.0
    sightings = Sightings(LookupService(None, NetworkSet(), mirror=mirror))
    collector = HepCollector(sightings, settings, lambda: 1.0, Refusals())
    return collector.udp_protocol().datagram_received  # type: ignore[return-value]


def per_datagram(receive: Callable[[bytes, tuple[str, int]], None], data: bytes, senders: list[str]) -> float:
    """Seconds per datagram, best of 5, cycling through ``senders``."""
    addrs = [(s, 40000) for s in senders]
    count = len(addrs)
    state = {"i": 0}

    def one() -> None:
        i = state["i"]
        receive(data, addrs[i % count])
        state["i"] = i + 1

    return min(timeit.repeat(one, number=NUMBER, repeat=5)) / NUMBER


async def main() -> None:
    logging.disable(logging.WARNING)
    allow = (ipaddress.ip_network("10.0.0.0/8"), ipaddress.ip_network("192.0.2.0/24"))
    elsewhere = (ipaddress.ip_network("192.0.2.0/24"),)
    keyed, unkeyed, wrong = packet(KEY), packet(None), packet("bench-hep-key-0123456789abcdeX")
    v1 = build_hep2(HepPacket(1, 2, 17, "45.33.2.1", "192.168.245.250", 5060, 5060, 0, 0, 1, 0, SIP_200))
    one = ["10.0.0.5"]
    cases: list[tuple[str, HepSettings, bytes, list[str]]] = [
        ("neither setting (no check; the ingest path)", HepSettings(), unkeyed, one),
        ("hep.allow_from, sender allowed", HepSettings(allow_from=allow), unkeyed, one),
        ("hep.auth_key, right key", HepSettings(auth_key=KEY), keyed, one),
        ("both, allowed sender with the right key", HepSettings(allow_from=allow, auth_key=KEY), keyed, one),
        ("both, 10,000 allowed senders in turn", HepSettings(allow_from=allow, auth_key=KEY), keyed, SENDERS),
        ("refused: sender not in hep.allow_from", HepSettings(allow_from=elsewhere), keyed, one),
        ("refused: 10,000 spoofed senders outside", HepSettings(allow_from=elsewhere), keyed, SENDERS),
        ("refused: wrong key", HepSettings(auth_key=KEY), wrong, one),
        ("refused: no key", HepSettings(auth_key=KEY), unkeyed, one),
        ("refused: HEPv1 while a key is set", HepSettings(auth_key=KEY), v1, one),
    ]
    # Rounds interleave the cases, so a burst of load elsewhere on the machine costs each case a
    # round, not the whole figure; each case keeps its best round.
    receivers = [protocol(settings) for _, settings, _, _ in cases]
    best = [float("inf")] * len(cases)
    for _ in range(ROUNDS):
        for index, (receive, (_, _, data, senders)) in enumerate(zip(receivers, cases, strict=True)):
            best[index] = min(best[index], per_datagram(receive, data, senders))
    rows = [
        [name, f"{seconds * 1e6:.2f} us", f"{seconds / best[0]:.2f}"]
        for (name, _, _, _), seconds in zip(cases, best, strict=True)
    ]
    print(f"machine: {machine()}")
    print(
        f"HEP3 SIP 200 OK with SDP ({len(keyed)} B with the key), {NUMBER:,} datagrams, best of 5 x {ROUNDS}"
    )
    print(table(["UDP datagram path", "per datagram", "/ no check"], rows))


if __name__ == "__main__":
    asyncio.run(main())
