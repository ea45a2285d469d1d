"""Sightings shared by agents through the store (``store.url``).

Writing: the in-memory ``Sightings`` marks every address a packet touches (a set of remembered
addresses, so at most ``sightings.max``); about once a second the writer takes that set and
upserts those addresses' *cumulative* totals, one round trip per ``BATCH_ROWS`` rows. A row
belongs to one writer (this process, a random ID per start) and one life of the address in its
memory (its ``first_seen``: an address forgotten and seen again is a new row), so the same batch
written twice, say after a commit whose answer was lost, sets the same totals and nothing is
counted twice. While the store is down the set is kept (bounded as the sightings are) and the
first write after the store is back carries the totals of then.

Reading: enrichment asks for the call's addresses with ``ip = ANY($1)`` under a short timeout and
adds up every writer's rows, this agent's own current row replaced by its fresher memory. On a
timeout or an error the answer is what this agent holds, and the store is left alone for a
moment so that a dead store costs enrichment one timeout, not one per request. How the rows are
added up and laid out for the write: store/sighting_rows.py.
"""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from ..core.logs import safe_text
from ..core.timing import Sleep, Waker
from ..core.trouble import FailureRun
from ..ingest.sightings import Sighting, Sightings
from .database import SCHEMA, STORE_FAILURES, Store
from .sighting_rows import _address, _columns, merge

# Its name before the wings: operators' log filters use it.
log = logging.getLogger("hepsub_apiban.shared_sightings")
FLUSH_EVERY = 1.0  # seconds between writes: "within a few seconds" on every agent
BATCH_ROWS = 5000  # rows per statement (one round trip); a flush of more takes several
# One-packet addresses written per flush when a flush has more rows than one statement carries: a
# flood of spoofed sources (one packet each) tells other agents little and would cost this agent
# most of a core to encode; the rest wait for a quieter flush or are forgotten (counted).
SINGLES_PER_FLUSH = 5000
WRITE_TIMEOUT = 10.0  # seconds one statement may take before the flush counts as failed
BACKOFF_MAX = 30.0  # seconds between attempts while the store fails, doubling up to this
READ_TIMEOUT = 0.15  # seconds enrichment waits for the store (agent.deadline is about 1 s)
READ_PAUSE = 2.0  # seconds enrichment stays local only after a failed read
READ_ROWS = 500  # rows one read returns at most, newest first (writers x lives x addresses)
KEEP_FOR = 3 * 86400.0  # seconds a row is kept after its last write (pruned by the writers)
PRUNE_EVERY = 600.0  # seconds between prunes

# Errors that mean "the store cannot be used now": the driver's, the network's, a timeout.

# One statement over arrays per batch: one round trip, one transaction. Pipelined
# ``executemany`` of a one-row statement takes the database as long, but about 1.3 times the
# agent's CPU in a flood, CPU that HEP ingest needs (bench/store_sightings.py).
UPSERT = f"""
INSERT INTO {SCHEMA}.sightings AS s
    (ip, writer, first_seen, agent, last_seen, packets, methods, user_agents, users, call_ids)
SELECT t.ip, $1, t.first_seen, $2, t.last_seen, t.packets, t.methods, t.user_agents, t.users, t.call_ids
FROM unnest($3::inet[], $4::float8[], $5::float8[], $6::int8[], $7::jsonb[], $8::jsonb[],
            $9::jsonb[], $10::jsonb[])
    AS t (ip, first_seen, last_seen, packets, methods, user_agents, users, call_ids)
ON CONFLICT (ip, writer, first_seen) DO UPDATE SET
    last_seen = excluded.last_seen,
    packets = excluded.packets,
    methods = excluded.methods,
    user_agents = excluded.user_agents,
    users = excluded.users,
    call_ids = excluded.call_ids,
    written_at = now()
-- Totals only grow within a life: an older batch arriving late never lowers them.
WHERE s.packets <= excluded.packets
"""
READ = f"""
SELECT ip, writer, first_seen, last_seen, packets, methods, user_agents, users, call_ids
FROM {SCHEMA}.sightings WHERE ip = ANY($1::inet[])
ORDER BY last_seen DESC LIMIT $2
"""
# /api/v1/sightings: the addresses of the newest rows (the written_at index; a row is rewritten
# each second its address is seen), with every row of them and of the listing's own addresses.
RECENT = f"""
WITH newest AS (
    SELECT ip FROM {SCHEMA}.sightings ORDER BY written_at DESC LIMIT $1
), wanted AS (
    (SELECT DISTINCT ip FROM newest LIMIT $2) UNION SELECT unnest($3::inet[])
)
SELECT ip, writer, first_seen, last_seen, packets, methods, user_agents, users, call_ids
FROM {SCHEMA}.sightings WHERE ip = ANY(ARRAY(SELECT ip FROM wanted))
ORDER BY last_seen DESC LIMIT $4
"""
RECENT_TIMEOUT = 1.0  # seconds the listing waits for the store before answering from memory
RECENT_ROWS_PER_IP = 4  # rows (writers x lives) read per address listed, at most on average
# By the database's clock: the rows' own times come from HEP packets, which anyone may forge.
PRUNE = f"DELETE FROM {SCHEMA}.sightings WHERE written_at < now() - make_interval(secs => $1)"


