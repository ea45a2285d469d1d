"""Mirror mode: the whole APIBAN list in memory, kept current within the request budget.

A full pull pages ``/banned/100`` to the end (250 addresses a page), then incremental pulls
ask for what came after the last ID every ``apiban.poll_interval``. The feed never sends
removals, so an address stays listed for 7 days after it was last reported, and a full
re-pull once a week (mark and sweep: whatever the new pull does not report again is dropped)
resyncs with APIBAN's active set. Progress is saved after every page, so a 429, an outage or
a restart resumes from the last good ID instead of starting over.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import time
from bisect import bisect_right
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import orjson

from .addresses import parse_ip
from .apiban import ApibanClient, ApibanError, BadKey, BudgetSpent, RateLimited
from .jsonutil import loads_object
from .lookups import Verdict
from .state import atomic_write
from .timing import Sleep

log = logging.getLogger(__name__)

START_ID = "100"  # what every APIBAN client starts from ("arbitrary ID copied from reference source")
ACTIVE_FOR = 7 * 86400  # APIBAN: an address is active for 7 days after it was last reported
# The weekly re-pull starts a day early: entries received in the previous full pull expire
# 7 days after it, and a re-pull started at that moment would leave them unlisted until its
# pages arrive again (a 20,000-entry pull takes ~16 minutes of budget).
FULL_PULL_EVERY = 6 * 86400
SNAPSHOT_FORMAT = "hepsub-apiban/mirror"
SNAPSHOT_VERSION = 2  # 2 added each entry's local serial; version 1 snapshots still load


class Mirror:
    """The list and the sync position; answers lookups for listed addresses (``ListSource``)."""

    def __init__(self) -> None:
        self.entries: dict[str, Verdict] = {}
        self.cursor = START_ID  # the ID to ask for next
        self.full_pull_started: int | None = None  # set while a full pull runs: its sweep mark
        self.last_full_sync: float | None = None  # when the last full pull reached the end
        self.last_sync: float | None = None  # when APIBAN last said there is nothing newer
        # Local serials order the list for the APIBAN-compatible API the agent serves to its site:
        # one per entry (APIBAN's own IDs cover a page each), increasing across restarts (they are
        # in the snapshot), and starting near the time in milliseconds so that a list rebuilt after
        # lost state still numbers above what a site client saw before.
        self.serials: dict[str, int] = {}
        self.next_serial = 0
        self._order: tuple[list[int], list[str]] | None = None

    @property
    def loaded(self) -> bool:
        return self.last_full_sync is not None

    def verdict(self, ip: str) -> Verdict | None:
        return self.entries.get(ip)

    def adopt(self, other: Mirror) -> None:
        """Take over another mirror's state in place: lookups hold a reference to this object."""
        self.__dict__.update(other.__dict__)
        self._order = None

    def needs_full_pull(self, now: float) -> bool:
        if self.full_pull_started is not None:
            return False
        return self.last_full_sync is None or now - self.last_full_sync >= FULL_PULL_EVERY

    def begin_full_pull(self, now: float) -> None:
        self.cursor = START_ID
        self.full_pull_started = int(now)

    def add(self, ips: Iterable[str], entry_id: str, now: float) -> int:
        """Record addresses APIBAN reported under ``entry_id``; returns how many were addresses."""
        reported = int(now)
        # A full pull re-reports the whole list: entries already held keep their serial, so site
        # clients are not sent the whole list again; an incremental report is news and moves the
        # entry to the end, as APIBAN gives a reactivated address a new ID.
        renumber_known = self.full_pull_started is None
        count = 0
        for text in ips:
            address = parse_ip(text)
            if address is not None:
                ip = address.text
                self.entries[ip] = Verdict(ip, True, "mirror", entry_id, reported)
                if renumber_known or ip not in self.serials:
                    self.serials[ip] = self._new_serial(now)
                count += 1
        self._order = None
        return count

    def _new_serial(self, now: float) -> int:
        serial = max(self.next_serial, int(now * 1000))
        self.next_serial = serial + 1
        return serial

    def _remove(self, ips: list[str]) -> int:
        for ip in ips:
            del self.entries[ip]
            self.serials.pop(ip, None)
        if ips:
            self._order = None
        return len(ips)

    def page_after(self, after: int, limit: int, skip: Callable[[str], bool]) -> tuple[list[str], int | None]:
        """Up to ``limit`` addresses numbered after ``after``, in serial order, leaving out ``skip``ped
        ones; and the serial to continue from (None when nothing is numbered after ``after``)."""
        if self._order is None:
            ordered = sorted((serial, ip) for ip, serial in self.serials.items())
            self._order = ([serial for serial, _ in ordered], [ip for _, ip in ordered])
        serials, ips = self._order
        page: list[str] = []
        last: int | None = None
        for index in range(bisect_right(serials, after), len(serials)):
            if len(page) == limit:
                break
            last = serials[index]
            if not skip(ips[index]):
                page.append(ips[index])
        return page, last

    def caught_up(self, now: float) -> int:
        """APIBAN has nothing newer. Ends a full pull by sweeping what it did not report again."""
        self.last_sync = now
        swept = 0
        if self.full_pull_started is not None:
            mark = self.full_pull_started
            swept = self._remove([ip for ip, v in self.entries.items() if (v.last_reported or 0) < mark])
            self.full_pull_started = None
            self.last_full_sync = now
        return swept

    def expire(self, now: float) -> int:
        horizon = now - ACTIVE_FOR
        return self._remove([ip for ip, v in self.entries.items() if (v.last_reported or 0) <= horizon])

    def to_snapshot(self, source: str, now: float) -> bytes:
        return orjson.dumps(
            {
                "format": SNAPSHOT_FORMAT,
                "version": SNAPSHOT_VERSION,
                "source": source,
                "saved_at": now,
                "cursor": self.cursor,
                "full_pull_started": self.full_pull_started,
                "last_full_sync": self.last_full_sync,
                "last_sync": self.last_sync,
                "next_serial": self.next_serial,
                "entries": [[v.ip, v.id, v.last_reported, self.serials[v.ip]] for v in self.entries.values()],
            }
        )


