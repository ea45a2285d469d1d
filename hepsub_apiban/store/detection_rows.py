"""A served detection as the store holds it: one row per address, merged, numbered and checked.

When an agent writes what its book served, the address's row (one per address, whoever detected
it) is merged with it (``merge``): rules joined, the later end wins, and the row keeps its ID
unless the end moved ``REANNOUNCE_AFTER`` past what clients were told, or the row had ended (a
new detection, a new ID). IDs (``_Ids``) come from the store's counter, above every APIBAN serial
in the store and every ID handed out before. A row read back (``_row``) is checked as the state
dir's snapshot is (the store is shared, not blindly trusted); ``_columns`` lays rows out as the
write's arrays. The writer and follower that use these is store/detections.py.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

import asyncpg
import orjson

from ..core.addresses import parse_ip
from ..detection.book import REANNOUNCE_AFTER, Detection

MAX_AGENTS = 16  # agents named per row
MAX_TEXT = 400  # characters of evidence or proof per rule, as in the state dir's snapshot
FAR_AHEAD_MS = 86_400_000  # a provisional ID further ahead of the database's clock is not followed


@dataclass(frozen=True, slots=True)
class Row:
    """A row read from the store: the detection as every agent serves it, and when it ended."""

    detection: Detection
    ended_at: float | None


class _Ids:
    """IDs handed out in one write: each above the last one, the database's clock in milliseconds
    (apiban/mirror.py's scale) and every APIBAN serial in the store."""

    def __init__(self, last: int, now_ms: int, listed_next: int) -> None:
        self.last = last
        self._now_ms = now_ms
        self._listed_next = listed_next

    @property
    def now(self) -> float:
        return self._now_ms / 1000.0

    def take(self, provisional: int | None) -> int:
        # The provisional ID the book served it under, when not absurdly ahead: the writer's own
        # clients then see the store's ID as a renumbering upward, as for an extension.
        ahead = min(provisional or 0, self._now_ms + FAR_AHEAD_MS)
        self.last = max(self.last + 1, self._now_ms, self._listed_next, ahead)
        return self.last


def merge(
    row: Row | None, mine: Detection, agent: str, now: float, take: Callable[[int | None], int]
) -> Detection:
    """What the store holds of an address once this agent's served ``mine`` joins its row: one
    entry per address, rules joined, the later end, the row's ID unless it ended or the end moved
    REANNOUNCE_AFTER past what clients were told."""
    if row is None or row.ended_at is not None or row.detection.until <= now:
        return Detection(
            mine.ip,
            mine.since,
            mine.until,
            dict(mine.rules),
            mine.proof,
            served=True,
            serial=take(mine.serial),
            repeats=mine.repeats,
            announced_until=mine.until,
            agents=(agent,),
        )
    held = row.detection
    rules = dict(held.rules)
    for rule, text in mine.rules.items():
        rules.setdefault(rule, text)
    until = max(held.until, mine.until)
    renumber = until - held.announced_until >= REANNOUNCE_AFTER
    return Detection(
        mine.ip,
        min(held.since, mine.since),
        until,
        rules,
        held.proof or mine.proof,
        served=True,
        serial=take(mine.serial) if renumber else held.serial,
        repeats=max(held.repeats, mine.repeats),
        announced_until=until if renumber else held.announced_until,
        agents=held.agents if agent in held.agents else (*held.agents, agent)[:MAX_AGENTS],
    )


def _row(record: asyncpg.Record) -> Row | None:
    """A stored row as a detection; None if it is not one this agent can serve (checked as the
    state dir's snapshot is: the store is shared, not blindly trusted)."""
    address = parse_ip(record["ip"])
    rules = _object(record["rules"])
    agents = _list(record["agents"])
    times = (record["since"], record["until"], record["announced_until"])
    if address is None or rules is None or agents is None or not all(map(math.isfinite, times)):
        return None
    return Row(
        Detection(
            address.text,
            record["since"],
            record["until"],
            {str(rule): _text(text) for rule, text in list(rules.items())[:32]},
            None if record["proof"] is None else _text(record["proof"]),
            served=True,
            serial=record["serial"],
            repeats=max(0, min(record["repeats"], 16)),
            announced_until=record["announced_until"],
            agents=tuple(str(agent)[:64] for agent in agents[:MAX_AGENTS]),
        ),
        record["ended_at"],
    )


def _object(raw: str) -> dict[str, Any] | None:
    value = orjson.loads(raw)
    return value if isinstance(value, dict) else None


def _list(raw: str) -> list[Any] | None:
    value = orjson.loads(raw)
    return value if isinstance(value, list) else None


def _text(value: object) -> str:
    return value[:MAX_TEXT] if isinstance(value, str) else ""


def _columns(detections: Iterable[Detection]) -> tuple[list[Any], ...]:
    """The rows as one array per column, in UPSERT's order of parameters before the changes."""
    rows = list(detections)
    dumps = orjson.dumps
    return (
        [d.ip for d in rows],
        [d.serial for d in rows],
        [d.since for d in rows],
        [d.until for d in rows],
        [d.announced_until for d in rows],
        [dumps({rule: _text(text) for rule, text in d.rules.items()}).decode() for d in rows],
        [None if d.proof is None else _text(d.proof) for d in rows],
        [d.repeats for d in rows],
        [dumps(list(d.agents)).decode() for d in rows],
    )
