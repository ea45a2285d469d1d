"""Sightings: every IP seen in captured SIP traffic, what it did, and its APIBAN verdict.

Anyone who can reach the HEP port can forge packets, so the store is built to survive them:

- It is bounded (``sightings.max``) and forgets the least recently seen *unprotected* address
  first. An address APIBAN lists (or that local detection flags) is protected: a flood of
  one-packet spoofed sources washes out ordinary sightings, never a protected one while an
  ordinary one is left. Two LRU orders keep this O(1) per packet.
- Everything kept per address is bounded: actions count into a fixed set of buckets (the SIP
  methods plus "other"; status codes that matter, else their class), and user agents, users and
  Call-IDs are small samples of values cut to 128 bytes. One address' answer stays a few KB.
- In check mode a new address costs one ``/check`` in the background, never on the packet path,
  and those lookups may spend only ``sightings.check_share`` of the APIBAN budget, so the HOMER
  lookups keep the rest whatever the capture shows.

Every packet re-reads the verdict, which in mirror mode is a dict probe: an address listed after
it was first seen is flagged (and protected) on its next packet.
"""

from __future__ import annotations

import asyncio
import heapq
import logging
import time
from collections import Counter, OrderedDict
from collections.abc import Callable, Iterable, Iterator, Mapping
from itertools import count
from operator import attrgetter
from typing import Any

from ..apiban.lookups import LookupService, Verdict
from ..core.addresses import Addr, parse_ip
from ..core.logs import UNSAFE_CHARACTERS, safe_text
from ..formats.sip import SipInfo

# Its name before the wings: operators' log filters use it.
log = logging.getLogger("hepsub_apiban.sightings")
CALL_ID_SAMPLE = 10
USER_AGENT_SAMPLE = 5
USER_SAMPLE = 10
SAMPLE_BYTES = 128  # per sampled value (UTF-8); formats/sip.py already cut it to 200 characters
MAX_BACKGROUND_CHECKS = 64  # check mode: upstream lookups in flight for new IPs

# What an address did, counted into a fixed set of buckets so that forged input cannot grow it.
SIP_METHODS = (
    "INVITE", "ACK", "BYE", "CANCEL", "REGISTER", "OPTIONS", "PRACK",
    "SUBSCRIBE", "NOTIFY", "PUBLISH", "INFO", "REFER", "MESSAGE", "UPDATE",
)  # fmt: skip
OTHER_METHOD = "other"
# Status codes worth telling apart (what a scanner gets back, call progress, failures); any other
# valid code counts under its class ("4xx"), an invalid one under "?".
STATUS_CODES = frozenset(
    (100, 180, 181, 183, 200, 202, 401, 403, 404, 405, 407, 408, 480, 481, 483, 484, 486, 487, 488,
     500, 503, 603)
)  # fmt: skip
# Keyed by the optional SipInfo fields so the packet path needs no None test.
_METHOD_KEY: dict[str | None, str] = {method: method for method in SIP_METHODS}
_STATUS_KEY: dict[int | None, str] = {
    code: str(code) if code in STATUS_CODES else f"{code // 100}xx" for code in range(100, 700)
}

# Every action bucket by name: counts read back from a worker or the shared store keep the one
# string object of their bucket instead of a copy per address.
_ACTIONS: dict[str, str] = {name: name for name in (*SIP_METHODS, OTHER_METHOD, "?", *_STATUS_KEY.values())}
# User agents are a few models shared by many addresses: each distinct one is kept once (with its
# one-element sample) while the table has room; forged ones can only fill it, then are kept per address.
USER_AGENT_TABLE = 4096
_agents: dict[str, tuple[str]] = {}
# An unlisted answer says nothing about the address itself: one shared object per kind.
_unlisted: dict[str, Verdict] = {}
# The sampled users and Call-IDs of an address are one string (a tuple and a string per value
# cost about 120 bytes more for a phone): each user is enclosed in USERS, each Call-ID in CALLS,
# the users first, e.g. "\x1e100\x1e\x1fa@b\x1fc@d\x1f". A sampled value holds no control character
# (``sampled`` replaces them), so the enclosed value is found by one substring search.
USERS = "\x1e"
CALLS = "\x1f"
_NO_SEPARATORS = str.maketrans({USERS: "\ufffd", CALLS: "\ufffd"})
# Sighting._state bits (at most 15: a small int, shared by every sighting).
_CHECKED = 1
_FLAGGED = 2
_USERS_FULL = 4  # the users sample has USER_SAMPLE values: a packet need not look further
_CALLS_FULL = 8  # the highest bit: "_state < _CALLS_FULL" is the cheapest test on the packet path


