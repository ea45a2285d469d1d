"""The lookup service: one verdict per IP, answered locally whenever possible.

Order of answers: non-routable and allow-listed addresses locally, then the APIBAN list held
in memory (mirror mode, once loaded), then the verdict cache, then one ``/check`` request per
address, shared by every concurrent caller. Upstream failures are never cached: they become
``listed: null`` for this answer only, and the caller's deadline bounds the wait.

A caller may limit its lookups to a ``share`` of the APIBAN request budget (the sightings do, for
addresses first seen in the capture): such a request goes out only while fewer than
``floor(share x budget)`` requests were sent in the window, so the other callers (HOMER) always
find the rest of the window unspent. When HOMER asks for an address whose limited check is queued
but has not gone out yet, the check goes out as HOMER's.
"""

from __future__ import annotations

import asyncio
import math
import time
from collections import Counter
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any, NamedTuple, Protocol

from cachetools import TLRUCache

from ..core.addresses import Addr, NetworkSet, is_non_routable, parse_ip
from ..core.trouble import FailureRun
from .client import ApibanClient, ApibanError, BudgetSpent

# Verdicts are built for every IP of every enrichment; see addresses._tuple_new.
_tuple_new = tuple.__new__


_VERDICT_LABEL = {True: "listed", False: "clean", None: "unknown"}
_SETTLED = frozenset(("private", "allowlist"))  # decided by configuration: no later answer differs


class Verdict(NamedTuple):
    """One IP's answer; a NamedTuple because enrichment builds thousands per second."""

    ip: str
    listed: bool | None
    source: str  # private, allowlist, mirror, cache, check, unavailable
    id: str | None = None
    last_reported: int | None = None
    reason: str | None = None

    def to_json(self) -> dict[str, Any]:
        body: dict[str, Any] = {"ip": self.ip, "listed": self.listed, "source": self.source}
        if self.id is not None:
            body["ID"] = self.id
        if self.last_reported is not None:
            body["last_reported"] = self.last_reported
        if self.reason is not None:
            body["reason"] = self.reason
        return body


class ListSource(Protocol):
    """A local copy of the APIBAN list (the mirror); consulted before any upstream request.

    ``verdict`` answers for listed addresses only; ``loaded`` says whether a miss means
    "not listed" (a complete list is in) or "not known yet" (ask APIBAN).
    """

    @property
    def loaded(self) -> bool: ...

    def verdict(self, ip: str) -> Verdict | None: ...


@dataclass(frozen=True, slots=True)
class CachePolicy:
    size: int = 10000
    listed_ttl: float = 3600.0
    unlisted_ttl: float = 900.0


