"""One APIBAN request budget for every agent of a key in check mode (``store.url``).

In check mode each agent sends a ``/check`` per new address on the same key, and APIBAN counts
them together (``apiban.rate_limit``, 11 per 120 s). With a store, a request goes out only when
both this agent's own ``Budget`` (core/ratelimit.py, in front: no round trip once it is spent) and the
key's window in the store allow it. The store's window is one row per key (``apiban_budget``)
holding the times of the key's requests in the window, by the database's clock: one ``UPDATE``
appends a time only while fewer than the limit are in the window, and PostgreSQL re-checks that
condition on the row's newest version when two agents update it at once, so the last slot is
taken once. A 429 blocks the whole key (``blocked_until``), not only the agent that got it.

The wait for the store is bounded (``SPEND_TIMEOUT``, well inside ``agent.deadline``). While
the store does not answer, the agent is on its own with a conservative share of the key's
budget: ``floor(limit / max(2, agents))`` per window, ``agents`` being how many agents of the key
asked the store lately. Nothing at all goes out for the first window of an outage, since the
other agents' requests in that window are unknown.

Mirror mode records instead of gating (``gating=False``): the puller holds the key's budget
through its lease and is the only agent that sends (followers' budgets are shut), so its own
budget decides, and each request it sends is written to the same window, once. An agent that
takes the lease over reads that window (``adopt_window``) and goes on with what is left of it,
instead of waiting a whole window for requests it cannot see.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from ..core.logs import safe_text
from ..core.ratelimit import Budget
from .database import SCHEMA, STORE_FAILURES, Store, StoreError

# Its name before the wings: operators' log filters use it.
log = logging.getLogger("hepsub_apiban.shared_budget")
SPEND_TIMEOUT = 0.2  # seconds a request waits for the store's answer (agent.deadline is about 1 s)
PAUSE = 2.0  # seconds the store is left alone after it failed: an outage costs one timeout per pause
# APIBAN counts a request when it arrives, the store when it was allowed: some milliseconds apart,
# and not always in the same order for two agents. The shared window is this much longer.
SLACK = 1.0
AGENTS_LATELY = 3600.0  # seconds: an agent that asked within this counts as sharing the key
FORGET_AGENTS = 86400.0  # seconds before a silent agent's row is deleted
WRITE_TIMEOUT = 5.0  # seconds a background write (a 429's block) may take
RECORD_ALL = 2**31 - 1  # mirror mode: every request is written, the puller's own budget decides


ENSURE = f"""
WITH row AS (INSERT INTO {SCHEMA}.apiban_budget (source) VALUES ($1) ON CONFLICT DO NOTHING)
DELETE FROM {SCHEMA}.apiban_budget_agents WHERE seen_at < now() - make_interval(secs => $2)
"""
# $1 source, $2 holder, $3 requests allowed in the window, $4 the window (seconds), $5 AGENTS_LATELY.
# The final SELECT reads the snapshot the statement started from: the row as it was before this
# request (enough to tell how long a refused request should wait), the agents but this one.
SPEND = f"""
WITH member AS (
    INSERT INTO {SCHEMA}.apiban_budget_agents (source, holder, seen_at) VALUES ($1, $2, now())
    ON CONFLICT (source, holder) DO UPDATE SET seen_at = now()
), spent AS (
    UPDATE {SCHEMA}.apiban_budget AS b SET
        sent = ARRAY(
            SELECT t FROM unnest(b.sent) AS t
            WHERE t > clock_timestamp() - make_interval(secs => $4) ORDER BY t
        ) || clock_timestamp(),
        updated_at = now()
    WHERE b.source = $1 AND b.blocked_until <= clock_timestamp()
        AND (SELECT count(*) FROM unnest(b.sent) AS t
             WHERE t > clock_timestamp() - make_interval(secs => $4)) < $3
    RETURNING 1
)
SELECT
    EXISTS (SELECT FROM spent) AS granted,
    1 + (SELECT count(*) FROM {SCHEMA}.apiban_budget_agents
         WHERE source = $1 AND holder <> $2 AND seen_at > now() - make_interval(secs => $5)) AS agents,
    extract(epoch FROM clock_timestamp())::float8 AS now,
    ARRAY(SELECT extract(epoch FROM t)::float8 FROM {SCHEMA}.apiban_budget AS b, unnest(b.sent) AS t
          WHERE b.source = $1 ORDER BY t) AS sent,
    (SELECT greatest(extract(epoch FROM blocked_until)::float8, 0) FROM {SCHEMA}.apiban_budget
     WHERE source = $1) AS blocked_until
"""
WINDOW = f"""
SELECT extract(epoch FROM clock_timestamp())::float8 AS now,
    ARRAY(SELECT extract(epoch FROM t)::float8 FROM unnest(sent) AS t ORDER BY t) AS sent,
    greatest(extract(epoch FROM blocked_until)::float8, 0) AS blocked_until
