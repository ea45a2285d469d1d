"""Memory per sighting: RSS growth of a fresh process that fills a ``Sightings`` to its cap.

    python bench/sightings_memory.py [--sightings 100000] [--churn 0]

Traffic as a site's phones make it: each phone (a distinct public address) registers (REGISTER,
401, REGISTER with credentials, 200), some also send OPTIONS or SUBSCRIBE and some place a call
(INVITE), so a sender has 1-3 methods, one user agent out of 12 models, 1-3 Call-IDs and 1-2
users. Every packet goes through ``parse_sip`` from its bytes, so each sampled value is a fresh
string as it is on the packet path, and so are the two addresses (the HEP decoder's text). Mirror
mode with 20,000 listed addresses (none of the phones).

The RSS figure comes from a child process (``--child``): ``/proc/self/statm`` after
``gc.collect()`` before the store is created and after it holds every phone, divided by the number
of sightings; no tracemalloc runs there. The breakdown then walks the store with
``sys.getsizeof`` (each object counted once, so a string shared by many sightings counts once).

``--churn N``: N more phones after the store is full, each replacing the least recently seen one,
as a long-running agent's store is: the figure then includes what replacing costs (the dict's
entry table used up by deletions and inserts, allocator pools left part-used).
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import random
import subprocess
import sys
from collections import defaultdict
from pathlib import Path
from typing import Any

from common import machine, public_ips, table

from hepsub_apiban.apiban.lookups import LookupService
from hepsub_apiban.apiban.mirror import Mirror
from hepsub_apiban.core.addresses import NetworkSet
from hepsub_apiban.formats.sip import parse_sip
from hepsub_apiban.ingest.sightings import Sightings

SERVER = "80.2.2.2"
AGENTS = [
    "Yealink SIP-T46S 66.86.0.15", "Yealink SIP-T54W 96.86.0.100", "Grandstream GXP2170 1.0.11.23",
    "Cisco/SPA504G-7.6.2c", "PolycomVVX-VVX_411-UA/6.4.3.5018", "snom D785/10.1.141.13",
    "Fanvil X4U 2.12.1", "Linphone/5.2.0 (belle-sip/5.2.0)", "Zoiper rv2.10.19.6",
    "MicroSIP/3.21.3", "Gigaset N670 IP PRO/83.V2.39.0", "Obihai-OBi200-3.2.2",
]  # fmt: skip


def _message(
    first_line: str, phone: str, user: str, call_id: str, cseq: str, agent: str, extra: str
) -> bytes:
    return (
        f"{first_line}\r\nVia: SIP/2.0/UDP {phone}:5060;branch=z9hG4bK-{cseq.split()[0]}{call_id[:6]}\r\n"
        f"From: <sip:{user}@{SERVER}>;tag=ab12\r\nTo: <sip:{user}@{SERVER}>\r\nCall-ID: {call_id}\r\n"
        f"CSeq: {cseq}\r\nUser-Agent: {agent}\r\n{extra}Content-Length: 0\r\n\r\n"
    ).encode()


def phone_packets(rng: random.Random, phone: str) -> list[tuple[str, str, bytes]]:
    """(source, destination, SIP bytes) of one phone's registration and what else it does."""
    agent = rng.choice(AGENTS)
    user = str(rng.randrange(100, 100_000))
    call_id = f"{rng.getrandbits(64):016x}-{rng.getrandbits(32):08x}@{phone}"
    auth = f'Authorization: Digest username="{user}", realm="{SERVER}", nonce="n1", response="r"\r\n'
    packets = [
        (
            phone,
            SERVER,
            _message(f"REGISTER sip:{SERVER} SIP/2.0", phone, user, call_id, "1 REGISTER", agent, ""),
        ),
        (SERVER, phone, _message("SIP/2.0 401 Unauthorized", phone, user, call_id, "1 REGISTER", "srv", "")),
        (
            phone,
            SERVER,
            _message(f"REGISTER sip:{SERVER} SIP/2.0", phone, user, call_id, "2 REGISTER", agent, auth),
        ),
        (SERVER, phone, _message("SIP/2.0 200 OK", phone, user, call_id, "2 REGISTER", "srv", "")),
    ]
    for method in rng.sample(["OPTIONS", "SUBSCRIBE", "INVITE", ""], rng.randrange(0, 3)):
        if not method:
            continue
        other_call = f"{rng.getrandbits(64):016x}@{phone}"
        callee = str(rng.randrange(100, 100_000)) if method == "INVITE" else user
        first_line = f"{method} sip:{callee}@{SERVER} SIP/2.0"
        packets.append(
            (phone, SERVER, _message(first_line, phone, user, other_call, f"1 {method}", agent, auth))
        )
    return packets


