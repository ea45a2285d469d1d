"""Per-packet cost of the sighting update, in process: ordinary traffic and a flood of spoofed sources.

    python bench/sightings.py [--flood 1000000] [--capacity 100000]

The step after decoding and SIP extraction: ``Sightings.record`` for one SIP REGISTER (sender and
receiver), mirror mode with 20,000 listed addresses. Five cases: a known unlisted sender to the
site's public address, the same to a private address, a known listed sender, a known sender with a
new Call-ID in every packet (both Call-ID samples full, as the site's SBC's is in real traffic), and
a flood where every packet comes from a new spoofed source into a full store (``--capacity``), after
one listed sender was seen. Beside each, the floor a bare ``OrderedDict``
LRU needs for the same bookkeeping (probe + move to end; insert + evict), measured in the same run.
The flood also reports whether the listed sender is still remembered and the growth of the
process' peak RSS. Run it against another checkout with ``PYTHONPATH=<checkout>`` to compare.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import socket
import time
import timeit
from collections import OrderedDict
from pathlib import Path

from common import machine, public_ips, table

from hepsub_apiban.apiban.lookups import LookupService
from hepsub_apiban.apiban.mirror import Mirror
from hepsub_apiban.core.addresses import NetworkSet
from hepsub_apiban.formats.sip import SipInfo, parse_sip
from hepsub_apiban.ingest.sightings import Sightings

DST = "80.2.2.2"  # the site's public SIP address (not in the listed sample)
PRIVATE_DST = "192.168.1.10"  # its private side
REGISTER = (
    f"REGISTER sip:{DST} SIP/2.0\r\nVia: SIP/2.0/UDP 45.0.0.1:5060;branch=z9hG4bK-1;rport\r\n"
    f"From: <sip:100@{DST}>;tag=1\r\nTo: <sip:100@{DST}>\r\nCall-ID: bench-1@45.0.0.1\r\n"
    "CSeq: 1 REGISTER\r\nUser-Agent: friendly-scanner\r\nMax-Forwards: 70\r\nContent-Length: 0\r\n\r\n"
).encode()


def per_call(function: object, number: int = 100_000) -> float:
    """Seconds per call, best of 5."""
    return min(timeit.repeat(function, number=number, repeat=5)) / number  # type: ignore[arg-type]


def peak_rss_kib() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1])
    return 0


def store(listed: list[str], capacity: int) -> Sightings:
    mirror = Mirror()
    mirror.add(listed, "1700000000", 1.0)
    mirror.last_full_sync = 1.0
    return Sightings(LookupService(None, NetworkSet(), mirror=mirror), capacity=capacity)


def spoofed(count: int) -> list[str]:
    """``count`` distinct public addresses from 45.0.0.0 up, none of them listed (seeded sample)."""
    return [socket.inet_ntoa((0x2D000000 + n).to_bytes(4, "big")) for n in range(count)]


def floor_repeat() -> float:
    lru: OrderedDict[str, object] = OrderedDict((f"k{n}", n) for n in range(1000))

    def step() -> None:
        for key in ("k1", "k2"):  # sender and receiver
            lru.get(key)
            lru.move_to_end(key)

    return per_call(step)


def floor_flood(keys: list[str], capacity: int) -> float:
    lru: OrderedDict[str, object] = OrderedDict()
    start = time.perf_counter()
    for key in keys:
        lru.get(key)
        lru[key] = key
        if len(lru) > capacity:
            lru.popitem(last=False)
        lru.get(DST)
    return (time.perf_counter() - start) / len(keys)


def new_call_ids(sightings: Sightings, infos: list[SipInfo]) -> float:
    """Seconds per packet from one sender, each with its own Call-ID, best of 5 passes."""
    record = sightings.record
    best = float("inf")
    for _ in range(5):
        start = time.perf_counter()
        for info in infos:
            record("45.33.2.3", DST, info, 1.0)
        best = min(best, (time.perf_counter() - start) / len(infos))
    return best


def flood(sightings: Sightings, info: SipInfo, sources: list[str], survivor: str) -> tuple[float, bool]:
    sightings.record(survivor, DST, info, 1.0)
    record = sightings.record
    start = time.perf_counter()
    for src in sources:
        record(src, DST, info, 2.0)
    elapsed = time.perf_counter() - start
    kept = sightings.get(survivor)
    return elapsed / len(sources), kept is not None and kept.listed is True


async def measure(args: argparse.Namespace) -> list[list[str]]:
    info = parse_sip(REGISTER)
    assert info is not None
    listed = public_ips(20_000, seed=11)
    steady = store(listed, args.capacity)
    assert DST not in listed
    unlisted_cost = per_call(lambda: steady.record("45.33.2.1", DST, info, 1.0))
    private_cost = per_call(lambda: steady.record("45.33.2.1", PRIVATE_DST, info, 1.0))
    listed_cost = per_call(lambda: steady.record(listed[0], DST, info, 1.0))
    calls = [parse_sip(REGISTER.replace(b"bench-1@", f"bench-{n}@".encode())) for n in range(20_000)]
    new_call_cost = new_call_ids(steady, [c for c in calls if c is not None])
    repeat_floor = floor_repeat()
    sources = spoofed(args.flood)
    before = peak_rss_kib()
    flooded = store(listed, args.capacity)
    flood_cost, survived = flood(flooded, info, sources, listed[1])
    grown = peak_rss_kib() - before
    flood_floor = floor_flood(sources, args.capacity)
    us = 1e6
    return [
        ["known unlisted sender + public receiver", f"{unlisted_cost * us:.2f} us",
         f"{repeat_floor * us:.2f} us", f"{unlisted_cost / repeat_floor:.1f} x", "-"],
        ["known unlisted sender + private receiver", f"{private_cost * us:.2f} us",
         f"{repeat_floor * us:.2f} us", f"{private_cost / repeat_floor:.1f} x", "-"],
        ["known listed sender + public receiver", f"{listed_cost * us:.2f} us", f"{repeat_floor * us:.2f} us",
         f"{listed_cost / repeat_floor:.1f} x", "-"],
        ["known sender, new Call-ID each", f"{new_call_cost * us:.2f} us", f"{repeat_floor * us:.2f} us",
         f"{new_call_cost / repeat_floor:.1f} x", "-"],
        [f"flood: {args.flood:,} new spoofed senders, cap {args.capacity:,}", f"{flood_cost * us:.2f} us",
         f"{flood_floor * us:.2f} us", f"{flood_cost / flood_floor:.1f} x",
         f"{'yes' if survived else 'NO'}; kept {len(flooded):,}, peak RSS +{grown / 1024:.0f} MiB"],
    ]  # fmt: skip


def main() -> None:
    logging.disable(logging.WARNING)  # the listed senders' warnings are not what is measured
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--flood", type=int, default=1_000_000)
    parser.add_argument("--capacity", type=int, default=100_000)
    rows = asyncio.run(measure(parser.parse_args()))
    print(f"machine: {machine()}")
    print(
        table(
            ["sighting update (one SIP packet)", "per packet", "bare OrderedDict LRU", "ratio",
             "listed sender kept after the flood"],
            rows,
        )
    )  # fmt: skip


if __name__ == "__main__":
    main()
