"""Mirror mode: the whole APIBAN list in memory, kept current within the request budget.

A full pull pages ``/banned/100`` to the end (250 addresses a page), then incremental pulls
ask for what came after the last ID every ``apiban.poll_interval``. The feed never sends
removals, so an address stays listed for 7 days after it was last reported, and a full
re-pull once a week (mark and sweep: whatever the new pull does not report again is dropped)
resyncs with APIBAN's active set. Progress is saved after every page, so a 429, an outage or
a restart resumes from the last good ID instead of starting over.

What the feed says is not taken on trust. A page that is not the documented shape never reaches
the mirror (``apiban.classify_banned``); addresses no attacker can send from (non-routable) are
never held, so nothing the agent serves can list them. A full pull that ends with under half the
entries of the last complete one is suspect (a feed cut short, a proxy answering "no new bans"):
it is retried, keeping the list held, and accepted only once ``SHRINK_CONFIRMATIONS`` pulls in a
row agree on the smaller size. A snapshot is checked field by field and used whole or not at
all; a rejected one costs a re-pull, never the start.

What the sweep and the 7-day expiry drop is remembered for a while (``removed``, bounded), so the
CrowdSec decision stream can tell bouncers to delete it. The list itself is ``held_list``'s
``Mirror``, its snapshot is checked by ``snapshot``; both are importable from here too.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from ..core.state import atomic_write
from ..core.timing import Sleep
from ..core.trouble import FailureRun
from .client import (
    ApibanClient,
    ApibanError,
    BadKey,
    BudgetSpent,
    RateLimited,
    is_plain_id,
)
from .held_list import (
    ACTIVE_FOR,
    FULL_PULL_EVERY,
    MAX_TOMBSTONES,
    SNAPSHOT_FORMAT,
    SNAPSHOT_VERSION,
    START_ID,
    CurrentMirror,
    Mirror,
)
from .snapshot import (
    MAX_SNAPSHOT_BYTES,
    STATE_CLOCK_SLACK,
    SnapshotError,
    mirror_from_snapshot,
    snapshot_source,
)

__all__ = [
    "ACTIVE_FOR",
    "ESTIMATE_SLACK",
    "FULL_PULL_EVERY",
    "MAX_RETRY_DELAY",
    "MAX_SNAPSHOT_BYTES",
    "MAX_TOMBSTONES",
    "SHRINK_AGREEMENT",
    "SHRINK_CONFIRMATIONS",
    "SHRINK_FACTOR",
    "SNAPSHOT_FORMAT",
    "SNAPSHOT_VERSION",
    "START_ID",
    "STATE_CLOCK_SLACK",
    "CurrentMirror",
    "FullPullRejection",
    "Mirror",
    "MirrorSync",
    "SnapshotError",
    "SyncStatus",
    "mirror_from_snapshot",
    "snapshot_source",
]

# Its name before the wings: operators' log filters use it.
log = logging.getLogger("hepsub_apiban.mirror")
ESTIMATE_SLACK = 86400  # a first pull's oldest ID may be this much more than ACTIVE_FOR old
# A full pull reporting under SHRINK_FACTOR of the last complete one is retried; the smaller list
# is accepted once SHRINK_CONFIRMATIONS such pulls in a row agree within SHRINK_AGREEMENT.
SHRINK_FACTOR = 0.5
SHRINK_CONFIRMATIONS = 3
SHRINK_AGREEMENT = 0.1
MAX_RETRY_DELAY = 3600.0


@dataclass(frozen=True, slots=True)
class FullPullRejection:
    """The last full pull that was not accepted, for the status page."""

    at: float  # unix seconds
    entries: int  # what it reported
    expected: int  # what the last accepted full pull reported
    reason: str
    repeats: int  # consecutive short pulls that agreed on about this size, this one included

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(slots=True)
class SyncStatus:
    state: str = "starting"  # starting, full_pull, incremental, idle, failing
    pages: int = 0
    next_sync: float | None = None
    consecutive_failures: int = 0
    snapshot_loaded: bool = False
    snapshot_error: str | None = None
    snapshot_saved: float | None = None
    full_pull_rejected: FullPullRejection | None = None  # cleared when a full pull is accepted
    full_pulls_rejected: int = 0  # since start


class MirrorSync:
    """Keeps the mirror current within the key's budget: full pulls, incremental pulls, the snapshot.

    Owns the sync loop (``run``, one APIBAN request per ``step`` at most), its ``status`` and the
    snapshot in the state dir; replaces the mirror whole through ``CurrentMirror`` when a snapshot is
    loaded. Built by ``create_app`` in mirror mode; run by its lookups context, or by ``StoreLink``
    while this agent holds the puller lease.

    Never spends the last request of a window a per-IP check may need while a list is pulled, never
    takes a short or malformed page as the list (a shrunken full pull must be confirmed), and never
    stops on an error: a failing step is logged and retried.
    """

    def __init__(
        self,
        client: ApibanClient,
        current: CurrentMirror,
        *,
        poll_interval: float,
        snapshot_path: Path,
        source: str,
        wall_clock: Callable[[], float] = time.time,
        sleep: Sleep = asyncio.sleep,
    ) -> None:
        self._client = client
        self.current = current
        self._poll = poll_interval
        self._path = snapshot_path
        self._source = source
        self._wall_clock = wall_clock
        self._sleep = sleep
        self.status = SyncStatus()
        self._short_pulls: list[int] = []  # entries of consecutive short full pulls that agree
        self._rejections = 0  # consecutive rejected full pulls, for the backoff
        # Leave one request of each window to per-IP checks while the list is being pulled.
        self._reserve = 1 if client.budget.limit.requests >= 3 else 0
        # Requests of each window left unspent for other agents of the key while this one pulls
        # without the store (shared_mirror.StoreLink, the store down for long).
        self.standalone_reserve = 0
        # With a store, where each saved step goes too (shared_mirror.StoreLink, while it pulls).
        self.publish: Callable[[Mirror], Awaitable[None]] | None = None
        # (ID, entries held) after the first page of the full pull under way: the estimate's base.
        self._pull_mark: tuple[int, int] | None = None
        self._trouble = FailureRun("APIBAN list sync", log, clock=wall_clock)

    @property
    def mirror(self) -> Mirror:
        return self.current.mirror

    def progress(self, next_in: float) -> str:
        """One line on a full pull under way, for the log and the status page."""
        held = len(self.mirror.entries)
        expected = self.mirror.last_full_entries or self._estimate(held)
        synced = f"{held:,} of ~{expected:,} addresses" if expected else f"{held:,} addresses so far"
        return (
            f"APIBAN list: synced {synced} ({self.status.pages} pages), "
            f"{self._client.budget.used()} requests used in this window, next page in {next_in:.0f} s"
        )

    def _estimate(self, held: int) -> int | None:
        """The first pull's total, from the entries' ages: APIBAN gives no count.

        IDs are the unix times of the entries, oldest first, over the last 7 days: the entries
        pulled since the first page, per second of ID, times the seconds of ID still ahead.
        None while that cannot be told (one page so far, or IDs that are not such times).
        """
        mark, cursor, now = self._pull_mark, self.mirror.cursor, self._wall_clock()
        if mark is None or not is_plain_id(cursor):
            return None
        first_id, first_held = mark
        position = int(cursor)
        if not now - ACTIVE_FOR - ESTIMATE_SLACK <= first_id < position <= now or held <= first_held:
            return None
        per_second = (held - first_held) / (position - first_id)
        return _two_digits(held + per_second * (now - position))

    def load_snapshot(self) -> None:
        try:
            with self._path.open("rb") as handle:
                raw = handle.read(MAX_SNAPSHOT_BYTES + 1)
        except FileNotFoundError:
            return
        except OSError as exc:
            self._snapshot_rejected(f"cannot read it: {exc.strerror}")
            return
        try:
            loaded = mirror_from_snapshot(raw, self._source, self._wall_clock())
        except SnapshotError as exc:
            self._snapshot_rejected(str(exc))
            return
        self.current.mirror = loaded
        expired = self.mirror.expire(self._wall_clock())
        self.status.snapshot_loaded = True
        log.info(
            "loaded %d APIBAN entries from %s (%d expired since, %d non-routable dropped), "
            "resuming after ID %s",
            len(self.mirror.entries),
            self._path,
            expired,
            self.mirror.dropped["non_routable"],
            self.mirror.cursor,
        )

    def _snapshot_rejected(self, reason: str) -> None:
        self.status.snapshot_error = reason
        log.warning("ignoring the list snapshot %s: %s; pulling the whole list again", self._path, reason)

    async def run(self) -> None:
        while True:
            try:
                delay = await self.step()
            except Exception:
                # A bug here must not silently end syncing (pycrowdsec's dead-thread trap).
                log.exception("APIBAN sync step failed; retrying in %.0f s", self._poll)
                delay = self._poll
            self.status.next_sync = self._wall_clock() + delay
            await self._sleep(delay)

    async def step(self) -> float:
        """Do one unit of sync work; return the seconds to wait before the next one."""
        now = self._wall_clock()
        self.mirror.expire(now)
        if self.mirror.needs_full_pull(now):
            self.mirror.begin_full_pull(now)
            log.info("pulling the whole APIBAN list from ID %s", START_ID)
        pulling = self.mirror.full_pull_started is not None
        wait = self._client.budget.wait_time(
            reserve=max(self._reserve if pulling else 0, self.standalone_reserve)
        )
        if wait > 0:
            if pulling:
                log.info("%s", self.progress(wait))
            return wait
        self.status.state = "full_pull" if pulling else "incremental"
        cursor = self.mirror.cursor
        if pulling and cursor == START_ID:
            # A pull's sweep mark is when it asks for its first page: a pull started over counts
            # only what it reports itself.
            self.mirror.full_pull_started = int(now)
        try:
            page = await self._client.banned(cursor)
        except ApibanError as exc:
            return self._failed(exc)
        self._trouble.succeeded(f"resumed at ID {cursor}")
        self.status.consecutive_failures = 0
        self.status.pages += 1
        held = self.mirror.add(page.ips, page.next_id or cursor, now)
        if held < len(page.ips):
            log.info(
                "APIBAN page after ID %s: ignored %d of %d entries (not an address, or non-routable)",
                cursor,
                len(page.ips) - held,
                len(page.ips),
            )
        if page.end or page.next_id is None:
            return await self._caught_up(now, pulling)
        self.mirror.cursor = page.next_id
        if pulling and (cursor == START_ID or self._pull_mark is None):
            self._pull_mark = (int(page.next_id), len(self.mirror.entries))
        await self.save()
        return 0.0

    async def _caught_up(self, now: float, was_full_pull: bool) -> float:
        self.status.state = "idle"
        if not was_full_pull:
            self.mirror.last_sync = now
            await self.save()
            return self._poll
        reported = self.mirror.reported_in_full_pull()
        reason = self._short_pull(reported)
        if reason is not None:
            return await self._reject_full_pull(now, reported, reason)
        self._rejections = 0
        self.status.full_pull_rejected = None
        swept = self.mirror.complete_full_pull(now)
        log.info(
            "APIBAN list complete: %d entries (%d no longer reported dropped)",
            len(self.mirror.entries),
            swept,
        )
        await self.save()
        return self._poll

    def _short_pull(self, reported: int) -> str | None:
        """Why a full pull reporting ``reported`` entries cannot be taken as the list, or None."""
        expected = self.mirror.last_full_entries
        if not expected or reported >= expected * SHRINK_FACTOR:
            self._short_pulls.clear()
            return None
        if self._short_pulls and not _agree([*self._short_pulls, reported]):
            self._short_pulls.clear()
        self._short_pulls.append(reported)
        if len(self._short_pulls) >= SHRINK_CONFIRMATIONS:
            log.warning(
                "APIBAN list shrank from %d to %d entries; accepted after %d full pulls in a row agreed",
                expected,
                reported,
                len(self._short_pulls),
            )
            self._short_pulls.clear()
            return None
        return (
            f"the full pull reported {reported:,} addresses, under half of the {expected:,} "
            f"of the last complete one"
        )

    async def _reject_full_pull(self, now: float, reported: int, reason: str) -> float:
        expected = self.mirror.last_full_entries or 0
        self._rejections += 1
        self.status.full_pulls_rejected += 1
        self.status.state = "failing"
        self.status.full_pull_rejected = FullPullRejection(
            now, reported, expected, reason, repeats=len(self._short_pulls)
        )
        self.mirror.restart_full_pull()
        delay = min(self._poll * 2.0 ** (self._rejections - 1), max(MAX_RETRY_DELAY, self._poll))
        log.warning(
            "APIBAN full pull not accepted: %s; keeping the %d entries held, pulling again in %.0f s",
            reason,
            len(self.mirror.entries),
            delay,
        )
        await self.save()
        return delay

    def _failed(self, exc: ApibanError) -> float:
        if isinstance(exc, BudgetSpent):
            return max(self._client.budget.wait_time(), 0.001)
        self.status.state = "failing"
        self.status.consecutive_failures += 1
        self._trouble.failed(self._client.last_error_text(), f"paused at ID {self.mirror.cursor}")
        if isinstance(exc, RateLimited):
            return max(self._client.budget.wait_time(), 1.0)
        if isinstance(exc, BadKey):
            # Nothing to gain by retrying soon; the key may be fixed upstream.
            return max(self._poll, 600.0)
        return min(self._poll, 5.0 * 2.0 ** (self.status.consecutive_failures - 1))

    async def save(self) -> None:
        # The state dir first: a store that fails stops this task (shared_mirror) in publish.
        now = self._wall_clock()
        data = self.mirror.to_snapshot(self._source, now)
        try:
            await asyncio.to_thread(atomic_write, self._path, data)
        except OSError as exc:
            log.warning("cannot save the list snapshot %s: %s", self._path, exc.strerror)
        else:
            self.status.snapshot_saved = now
        if self.publish is not None:
            await self.publish(self.mirror)


def _agree(counts: list[int]) -> bool:
    """Whether full pull sizes are the same within ``SHRINK_AGREEMENT``."""
    return max(counts) - min(counts) <= SHRINK_AGREEMENT * max(counts)


def _two_digits(value: float) -> int:
    """An estimate shown as what it is: 5,312.7 -> 5,300."""
    step = int(10 ** max(0, len(str(round(value))) - 2))
    return round(value / step) * step
