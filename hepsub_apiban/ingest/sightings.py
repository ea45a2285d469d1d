"""Sightings: every IP seen in captured SIP traffic, what it did, and its APIBAN verdict.

Anyone who can reach the HEP port can forge packets, so the store is built to survive them:

- It is bounded (``sightings.max``) and forgets the least recently seen *unprotected* address
  first. An address APIBAN lists (or that local detection flags) is protected: a flood of
  one-packet spoofed sources washes out ordinary sightings, never a protected one while an
  ordinary one is left. Two LRU orders keep this O(1) per packet.
- Everything kept per address is bounded: the ``Sighting`` and its samples (``ingest/sighting.py``,
  re-exported here with ``__all__`` for the importers of the old path).
- In check mode a new address costs one ``/check`` in the background, never on the packet path,
  and those lookups may spend only ``sightings.check_share`` of the APIBAN budget, so the HOMER
  lookups keep the rest whatever the capture shows (``ingest/sighting_checks.py``).

Every packet re-reads the verdict, which in mirror mode is a dict probe: an address listed after
it was first seen is flagged (and protected) on its next packet.
"""

from __future__ import annotations

import heapq
import logging
import time
from collections import OrderedDict
from collections.abc import Callable, Iterable, Iterator, Mapping
from itertools import count
from operator import attrgetter

from ..apiban.lookups import LookupService, Verdict
from ..core.addresses import Addr, parse_ip
from ..core.logs import safe_text
from ..formats.sip import SipInfo
from . import sighting as _sighting
from .sighting import (
    _CALLS_FULL,
    _USERS_FULL,
    CALL_ID_SAMPLE,
    CALLS,
    OTHER_METHOD,
    SAMPLE_BYTES,
    SIP_METHODS,
    STATUS_CODES,
    USER_AGENT_SAMPLE,
    USER_AGENT_TABLE,
    USER_SAMPLE,
    USERS,
    Sighting,
    _shared_verdict,
    agents_sampled,
    sampled,
)
from .sighting_checks import BackgroundChecks

__all__ = [
    "CALLS",
    "CALL_ID_SAMPLE",
    "OTHER_METHOD",
    "SAMPLE_BYTES",
    "SIP_METHODS",
    "STATUS_CODES",
    "USERS",
    "USER_AGENT_SAMPLE",
    "USER_AGENT_TABLE",
    "USER_SAMPLE",
    "Sighting",
    "Sightings",
    "agents_sampled",
    "sampled",
]

# Its name before the wings: operators' log filters use it.
log = logging.getLogger("hepsub_apiban.sightings")
# The packet path's keys, bound here by assignment rather than imported: CPython compiles
# ``name.get(...)`` on an imported name as an attribute load (a bound method per packet), not
# LOAD_METHOD. (bench/sightings.py: record 2-4% slower with them imported.)
_METHOD_KEY = _sighting._METHOD_KEY
_STATUS_KEY = _sighting._STATUS_KEY

_order_of = attrgetter("order")


