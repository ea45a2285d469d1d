"""Served detections shared by agents through the store (``store.url``): marked, written, followed.

Each agent runs the rules on its own traffic; only what its book *serves* (which already needed
proof, detection/book.py) is shared: a flagged-only detection stays local, so no agent can put an
address on every agent's blocklist without proof. When the book serves a detection, extends or
renumbers it, or ends it, the address is marked; about once a second the marked ones are written
in one transaction (``BATCH_ROWS`` at most), off the ingest path. The transaction locks the
store's counter row first, so writes are serialized; the address's row is merged with what the
book holds and numbered from the counter (store/detection_rows.py). The book then adopts the row:
until the first write (or while the store is down) a detection is served under a provisional ID
of the agent's own, afterwards under the store's, which is what every agent serves. Every agent
follows the table: every ``FOLLOW_EVERY`` seconds it reads the counter's ``change`` (one row) and,
when it moved, the rows changed since, and adopts them into its book: served by its site API,
decision stream, /api/v1/detections and enrichment with the same ID and end, ended with the same
end. A failing store is counted and retried with backoff; the marks are kept (bounded) and every
served detection is marked again when the store comes back, so an outage loses nothing; the agent
serves from its book meanwhile.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

from ..core.logs import safe_text
from ..core.timing import Sleep, Waker
from ..core.trouble import FailureRun
from ..detection.book import Detection, Detections
from .database import SCHEMA, STORE_FAILURES, Store
from .detection_rows import FAR_AHEAD_MS, Row, _columns, _Ids, _row, merge

__all__ = ["DetectionSharingStats", "Row", "Serials", "SharedDetections", "merge"]

# Its name before the wings: operators' log filters use it.
log = logging.getLogger("hepsub_apiban.shared_detections")
FLUSH_EVERY = 1.0  # seconds between writes of what the book served, extended or ended
FOLLOW_EVERY = 2.0  # seconds between polls of the counter's change (one row)
BACKOFF_MAX = 30.0  # seconds between attempts while the store fails, doubling up to this
WRITE_TIMEOUT = 10.0  # seconds one statement may take
BATCH_ROWS = 500  # addresses per write transaction; more wait for the next flush
READ_ROWS = 1000  # rows per read of the changes; a follower reads page after page
MAX_PENDING = 10_000  # addresses marked for writing; more are counted as dropped
KEEP_ENDED = 86400.0  # seconds a row is kept after its end (then pruned by the writers)
PRUNE_EVERY = 600.0

COUNTER = f"""
SELECT c.serial, c.change,
       floor(extract(epoch FROM clock_timestamp()) * 1000)::bigint AS now_ms,
       (SELECT coalesce(max(next_serial), 0) FROM {SCHEMA}.apiban_sources) AS listed_next
FROM {SCHEMA}.detection_counter c FOR UPDATE OF c
"""
COLUMNS = "host(ip) AS ip, serial, since, until, announced_until, rules, proof, repeats, agents, ended_at"
ROWS = f"SELECT {COLUMNS} FROM {SCHEMA}.detections WHERE ip = ANY($1::inet[])"
UPSERT = f"""
INSERT INTO {SCHEMA}.detections AS d
    (ip, serial, since, until, announced_until, rules, proof, repeats, agents, ended_at, change)
SELECT t.ip::inet, t.serial, t.since, t.until, t.announced_until, t.rules, t.proof, t.repeats, t.agents,
       NULL, t.change
FROM unnest($1::text[], $2::int8[], $3::float8[], $4::float8[], $5::float8[], $6::jsonb[], $7::text[],
            $8::int4[], $9::jsonb[], $10::int8[])
    AS t (ip, serial, since, until, announced_until, rules, proof, repeats, agents, change)
ON CONFLICT (ip) DO UPDATE SET serial = excluded.serial, since = excluded.since, until = excluded.until,
    announced_until = excluded.announced_until, rules = excluded.rules, proof = excluded.proof,
    repeats = excluded.repeats, agents = excluded.agents, ended_at = NULL, change = excluded.change,
    written_at = now()
"""
# An end counts only for the detection that ended: a row renumbered or extended since is not ended.
END = f"""
UPDATE {SCHEMA}.detections AS d SET ended_at = t.at, change = t.change, written_at = now()
FROM unnest($1::text[], $2::int8[], $3::float8[], $4::int8[]) AS t (ip, serial, at, change)
WHERE d.ip = t.ip::inet AND d.serial = t.serial AND d.until <= t.at AND d.ended_at IS NULL
"""
SET_COUNTER = f"UPDATE {SCHEMA}.detection_counter SET serial = $1, change = $2"
# An agent's own numbering may run ahead of the store's (its APIBAN list numbered before it joined,
# a full pull): IDs handed out later must be above what its clients were already given.
RAISE_COUNTER = f"""
UPDATE {SCHEMA}.detection_counter SET serial = greatest(serial,
    least($1, floor(extract(epoch FROM clock_timestamp()) * 1000)::bigint + $2))