class Sighting:
    """One address. Kept lean, as the store holds up to ``sightings.max`` of them: what it sent as
    a flat list ``[action, count, ...]`` (a Counter costs 200 bytes), shared strings for actions and
    user agents, one shared verdict per kind of unlisted answer, the users and Call-IDs in one
    string, two flags in one int (bench/sightings_memory.py)."""

    __slots__ = (
        "_samples",
        "_state",
        "actions",
        "first_seen",
        "ip",
        "last_seen",
        "order",
        "packets",
        "user_agents",
        "verdict",
    )  # fmt: skip

    def __init__(
        self,
        ip: str,
        address: Addr,  # the parsed ip: only its text is kept
        first_seen: float,
        last_seen: float,
        packets: int = 0,
        methods: Mapping[str, int] | None = None,
        user_agents: tuple[str, ...] = (),
        call_ids: tuple[str, ...] = (),
        users: tuple[str, ...] = (),
        verdict: Verdict | None = None,
    ) -> None:
        self.ip = ip  # canonical: address.text (the parsed form is made again when needed)
        self.first_seen = first_seen
        self.last_seen = last_seen
        self.packets = packets
        # What it sent: [action, count, action, count, ...] in first-seen order; None for nothing.
        self.actions: list[str | int] | None = None
        # Tuples: the empty one is shared, and the garbage collector stops tracking tuples of strings.
        self.user_agents = user_agents
        self.verdict = verdict
        # Check mode: an upstream lookup for this IP is under way or done (_CHECKED); found hostile
        # locally (_FLAGGED, the detection work sets it via Sightings.flag); full samples.
        self._state = 0
        self._samples = ""
        if users or call_ids:
            self._pack(users, call_ids)
        self.order = 0  # when last touched, in the store's own sequence (for most-recent-first listings)
        if methods:
            self.count(methods)

    @property
    def address(self) -> Addr:
        """The parsed address (not kept: 90 bytes per sighting for a parse done only off the packet path)."""
        address = parse_ip(self.ip)
        assert address is not None  # the store keeps only addresses it parsed
        return address

    def __repr__(self) -> str:
        return f"Sighting({self.ip!r}, packets={self.packets}, methods={dict(self.methods)!r})"

    @property
    def methods(self) -> Counter[str]:
        """What it sent, by action: a new Counter (changing it leaves the sighting alone)."""
        actions = self.actions
        if actions is None:
            return Counter()
        return Counter(dict(zip(actions[::2], actions[1::2], strict=True)))  # type: ignore[arg-type]

    def count(self, methods: Mapping[str, int]) -> None:
        """Add counts by action."""
        for action, n in methods.items():
            _count(self, _ACTIONS.get(action, action), n)

    @property
    def call_ids(self) -> tuple[str, ...]:
        return _unpacked(self._samples, CALLS)

    @call_ids.setter
    def call_ids(self, values: tuple[str, ...]) -> None:
        self._pack(self.users, values)

    @property
    def users(self) -> tuple[str, ...]:
        return _unpacked(self._samples, USERS)

    @users.setter
    def users(self, values: tuple[str, ...]) -> None:
        self._pack(values, self.call_ids)

    def _pack(self, users: tuple[str, ...], call_ids: tuple[str, ...]) -> None:
        self._samples = _packed(users, call_ids)
        full = (_USERS_FULL if len(users) >= USER_SAMPLE else 0) | (
            _CALLS_FULL if len(call_ids) >= CALL_ID_SAMPLE else 0
        )
        self._state = self._state & ~(_USERS_FULL | _CALLS_FULL) | full

    def sample(self, separator: str, full: int, limit: int, value: str | None) -> None:
        """``sampled`` for the samples string: ``value`` added to the users (``separator`` USERS,
        ``full`` _USERS_FULL, ``limit`` USER_SAMPLE) or the Call-IDs (CALLS, _CALLS_FULL,
        CALL_ID_SAMPLE) if there is room and it is not there yet."""
        if not value or self._state & full:
            return
        samples = self._samples
        held = samples.count(separator)  # values + 1, or 0 for none
        if len(value) > SAMPLE_BYTES or not (value.isascii() and value.isprintable()):
            value = _bounded(value)  # also replaces both separators (control characters)
        if held and f"{separator}{value}{separator}" in samples:
            return
        if held >= limit:  # this value fills the sample
            self._state |= full
        if separator == CALLS:
            self._samples = f"{samples}{value}{CALLS}" if held else f"{samples}{CALLS}{value}{CALLS}"
        elif held:
            end = samples.rfind(USERS) + 1
            self._samples = f"{samples[:end]}{value}{USERS}{samples[end:]}"
        else:
            self._samples = f"{USERS}{value}{USERS}{samples}"

    @property
    def checked(self) -> bool:
        return bool(self._state & _CHECKED)

    @checked.setter
    def checked(self, value: bool) -> None:
        self._state = self._state | _CHECKED if value else self._state & ~_CHECKED

    @property
    def flagged(self) -> bool:
        return bool(self._state & _FLAGGED)

    @flagged.setter
    def flagged(self, value: bool) -> None:
        self._state = self._state | _FLAGGED if value else self._state & ~_FLAGGED

    @property
    def listed(self) -> bool | None:
        return None if self.verdict is None else self.verdict.listed

    @property
    def protected(self) -> bool:
        """Kept while any unprotected sighting is left to forget."""
        return bool(self._state & _FLAGGED) or (self.verdict is not None and self.verdict.listed is True)

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