FROM {SCHEMA}.apiban_budget WHERE source = $1
"""
BLOCK = f"""
UPDATE {SCHEMA}.apiban_budget
SET blocked_until = greatest(blocked_until, clock_timestamp() + make_interval(secs => $2)), updated_at = now()
WHERE source = $1
"""


@dataclass(slots=True)
class SharedBudgetStats:
    granted: int = 0  # allowed by the store's window
    refused: int = 0  # refused by it: the key's window is full (or blocked after a 429)
    fallback_granted: int = 0  # allowed by this agent's share while the store did not answer
    fallback_refused: int = 0
    failures: int = 0  # the store failed or did not answer within SPEND_TIMEOUT
    blocks: int = 0  # 429s shared with the other agents


class SharedBudget:
    """The key's request window in the store, behind this agent's own ``Budget`` (see the module docstring).

    Owns the store's view of the window for this key (its ``source``) and this process (its
    ``holder``). Built with the ``ApibanClient`` when ``store.url`` is set: in check mode it gates
    every /check, in mirror mode it records the puller's requests for the agent that takes over; the
    ``StoreLink`` attaches the store once connected.

    Never waits on a store that does not answer longer than its timeout: this agent then spends its
    own share of the window.
    """

    def __init__(
        self,
        local: Budget,
        source: str,
        holder: str,
        *,
        gating: bool = True,
        timeout: float = SPEND_TIMEOUT,
        monotonic: Callable[[], float] = time.monotonic,
    ) -> None:
        self._local = local
        self.limit = local.limit
        self.source = source
        self.holder = holder
        self._gating = gating
        # The puller has no deadline to keep, and a record it cannot write costs it the request.
        self._timeout = timeout if gating else WRITE_TIMEOUT
        self._monotonic = monotonic
        self._store: Store | None = None
        self._ensured = False
        # Since when the store has not answered; from the start until it first does.
        self._lost_at: float | None = monotonic()
        self._paused_until = 0.0  # no store attempt before this, after a failure
        # A refusal by the store: (reserve, until): a request leaving at least that much unspent
        # is refused without a round trip until then.
        self._full: tuple[int, float] = (0, 0.0)
        self.agents = 1  # agents of the key that asked the store lately, this one included
        self.stats = SharedBudgetStats()
        self._asking = asyncio.Lock()
        self._writes: set[asyncio.Task[None]] = set()

    def attach(self, store: Store) -> None:
        """The store, once connected and migrated (again after each reconnection)."""
        self._store = store
        self._ensured = False

    @property
    def shared(self) -> bool:
        """Whether the store's window is in use (else this agent's fallback share)."""
        return self._lost_at is None

    def fallback_allowance(self, reserve: int = 0) -> int:
        """Requests per window this agent may send while the store does not answer."""
        share = self.limit.requests // max(2, self.agents)
        return share * max(0, self.limit.requests - reserve) // self.limit.requests

    def may_spend(self, reserve: int = 0) -> bool:
        """False when a request leaving ``reserve`` unspent would surely be refused now (no round trip)."""
        now = self._monotonic()
        if self._lost_at is None:
            least, until = self._full
            return not (reserve >= least and now < until)
        return self._fallback_refusal(reserve, now, spent=0) is None

    async def admit(self, reserve: int = 0) -> str | None:
        """Spend one request of the key's window; None if allowed, else why not.

        Called once this agent's own budget allowed the request (its time is in it)."""
        if self._store is not None and self._monotonic() >= self._paused_until:
            # One request of this agent at a time asks the store: a burst of lookups learns from
            # the first refusal instead of sending the store one statement each.
            try:
                async with asyncio.timeout(self._timeout):
                    await self._asking.acquire()
            except TimeoutError:
                self.stats.refused += 1
                return "the APIBAN request budget shared with the other agents of this key is busy"
            try:
                if self._store is not None and self._monotonic() >= self._paused_until:
                    answered, refusal = await self._ask_store(self._store, reserve)
                    if answered:
                        return refusal
            finally:
                self._asking.release()
        refusal = self._fallback_refusal(reserve, self._monotonic(), spent=1)
        if refusal is None:
            self.stats.fallback_granted += 1
        else:
            self.stats.fallback_refused += 1
            if not self._gating:
                self._local.block_for(PAUSE)  # the mirror sync asks again when its budget says
        return refusal

    async def _ask_store(self, store: Store, reserve: int) -> tuple[bool, str | None]:
        """(whether the store answered, why the request is refused or None)."""
        now = self._monotonic()
        if self._lost_at is None and not self.may_spend(reserve):
            self.stats.refused += 1
            return True, self._refusal_text()
        try:
            async with asyncio.timeout(self._timeout):
                granted, wait = await self._spend(store, reserve)
        except STORE_FAILURES as exc:
            self._failed(exc, now)
            return False, None
        self._answered()
        if granted:
            self.stats.granted += 1
            return True, None
        self.stats.refused += 1
        self._full = (reserve, now + wait)
        if not self._gating:
            self._local.block_for(wait)  # a 429 blocked the key: the mirror sync waits it out
        return True, self._refusal_text()

    def _refusal_text(self) -> str:
        return (
            f"the APIBAN request budget ({self.limit} s) shared by the {self.agents} agents of this "
            "key is spent"
        )

    def _fallback_refusal(self, reserve: int, now: float, spent: int) -> str | None:
        """Why this agent may not send on its own now (``spent``: its own request already counted)."""
        lost_at = self._lost_at if self._lost_at is not None else now
        opens = lost_at + self.limit.window - now
        if opens > 0:
            return (
                "the store does not answer: no APIBAN request for one window "
                f"({opens:.0f} s more), the other agents' requests in it are unknown"
            )
        allowance = self.fallback_allowance(reserve)
        if self._local.used() - spent >= allowance:
            return (
                f"the store does not answer: this agent's share of the APIBAN budget ({allowance} of "
                f"{self.limit} s, {self.agents} agents) is spent"
            )
        return None

    async def _spend(self, store: Store, reserve: int) -> tuple[bool, float]:
        """(granted, seconds until a refused request could be granted)."""
        if not self._ensured:
            await store.pool.execute(ENSURE, self.source, FORGET_AGENTS)
            self._ensured = True
        window = self.limit.window + SLACK
        allowed = self.limit.requests - reserve if self._gating else RECORD_ALL
        row = await store.pool.fetchrow(SPEND, self.source, self.holder, allowed, window, AGENTS_LATELY)
        assert row is not None  # a SELECT without FROM: always one row
        self.agents = max(1, int(row["agents"]))
        if row["granted"]:
            return True, 0.0
        now: float = row["now"]
        wait = max(0.0, (row["blocked_until"] or 0.0) - now)
        stamps = [t for t in row["sent"] if t > now - window]
        if allowed >= 1 and len(stamps) >= allowed:
            wait = max(wait, stamps[len(stamps) - allowed] + window - now)
        return False, wait

    def _failed(self, exc: BaseException, now: float) -> None:
        self.stats.failures += 1
        self._paused_until = now + PAUSE
        if self._lost_at is None:
            self._lost_at = now
            log.warning(
                "store: the shared APIBAN budget is out of reach (%s); this agent is on its own share "
                "(%d per %g s, none for the first window)",
                safe_text(str(exc) or type(exc).__name__, 200),
                self.fallback_allowance(),
                self.limit.window,
            )

    def _answered(self) -> None:
        if self._lost_at is not None:
            if self.stats.failures:
                log.info("store: the shared APIBAN budget answers again")
            self._lost_at = None

    async def adopt_window(self) -> None:
        """Take the key's window as recorded in the store into this agent's own budget (a new
        puller: its predecessors' requests). Each request still in the window counts as sent now:
        this agent's clock and the database's need not agree, and only the count matters to
        what may be sent at once."""
        store = self._store
        if store is None:
            raise StoreError("the store is not connected")
        row = await store.pool.fetchrow(WINDOW, self.source, timeout=WRITE_TIMEOUT)
        if row is None:
            self._local.adopt((), 0.0)  # no request of this key was ever recorded
            return
        now: float = row["now"]
        recent = sum(1 for t in row["sent"] if t > now - self.limit.window - SLACK)
        self._local.adopt([0.0] * recent, (row["blocked_until"] or 0.0) - now)

    def block_for(self, seconds: float) -> None:
        """A 429: the key's window is full for every agent; written in the background."""
        store = self._store
        if store is None or self._lost_at is not None:
            return
        task = asyncio.get_running_loop().create_task(self._block(store, seconds))
        self._writes.add(task)
        task.add_done_callback(self._writes.discard)

    async def _block(self, store: Store, seconds: float) -> None:
        try:
            await store.pool.execute(BLOCK, self.source, seconds, timeout=WRITE_TIMEOUT)
        except STORE_FAILURES as exc:
            log.warning("store: a 429 was not shared with the other agents: %s", safe_text(str(exc), 200))
            return
        self.stats.blocks += 1

    async def close(self) -> None:
        for task in list(self._writes):
            task.cancel()
        await asyncio.gather(*self._writes, return_exceptions=True)

    def to_json(self) -> dict[str, Any]:
        now = self._monotonic()
        stats = self.stats
        opens = None if self._lost_at is None else max(0.0, self._lost_at + self.limit.window - now)
        return {
            "gating": self._gating,  # check mode; mirror mode only records the puller's requests
            "shared": self.shared,
            "agents": self.agents,
            "fallback_allowance": self.fallback_allowance(),
            "fallback_opens_in": None if opens is None else round(opens, 3),
            "granted": stats.granted,
            "refused": stats.refused,
            "fallback_granted": stats.fallback_granted,
            "fallback_refused": stats.fallback_refused,
            "failures": stats.failures,
            "blocks": stats.blocks,
        }