"""
CHANGE = f"SELECT change FROM {SCHEMA}.detection_counter"
CHANGES = f"""
SELECT {COLUMNS}, change FROM {SCHEMA}.detections WHERE change > $1 ORDER BY change LIMIT $2
"""
# Ends are the agents' clocks (Unix seconds); a day's margin makes their skew irrelevant.
PRUNE = f"""
DELETE FROM {SCHEMA}.detections WHERE until < extract(epoch FROM now()) - $1
"""


class Serials(Protocol):
    """The agent's own numbering (the mirror's, or check mode's): the next serial it would give."""

    next_serial: int


@dataclass(slots=True)
class DetectionSharingStats:
    writes: int = 0  # transactions that wrote
    rows_written: int = 0  # detections served or extended, written
    ends_written: int = 0
    failures: int = 0  # writes or follows that failed (retried)
    adopted: int = 0  # rows applied to the book (this agent's and the others')
    dropped: int = 0  # marks not kept (over MAX_PENDING); the next reconnection marks them again
    up: bool | None = None  # did the last write or follow reach the store (None: none tried yet)


class SharedDetections:
    """Served detections shared by the agents of a store: marked by the book, written and followed.

    Owns the marks of the book's served detections and their writer's stats; built by ``create_app``
    with ``store.url`` and detection on, with the book and its serial source. The ``StoreLink`` attaches
    the store once connected. It registers itself with the book (``share_with``) when built.

    Never shares a flagged-only detection (serving needed proof), never writes on the packet path,
    and loses no mark while the store is down (every served detection is marked again on reconnect).
    """

    def __init__(
        self,
        book: Detections,
        agent: str,
        serials: Serials,
        *,
        wall_clock: Callable[[], float] = time.time,
        monotonic: Callable[[], float] = time.monotonic,
        sleep: Sleep = asyncio.sleep,
    ) -> None:
        self._book = book
        self.agent = agent
        self._serials = serials  # local serials continue above every shared ID, and vice versa
        self._floor_told = False  # has the store's counter been raised to this agent's numbering
        self._wall_clock = wall_clock
        self._monotonic = monotonic
        self._waker = Waker(sleep)
        self._store: Store | None = None
        # ip -> (the detection, when it ended or None); the latest mark of an address wins.
        self._pending: dict[str, tuple[Detection, float | None]] = {}
        self._writing = 0  # marks taken by the write under way
        self.held = 0  # the counter's change this book holds every row up to
        self._followed_at: float | None = None
        self._pruned_at: float | None = None
        self.stats = DetectionSharingStats()
        self._trouble = FailureRun("sharing detections with the store", log)
        book.share_with(self.mark)

    def attach(self, store: Store) -> None:
        """The store, connected (or reconnected): every served detection is marked again, so what
        was served while the store was away, or before a restart, reaches it."""
        reconnected = self._store is not None
        self._store = store
        self._floor_told = False
        for detection in self._book.served(self._wall_clock()):
            self.mark(detection, None)
        if reconnected:  # back from an outage: written now, not at the end of the backoff
            self._waker.wake()

    def mark(self, detection: Detection, ended_at: float | None) -> None:
        """The book's hook: ``detection`` was served, extended or renumbered (or ended at ``ended_at``).
        On the ingest path: one dict store."""
        pending = self._pending
        if len(pending) >= MAX_PENDING and detection.ip not in pending:
            self.stats.dropped += 1
            return
        pending[detection.ip] = (detection, ended_at)

    def pending(self) -> int:
        """Addresses marked and not written yet (the write under way included)."""
        return len(self._pending) + self._writing

    async def run(self) -> None:
        delay = FLUSH_EVERY
        while True:
            await self._waker.sleep(delay)
            try:
                await self.flush()
                now = self._monotonic()
                if self._followed_at is None or now - self._followed_at >= FOLLOW_EVERY:
                    self._followed_at = now
                    await self.follow()
                    await self._prune_now_and_then(now)
            except STORE_FAILURES as exc:
                self._failed(exc)
            except Exception as exc:
                # A bug here must not silently end the sharing (the marks wait for the next try).
                log.exception("sharing detections failed; trying again")
                self._failed(exc)
            else:
                delay = FLUSH_EVERY
                continue
            delay = min(BACKOFF_MAX, max(FLUSH_EVERY, delay * 2))

    def _failed(self, exc: BaseException) -> None:
        self.stats.failures += 1
        self.stats.up = False
        if self._store is not None:
            reason = f"store {self._store.shown}: {safe_text(str(exc) or type(exc).__name__, 300)}"
            self._trouble.failed(reason, f"{len(self._pending)} kept for the next try")

    def _reached(self) -> None:
        if self._store is not None:
            self._trouble.succeeded()
        self.stats.up = True

    # ---------------------------------------------------------------- writing

    async def flush(self) -> None:
        """Write up to BATCH_ROWS marked addresses and adopt what the store made of them; raises
        a store error (the marks are kept)."""
        store = self._store
        if store is None:
            return
        if not self._floor_told:
            floor = self._serials.next_serial - 1
            await store.pool.execute(RAISE_COUNTER, floor, FAR_AHEAD_MS, timeout=WRITE_TIMEOUT)
            self._floor_told = True
        if not self._pending:
            return
        batch = dict(itertools.islice(self._pending.items(), BATCH_ROWS))
        for ip in batch:
            del self._pending[ip]
        self._writing = len(batch)
        try:
            rows = await self._write(store, batch)
        except BaseException:
            self._pending = {**batch, **self._pending}  # a later mark is newer than the batch's
            raise
        finally:
            self._writing = 0
        self._reached()
        now = self._wall_clock()
        for row in rows:
            self._apply(row, now)

    async def _write(self, store: Store, batch: dict[str, tuple[Detection, float | None]]) -> list[Row]:
        now = self._wall_clock()
        served = {ip: d for ip, (d, ended) in batch.items() if ended is None and self._book.get(ip, now) is d}
        ends = [(d, ended) for d, ended in batch.values() if ended is not None and d.serial is not None]
        async with store.pool.acquire() as connection, connection.transaction():
            counter = await connection.fetchrow(COUNTER, timeout=WRITE_TIMEOUT)
            assert counter is not None  # migration 3 inserted the one row
            current = {
                row.detection.ip: row
                for row in map(_row, await connection.fetch(ROWS, list(served), timeout=WRITE_TIMEOUT))
                if row is not None
            }
            ids = _Ids(counter["serial"], counter["now_ms"], counter["listed_next"])
            change = counter["change"]
            merged: list[Detection] = []
            for ip, mine in served.items():
                merged.append(merge(current.get(ip), mine, self.agent, ids.now, ids.take))
            changes = list(range(change + 1, change + 1 + len(merged) + len(ends)))
            if merged:
                columns = _columns(merged)
                await connection.execute(UPSERT, *columns, changes[: len(merged)], timeout=WRITE_TIMEOUT)
            if ends:
                await connection.execute(
                    END,
                    [d.ip for d, _ in ends],
                    [d.serial for d, _ in ends],
                    [at for _, at in ends],
                    changes[len(merged) :],
                    timeout=WRITE_TIMEOUT,
                )
            await connection.execute(SET_COUNTER, ids.last, change + len(changes), timeout=WRITE_TIMEOUT)
        self.stats.writes += 1
        self.stats.rows_written += len(merged)
        self.stats.ends_written += len(ends)
        return [Row(detection, None) for detection in merged]

    # ---------------------------------------------------------------- following

    async def follow(self) -> int:
        """Adopt every row changed since the last follow; how many. Raises a store error."""
        store = self._store
        if store is None:
            return 0
        change = await store.pool.fetchval(CHANGE, timeout=WRITE_TIMEOUT)
        if change < self.held:  # a store restored from an older backup: read it all again
            self.held = 0
        if change <= self.held:
            self._reached()
            return 0
        applied = 0
        while True:
            records = await store.pool.fetch(CHANGES, self.held, READ_ROWS, timeout=WRITE_TIMEOUT)
            now = self._wall_clock()
            for record in records:
                row = _row(record)
                if row is not None:
                    self._apply(row, now)
                    applied += 1
            if records:
                self.held = records[-1]["change"]
            if len(records) < READ_ROWS:
                break
        self._reached()
        return applied

    def _apply(self, row: Row, now: float) -> None:
        detection = row.detection
        serials = self._serials
        if detection.serial is not None and detection.serial >= serials.next_serial:
            serials.next_serial = detection.serial + 1
        if row.ended_at is not None:
            self._book.end_shared(detection.ip, detection.serial or 0, row.ended_at)
        elif self._book.adopt(detection, now) is not None:
            self.stats.adopted += 1

    async def _prune_now_and_then(self, now: float) -> None:
        store = self._store
        if store is not None and (self._pruned_at is None or now - self._pruned_at >= PRUNE_EVERY):
            self._pruned_at = now
            await store.pool.execute(PRUNE, KEEP_ENDED, timeout=WRITE_TIMEOUT)

    def to_json(self) -> dict[str, Any]:
        stats = self.stats
        return {
            "up": stats.up,
            "waiting": self.pending(),
            "writes": stats.writes,
            "rows_written": stats.rows_written,
            "ends_written": stats.ends_written,
            "adopted": stats.adopted,
            "failures": stats.failures,
            "dropped": stats.dropped,
            "change": self.held,
        }
