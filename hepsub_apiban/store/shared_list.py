"""One APIBAN source's list in the store: the rows the puller writes and the followers read.

The puller writes, after every step that changed its mirror, the changed entries and the sync
position in one transaction fenced by its lease's epoch (``LeaseLost`` when the fence refuses),
bumping ``apiban_sources.version``; the rows carry that version in ``change``, so a follower
applies the rows whose ``change`` is above what it holds to its in-memory ``Mirror``. Entries
numbered in memory are renumbered above any detection ID taken meanwhile (store/detections.py),
and removed rows are kept as tombstones for the decision stream, then pruned. The link that
holds the lease and drives the pull is store/link.py.
"""

from __future__ import annotations

from typing import Any

from ..apiban.lookups import Verdict
from ..apiban.mirror import Mirror
from .database import SCHEMA, Lease, Store

SOURCE_ROW = f"""
SELECT cursor, full_pull_started, last_full_sync, last_sync, last_full_entries, next_serial, version
FROM {SCHEMA}.apiban_sources WHERE source = $1
"""
# From version 0 (a whole load) the removed rows are left out: an empty mirror has nothing to remove.
CHANGED_ROWS = f"""
SELECT host(ip) AS ip, apiban_id, last_reported, serial, removed_at
FROM {SCHEMA}.apiban_entries
WHERE source = $1 AND change > $2 AND ($2 > 0 OR removed_at IS NULL) ORDER BY change
"""
# The write's fence: the lease row is locked for the transaction, so a takeover waits for it.
FENCE = f"""
SELECT 1 FROM {SCHEMA}.leases
WHERE name = $1 AND holder = $2 AND epoch = $3 AND expires_at > now() FOR UPDATE
"""
WRITE_SOURCE = f"""
UPDATE {SCHEMA}.apiban_sources SET version = version + 1, cursor = $2, full_pull_started = $3,
    last_full_sync = $4, last_sync = $5, last_full_entries = $6, next_serial = $7, updated_at = now()
WHERE source = $1 RETURNING version
"""
UPSERT_ENTRIES = f"""
INSERT INTO {SCHEMA}.apiban_entries (source, ip, apiban_id, last_reported, serial, change, removed_at)
SELECT $1, e.ip::inet, e.apiban_id, e.last_reported, e.serial, $6, NULL
FROM unnest($2::text[], $3::text[], $4::bigint[], $5::bigint[]) AS e(ip, apiban_id, last_reported, serial)
ON CONFLICT (source, ip) DO UPDATE SET apiban_id = excluded.apiban_id,
    last_reported = excluded.last_reported, serial = excluded.serial, change = excluded.change,
    removed_at = NULL
"""
# Locks the detections' ID counter for the write (migration 3): see _number_above.
LOCK_DETECTION_IDS = f"""
SELECT c.serial, s.next_serial AS stored_next
FROM {SCHEMA}.detection_counter c, {SCHEMA}.apiban_sources s
WHERE s.source = $1 FOR UPDATE OF c
"""
# Removed entries are kept for the decision stream's "deleted" as long as the mirror keeps its own
# tombstones; older ones go, at most once an hour, in the puller's write (by its clock, as removed_at).
PRUNE_REMOVED = f"""
DELETE FROM {SCHEMA}.apiban_entries WHERE source = $1 AND removed_at < $2
"""
TOMBSTONE_SECONDS = 7 * 86400.0
PRUNE_EVERY = 3600.0
REMOVE_ENTRIES = f"""
UPDATE {SCHEMA}.apiban_entries SET change = $3, removed_at = $4
WHERE source = $1 AND ip = ANY($2::text[]::inet[]) AND removed_at IS NULL
"""


class LeaseLost(Exception):
    """The puller's lease is no longer its own: another agent may be pulling."""


