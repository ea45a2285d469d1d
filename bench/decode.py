"""Decoding cost per HEP packet: the ingest fast path against the construct declaration.

    python bench/decode.py

In process, ``timeit`` best of 5, on packets built from the construct declaration: a HEP3 packet
carrying a SIP 200 OK with SDP (the heplify fixture's shape), a minimal HEP3 and a HEPv1 packet;
plus the SIP field extraction and one sighting update, the other steps of ingest.
"""

from __future__ import annotations

import asyncio
import timeit

from common import machine, table

from hepsub_apiban.apiban.lookups import LookupService
from hepsub_apiban.apiban.mirror import Mirror
from hepsub_apiban.core.addresses import NetworkSet
from hepsub_apiban.formats.hep import HepPacket, build_hep2, build_hep3, decode, parse_with_construct
from hepsub_apiban.formats.sip import parse_sip
from hepsub_apiban.ingest.sightings import Sightings

SIP_200 = (
    b"SIP/2.0 200 OK\r\nVia: SIP/2.0/UDP 192.168.111.111:5060;branch=z9hG4bK+21f113e7;rport=5060\r\n"
    b"From: <sip:100@192.168.111.111>;tag=1\r\nTo: <sip:100@192.168.111.111>;tag=2\r\n"
    b"Call-ID: BC099884@6dfcffe8\r\nCSeq: 215834489 OPTIONS\r\nServer: aaaaaa\r\n"
    b"Content-Type: application/sdp\r\nContent-Length: 78\r\n\r\n"
    + b"v=0\r\no=- 0 0 IN IP4 192.168.111.111\r\ns=-\r\nc=IN IP4 192.168.111.111\r\n"
    + b"t=0 0\r\nm=audio 0 RTP/AVP 8"
)


def packet(payload: bytes, src: str = "45.33.2.1") -> HepPacket:
    return HepPacket(3, 2, 17, src, "192.168.245.250", 5060, 5060, 1_520_606_104, 119_540, 1, 0, payload)


def rate(function: object, number: int = 20_000) -> float:
    best = min(timeit.repeat(function, number=number, repeat=5))  # type: ignore[arg-type]
    return number / best


def main() -> None:
    big, small = build_hep3(packet(SIP_200)), build_hep3(packet(b"INVITE sip:bob"))
    v1 = build_hep2(packet(SIP_200), version=1)
    rows = []
    for name, data in (
        (f"HEP3, SIP 200 OK ({len(big)} B)", big),
        (f"HEP3 minimal ({len(small)} B)", small),
        (f"HEPv1, SIP 200 OK ({len(v1)} B)", v1),
    ):
        fast = rate(lambda data=data: decode(data, 0.0))
        slow = rate(lambda data=data: parse_with_construct(data, 0.0), number=500)
        rows.append([name, f"{fast:,.0f}/s", f"{slow:,.0f}/s", f"{fast / slow:.0f} x"])
    sip = rate(lambda: parse_sip(SIP_200))
    mirror = Mirror()
    mirror.last_full_sync = 1.0
    sightings = Sightings(LookupService(None, NetworkSet(), mirror=mirror))
    info = parse_sip(SIP_200)
    assert info is not None

    async def update() -> float:
        return rate(lambda: sightings.record("45.33.2.1", "192.168.245.250", info, 1.0))

    record = asyncio.run(update())
    print(f"machine: {machine()}")
    print(table(["packet", "fast path decode", "construct declaration", "ratio"], rows))
    print(
        table(
            ["other ingest step", "per second"],
            [
                ["SIP field extraction (200 OK with SDP)", f"{sip:,.0f}/s"],
                ["sighting update (sender + receiver, mirror verdict)", f"{record:,.0f}/s"],
            ],
        )
    )


if __name__ == "__main__":
    main()
