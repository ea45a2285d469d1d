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
CrowdSec decision stream can tell bouncers to delete it.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import math
import time
from bisect import bisect_right
from collections import Counter, deque
from collections.abc import Awaitable, Callable, Iterable, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import orjson

from ..core.addresses import Addr, is_non_routable, parse_ip
from ..core.jsonutil import loads_object
from ..core.state import atomic_write
from ..core.timing import Sleep
from ..core.trouble import FailureRun
from .client import (
    ID_AHEAD_LIMIT,
    ApibanClient,
    ApibanError,
    BadKey,
    BudgetSpent,
    RateLimited,
    is_plain_id,
)
from .lookups import Verdict

# Its name before the wings: operators' log filters use it.
log = logging.getLogger("hepsub_apiban.mirror")
START_ID = "100"  # what every APIBAN client starts from ("arbitrary ID copied from reference source")
ACTIVE_FOR = 7 * 86400  # APIBAN: an address is active for 7 days after it was last reported
ESTIMATE_SLACK = 86400  # a first pull's oldest ID may be this much more than ACTIVE_FOR old
# The weekly re-pull starts a day early: entries received in the previous full pull expire
# 7 days after it, and a re-pull started at that moment would leave them unlisted until its
# pages arrive again (a 20,000-entry pull takes ~16 minutes of budget).
FULL_PULL_EVERY = 6 * 86400
SNAPSHOT_FORMAT = "hepsub-apiban/mirror"
SNAPSHOT_VERSION = 2  # 2 added each entry's local serial; version 1 snapshots still load
# ~1,000,000 entries; APIBAN lists thousands. Bounds what a damaged file costs to read.
MAX_SNAPSHOT_BYTES = 64 << 20
# A time saved in a snapshot may be this far ahead of the clock at load (a clock stepped back
# by NTP at boot); further ahead, it would keep entries from expiring or the weekly re-pull
# from running, so the snapshot is not trusted.
STATE_CLOCK_SLACK = 600.0
# A full pull reporting under SHRINK_FACTOR of the last complete one is retried; the smaller list
# is accepted once SHRINK_CONFIRMATIONS such pulls in a row agree within SHRINK_AGREEMENT.
SHRINK_FACTOR = 0.5
SHRINK_CONFIRMATIONS = 3
SHRINK_AGREEMENT = 0.1
MAX_RETRY_DELAY = 3600.0
MAX_TOMBSTONES = 100_000  # removed entries remembered for the decision stream's "deleted"