def statm_bytes() -> int:
    return int(Path("/proc/self/statm").read_text().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def fill(count: int, churn: int = 0) -> tuple[Sightings, int]:
    """A store with ``count`` phones in it (after ``churn`` more replaced as many), and the RSS it
    added (bytes)."""
    mirror = Mirror()
    listed = public_ips(20_000, seed=11)
    mirror.add(listed, "1700000000", 1.0)
    mirror.last_full_sync = 1.0
    lookups = LookupService(None, NetworkSet(), mirror=mirror)
    skip = {SERVER, *listed}
    phones = [ip for ip in public_ips(count + churn + 1000, seed=29) if ip not in skip][: count + churn]
    rng = random.Random(7)
    gc.collect()
    before = statm_bytes()
    sightings = Sightings(lookups, capacity=count + 1)  # the phones and the server
    seen_at = 1_700_000_000.0
    for phone in phones:
        for src, dst, raw in phone_packets(rng, phone):
            info = parse_sip(raw)
            assert info is not None
            seen_at += 0.001
            # Fresh address strings, as the decoder makes them (the store keeps the first one).
            sightings.record(src.encode().decode(), dst.encode().decode(), info, seen_at)
    del phones
    gc.collect()
    return sightings, statm_bytes() - before


def breakdown(sightings: Sightings) -> dict[str, float]:
    """Bytes per sighting by part, each object counted once (sys.getsizeof)."""
    seen: set[int] = set()
    parts: dict[str, int] = defaultdict(int)

    def size(part: str, obj: object) -> None:
        if id(obj) not in seen:
            seen.add(id(obj))
            parts[part] += sys.getsizeof(obj)

    stores = [sightings._ordinary, sightings._protected]
    for items in stores:
        parts["store (OrderedDict per entry)"] += sys.getsizeof(items)
    names = [n for n in type(next(iter(sightings.values()))).__slots__ if n != "__weakref__"]  # type: ignore[attr-defined]
    for sighting in sightings.values():
        size("Sighting object", sighting)
        for name in names:
            _walk(size, name, getattr(sighting, name))
    return {part: total / len(sightings) for part, total in parts.items()}


def _walk(size: Any, name: str, value: object) -> None:
    if value is None or isinstance(value, bool) or (isinstance(value, int) and -5 <= value <= 256):
        return  # shared singletons
    size(f"{name}", value)
    if isinstance(value, tuple | list):
        for item in value:
            _walk(size, f"{name} (items)", item)
    elif isinstance(value, dict):
        for key, item in value.items():
            _walk(size, f"{name} (items)", key)
            _walk(size, f"{name} (items)", item)


def child(count: int, churn: int) -> None:
    sightings, grown = fill(count, churn)
    result = {"sightings": len(sightings), "rss": grown, "parts": breakdown(sightings)}
    print(json.dumps(result))


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--sightings", type=int, default=100_000)
    parser.add_argument("--churn", type=int, default=0, help="phones replacing others once the store is full")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(args.sightings, args.churn)
        return
    output = subprocess.run(
        [sys.executable, __file__, "--child", "--sightings", str(args.sightings), "--churn", str(args.churn)],
        check=True,
        capture_output=True,
        text=True,
    ).stdout
    result = json.loads(output)
    per = result["rss"] / result["sightings"]
    print(f"machine: {machine()}")
    print(
        f"{result['sightings']:,} sightings (after {args.churn:,} replaced): "
        f"RSS +{result['rss'] / 2**20:.1f} MiB, {per:,.0f} B per sighting"
    )
    rows = sorted(result["parts"].items(), key=lambda item: -item[1])
    listed = sum(value for _, value in rows)
    print(
        table(
            ["part (sys.getsizeof, each object once)", "bytes per sighting"],
            [*[[name, f"{value:,.0f}"] for name, value in rows], ["sum", f"{listed:,.0f}"],
             ["RSS not accounted for (allocator rounding, free lists, arenas)", f"{per - listed:,.0f}"]],
        )
    )  # fmt: skip


if __name__ == "__main__":
    main()
