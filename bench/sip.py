"""SIP field extraction per packet: ``parse_sip_general`` (every line split and walked, the reference)
against ``parse_sip`` (one compiled pattern reads every field; what the packet path calls).

    python bench/sip.py [--phones 10000] [--repeat 5]

Both parsers run in the same process on the same payloads, alternating, best of ``--repeat``:
the registrar traffic ``bench/ingest.py`` builds (``site_traffic``: REGISTER, 401, REGISTER with
credentials, 200, calls and a scan, as HEP packets decoded once beforehand), and the payloads of
the HEP fixtures in tests/fixtures/hep. Before timing, every payload is checked to give the
same SipInfo from both.
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable
from pathlib import Path

from common import machine, public_ips, table
from ingest import PHONES, SCANNERS, site_traffic

from hepsub_apiban.formats.hep import HepPacket, decode
from hepsub_apiban.formats.sip import SipInfo, parse_sip
from hepsub_apiban.formats.sip_reference import parse_sip_general

FIXTURES = Path(__file__).resolve().parents[1] / "tests" / "fixtures" / "hep"


def payloads_of(datagrams: list[bytes]) -> list[bytes]:
    payloads = []
    for datagram in datagrams:
        packet = decode(datagram, 0.0)
        assert isinstance(packet, HepPacket)
        payloads.append(packet.payload)
    return payloads


def per_packet_us(parse: Callable[[bytes], SipInfo | None], payloads: list[bytes], rounds: int) -> float:
    """Microseconds per payload of one pass over ``payloads``, ``rounds`` times over."""
    start = time.perf_counter()
    for _ in range(rounds):
        for payload in payloads:
            parse(payload)
    return (time.perf_counter() - start) / (rounds * len(payloads)) * 1e6


def compare(payloads: list[bytes], rounds: int, repeat: int) -> tuple[float, float]:
    for payload in payloads:
        assert parse_sip(payload) == parse_sip_general(payload), payload
    general, fast = [], []
    for _ in range(repeat):  # alternating, so both see the same load on a shared machine
        general.append(per_packet_us(parse_sip_general, payloads, rounds))
        fast.append(per_packet_us(parse_sip, payloads, rounds))
    return min(general), min(fast)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--phones", type=int, default=PHONES)
    parser.add_argument("--repeat", type=int, default=5)
    args = parser.parse_args()
    phones = public_ips(args.phones, seed=12)
    traffic = payloads_of(site_traffic(phones, public_ips(SCANNERS, seed=13)))
    fixtures = sorted(FIXTURES.glob("*.hex"))
    rows = []
    for name, payloads, rounds in [
        (f"registrar traffic ({len(traffic):,} packets)", traffic, 1),
        *[(path.name, payloads_of([bytes.fromhex(path.read_text())]), 20_000) for path in fixtures],
    ]:
        general, fast = compare(payloads, rounds, args.repeat)
        rows.append([name, f"{general:.2f} us", f"{fast:.2f} us", f"{fast / general:.2f}"])
    print(f"machine: {machine()}")
    print(table(["payloads", "parse_sip_general", "parse_sip", "parse_sip / general"], rows))


if __name__ == "__main__":
    main()