class LookupService:
    """One verdict per IP for everyone who asks (enrichment, the sightings, the status page).

    Owns the verdict cache and the in-flight /check requests; reads the mirror (``ListSource``, through
    ``CurrentMirror`` in mirror mode) and sends through the ``ApibanClient``. Used by the web layer and
    the sightings; the collector reaches it only through the sightings.

    ``answer_now`` never makes a request, so the packet path uses it alone; ``lookup_many`` waits at
    most the caller's deadline whatever APIBAN does, spends the key's budget only within the caller's
    ``share``, sends one /check per address however many callers ask, and never caches a failure.
    """

    def __init__(
        self,
        client: ApibanClient | None,
        allow: NetworkSet,
        cache: CachePolicy = CachePolicy(),
        *,
        mirror: ListSource | None = None,
        clock: Callable[[], float] = time.monotonic,
        wall_clock: Callable[[], float] = time.time,
        trouble: FailureRun | None = None,
    ) -> None:
        self._client = client
        # Check mode's outages, logged as they start, go on and end (the sync logs mirror mode's).
        self._trouble = trouble
        self._allow = allow
        self._has_allow = len(allow) > 0
        self._policy = cache
        self.mirror = mirror
        self._wall_clock = wall_clock
        # A listed verdict is worth keeping longer than a clean one: attackers stay listed for
        # days, while a clean address may be listed any minute.
        self._cache: TLRUCache[str, Verdict] = TLRUCache(
            maxsize=cache.size, ttu=self._time_to_use, timer=clock
        )
        self._in_flight: dict[str, asyncio.Task[Verdict]] = {}
        # Checks created but not yet started, with the requests of the window each must leave unspent.
        self._queued: dict[str, int] = {}
        self.answers: Counter[tuple[str, str]] = Counter()  # (source, verdict) -> count, for metrics

    def _time_to_use(self, _key: str, verdict: Verdict, now: float) -> float:
        return now + (self._policy.listed_ttl if verdict.listed else self._policy.unlisted_ttl)

    @property
    def ready(self) -> bool:
        """In mirror mode once the list is in; in check mode at once."""
        return self.mirror.loaded if self.mirror is not None else self._client is not None

    def cache_size(self) -> int:
        return len(self._cache)

    def in_flight(self) -> int:
        return len(self._in_flight)

    def answer_now(self, address: Addr) -> Verdict | None:
        """The verdict if it needs no upstream request, else None."""
        ip = address.text
        if is_non_routable(address):
            return _tuple_new(Verdict, (ip, False, "private", None, None, None))
        if self._has_allow and address in self._allow:
            return _tuple_new(Verdict, (ip, False, "allowlist", None, None, None))
        mirror = self.mirror
        if mirror is not None:
            # Even a list still being pulled answers "listed" with certainty.
            listed = mirror.verdict(ip)
            if listed is not None:
                return listed
            if mirror.loaded:
                return _tuple_new(Verdict, (ip, False, "mirror", None, None, None))
        cached = self._cache.get(ip)
        if cached is not None:
            return Verdict(ip, cached.listed, "cache", cached.id, cached.last_reported)
        return None

    def may_look_up(self, share: float, starting: int = 0) -> bool:
        """Whether a lookup limited to ``share`` of the budget could go upstream now.

        Checks already queued count as spent, and so do the ``starting`` lookups the caller began
        that have not reached this service yet: a burst of callers in one loop iteration cannot all
        pass this test and then find the share gone.
        """
        if self._client is None:
            return False
        reserve = self._reserve(share)
        shared = self._client.shared
        if shared is not None and not shared.may_spend(reserve):
            return False  # the key's budget shared with other agents is spent (store/budget.py)
        return self._client.budget.headroom(reserve) > len(self._queued) + starting

    def _reserve(self, share: float) -> int:
        """Requests of the window a lookup limited to ``share`` of the budget must leave to others."""
        if share >= 1.0 or self._client is None:
            return 0
        requests = self._client.budget.limit.requests
        return requests - math.floor(share * requests + 1e-9)

    def answer_again(self, ip: str, previous: Verdict | None) -> Verdict | None:
        """``answer_now`` for an address answered ``previous``ly, returning ``previous`` itself when
        nothing can have changed: a non-routable or allow-listed address, or one the complete mirror
        did not list and still does not (the capture asks again for every packet); the mirror's own
        entry for one it lists.

        ``ip`` is the canonical text (``Addr.text``), parsed only when the answer needs more: the
        sightings keep no parsed address per IP.
        """
        if previous is not None:
            source = previous.source
            if source in _SETTLED:
                return previous
            mirror = self.mirror
            if source == "mirror" and mirror is not None:
                # Routable and not allow-listed (the allowlist is fixed): the mirror's word stands.
                current = mirror.verdict(ip)
                if current is not None or previous.listed is False:
                    return current or previous
        address = parse_ip(ip)
        return None if address is None else self.answer_now(address)

    async def lookup(self, address: Addr, deadline: float, *, share: float = 1.0) -> Verdict:
        return (await self.lookup_many([address], deadline, share=share))[0]

    async def lookup_many(
        self, addresses: Sequence[Addr], deadline: float, *, share: float = 1.0
    ) -> list[Verdict]:
        """Verdicts in the order given, within ``deadline`` seconds whatever APIBAN does.

        ``share``: the part of the APIBAN budget these lookups may spend (1.0: all of it).
        """
        answers = [self.answer_now(address) for address in addresses]
        if None in answers:
            await self._fill_from_upstream(addresses, answers, deadline, self._reserve(share))
        result: list[Verdict] = answers  # type: ignore[assignment]  # no None left
        self.answers.update([(v.source, _VERDICT_LABEL[v.listed]) for v in result])
        return result

    async def _fill_from_upstream(
        self, addresses: Sequence[Addr], answers: list[Verdict | None], deadline: float, reserve: int
    ) -> None:
        pending = {
            a.text: self._upstream(a.text, reserve)
            for a, v in zip(addresses, answers, strict=True)
            if v is None
        }
        done, _ = await asyncio.wait(pending.values(), timeout=deadline)
        for index, address in enumerate(addresses):
            if answers[index] is None:
                task = pending[address.text]
                # A late answer is not lost: the shared task goes on and fills the cache.
                answers[index] = (
                    _outcome(task, address.text) if task in done else _late(address.text, deadline)
                )

    def _upstream(self, ip: str, reserve: int) -> asyncio.Task[Verdict]:
        task = self._in_flight.get(ip)
        # A finished task whose callback has not run yet failed (a success is in the cache): ask again.
        if task is None or task.done():
            self._queued[ip] = reserve
            task = asyncio.create_task(self._check(ip), name=f"apiban-check-{ip}")
            self._in_flight[ip] = task
            task.add_done_callback(lambda done: self._landed(ip, done))
        elif reserve < self._queued.get(ip, reserve):
            self._queued[ip] = reserve  # not sent yet: it goes out with the more urgent caller's budget
        return task

    def _landed(self, ip: str, task: asyncio.Task[Verdict]) -> None:
        if self._in_flight.get(ip) is task:
            del self._in_flight[ip]
            self._queued.pop(ip, None)  # a task cancelled before it started

    async def _check(self, ip: str) -> Verdict:
        reserve = self._queued.pop(ip, 0)  # read as the request goes out: a joining caller may lower it
        if self._client is None:
            return Verdict(ip, None, "unavailable", reason="the APIBAN list is not loaded yet")
        try:
            answer = await self._client.check(ip, reserve)
        except ApibanError as exc:
            # A budget spent here is this agent's own pacing, not APIBAN's trouble.
            if self._trouble is not None and not isinstance(exc, BudgetSpent):
                self._trouble.failed(str(exc), "lookups answer listed: null meanwhile")
            return Verdict(ip, None, "unavailable", reason=str(exc))
        if self._trouble is not None:
            self._trouble.succeeded()
        now = int(self._wall_clock())
        verdict = Verdict(ip, answer.listed, "check", answer.id, now if answer.listed else None)
        self._cache[ip] = verdict
        return verdict

    async def settle(self) -> None:
        """Wait for the upstream checks under way (their answers land in the cache)."""
        await asyncio.gather(*self._in_flight.values(), return_exceptions=True)

    async def close(self) -> None:
        """Cancel upstream checks still running (shutdown)."""
        tasks: Iterable[asyncio.Task[Verdict]] = list(self._in_flight.values())
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


def _late(ip: str, deadline: float) -> Verdict:
    return Verdict(ip, None, "unavailable", reason=f"APIBAN did not answer within {deadline:g} s")


def _outcome(task: asyncio.Task[Verdict], ip: str) -> Verdict:
    if task.cancelled():
        return Verdict(ip, None, "unavailable", reason="lookup cancelled (shutting down)")
    error = task.exception()
    if error is not None:
        return Verdict(ip, None, "unavailable", reason=f"lookup failed: {type(error).__name__}")
    return task.result()
