"""Sightings: every IP seen in captured SIP traffic, what it did, and its APIBAN verdict.

The store is bounded and evicts the least recently seen IP, so a flood of spoofed source
addresses costs a fixed amount of memory. Every packet re-reads the verdict, which in mirror
mode is a dict probe (an IP listed after it was first seen is flagged on its next packet); in
check mode a new IP costs one budgeted ``/check`` in the background, never on the packet path.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import Counter, OrderedDict
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

from .addresses import Addr, parse_ip
from .lookups import LookupService, Verdict
from .sip import SipInfo

log = logging.getLogger(__name__)

CALL_ID_SAMPLE = 10
USER_AGENT_SAMPLE = 5
USER_SAMPLE = 10
MAX_BACKGROUND_CHECKS = 64  # check mode: upstream lookups in flight for new IPs


@dataclass(slots=True)
class Sighting:
    ip: str
    address: Addr  # parsed once, when first seen
    first_seen: float
    last_seen: float
    packets: int = 0
    methods: Counter[str] = field(default_factory=Counter)
    user_agents: list[str] = field(default_factory=list)
    call_ids: list[str] = field(default_factory=list)
    users: list[str] = field(default_factory=list)
    verdict: Verdict | None = None
    logged_at: float | None = None  # when this IP was last logged as listed
    checked: bool = False  # check mode: the one upstream lookup a new IP gets was started

    @property
    def listed(self) -> bool | None:
        return None if self.verdict is None else self.verdict.listed

    def to_json(self) -> dict[str, Any]:
        body: dict[str, Any] = {
            "ip": self.ip,
            "first_seen": int(self.first_seen),
            "last_seen": int(self.last_seen),
            "packets": self.packets,
            "listed": self.listed,
            "methods": dict(self.methods),
            "user_agents": self.user_agents,
            "call_ids": self.call_ids,
            "users": self.users,
        }
        if self.verdict is not None:
            body["source"] = self.verdict.source
            if self.verdict.id is not None:
                body["ID"] = self.verdict.id
        return body

    def summary(self) -> dict[str, Any]:
        """What enrichment adds to an IP's verdict: how the capture saw it."""
        return {
            "seen": {
                "first_seen": int(self.first_seen),
                "last_seen": int(self.last_seen),
                "packets": self.packets,
                "methods": dict(self.methods),
                "user_agents": self.user_agents,
            }
        }


def _sample(items: list[str], value: str | None, limit: int) -> None:
    if value and len(items) < limit and value not in items:
        items.append(value)


class Sightings:
    def __init__(
        self,
        lookups: LookupService,
        *,
        capacity: int = 100_000,
        log_every: float = 300.0,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self._lookups = lookups
        self.capacity = capacity
        self._log_every = log_every
        self._clock = clock
        self._items: OrderedDict[str, Sighting] = OrderedDict()
        self._checks: set[asyncio.Task[None]] = set()
        self.evicted = 0
        self.listed_packets = 0

    def __len__(self) -> int:
        return len(self._items)

    def get(self, ip: str) -> Sighting | None:
        return self._items.get(ip)

    def values(self, listed: bool | None = None) -> Iterator[Sighting]:
        """Most recently seen first."""
        for sighting in reversed(self._items.values()):
            if listed is None or sighting.listed is listed:
                yield sighting

    def listed_count(self) -> int:
        return sum(1 for s in self._items.values() if s.listed)

    def record(self, src_ip: str, dst_ip: str, sip: SipInfo, seen_at: float) -> None:
        """One SIP packet: the sender and the receiver are both sightings; the sender acted."""
        sender = self._touch(src_ip, seen_at)
        if sender is not None:
            # Requests count by method, responses by status code ("401" answers to a scanner).
            action = sip.method if sip.is_request and sip.method else str(sip.status or "?")
            sender.methods[action] += 1
            _sample(sender.user_agents, sip.user_agent, USER_AGENT_SAMPLE)
            if sip.is_request:
                _sample(sender.users, sip.from_user, USER_SAMPLE)
            _sample(sender.call_ids, sip.call_id, CALL_ID_SAMPLE)
            self._judge(sender, sip)
        receiver = self._touch(dst_ip, seen_at)
        if receiver is not None:
            _sample(receiver.call_ids, sip.call_id, CALL_ID_SAMPLE)
            self._judge(receiver, sip)

    def _touch(self, ip: str, seen_at: float) -> Sighting | None:
        sighting = self._items.get(ip)  # the decoder's text is canonical in all but odd cases
        if sighting is None:
            address = parse_ip(ip)
            if address is None:
                return None
            sighting = self._items.get(address.text)
            if sighting is None:
                return self._add(address, seen_at)
        self._items.move_to_end(sighting.ip)
        sighting.last_seen = max(sighting.last_seen, seen_at)
        sighting.packets += 1
        return sighting

    def _add(self, address: Addr, seen_at: float) -> Sighting:
        sighting = Sighting(address.text, address, seen_at, seen_at, packets=1)
        self._items[address.text] = sighting
        if len(self._items) > self.capacity:
            self._items.popitem(last=False)
            self.evicted += 1
        return sighting

    def _judge(self, sighting: Sighting, sip: SipInfo) -> None:
        verdict = self._lookups.answer_now(sighting.address)
        if verdict is None:
            self._check_later(sighting)
            return
        sighting.verdict = verdict
        if verdict.listed:
            self.listed_packets += 1
            self._log_listed(sighting)

    def _check_later(self, sighting: Sighting) -> None:
        # In mirror mode the list is on its way (the packet path re-reads it); per-IP checks of
        # captured addresses would take the budget the list pull and enrichment need.
        if self._lookups.mirror is not None or sighting.checked or len(self._checks) >= MAX_BACKGROUND_CHECKS:
            return
        sighting.checked = True
        task = asyncio.get_running_loop().create_task(self._check(sighting))
        self._checks.add(task)
        task.add_done_callback(self._checks.discard)

    async def _check(self, sighting: Sighting) -> None:
        verdict = await self._lookups.lookup(sighting.address, deadline=30.0)
        if verdict.listed is not None:
            sighting.verdict = verdict
            if verdict.listed:
                self._log_listed(sighting)

    def _log_listed(self, sighting: Sighting) -> None:
        now = self._clock()
        if sighting.logged_at is not None and now - sighting.logged_at < self._log_every:
            return
        sighting.logged_at = now
        methods = ", ".join(f"{m} x{n}" for m, n in sighting.methods.most_common(5))
        log.warning(
            "APIBAN-listed %s in captured SIP: %d packet%s (%s), user agents %s, ID %s",
            sighting.ip,
            sighting.packets,
            "" if sighting.packets == 1 else "s",
            methods or "responses only",
            sighting.user_agents or "none",
            sighting.verdict.id if sighting.verdict else None,
        )

    async def close(self) -> None:
        for task in list(self._checks):
            task.cancel()
        await asyncio.gather(*self._checks, return_exceptions=True)