class Sightings:
    """Every address seen in the captured SIP traffic, what it did and its verdict: bounded, protected.

    Owns the sighting of each address (``sightings.max`` at most, least recently seen unprotected ones
    forgotten first) and, through ``BackgroundChecks``, the background /check tasks of check mode. Fed by
    the collector (``record``, once per packet) and by ``WorkerPool`` batches; read by enrichment, the
    HOMER tab, the evidence (``protected_addresses``), ``SharedSightings`` and the metrics. Asks the
    ``LookupService`` for verdicts.

    ``record`` runs once per packet on the event loop: it never awaits, never makes an upstream request
    (a check is a background task limited to ``sightings.check_share`` of the budget), keeps every
    per-address sample bounded, and never forgets a protected address while an ordinary one is left.
    """

    def __init__(
        self,
        lookups: LookupService,
        *,
        capacity: int = 100_000,
        check_share: float = 0.5,
        log_every: float = 300.0,
        clock: Callable[[], float] = time.time,
        detected: Callable[[str], bool] | None = None,
    ) -> None:
        self._lookups = lookups
        self.capacity = capacity
        self._log_every = log_every
        self._clock = clock
        # Least recently seen first in each; a sighting is in exactly one of them.
        self._ordinary: OrderedDict[str, Sighting] = OrderedDict()
        self._protected: OrderedDict[str, Sighting] = OrderedDict()
        self._sequence = count(1)
        # When a listed address was last logged (at most one warning per ``log_every``): kept here
        # rather than in every sighting, as only listed ones are logged.
        self._logged: dict[str, float] = {}
        # The parsed address of the sighting created last, until its first verdict.
        self._fresh: Addr | None = None
        self._listed = 0
        self._checks = BackgroundChecks(lookups, check_share, self._checked)
        self.evicted = 0
        self.evicted_protected = 0  # only when the whole store is protected
        self.listed_packets = 0
        # Whether local detection holds an address now (the book's ``holds``); None without detection.
        self.detected = detected
        # Addresses touched since the shared store last took them (store/sightings.py sets it):
        # only remembered ones, so never more than ``capacity``. One forgotten before it was
        # written is counted in ``evicted_unwritten`` (its last counts never reach the store).
        self.touched: set[str] | None = None
        self.evicted_unwritten = 0

    def __len__(self) -> int:
        return len(self._ordinary) + len(self._protected)

    def get(self, ip: str) -> Sighting | None:
        found = self._ordinary.get(ip)
        return found if found is not None else self._protected.get(ip)

    def values(self, listed: bool | None = None) -> Iterator[Sighting]:
        """Most recently seen first."""
        if listed is True:  # every listed sighting is protected
            newest_first: Iterator[Sighting] = reversed(self._protected.values())
        else:
            newest_first = heapq.merge(
                reversed(self._ordinary.values()),
                reversed(self._protected.values()),
                key=_order_of,
                reverse=True,
            )
        for sighting in newest_first:
            if listed is None or sighting.listed is listed:
                yield sighting

    def listed_count(self) -> int:
        return self._listed

    def protected_count(self) -> int:
        return len(self._protected)

    def protected_addresses(self) -> Mapping[str, Sighting]:
        """The protected sightings by address: a live view, probed per packet for evidence."""
        return self._protected

    def flag(self, ip: str, flagged: bool = True) -> bool:
        """Mark a remembered address as found hostile by local detection (kept like a listed one).

        Returns False when the address is not remembered.
        """
        sighting = self.get(ip)
        if sighting is None:
            return False
        sighting.flagged = flagged
        self._place(sighting)
        return True

    def record(self, src_ip: str, dst_ip: str, sip: SipInfo, seen_at: float) -> None:
        """One SIP packet: the sender and the receiver are both sightings; the sender acted."""
        # The samples' usual case (the value is there already) is tested here, the rest of
        # ``Sighting.sample``/``agents_sampled`` only when that fails: this is the packet path.
        # The literals are USERS and CALLS (a global costs a lookup); a value holding its separator
        # is not looked for (it cannot be there as it is: ``sample`` cleans it).
        call_id = sip.call_id
        enclosed = f"\x1f{call_id}\x1f" if call_id and "\x1f" not in call_id else None
        sender = self._touch(src_ip, seen_at)
        if sender is not None:
            if sip.status is None:
                action = _METHOD_KEY.get(sip.method, OTHER_METHOD)
                user = sip.from_user
                if (
                    user
                    and ("\x1e" in user or f"\x1e{user}\x1e" not in sender._samples)
                    and not sender._state & _USERS_FULL
                ):
                    sender.sample(USERS, _USERS_FULL, USER_SAMPLE, user)
            else:
                # Responses count by status code ("401" answers to a scanner).
                action = _STATUS_KEY.get(sip.status, "?")
            actions = sender.actions  # _count inlined
            if actions is None:
                sender.actions = [action, 1]
            else:
                try:
                    actions[actions.index(action) + 1] += 1  # type: ignore[operator]
                except ValueError:
                    sender.actions = actions + [action, 1]  # noqa: RUF005  (exact size, where [*a, b] over-allocates)
            agent = sip.user_agent
            if agent and agent not in sender.user_agents:
                sender.user_agents = agents_sampled(sender.user_agents, agent)
            if (
                call_id
                and sender._state < _CALLS_FULL
                and (enclosed is None or enclosed not in sender._samples)
            ):
                sender.sample(CALLS, _CALLS_FULL, CALL_ID_SAMPLE, call_id)
            self._judge(sender)
        receiver = self._touch(dst_ip, seen_at)
        if receiver is not None:
            if (
                call_id
                and receiver._samples != enclosed  # (a lone Call-ID: the usual case, one comparison)
                and receiver._state < _CALLS_FULL
                and (enclosed is None or enclosed not in receiver._samples)
            ):
                receiver.sample(CALLS, _CALLS_FULL, CALL_ID_SAMPLE, call_id)
            self._judge(receiver)

    def add(
        self,
        ip: str,
        first_seen: float,
        last_seen: float,
        packets: int,
        methods: Mapping[str, int],
        user_agents: Iterable[str],
        users: Iterable[str],
        call_ids: Iterable[str],
    ) -> None:
        """What ``record`` did to one address in a HEP worker process (hep.workers), ``packets``
        packets at once: their counts added, their samples taken while there is room."""
        sighting = self._touch(ip, first_seen)
        if sighting is None or packets < 1:
            return
        sighting.packets += packets - 1  # _touch counted one
        if last_seen > sighting.last_seen:
            sighting.last_seen = last_seen
        sighting.count(methods)
        for value in user_agents:
            sighting.user_agents = agents_sampled(sighting.user_agents, value)
        for value in users:
            sighting.sample(USERS, _USERS_FULL, USER_SAMPLE, value)
        for value in call_ids:
            sighting.sample(CALLS, _CALLS_FULL, CALL_ID_SAMPLE, value)
        self._judge(sighting)
        if sighting.listed:
            self.listed_packets += packets - 1  # _judge counted one

    def _touch(self, ip: str, seen_at: float) -> Sighting | None:
        # The decoder's text is canonical in all but odd cases, so the first probe usually hits.
        ordinary = self._ordinary
        sighting = ordinary.get(ip)
        if sighting is not None:
            ordinary.move_to_end(ip)
        else:
            sighting = self._protected.get(ip)
            if sighting is not None:
                self._protected.move_to_end(ip)
            else:
                sighting = self._first_seen(ip, seen_at)
                if sighting is None:
                    return None
        sighting.order = next(self._sequence)
        touched = self.touched
        if touched is not None:
            touched.add(sighting.ip)
        if seen_at > sighting.last_seen:
            sighting.last_seen = seen_at
        sighting.packets += 1
        return sighting

    def _first_seen(self, ip: str, seen_at: float) -> Sighting | None:
        """A new sighting, or the one of an address first written another way (``::ffff:a.b.c.d``)."""
        address = parse_ip(ip)
        if address is None:
            return None
        key = address.text
        if key != ip:
            for items in (self._ordinary, self._protected):
                sighting = items.get(key)
                if sighting is not None:
                    items.move_to_end(key)
                    return sighting
        if len(self._ordinary) + len(self._protected) >= self.capacity:
            self._evict()
        sighting = Sighting(key, address, seen_at, seen_at)
        self._fresh = address
        if self.detected is not None and self.detected(key):
            sighting.flagged = True  # detected before it was (again) remembered: after a restart
            self._protected[key] = sighting
        else:
            self._ordinary[key] = sighting
        return sighting

    def _evict(self) -> None:
        if self._ordinary:
            key, _ = self._ordinary.popitem(last=False)
        else:
            key, sighting = self._protected.popitem(last=False)
            self.evicted_protected += 1
            if sighting.listed:
                self._listed -= 1
        self.evicted += 1
        if self._logged:
            self._logged.pop(key, None)
        if self.touched is not None and key in self.touched:
            self.touched.discard(key)
            self.evicted_unwritten += 1

    def _judge(self, sighting: Sighting) -> None:
        before = sighting.verdict
        if before is None and (fresh := self._fresh) is not None and fresh.text is sighting.ip:
            # Just created: the address parsed to key it gives its first answer (not parsed again).
            self._fresh = None
            verdict = self._lookups.answer_now(fresh)
        else:
            # Every packet asks again (an address listed after it was first seen is flagged on its
            # next packet); an answer that cannot have changed comes back as the same object, cheaply.
            verdict = self._lookups.answer_again(sighting.ip, before)
        if verdict is None:
            self._checks.later(sighting)
            return
        if verdict is not before:
            self._take_verdict(sighting, verdict)
        if verdict.listed:
            self.listed_packets += 1
            logged_at = self._logged.get(sighting.ip)  # _log_listed's own test, without the call
            if logged_at is None or self._clock() - logged_at >= self._log_every:
                self._log_listed(sighting)

    def _take_verdict(self, sighting: Sighting, verdict: Verdict) -> None:
        """Set a new verdict; a change of listed moves the sighting between the two orders."""
        was_listed = sighting.listed is True
        sighting.verdict = _shared_verdict(verdict)
        if bool(verdict.listed) is not was_listed:
            self._listed += -1 if was_listed else 1
            self._place(sighting)

    def _place(self, sighting: Sighting) -> None:
        """Move a sighting to the order its protection says, as the most recent there."""
        key = sighting.ip
        source, target = (
            (self._ordinary, self._protected) if sighting.protected else (self._protected, self._ordinary)
        )
        if source.pop(key, None) is sighting:
            sighting.order = next(self._sequence)  # keeps each order sorted for values()
            target[key] = sighting

    def _stored(self, sighting: Sighting) -> bool:
        return self.get(sighting.ip) is sighting

    def _checked(self, sighting: Sighting, verdict: Verdict) -> None:
        """A verdict a background check learnt (``BackgroundChecks``)."""
        if not self._stored(sighting):
            return  # forgotten meanwhile; the verdict is in the lookup cache for its next packet
        self._take_verdict(sighting, verdict)
        if verdict.listed:
            self._log_listed(sighting)

    def _log_listed(self, sighting: Sighting) -> None:
        now = self._clock()
        logged_at = self._logged.get(sighting.ip)
        if logged_at is not None and now - logged_at < self._log_every:
            return
        self._logged[sighting.ip] = now
        # Method keys are from a fixed set; user agents and the ID came from the network.
        methods = ", ".join(f"{m} x{n}" for m, n in sighting.methods.most_common(5))
        log.warning(
            "APIBAN-listed %s in captured SIP: %d packet%s (%s), user agents %s, ID %s",
            sighting.ip,
            sighting.packets,
            "" if sighting.packets == 1 else "s",
            methods or "responses only",
            ", ".join(f'"{safe_text(ua, 100)}"' for ua in sighting.user_agents) or "none",
            safe_text(sighting.verdict.id, 40) if sighting.verdict else None,
        )

    async def settle(self) -> None:
        """Wait for the check-mode lookups under way (their verdicts land in the sightings)."""
        await self._checks.settle()

    async def close(self) -> None:
        await self._checks.close()