def _packed(users: Iterable[str], call_ids: Iterable[str]) -> str:
    """The samples string of ``users`` and ``call_ids``; a separator in a value (only a value
    sampled elsewhere can hold one) is replaced as ``sampled`` replaces control characters."""
    users = [value.translate(_NO_SEPARATORS) for value in users]
    call_ids = [value.translate(_NO_SEPARATORS) for value in call_ids]
    return (
        (f"{USERS}{USERS.join(users)}{USERS}" if users else "")
        + (f"{CALLS}{CALLS.join(call_ids)}{CALLS}" if call_ids else "")
    )  # fmt: skip


def _unpacked(samples: str, separator: str) -> tuple[str, ...]:
    start = samples.find(separator)
    if start < 0:
        return ()
    return tuple(samples[start + 1 : samples.rfind(separator)].split(separator))


def _count(sighting: Sighting, action: str, n: int) -> None:
    actions = sighting.actions
    if actions is None:
        sighting.actions = [action, n]
        return
    try:
        at = actions.index(action) + 1  # counts are ints: only an action's own place matches
    except ValueError:
        sighting.actions = actions + [action, n]  # noqa: RUF005  (exact size, where [*a, b] over-allocates)
    else:
        actions[at] += n  # type: ignore[operator]


def agents_sampled(items: tuple[str, ...], value: str | None) -> tuple[str, ...]:
    """``sampled`` for user agents, each distinct one kept once while the table has room."""
    added = sampled(items, value, USER_AGENT_SAMPLE)
    if added is items:
        return items
    agent = added[-1]
    shared = _agents.get(agent)
    if shared is None:
        if len(_agents) >= USER_AGENT_TABLE:
            return added
        shared = _agents[agent] = (agent,)
    return shared if not items else (*items, shared[0])


def _shared_verdict(verdict: Verdict) -> Verdict:
    """The verdict to keep: an unlisted one without details is one shared object per source."""
    if verdict.listed is not False or verdict.id is not None or verdict.last_reported is not None:
        return verdict
    if verdict.reason is not None:
        return verdict
    shared = _unlisted.get(verdict.source)
    if shared is None:
        shared = _unlisted[verdict.source] = verdict._replace(ip="")
    return shared


def sampled(items: tuple[str, ...], value: str | None, limit: int) -> tuple[str, ...]:
    """``items`` with ``value`` added if the sample has room and does not hold it yet."""
    if not value or len(items) >= limit or value in items:
        return items
    if len(value) > SAMPLE_BYTES or not (value.isascii() and value.isprintable()):
        value = _bounded(value)
        if value in items:  # a long or dirty value is stored cleaned: compare that
            return items
    return (*items, value)


def _bounded(value: str) -> str:
    """``value`` with control characters replaced and at most SAMPLE_BYTES of UTF-8."""
    if value.isascii() and value.isprintable():
        return value[:SAMPLE_BYTES]
    # Kept out of samples: they would only forge lines where a sample is shown, and each costs
    # six bytes of JSON.
    value = UNSAFE_CHARACTERS.sub("\ufffd", value)
    raw = value.encode("utf-8", "replace")
    return value if len(raw) <= SAMPLE_BYTES else raw[:SAMPLE_BYTES].decode("utf-8", "ignore")


_order_of = attrgetter("order")


class Sightings:
    """Every address seen in the captured SIP traffic, what it did and its verdict: bounded, protected.

    Owns the sighting of each address (``sightings.max`` at most, least recently seen unprotected ones
    forgotten first) and the background /check tasks of check mode. Fed by the collector (``record``,
    once per packet) and by ``WorkerPool`` batches; read by enrichment, the HOMER tab, the evidence
    (``protected_addresses``), ``SharedSightings`` and the metrics. Asks the ``LookupService`` for verdicts.

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
        self._check_share = check_share
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
        self._checks: set[asyncio.Task[None]] = set()
        self._starting = 0  # check tasks created that have not asked the lookup service yet
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
            self._check_later(sighting)
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

    def _check_later(self, sighting: Sighting) -> None:
        # In mirror mode the list is on its way (the packet path re-reads it); per-IP checks of
        # captured addresses would take the budget the list pull and enrichment need.
        if self._lookups.mirror is not None or sighting.checked or len(self._checks) >= MAX_BACKGROUND_CHECKS:
            return
        if not self._lookups.may_look_up(self._check_share, self._starting):
            return  # the capture's share of the budget is spent: a later packet tries again
        sighting.checked = True
        self._starting += 1
        task = asyncio.get_running_loop().create_task(self._check(sighting))
        self._checks.add(task)
        task.add_done_callback(self._checks.discard)

    async def _check(self, sighting: Sighting) -> None:
        self._starting -= 1  # the lookup below queues its request before it first waits
        verdict = await self._lookups.lookup(sighting.address, deadline=30.0, share=self._check_share)
        if verdict.listed is None:
            sighting.checked = False  # nothing learnt (share spent, APIBAN failing): try again later
            return
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
        await asyncio.gather(*self._checks, return_exceptions=True)

    async def close(self) -> None:
        for task in list(self._checks):
            task.cancel()
        await asyncio.gather(*self._checks, return_exceptions=True)