class MirrorStore:
    """One APIBAN source's list in the store: read whole or by changes, written by the puller."""

    def __init__(self, store: Store, source: str) -> None:
        self._store = store
        self.source = source
        self._pruned_at: float | None = None  # the puller's clock at the last prune of removed rows
        self.pruned = 0

    async def ensure_source(self) -> None:
        await self._store.pool.execute(
            f"INSERT INTO {SCHEMA}.apiban_sources (source) VALUES ($1) ON CONFLICT DO NOTHING", self.source
        )

    async def version(self) -> int:
        value: int | None = await self._store.pool.fetchval(
            f"SELECT version FROM {SCHEMA}.apiban_sources WHERE source = $1", self.source
        )
        return value or 0

    async def apply_changes(self, mirror: Mirror, held: int) -> int:
        """Bring ``mirror`` from version ``held`` to the store's; the version it is at now.

        One repeatable-read snapshot, so the position and the rows read agree."""
        async with (
            self._store.pool.acquire() as connection,
            connection.transaction(isolation="repeatable_read", readonly=True),
        ):
            position = await connection.fetchrow(SOURCE_ROW, self.source)
            if position is None or position["version"] <= held:
                return held
            rows = await connection.fetch(CHANGED_ROWS, self.source, held)
        _apply_rows(mirror, rows)
        mirror.cursor = position["cursor"]
        mirror.full_pull_started = position["full_pull_started"]
        mirror.last_full_sync = position["last_full_sync"]
        mirror.last_sync = position["last_sync"]
        mirror.last_full_entries = position["last_full_entries"]
        mirror.next_serial = max(mirror.next_serial, position["next_serial"])
        version: int = position["version"]
        return version

    async def save(self, mirror: Mirror, changed: set[str], lease: Lease, now: float) -> int:
        """Write the changed entries and the sync position, if ``lease`` is still held; the new version."""
        present = [mirror.entries[ip] for ip in changed if ip in mirror.entries]
        gone = [ip for ip in changed if ip not in mirror.entries]
        async with self._store.pool.acquire() as connection, connection.transaction():
            if await connection.fetchval(FENCE, lease.name, lease.holder, lease.epoch) is None:
                raise LeaseLost(lease.name)
            issued = await connection.fetchrow(LOCK_DETECTION_IDS, self.source)
            if present and issued is not None:
                _number_above(mirror, present, issued["stored_next"], issued["serial"], now)
            version: int = await connection.fetchval(
                WRITE_SOURCE,
                self.source,
                mirror.cursor,
                mirror.full_pull_started,
                mirror.last_full_sync,
                mirror.last_sync,
                mirror.last_full_entries,
                mirror.next_serial,
            )
            if present:
                await connection.execute(
                    UPSERT_ENTRIES,
                    self.source,
                    [v.ip for v in present],
                    [v.id for v in present],
                    [v.last_reported for v in present],
                    [mirror.serials[v.ip] for v in present],
                    version,
                )
            if gone:
                await connection.execute(REMOVE_ENTRIES, self.source, gone, version, now)
            if self._pruned_at is None or now - self._pruned_at >= PRUNE_EVERY:
                status = await connection.execute(PRUNE_REMOVED, self.source, now - TOMBSTONE_SECONDS)
                self.pruned += int(status.rsplit(" ", 1)[-1])
                self._pruned_at = now
        return version


def _number_above(mirror: Mirror, present: list[Verdict], stored_next: int, issued: int, now: float) -> None:
    """Entries numbered since the last write but not above the last detection ID get new serials.

    Detections (store/detections.py) take IDs under the counter row's lock, above the list's
    committed ``next_serial``; an entry this puller numbered in memory before such an ID was taken
    would otherwise be written below it, unseen by a client that already paged past that ID. Entries
    already written keep their serial (a full pull re-reports the whole list)."""
    mirror.next_serial = max(mirror.next_serial, issued + 1)
    late = sorted(
        (serial, verdict.ip)
        for verdict in present
        if stored_next <= (serial := mirror.serials[verdict.ip]) <= issued
    )
    for _, ip in late:
        mirror.serials[ip] = mirror.new_serial(now)
    if late:
        mirror.touched()


def _apply_rows(mirror: Mirror, rows: list[Any]) -> None:
    for row in rows:
        ip = row["ip"]
        if row["removed_at"] is None:
            mirror.entries[ip] = Verdict(ip, True, "mirror", row["apiban_id"], row["last_reported"])
            mirror.serials[ip] = row["serial"]
        elif ip in mirror.entries:
            mirror.removed.append((row["removed_at"], mirror.entries.pop(ip), mirror.serials.pop(ip)))
    mirror.touched()