@dataclass(slots=True)
class SharingStats:
    flushes: int = 0  # flushes that wrote (an empty one is not counted)
    rows_written: int = 0
    round_trips: int = 0  # statements sent by successful flushes
    failures: int = 0  # flushes that failed (their addresses are written by a later one)
    reads: int = 0
    read_failures: int = 0  # reads that timed out or failed: answered from memory only
    reads_skipped: int = 0  # reads not tried, within READ_PAUSE of a failure
    up: bool | None = None  # did the last flush reach the store (None: none tried yet)


class SharedSightings:
    """The sightings of every agent of a store: this agent's written about once a second, all read back.

    Owns the writer's marks (the addresses ``Sightings`` touched since the last write) and its stats.
    Built by ``create_app`` with ``store.url``; the ``StoreLink`` attaches the store once it is
    connected (``attach``), until then it holds what memory holds. Read by enrichment (``seen``:
    every agent's sightings of a call's addresses).

    Never holds enrichment longer than ``read_timeout`` (a store that fails is left alone for a moment,
    and the answer is this agent's memory), never writes on the packet path, and never counts a batch
    twice (cumulative totals per writer and address life).
    """

    def __init__(
        self,
        store: Store | None,
        sightings: Sightings,
        agent: str,
        *,
        flush_every: float = FLUSH_EVERY,
        read_timeout: float = READ_TIMEOUT,
        monotonic: Callable[[], float] = time.monotonic,
        sleep: Sleep = asyncio.sleep,
    ) -> None:
        self._store = store
        self._sightings = sightings
        self.agent = agent
        self.writer = uuid.uuid4()
        self._flush_every = flush_every
        self._read_timeout = read_timeout
        self._monotonic = monotonic
        self._waker = Waker(sleep)
        self._read_paused_until = 0.0
        self._pruned_at: float | None = None
        self.stats = SharingStats()
        self._trouble = FailureRun("sharing sightings with the store", log)
        if sightings.touched is None:
            sightings.touched = set()

    def attach(self, store: Store) -> None:
        """The store, once connected and migrated: until then writes wait (the addresses touched
        meanwhile are written by the first flush) and reads are the memory's alone. Called again
        each time the store link reconnects: the writer then writes what waits at once, not at the
        end of its backoff."""
        self._store = store
        self._waker.wake()

    @property
    def evicted_unwritten(self) -> int:
        """Addresses forgotten by this agent before their last counts were written."""
        return self._sightings.evicted_unwritten

    def to_json(self) -> dict[str, Any]:
        """The status page's ``store.sightings``."""
        stats = self.stats
        return {
            "up": stats.up,
            "waiting": self.pending(),  # addresses touched since the last write
            "flushes": stats.flushes,
            "rows_written": stats.rows_written,
            "round_trips": stats.round_trips,
            "failures": stats.failures,
            "reads": stats.reads,
            "read_failures": stats.read_failures,
            "reads_skipped": stats.reads_skipped,
            "evicted_unwritten": self.evicted_unwritten,
        }

    def pending(self) -> int:
        """Addresses waiting for the next flush."""
        return len(self._sightings.touched or ())

    async def run(self) -> None:
        """Flush about once a second; while the store fails, back off up to BACKOFF_MAX."""
        delay = self._flush_every
        while True:
            await self._waker.sleep(delay)
            if await self.flush():
                delay = self._flush_every
                await self._prune_now_and_then()
            else:
                delay = min(BACKOFF_MAX, max(self._flush_every, delay * 2))

    async def flush(self) -> bool:
        """Write the totals of every address touched since the last flush; False if the store failed."""
        sightings, store = self._sightings, self._store
        touched = sightings.touched
        if not touched or store is None:
            return True
        sightings.touched = set()
        # The totals of this moment, taken before the first await: one consistent batch.
        rows = self._batch(touched)
        statements = 0
        try:
            for start in range(0, len(rows), BATCH_ROWS):
                columns = _columns(rows[start : start + BATCH_ROWS])
                await store.pool.execute(UPSERT, self.writer, self.agent, *columns, timeout=WRITE_TIMEOUT)
                statements += 1
        except asyncio.CancelledError:
            # Stopped mid-write (the agent shutting down): the last flush writes the batch. The
            # totals are cumulative, so a batch that did commit is only written again.
            self._keep(touched)
            raise
        except STORE_FAILURES as exc:
            self._keep(touched)
            self.stats.failures += 1
            self.stats.up = False
            reason = f"store {store.shown}: {_words(exc)}"
            self._trouble.failed(reason, f"{len(touched)} addresses kept for the next try")
            return False
        self._trouble.succeeded()
        self.stats.up = True
        self.stats.flushes += 1
        self.stats.rows_written += len(rows)
        self.stats.round_trips += statements
        return True

    def _batch(self, touched: set[str]) -> list[Sighting]:
        """The sightings of ``touched`` to write now: all of them, unless they are more than one
        statement carries; then every address with more than one packet (or listed, or detected)
        and at most SINGLES_PER_FLUSH of the others, the rest left waiting for a later flush."""
        get = self._sightings.get
        if len(touched) <= BATCH_ROWS:
            return [sighting for ip in touched if (sighting := get(ip)) is not None]
        rows: list[Sighting] = []
        waiting: list[str] = []
        room = SINGLES_PER_FLUSH
        for ip in touched:
            sighting = get(ip)
            if sighting is None:
                continue
            if sighting.packets > 1 or sighting.protected:
                rows.append(sighting)
            elif room:
                rows.append(sighting)
                room -= 1
            else:
                waiting.append(ip)
        if waiting:
            left = self._sightings.touched
            assert left is not None  # set in __init__, replaced (never removed) by flush
            left.update(waiting)
        return rows

    def _keep(self, failed: set[str]) -> None:
        """Put a failed batch's addresses back beside those touched meanwhile: those still
        remembered, so the set stays within the sightings' bound."""
        sightings = self._sightings
        kept = {ip for ip in failed if sightings.get(ip) is not None}
        sightings.evicted_unwritten += len(failed) - len(kept)
        kept |= sightings.touched or set()
        sightings.touched = kept

    async def _prune_now_and_then(self) -> None:
        now = self._monotonic()
        if self._pruned_at is None or now - self._pruned_at >= PRUNE_EVERY:
            self._pruned_at = now
            await self.prune()

    async def prune(self) -> int:
        """Delete every writer's rows not written for KEEP_FOR; how many went."""
        store = self._store
        if store is None:
            return 0
        try:
            status = await store.pool.execute(PRUNE, KEEP_FOR, timeout=WRITE_TIMEOUT)
        except STORE_FAILURES as exc:
            log.warning("store %s: old sightings not pruned: %s", store.shown, _words(exc))
            return 0
        return int(status.split()[-1])  # "DELETE 12"

    async def seen(self, ips: Sequence[str]) -> dict[str, Sighting]:
        """What every agent saw of ``ips``: the store's rows with this agent's memory, or the
        memory alone if the store does not answer within the read timeout."""
        local = {ip: sighting for ip in ips if (sighting := self._sightings.get(ip)) is not None}
        store = self._store
        if not ips or store is None:
            return local
        if self._monotonic() < self._read_paused_until:
            self.stats.reads_skipped += 1
            return local
        self.stats.reads += 1
        try:
            rows = await asyncio.wait_for(store.pool.fetch(READ, list(ips), READ_ROWS), self._read_timeout)
        except STORE_FAILURES:
            self.stats.read_failures += 1
            self._read_paused_until = self._monotonic() + READ_PAUSE
            return local
        return merge(ips, local, rows, self.writer)

    async def recent(self, limit: int, mine: Sequence[str]) -> dict[str, Sighting] | None:
        """/api/v1/sightings: every agent's newest ``limit`` addresses and ``mine`` (the listing's
        own), added up with this agent's memory; None if the store does not answer in time. The
        rows read are bounded by ``limit``."""
        store = self._store
        if store is None:
            return None
        if self._monotonic() < self._read_paused_until:  # as for enrichment: a hung store costs one wait
            self.stats.reads_skipped += 1
            return None
        rows_read = (limit + len(mine)) * RECENT_ROWS_PER_IP
        try:
            rows = await asyncio.wait_for(
                store.pool.fetch(RECENT, limit * RECENT_ROWS_PER_IP, limit, list(mine), rows_read),
                RECENT_TIMEOUT,
            )
        except STORE_FAILURES:
            self.stats.read_failures += 1
            self._read_paused_until = self._monotonic() + READ_PAUSE
            return None
        found = [address.text for row in rows if (address := _address(row["ip"])) is not None]
        ips = list(dict.fromkeys([*mine, *found]))
        local = {ip: sighting for ip in ips if (sighting := self._sightings.get(ip)) is not None}
        return merge(ips, local, rows, self.writer)


def _words(exc: BaseException) -> str:
    # The driver's words; PostgreSQL never echoes a password, and the URL is not in them.
    return safe_text(str(exc) or type(exc).__name__, 300)