class SnapshotError(ValueError):
    """A snapshot that cannot be trusted; it is ignored whole, never used half-way."""


def mirror_from_snapshot(raw: bytes, source: str) -> Mirror:
    document = loads_object(raw)
    if document is None:
        raise SnapshotError("not a JSON object")
    version = document.get("version")
    if document.get("format") != SNAPSHOT_FORMAT or version not in (1, SNAPSHOT_VERSION):
        raise SnapshotError("not a hepsub-apiban mirror snapshot of a known version")
    if document.get("source") != source:
        raise SnapshotError("written for another APIBAN URL or key")
    mirror = Mirror()
    mirror.cursor = _digits(document.get("cursor"), "cursor")
    started = _optional_number(document.get("full_pull_started"), "full_pull_started")
    mirror.full_pull_started = None if started is None else int(started)
    mirror.last_full_sync = _optional_number(document.get("last_full_sync"), "last_full_sync")
    mirror.last_sync = _optional_number(document.get("last_sync"), "last_sync")
    entries = document.get("entries")
    if not isinstance(entries, list):
        raise SnapshotError("entries is not a list")
    next_serial = _optional_number(document.get("next_serial"), "next_serial")
    mirror.next_serial = int(next_serial or 0)
    for index, item in enumerate(entries):
        parsed = _entry(item, with_serial=version == SNAPSHOT_VERSION)
        if parsed is None:
            raise SnapshotError(f"entry {index} is malformed")
        verdict, serial = parsed
        mirror.entries[verdict.ip] = verdict
        # A version 1 snapshot has no serials: number its entries in stored order.
        mirror.serials[verdict.ip] = serial if serial is not None else mirror._new_serial(0)
    if mirror.serials and mirror.next_serial <= max(mirror.serials.values()):
        raise SnapshotError("next_serial is not above every entry's serial")
    return mirror


def _digits(value: object, name: str) -> str:
    if not isinstance(value, str) or not value.isdigit():
        raise SnapshotError(f"{name} is not an APIBAN ID")
    return value


def _optional_number(value: object, name: str) -> float | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise SnapshotError(f"{name} is not a number")
    return float(value)


def _entry(item: Any, *, with_serial: bool) -> tuple[Verdict, int | None] | None:
    if not isinstance(item, list) or len(item) != (4 if with_serial else 3):
        return None
    ip, entry_id, reported = item[:3]
    serial = item[3] if with_serial else None
    address = parse_ip(ip)
    if address is None or address.text != ip or not isinstance(entry_id, str) or not entry_id.isdigit():
        return None
    if not _is_int(reported) or (with_serial and not _is_int(serial)):
        return None
    return Verdict(ip, True, "mirror", entry_id, reported), serial


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def snapshot_source(url: str, key: str) -> str:
    """Identifies the feed a snapshot came from without storing the key."""
    return hashlib.sha256(f"{url}\n{key}".encode()).hexdigest()[:16]