class Mirror:
    """The APIBAN list held in memory and the sync position: answers lookups for listed addresses.

    Owns the entries, their local serials (one sequence for the site API, shared with the detection
    book), the tombstones of removed entries and the position a pull resumes from. Changed only by
    ``MirrorSync`` (and, with a store, by ``StoreLink`` following the puller); read through
    ``CurrentMirror`` by the lookups, the blocklist and the book's numbering.

    Never holds a non-routable or malformed address, never makes a request itself, and a read costs
    one dict probe (the serial order is sorted once per change, not per reader).
    """

    def __init__(self) -> None:
        self.entries: dict[str, Verdict] = {}
        self.cursor = START_ID  # the ID to ask for next
        self.full_pull_started: int | None = None  # set while a full pull runs: its sweep mark
        self.last_full_sync: float | None = None  # when the last full pull reached the end
        self.last_sync: float | None = None  # when APIBAN last said there is nothing newer
        self.last_full_entries: int | None = None  # what the last accepted full pull reported
        # Addresses the feed (or a snapshot) gave that are not held: not_an_address, non_routable.
        self.dropped: Counter[str] = Counter()
        # Local serials order the list for the APIBAN-compatible API the agent serves to its site:
        # one per entry (APIBAN's own IDs cover a page each), increasing across restarts (they are
        # in the snapshot), and starting near the time in milliseconds so that a list rebuilt after
        # lost state still numbers above what a site client saw before.
        self.serials: dict[str, int] = {}
        self.next_serial = 0
        self._order: tuple[list[int], list[str]] | None = None
        # (when, entry, serial) of entries dropped by the sweep or by expiry, newest last: what
        # CrowdSec bouncers are told to delete. Not saved: a restart forgets every bouncer too.
        self.removed: deque[tuple[float, Verdict, int]] = deque(maxlen=MAX_TOMBSTONES)
        # Addresses added or removed since the store last took them (store/mirror.py); None:
        # not tracked (no store, or this agent does not pull).
        self.changed: set[str] | None = None

    @property
    def loaded(self) -> bool:
        return self.last_full_sync is not None

    def verdict(self, ip: str) -> Verdict | None:
        return self.entries.get(ip)

    def needs_full_pull(self, now: float) -> bool:
        if self.full_pull_started is not None:
            return False
        return self.last_full_sync is None or now - self.last_full_sync >= FULL_PULL_EVERY

    def begin_full_pull(self, now: float) -> None:
        self.cursor = START_ID
        self.full_pull_started = int(now)

    def add(self, ips: Iterable[str], entry_id: str, now: float) -> int:
        """Record addresses APIBAN reported under ``entry_id``; returns how many were held.

        A string that is not an address is skipped, not fatal to its page: rejecting the page
        would stall the sync on it for good, while skipping it lists nothing. A non-routable
        address (loopback, private, documentation ranges) is skipped too: no attacker sends
        from one, and a firewall fed ``127.0.0.1`` or ``10.0.0.1`` by the site API would cut
        the site off from itself.
        """
        reported = int(now)
        # A full pull re-reports the whole list: entries already held keep their serial, so site
        # clients are not sent the whole list again; an incremental report is news and moves the
        # entry to the end, as APIBAN gives a reactivated address a new ID.
        renumber_known = self.full_pull_started is None
        count = 0
        for text in ips:
            address = self._admit(parse_ip(text))
            if address is not None:
                ip = address.text
                self.entries[ip] = Verdict(ip, True, "mirror", entry_id, reported)
                if renumber_known or ip not in self.serials:
                    self.serials[ip] = self.new_serial(now)
                if self.changed is not None:
                    self.changed.add(ip)
                count += 1
        self._order = None
        return count

    def _admit(self, address: Addr | None) -> Addr | None:
        if address is None:
            self.dropped["not_an_address"] += 1
            return None
        if is_non_routable(address):
            self.dropped["non_routable"] += 1
            return None
        return address

    def new_serial(self, now: float) -> int:
        serial = max(self.next_serial, int(now * 1000))
        self.next_serial = serial + 1
        return serial

    def _remove(self, ips: list[str], now: float) -> int:
        for ip in ips:
            self.removed.append((now, self.entries.pop(ip), self.serials.pop(ip)))
        if self.changed is not None:
            self.changed.update(ips)
        if ips:
            self._order = None
        return len(ips)

    def touched(self) -> None:
        """The entries were changed from outside (a follower applying the store's changes)."""
        self._order = None

    def after(self, after: int) -> Iterator[tuple[int, str]]:
        """(serial, address) of the entries numbered after ``after``, in serial order. The order is
        sorted once per change of the list, not per reader; read it before the list changes again."""
        if self._order is None:
            ordered = sorted((serial, ip) for ip, serial in self.serials.items())
            self._order = ([serial for serial, _ in ordered], [ip for _, ip in ordered])
        serials, ips = self._order
        for index in range(bisect_right(serials, after), len(serials)):
            yield serials[index], ips[index]

    def reported_in_full_pull(self) -> int:
        """How many held entries the full pull under way has reported so far."""
        mark = self.full_pull_started
        if mark is None:
            return 0
        return sum(1 for v in self.entries.values() if (v.last_reported or 0) >= mark)

    def restart_full_pull(self) -> None:
        """Back to the start of the list, nothing swept; the pull takes a new mark when it asks
        for its first page again."""
        self.cursor = START_ID

    def complete_full_pull(self, now: float) -> int:
        """A full pull reached the end and is accepted: sweep what it did not report again."""
        mark = self.full_pull_started if self.full_pull_started is not None else int(now)
        swept = self._remove([ip for ip, v in self.entries.items() if (v.last_reported or 0) < mark], now)
        self.full_pull_started = None
        self.last_sync = self.last_full_sync = now
        self.last_full_entries = len(self.entries)
        return swept

    def expire(self, now: float) -> int:
        horizon = now - ACTIVE_FOR
        return self._remove([ip for ip, v in self.entries.items() if (v.last_reported or 0) <= horizon], now)

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
                "last_full_entries": self.last_full_entries,
                "next_serial": self.next_serial,
                "entries": [[v.ip, v.id, v.last_reported, self.serials[v.ip]] for v in self.entries.values()],
            }
        )


class CurrentMirror:
    """The mirror the agent answers from, read through by everyone who answers from it.

    A loaded snapshot, or the store's copy after a pull ends (store/mirror.py), replaces the
    mirror whole while the agent runs. The lookups, the site API's blocklist and the detection
    book's numbering are built once, before any load, and keep this object: each reads ``mirror``
    on every use, so a replacement reaches them all at once, with no state copied into an object
    someone else holds. Built by the application factory, handed to each at construction.
    """

    __slots__ = ("mirror",)

    def __init__(self, mirror: Mirror | None = None) -> None:
        self.mirror = mirror if mirror is not None else Mirror()

    # ``ListSource`` (apiban/lookups.py): what the packet path asks, one attribute read more than the mirror.
    @property
    def loaded(self) -> bool:
        return self.mirror.loaded

    def verdict(self, ip: str) -> Verdict | None:
        return self.mirror.entries.get(ip)

    # The serial source of the detection book: local detections share the mirror's sequence.
    def new_serial(self, now: float) -> int:
        return self.mirror.new_serial(now)

    @property
    def next_serial(self) -> int:
        return self.mirror.next_serial

    @next_serial.setter
    def next_serial(self, value: int) -> None:
        self.mirror.next_serial = value


class SnapshotError(ValueError):
    """A snapshot that cannot be trusted; it is ignored whole, never used half-way."""


