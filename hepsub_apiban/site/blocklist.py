"""What the site's blocking clients are told is blocked: one view for the site API and the
CrowdSec decision stream.

Two sources: the APIBAN mirror (an entry is active for 7 days after it was last reported) and,
with ``site.include_local``, the local detections that are served. Both take their numbers from
one sequence (the book draws its serials from the mirror), so one ID orders the merged list and a
client resumes from the last ID it got, whichever source that ID came from (with ``store.url``,
served detections carry the store's IDs, taken above every APIBAN serial: store/detections.py,
so every agent lists them under the same ID). The mirror keeps its
order sorted; the few served detections are merged into it as it is read, so a page costs what it
reads. Allow-listed addresses are never handed out: the allow-list is site policy.
"""

from __future__ import annotations

import heapq
import time
from collections.abc import Iterator
from dataclasses import dataclass

from ..apiban.mirror import ACTIVE_FOR, CurrentMirror, Mirror
from ..core.addresses import NetworkSet, parse_ip
from ..core.timing import Clock
from ..detection.book import Detection, Detections
from ..detection.detector import rule_name

APIBAN_ORIGIN = "apiban"
APIBAN_SCENARIO = "apiban"
LOCAL_ORIGIN = "hepsub-apiban"


@dataclass(frozen=True, slots=True)
class Entry:
    """One address blocked by one source: what a CrowdSec decision says."""

    ip: str
    serial: int
    until: float
    origin: str
    scenario: str


def apiban_entry(ip: str, serial: int, last_reported: int | None) -> Entry:
    return Entry(ip, serial, float((last_reported or 0) + ACTIVE_FOR), APIBAN_ORIGIN, APIBAN_SCENARIO)


def local_entry(detection: Detection) -> Entry:
    # The first rule that fired names it, as a CrowdSec scenario: hepsub-apiban/auth-failure.
    rule = next(iter(detection.rules), "detection")
    return Entry(
        detection.ip,
        detection.serial or 0,
        detection.until,
        LOCAL_ORIGIN,
        f"{LOCAL_ORIGIN}/{rule_name(rule)}",
    )