@dataclass(slots=True)
class SyncStatus:
    state: str = "starting"  # starting, full_pull, incremental, idle, failing
    pages: int = 0
    next_sync: float | None = None
    consecutive_failures: int = 0
    snapshot_loaded: bool = False
    snapshot_error: str | None = None
    snapshot_saved: float | None = None


class MirrorSync:
    """Keeps a Mirror current; one step is at most one APIBAN request."""

    def __init__(
        self,
        client: ApibanClient,
        mirror: Mirror,
        *,
        poll_interval: float,
        snapshot_path: Path,
        source: str,
        wall_clock: Callable[[], float] = time.time,
        sleep: Sleep = asyncio.sleep,
    ) -> None:
        self._client = client
        self.mirror = mirror
        self._poll = poll_interval
        self._path = snapshot_path
        self._source = source
        self._wall_clock = wall_clock
        self._sleep = sleep
        self.status = SyncStatus()
        self._expected = 0  # entries of the last complete list: the size a new full pull will reach
        # Leave one request of each window to per-IP checks while the list is being pulled.
        self._reserve = 1 if client.budget.limit.requests >= 3 else 0

    def progress(self, next_in: float) -> str:
        """One line on a full pull under way, for the log and the status page."""
        held = len(self.mirror.entries)
        of = f" of ~{self._expected:,}" if self._expected else " so far"
        return (
            f"APIBAN list: synced {held:,}{of} addresses ({self.status.pages} pages), "
            f"{self._client.budget.used()} requests used in this window, next page in {next_in:.0f} s"
        )

    def load_snapshot(self) -> None:
        try:
            raw = self._path.read_bytes()
        except FileNotFoundError:
            return
        except OSError as exc:
            self._snapshot_rejected(f"cannot read it: {exc.strerror}")
            return
        try:
            loaded = mirror_from_snapshot(raw, self._source)
        except SnapshotError as exc:
            self._snapshot_rejected(str(exc))
            return
        self.mirror.adopt(loaded)
        expired = self.mirror.expire(self._wall_clock())
        self._expected = len(self.mirror.entries)
        self.status.snapshot_loaded = True
        log.info(
            "loaded %d APIBAN entries from %s (%d expired since), resuming after ID %s",
            len(self.mirror.entries),
            self._path,
            expired,
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
        wait = self._client.budget.wait_time(reserve=self._reserve if pulling else 0)
        if wait > 0:
            if pulling:
                log.info("%s", self.progress(wait))
            return wait
        self.status.state = "full_pull" if pulling else "incremental"
        cursor = self.mirror.cursor
        try:
            page = await self._client.banned(cursor)
        except ApibanError as exc:
            return self._failed(exc)
        if self.status.consecutive_failures:
            log.info("APIBAN list sync resumed at ID %s", cursor)
        self.status.consecutive_failures = 0
        self.status.pages += 1
        self.mirror.add(page.ips, page.next_id or cursor, now)
        if page.end or page.next_id in (None, cursor):
            return await self._caught_up(now, pulling)
        self.mirror.cursor = page.next_id or cursor
        await self.save()
        return 0.0

    async def _caught_up(self, now: float, was_full_pull: bool) -> float:
        swept = self.mirror.caught_up(now)
        self.status.state = "idle"
        if was_full_pull:
            self._expected = len(self.mirror.entries)
            log.info(
                "APIBAN list complete: %d entries (%d no longer reported dropped)",
                len(self.mirror.entries),
                swept,
            )
        await self.save()
        return self._poll

    def _failed(self, exc: ApibanError) -> float:
        if isinstance(exc, BudgetSpent):
            return max(self._client.budget.wait_time(), 0.001)
        self.status.state = "failing"
        self.status.consecutive_failures += 1
        if self.status.consecutive_failures == 1:
            log.warning(
                "APIBAN list sync paused at ID %s: %s", self.mirror.cursor, self._client.last_error_text()
            )
        if isinstance(exc, RateLimited):
            return max(self._client.budget.wait_time(), 1.0)
        if isinstance(exc, BadKey):
            # Nothing to gain by retrying soon; the key may be fixed upstream.
            return max(self._poll, 600.0)
        return min(self._poll, 5.0 * 2.0 ** (self.status.consecutive_failures - 1))

    async def save(self) -> None:
        now = self._wall_clock()
        data = self.mirror.to_snapshot(self._source, now)
        try:
            await asyncio.to_thread(atomic_write, self._path, data)
        except OSError as exc:
            log.warning("cannot save the list snapshot %s: %s", self._path, exc.strerror)
            return
        self.status.snapshot_saved = now
