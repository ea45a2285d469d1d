"""The store's write load from shared sightings at 50,000 packets/s, and what a read costs.

    python bench/store_sightings.py [--rate 50000] [--seconds 5]

A throwaway PostgreSQL cluster (tests/postgres.py: Debian's ``postgresql``, durability off as in
the tests). Each simulated second, ``--rate`` SIP packets go through ``Sightings.record`` in
process (no network), then ``SharedSightings.flush`` writes what they touched: rows, statements
(round trips) and the flush's time, for two kinds of traffic: a registrar's (10,000 phones and
their SBC: at most 10,001 addresses a second whatever the rate) and a flood where every packet
comes from a new spoofed source (the worst case: one row per packet, into a full store of
100,000; a flush writes every address with more than one packet and at most
``SINGLES_PER_FLUSH`` one-packet ones, the rest wait). Baseline in the same run: every row the
second touched, written by asyncpg's pipelined ``executemany`` of a one-row statement per batch
(also one round trip a batch), and a ``SELECT 1`` round trip. Then the enrichment read: 10 addresses, each
written by two agents.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import time
from pathlib import Path

from common import machine, table

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # tests/postgres.py

from hepsub_apiban.apiban.lookups import LookupService
from hepsub_apiban.apiban.mirror import Mirror
from hepsub_apiban.core.addresses import NetworkSet
from hepsub_apiban.core.config import StoreSettings
from hepsub_apiban.formats.sip import SipInfo
from hepsub_apiban.ingest.sightings import Sightings
from hepsub_apiban.store.database import SCHEMA, Store
from hepsub_apiban.store.sighting_rows import _columns
from hepsub_apiban.store.sightings import BATCH_ROWS, SharedSightings
from tests.postgres import remove_cluster, start_cluster

SBC = "80.2.2.2"
REGISTER = SipInfo(method="REGISTER", call_id="bench-1", from_user="100", user_agent="Yealink T46")
# The other way to send a batch in one round trip: a one-row statement, pipelined by asyncpg.
ONE_ROW = f"""
INSERT INTO {SCHEMA}.sightings AS s
    (ip, writer, first_seen, agent, last_seen, packets, methods, user_agents, users, call_ids)
VALUES ($1, $3, $4, $2, $5, $6, $7, $8, $9, $10)
ON CONFLICT (ip, writer, first_seen) DO UPDATE SET
    last_seen = excluded.last_seen, packets = excluded.packets, methods = excluded.methods,
    user_agents = excluded.user_agents, users = excluded.users, call_ids = excluded.call_ids,
    written_at = now()