class Blocklist:
    """What the site API and the CrowdSec decision stream hand out: the mirror's entries merged with
    the served local detections, allow-listed addresses left out.

    Owns no list of its own: it reads the mirror (through ``CurrentMirror``, which a snapshot or the
    store may replace) and the detection book on every call. Used by ``SiteApi`` and ``DecisionApi``
    only. Never makes an upstream request, never hands out an allow-listed address, and a page
    costs what it reads (the mirror keeps its order sorted).
    """

    def __init__(
        self,
        allow: NetworkSet,
        *,
        include_local: bool,
        clock: Clock = time.time,
        mirror: CurrentMirror | None = None,
        book: Detections | None = None,
    ) -> None:
        self._current = mirror  # None in check mode: no APIBAN list to serve
        self.book = book  # None without detection
        self.include_local = include_local
        self._allow = allow
        self._clock = clock

    @property
    def mirror(self) -> Mirror | None:
        return self._current.mirror if self._current is not None else None

    @property
    def loaded(self) -> bool:
        """Whether the APIBAN list is in (mirror mode, first full pull done)."""
        return self.mirror is not None and self.mirror.loaded

    def now(self) -> float:
        return self._clock()

    def skip(self, ip: str) -> bool:
        """Never handed to a blocking client: a trusted trunk. (Non-routable addresses never get into
        either source: the mirror drops them, the detector never looks at them.)"""
        if not self._allow:  # both sources hold addresses in canonical form
            return False
        address = parse_ip(ip)
        return address is None or address in self._allow

    # ---------------------------------------------------------------- sources

    def served(self, now: float) -> list[Detection]:
        """Active served detections in serial order (none unless ``site.include_local``)."""
        if not self.include_local or self.book is None:
            return []
        return self.book.served(now)

    def listed(self, ip: str) -> Entry | None:
        """The mirror's entry for ``ip``, held or not yet expired."""
        mirror = self.mirror
        verdict = mirror.entries.get(ip) if mirror is not None else None
        if mirror is None or verdict is None:
            return None
        return apiban_entry(ip, mirror.serials[ip], verdict.last_reported)

    def detected(self, ip: str, now: float) -> Entry | None:
        """The served detection of ``ip``, while it lasts."""
        if not self.include_local or self.book is None:
            return None
        detection = self.book.get(ip, now)
        return local_entry(detection) if detection is not None and detection.served else None

    def entries_for(self, ip: str, now: float) -> list[Entry]:
        """Every source's active entry for ``ip``, allow-listed addresses none."""
        if self.skip(ip):
            return []
        found = [self.listed(ip), self.detected(ip, now)]
        return [entry for entry in found if entry is not None and entry.until > now]

    # ---------------------------------------------------------------- the site API's sequence

    def sequence(self, after: int, now: float) -> Iterator[tuple[int, str]]:
        """(serial, address) of what the site API lists after ``after``, in serial order: the mirror's
        entries and the served detections of addresses the mirror does not list, merged. Allow-listed
        addresses are in it (a client's position passes them), for the caller to leave out."""
        mirror = self.mirror
        held = mirror.serials if mirror is not None else {}
        local = [(d.serial or 0, d.ip) for d in self.served(now) if d.ip not in held]
        local = [(serial, ip) for serial, ip in local if serial > after]
        if mirror is None:
            return iter(local)
        return heapq.merge(mirror.after(after), local)

    def page_after(self, after: int, limit: int, now: float) -> tuple[list[str], int | None]:
        """Up to ``limit`` addresses numbered after ``after``, leaving out skipped ones; and the serial
        to continue from (None when nothing is numbered after ``after``). A page never ends between
        two entries of one ID: with a store, a detection numbered by the store while the APIBAN
        puller numbers a page may share an ID with an entry of it (store/detections.py)."""
        page: list[str] = []
        last: int | None = None
        for serial, ip in self.sequence(after, now):
            if len(page) >= limit and serial != last:
                break
            last = serial
            if not self.skip(ip):
                page.append(ip)
        return page, last

    def everything(self, now: float) -> list[str]:
        """Every listed address once, in serial order (the ipset list)."""
        return [ip for _, ip in self.sequence(-1, now) if not self.skip(ip)]

    def check(self, ip: str, now: float) -> int | None:
        """The ID under which ``ip`` is listed, or None: the mirror's, else its served detection's."""
        if self.skip(ip):
            return None
        entry = self.listed(ip) or self.detected(ip, now)
        return entry.serial if entry is not None else None

    # ---------------------------------------------------------------- the decision stream's view

    def active(self, now: float) -> Iterator[Entry]:
        """Every source's active entries; an address listed and detected is in it twice."""
        mirror = self.mirror
        if mirror is not None:
            for ip, verdict in mirror.entries.items():
                entry = apiban_entry(ip, mirror.serials[ip], verdict.last_reported)
                if entry.until > now and not self.skip(ip):
                    yield entry
        for detection in self.served(now):
            if not self.skip(detection.ip):
                yield local_entry(detection)

    def numbered_after(self, serial: int, now: float) -> Iterator[str]:
        """Addresses with an entry numbered after ``serial`` (new, or reported again), either source."""
        if self.mirror is not None:
            yield from (ip for _, ip in self.mirror.after(serial))
        yield from (d.ip for d in self.served(now) if (d.serial or 0) > serial)

    def high_water(self, now: float) -> int:
        """A serial at least that of every entry there is; every later entry is numbered above it."""
        mirror_high = self.mirror.next_serial - 1 if self.mirror is not None else -1
        return max([mirror_high, *(d.serial or 0 for d in self.served(now))])

    def settle(self, now: float) -> None:
        """End the detections whose time is up, so ``ended_since`` sees every end up to ``now``."""
        if self.book is not None:
            self.book.expire(now)

    def ended_since(self, since: float) -> list[Entry]:
        """Entries that stopped being listed after ``since``, newest first: swept or expired by the
        mirror, ended detections. Exact for a ``since`` at which ``settle`` ran; bounded by what the
        sources remember (their tombstones)."""
        ended: list[Entry] = []
        if self.mirror is not None:
            for at, verdict, serial in reversed(self.mirror.removed):
                if at <= since:
                    break
                ended.append(apiban_entry(verdict.ip, serial, verdict.last_reported))
        if self.include_local and self.book is not None:
            for at, detection in reversed(self.book.ended):
                if at <= since:
                    break
                ended.append(local_entry(detection))
        return [entry for entry in ended if not self.skip(entry.ip)]
