"""The list snapshot in the state dir, read back: ``mirror_from_snapshot`` checks a saved
mirror field by field against the clock (no time ahead of it, no cursor a day ahead, no repeated
address or serial, at most ``MAX_SNAPSHOT_BYTES``) and gives the whole ``Mirror`` or raises
``SnapshotError``, never half of one; non-routable entries are dropped and counted as the feed's
are. ``snapshot_source`` names the feed a snapshot was written for without storing the key. The
snapshot is written by ``Mirror.to_snapshot`` and saved and loaded by ``MirrorSync`` (``mirror``).
"""

from __future__ import annotations

import hashlib
import math
import time
from typing import Any

from ..core.addresses import Addr, parse_ip
from ..core.jsonutil import loads_object
from .client import ID_AHEAD_LIMIT, is_plain_id
from .held_list import SNAPSHOT_FORMAT, SNAPSHOT_VERSION, Mirror
from .lookups import Verdict

# ~1,000,000 entries; APIBAN lists thousands. Bounds what a damaged file costs to read.
MAX_SNAPSHOT_BYTES = 64 << 20
# A time saved in a snapshot may be this far ahead of the clock at load (a clock stepped back
# by NTP at boot); further ahead, it would keep entries from expiring or the weekly re-pull
# from running, so the snapshot is not trusted.
STATE_CLOCK_SLACK = 600.0


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