WHERE s.packets <= excluded.packets
"""


def memory() -> Sightings:
    mirror = Mirror()
    mirror.last_full_sync = 1.0
    return Sightings(LookupService(None, NetworkSet(), mirror=mirror), capacity=100_000)


def phone(n: int) -> str:
    return f"100.{64 + (n >> 16)}.{(n >> 8) & 255}.{n & 255}"


def spoofed(n: int) -> str:
    return f"45.{n >> 16 & 255}.{(n >> 8) & 255}.{n & 255}"


async def scenario(store: Store, name: str, source: str, rate: int, seconds: int) -> list[object]:
    sightings = memory()
    shared = SharedSightings(store, sightings, f"bench-{name}")
    record = sightings.record
    address = phone if source == "phones" else spoofed
    now = 1_800_000_000.0
    flush_ms: list[float] = []
    cpu_ms: list[float] = []  # the agent's own CPU in a flush: the part that holds its event loop
    for second in range(seconds):
        base = second * rate
        for n in range(rate):
            index = (base + n) % 10_000 if source == "phones" else base + n
            record(address(index), SBC, REGISTER, now + n / rate)
        now += 1.0
        began, cpu = time.perf_counter(), time.process_time()
        assert await shared.flush()
        flush_ms.append((time.perf_counter() - began) * 1000)
        cpu_ms.append((time.process_time() - cpu) * 1000)
    stats = shared.stats
    rows = stats.rows_written / seconds
    statements = stats.round_trips / seconds
    # Baseline: the last second's rows, one statement each.
    last = (seconds - 1) * rate
    indexes = {(last + n) % 10_000 if source == "phones" else last + n for n in range(rate)}
    unique = {s.ip: s for i in indexes if (s := sightings.get(address(i))) is not None}
    for sighting in unique.values():
        sighting.packets += 1  # an update, as the flushes were
    began, cpu = time.perf_counter(), time.process_time()  # building the rows included, as in a flush
    chosen = list(unique.values())
    for start in range(0, len(chosen), BATCH_ROWS):
        columns = _columns(chosen[start : start + BATCH_ROWS])
        await store.pool.executemany(
            ONE_ROW, [(ip, "baseline", shared.writer, *rest) for ip, *rest in zip(*columns, strict=True)]
        )
    rowwise_ms = (time.perf_counter() - began) * 1000
    rowwise_cpu_ms = (time.process_time() - cpu) * 1000
    median = statistics.median(flush_ms)
    return [
        name,
        f"{rate:,}",
        f"{rows:,.0f}",
        f"{statements:.0f}",
        f"{shared.pending():,}",
        f"{median:.0f} / {max(flush_ms):.0f}",
        f"{median / 10:.1f} %",
        f"{statistics.median(cpu_ms):.0f}",
        f"{rowwise_ms:.0f} ({rowwise_ms / median:.2f} x), CPU {rowwise_cpu_ms:.0f}",
    ]


async def read_cost(store: Store) -> tuple[float, float]:
    a_memory, b_memory = memory(), memory()
    a = SharedSightings(store, a_memory, "bench-a")
    b = SharedSightings(store, b_memory, "bench-b", read_timeout=5.0)
    ips = [phone(200_000 + n) for n in range(10)]
    for ip in ips:
        a_memory.record(ip, SBC, REGISTER, 1_800_000_000.0)
        b_memory.record(ip, SBC, REGISTER, 1_800_000_001.0)
    await a.flush()
    await b.flush()
    reads, pings = [], []
    for _ in range(200):
        began = time.perf_counter()
        seen = await b.seen(ips)
        reads.append(time.perf_counter() - began)
        began = time.perf_counter()
        await store.pool.fetchval("SELECT 1")
        pings.append(time.perf_counter() - began)
    assert all(seen[ip].packets == 2 for ip in ips)
    return statistics.median(reads) * 1000, statistics.median(pings) * 1000


async def main(rate: int, seconds: int) -> None:
    cluster = start_cluster()
    try:
        store = await Store.connect(StoreSettings(cluster.url()))
        await store.migrate()
        rows = [
            await scenario(store, "registrar (10,000 phones)", "phones", rate, seconds),
            await scenario(store, "flood (a new source per packet)", "spoofed", rate, seconds),
        ]
        read_ms, ping_ms = await read_cost(store)
        sizes = await store.pool.fetchrow(
            f"SELECT count(*) AS rows, pg_total_relation_size('{SCHEMA}.sightings') AS bytes "
            f"FROM {SCHEMA}.sightings"
        )
        await store.close()
    finally:
        remove_cluster(cluster)
    print(machine())
    print(
        table(
            [
                "traffic",
                "packets/s",
                "rows/s",
                "round trips/s",
                "addresses waiting after the last flush",
                "flush ms median / max",
                "of each second",
                "agent CPU ms",
                "every touched row by executemany: ms (/ flush), agent CPU ms",
            ],
            rows,
        )
    )
    print(f"enrichment read, 10 addresses x 2 agents: {read_ms:.2f} ms median (SELECT 1: {ping_ms:.2f} ms)")
    count, size = sizes["rows"], sizes["bytes"]
    mib, per_row = size / 2**20, size / count
    print(f"the sightings table: {count:,} rows, {mib:.0f} MiB with indexes, {per_row:.0f} B a row")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rate", type=int, default=50_000)
    parser.add_argument("--seconds", type=int, default=5)
    options = parser.parse_args()
    asyncio.run(main(options.rate, options.seconds))
