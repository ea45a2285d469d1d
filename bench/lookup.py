"""Lookup cost per IP from the mirror, and the agent's memory with a large list.

    python bench/lookup.py [--listed 20000] [--memory-listed 50000]

Lookup cost is measured in this process (no I/O is involved): per IP, from the string homer-app
sends to the verdict (parse + classify + mirror probe), and from an already parsed address, for a
mix of listed, clean and private addresses; Python's own ``ipaddress.ip_address`` parse is shown
as the baseline. Memory is the resident set (VmRSS) of a real ``hepsub-apiban serve`` process,
pinned to core 0, once it has loaded a snapshot of N listed IPs, against the same process with an
empty list.
"""

from __future__ import annotations

import argparse
import asyncio
import ipaddress
import random
import tempfile
import time
import timeit
from pathlib import Path

import aiohttp
from common import PYTHON, agent_env, free_port, machine, pinned, public_ips, rss_kib, table, write_snapshot

from hepsub_apiban.apiban.lookups import LookupService
from hepsub_apiban.apiban.mirror import Mirror
from hepsub_apiban.core.addresses import NetworkSet, parse_ip

SERVER_CORE = 0


def lookup_costs(listed_count: int) -> list[list[str]]:
    pool = public_ips(listed_count + 5000, seed=2)
    listed, clean = pool[:listed_count], pool[listed_count:]
    mirror = Mirror()
    mirror.add(listed, "1700000000", time.time())
    mirror.last_full_sync = time.time()
    service = LookupService(None, NetworkSet([ipaddress.ip_network("198.51.100.0/24")]), mirror=mirror)
    rng = random.Random(5)
    private = [f"10.{rng.randrange(256)}.{rng.randrange(256)}.{rng.randrange(256)}" for _ in range(1000)]
    texts = rng.sample(listed, 4000) + rng.sample(clean, 4000) + private + ["2a01:4f8::5"] * 200
    rng.shuffle(texts)
    parsed = [parse_ip(t) for t in texts]
    assert all(p is not None for p in parsed)
    answer, parse = service.answer_now, parse_ip

    def from_text() -> None:
        for text in texts:
            answer(parse(text))  # type: ignore[arg-type]

    def from_parsed() -> None:
        for address in parsed:
            answer(address)  # type: ignore[arg-type]

    def python_parse() -> None:
        for text in texts:
            ipaddress.ip_address(text)

    rows = []
    for name, function in (
        ("string -> verdict (parse + classify + probe)", from_text),
        ("parsed address -> verdict", from_parsed),
        ("baseline: ipaddress.ip_address(string) alone", python_parse),
    ):
        best = min(timeit.repeat(function, number=20, repeat=5))
        rows.append([name, f"{best / (20 * len(texts)) * 1e9:,.0f} ns"])
    return rows


async def rss_after_load(listed_count: int) -> int:
    with tempfile.TemporaryDirectory(prefix="hepsub-bench-") as tmp:
        feed_url = "http://127.0.0.1:9"  # never answers: the list comes from the snapshot
        state = Path(tmp) / "state"
        write_snapshot(state, feed_url, public_ips(listed_count, seed=3) if listed_count else [], time.time())
        port = free_port()
        env = agent_env(feed_url, state, port, log_level="error")
        argv = pinned(SERVER_CORE, [PYTHON, "-m", "hepsub_apiban", "serve"])
        process = await asyncio.create_subprocess_exec(*argv, env=env)
        try:
            await _until_ready(f"http://127.0.0.1:{port}/api/v1/status", listed_count)
            return rss_kib(process.pid)
        finally:
            process.terminate()
            await process.wait()


async def _until_ready(url: str, entries: int) -> None:
    async with aiohttp.ClientSession() as session:
        for _ in range(300):
            try:
                async with session.get(url) as response:
                    status = await response.json()
                    if status["mirror"]["entries"] == entries:
                        return
            except aiohttp.ClientError:
                pass
            await asyncio.sleep(0.1)
    raise RuntimeError("the agent did not load its snapshot")


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--listed", type=int, default=20_000)
    parser.add_argument("--memory-listed", type=int, default=50_000)
    args = parser.parse_args()
    print(f"machine: {machine()}")
    print(
        f"lookup cost per IP, {args.listed:,} listed in the mirror; "
        "mix: 40% listed, 40% clean, 10% private, 2% IPv6"
    )
    print(table(["path", "per IP (best of 5)"], lookup_costs(args.listed)))
    empty = asyncio.run(rss_after_load(0))
    full = asyncio.run(rss_after_load(args.memory_listed))
    print()
    print(
        "memory of `hepsub-apiban serve` (VmRSS) after loading its list from a snapshot, "
        f"on core {SERVER_CORE}"
    )
    print(
        table(
            ["listed IPs", "RSS", "per listed IP"],
            [
                ["0", f"{empty / 1024:.1f} MiB", "-"],
                [
                    f"{args.memory_listed:,}",
                    f"{full / 1024:.1f} MiB",
                    f"{(full - empty) * 1024 / args.memory_listed:,.0f} B",
                ],
            ],
        )
    )


if __name__ == "__main__":
    main()
