"""The APIBAN list held in memory: ``Mirror`` holds the entries with their local serials, the
tombstones of removed ones and the position a pull resumes from, and answers a lookup with one
dict probe; ``CurrentMirror`` is the one reference everyone who answers from the list reads it
through, so a mirror replaced whole (a loaded snapshot, the store's copy) reaches them all at once.
Neither makes a request nor touches a file: ``MirrorSync`` (``mirror``) fills the list from
APIBAN, and ``snapshot`` reads it back from the state dir.
"""

from __future__ import annotations

from bisect import bisect_right
from collections import Counter, deque
from collections.abc import Iterable, Iterator

import orjson

from ..core.addresses import Addr, is_non_routable, parse_ip
from .lookups import Verdict

START_ID = "100"  # what every APIBAN client starts from ("arbitrary ID copied from reference source")
ACTIVE_FOR = 7 * 86400  # APIBAN: an address is active for 7 days after it was last reported
# The weekly re-pull starts a day early: entries received in the previous full pull expire
# 7 days after it, and a re-pull started at that moment would leave them unlisted until its
# pages arrive again (a 20,000-entry pull takes ~16 minutes of budget).
FULL_PULL_EVERY = 6 * 86400
SNAPSHOT_FORMAT = "hepsub-apiban/mirror"
SNAPSHOT_VERSION = 2  # 2 added each entry's local serial; version 1 snapshots still load
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
        # Addresses added or removed since the store last took them (store/shared_list.py); None:
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

    A loaded snapshot, or the store's copy after a pull ends (store/link.py), replaces the
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