def mirror_from_snapshot(raw: bytes, source: str, now: float | None = None) -> Mirror:
    """The mirror a snapshot holds, checked field by field against ``now`` (default: the clock);
    ``SnapshotError`` for anything malformed. Non-routable entries are dropped and counted."""
    if len(raw) > MAX_SNAPSHOT_BYTES:
        raise SnapshotError(f"larger than {MAX_SNAPSHOT_BYTES:,} bytes")
    now = time.time() if now is None else now
    latest = now + STATE_CLOCK_SLACK
    document = loads_object(raw)
    if document is None:
        raise SnapshotError("not a JSON object")
    version = document.get("version")
    if document.get("format") != SNAPSHOT_FORMAT or version not in (1, SNAPSHOT_VERSION):
        raise SnapshotError("not a hepsub-apiban mirror snapshot of a known version")
    if document.get("source") != source:
        raise SnapshotError("written for another APIBAN URL or key")
    if _time(document.get("saved_at"), "saved_at", latest) is None:
        raise SnapshotError("saved_at is missing")
    mirror = Mirror()
    mirror.cursor = _cursor(document.get("cursor"), now)
    started = _time(document.get("full_pull_started"), "full_pull_started", latest)
    mirror.full_pull_started = None if started is None else int(started)
    mirror.last_full_sync = _time(document.get("last_full_sync"), "last_full_sync", latest)
    mirror.last_sync = _time(document.get("last_sync"), "last_sync", latest)
    # A serial is the time in milliseconds, run ahead only by as many serials as were handed out
    # at once: a day ahead would take 86 million of them.
    max_serial = int((now + 86400) * 1000)
    mirror.next_serial = _count(document.get("next_serial", 0), "next_serial", max_serial)
    full_entries = document.get("last_full_entries")
    if full_entries is not None:
        mirror.last_full_entries = _count(full_entries, "last_full_entries", MAX_SNAPSHOT_BYTES)
    entries = document.get("entries")
    if not isinstance(entries, list):
        raise SnapshotError("entries is not a list")
    _load_entries(mirror, entries, with_serial=version == SNAPSHOT_VERSION, latest=latest)
    if mirror.last_full_entries is None and mirror.last_full_sync is not None:
        mirror.last_full_entries = len(mirror.entries)  # written before the count was kept
    return mirror


def _load_entries(mirror: Mirror, entries: list[Any], *, with_serial: bool, latest: float) -> None:
    serials: set[int] = set()
    seen: set[str] = set()
    for index, item in enumerate(entries):
        parsed = _entry(item, with_serial=with_serial, latest=latest)
        if isinstance(parsed, str):
            raise SnapshotError(f"entry {index} is malformed: {parsed}")
        address, verdict, serial = parsed
        if address.text in seen:
            raise SnapshotError(f"entry {index} repeats an address")
        seen.add(address.text)
        if serial is not None:
            if serial in serials or serial >= mirror.next_serial:
                raise SnapshotError(f"entry {index} has a serial that is taken or not below next_serial")
            serials.add(serial)
        if mirror._admit(address) is None:
            continue
        mirror.entries[verdict.ip] = verdict
        # A version 1 snapshot has no serials: number its entries in stored order.
        mirror.serials[verdict.ip] = serial if serial is not None else mirror.new_serial(0)


def _cursor(value: object, now: float) -> str:
    if not is_plain_id(value):
        raise SnapshotError("cursor is not an APIBAN ID (ASCII digits)")
    assert isinstance(value, str)
    if int(value) > now + ID_AHEAD_LIMIT:
        raise SnapshotError("cursor is more than a day ahead of the clock")
    return value


def _time(value: object, name: str, latest: float) -> float | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise SnapshotError(f"{name} is not a number")
    if value < 0 or value > latest:
        raise SnapshotError(f"{name} is {'negative' if value < 0 else 'in the future'}")
    return float(value)


def _count(value: object, name: str, limit: int) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or not 0 <= value <= limit:
        raise SnapshotError(f"{name} is not a whole number from 0 to {limit:,}")
    return value


def _entry(item: Any, *, with_serial: bool, latest: float) -> tuple[Addr, Verdict, int | None] | str:
    """The entry, or why it is malformed."""
    if not isinstance(item, list) or len(item) != (4 if with_serial else 3):
        return "not a list of ip, ID, time" + (", serial" if with_serial else "")
    ip, entry_id, reported = item[:3]
    serial: int | None = item[3] if with_serial else None
    address = parse_ip(ip)
    if address is None or address.text != ip:
        return "not an address in canonical form"
    if not is_plain_id(entry_id):
        return "ID is not an APIBAN ID"
    if not _is_int(reported) or not 0 <= reported <= latest:
        return "the time reported is not a unix time up to now"
    if with_serial and (not _is_int(serial) or serial is None or serial < 0):
        return "serial is not a whole number"
    return address, Verdict(ip, True, "mirror", entry_id, reported), serial


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def snapshot_source(url: str, key: str) -> str:
    """Identifies the feed a snapshot came from without storing the key."""
    return hashlib.sha256(f"{url}\n{key}".encode()).hexdigest()[:16]


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
