"""The agent's link to the store, and one APIBAN puller per key, the others following it.

With ``store.url`` the agent keeps a link to the store in the background (``StoreLink.run``):
it connects and migrates with a capped backoff, so a database that is down never stops the
agent, which meanwhile serves what it holds (memory, the state dir's snapshot). In mirror mode
the agents of one key elect a puller with a lease (``apiban-puller:<source>``,
``store.lease_ttl`` seconds by the database's clock, renewed every third of it). Only the holder
runs ``MirrorSync`` and so only it sends APIBAN requests: the key's budget is the puller's.
It writes each changed step to the store's list (store/shared_list.py, fenced by the lease's
epoch); a renew that fails, or a write the fence refuses, stops the pull at once. The others
poll the list's version every ``FOLLOW_EVERY`` seconds (a tenth of the lease if that is shorter,
so a takeover comes within the lease time) and apply its changed rows to their in-memory
``Mirror`` (lookups stay a dict probe; site API IDs are the stored serials). When the lease
lapses (the puller died), a follower takes it and goes on from the stored cursor. Every request
a puller sends is first recorded in the key's window in the store (store/budget.py), so the new
puller counts its predecessors' requests still in the window as its own and spends only what is
left of it (if that window cannot be read, it waits the window out). A follower sends no APIBAN
request at all (its budget is shut while it follows, and for a window after it stops following),
so the agents of one key together stay within ``apiban.rate_limit``.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import secrets
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from ..apiban.mirror import Mirror, MirrorSync
from ..core.config import StoreSettings
from ..core.logs import Redactor
from ..core.ratelimit import Budget
from ..core.trouble import FailureRun
from .budget import SharedBudget
from .database import STORE_FAILURES, Lease, Store
from .shared_list import LeaseLost, MirrorStore

# Its name before the wings: operators' log filters use it.
log = logging.getLogger("hepsub_apiban.shared_mirror")
RENEWALS_PER_TTL = 3  # one slow round-trip does not cost the lease
FOLLOW_EVERY = 2.0  # seconds between a follower's polls of the list's version (one cheap row)
RECONNECT_FIRST = 1.0
FOLLOWER_SHUT = 365 * 86400.0  # a follower's own budget: shut until it pulls or loses the store
# A refused connection costs the store nothing, and each module that uses the store waits for
# this link's news (``when_connected``) to write what it buffered: so a store back from an
# outage is in use again within this many seconds.
RECONNECT_MAX = 10.0
# Seconds of a store outage after which an agent in mirror mode pulls the list on its own (with
# half the key's budget, as the other agents of the key may do the same): a store that never comes
# back, or a wrong store.url, must not leave it without a list.
ALONE_AFTER = 300.0
CLOSE_TIMEOUT = 5.0


@dataclass(slots=True)
class StoreStatus:
    connected: bool = False
    schema_version: int | None = None
    last_error: dict[str, Any] | None = None
    role: str | None = None  # puller, follower; None outside mirror mode or while unconnected
    next_attempt: float | None = None  # wall clock of the next connection attempt while unconnected


def process_holder(agent: str) -> str:
    """The name this process holds leases and spends the key's window under: a new one per process,
    so a restarted agent does not inherit its old lease's budget."""
    return f"{agent}:{secrets.token_hex(4)}"


class StoreLink:
    """The agent's link to the PostgreSQL store: connects, migrates, reconnects with backoff; in mirror
    mode it takes the APIBAN puller lease or follows the list the puller writes.

    Owns the ``Store`` once connected, the lease and the store's ``status``. Built by ``create_app``
    with ``store.url``, with the mirror sync and the shared budget it drives; hands the store to
    ``SharedSightings``, ``SharedDetections`` and ``SharedBudget`` (``when_connected``).

    Never holds up the start (a database that is down is retried in the background while the agent
    serves from memory and its snapshot), and never lets two agents of one key pull APIBAN at once.
    """

    def __init__(
        self,
        settings: StoreSettings,
        holder: str,
        *,
        sync: MirrorSync | None = None,
        budget: Budget | None = None,
        source: str = "",
        shared_budget: SharedBudget | None = None,
        wall_clock: Callable[[], float] = time.time,
        monotonic: Callable[[], float] = time.monotonic,
    ) -> None:
        self._settings = settings
        self._ttl = settings.lease_ttl
        self._redact = Redactor(settings.secrets())
        self.holder = holder  # process_holder(agent UUID): this process, not the agent
        self._sync = sync
        self._budget = budget
        self._source = source
        self._wall_clock = wall_clock
        self._monotonic = monotonic
        self._down_since: float | None = None  # monotonic: when the store stopped answering
        self._trouble = FailureRun(f"store {settings.shown}", log, clock=monotonic)
        self._alone: asyncio.Task[None] | None = None  # the sync run without the store (ALONE_AFTER)
        self.status = StoreStatus()
        self.store: Store | None = None
        self._lease: Lease | None = None
        self._held = 0  # the store version the mirror holds
        # The mirror may hold what the store does not (a snapshot, pages pulled but not written).
        self._diverged = True
        self._lost = asyncio.Event()
        self._pull_task: asyncio.Task[None] | None = None
        self.task: asyncio.Task[None] | None = None
        self._on_connected: list[Callable[[Store], None]] = []
        # The key's request window in the store (store/budget.py): gating in check mode, recording
        # the puller's requests in mirror mode.
        self.shared_budget = shared_budget

    def when_connected(self, callback: Callable[[Store], None]) -> None:
        """Call ``callback`` with the store once it is connected and migrated (at once if it is)."""
        self._on_connected.append(callback)
        if self.store is not None and self.status.connected:
            callback(self.store)

    @property
    def _follow_every(self) -> float:
        return min(FOLLOW_EVERY, self._ttl / 10)

    @property
    def source(self) -> str:
        return self._source

    @property
    def lease_name(self) -> str:
        return f"apiban-puller:{self._source}"

    async def run(self) -> None:
        delay = RECONNECT_FIRST
        while True:
            try:
                if self.store is None:
                    self.store = await Store.connect(self._settings)
                self.status.schema_version = await self.store.migrate()
                await self._stop_pulling_alone()
                self.status.connected = True
                self.status.last_error = None
                self._trouble.succeeded()
                self.status.next_attempt = None
                for callback in self._on_connected:
                    callback(self.store)
                delay = RECONNECT_FIRST
                await self._mirror_role()
            except STORE_FAILURES as exc:
                self._failed(exc)
            except Exception as exc:
                # A bug here must not silently end the link (and with it the pull for every agent).
                log.exception("store link failed; starting it again in %.0f s", delay)
                self._failed(exc)
            self._pull_alone_when_down_long()
            self.status.next_attempt = self._now() + delay
            await asyncio.sleep(delay)
            delay = min(delay * 2.0, RECONNECT_MAX)

    def _failed(self, exc: BaseException) -> None:
        words = self._redact(str(exc) or type(exc).__name__)
        self._trouble.failed(words, "serving from memory, retrying")
        if self.status.role == "follower" and self._budget is not None:
            # On its own now: its checks may go out once the puller's requests have aged out.
            self._budget.shut_for(self._budget.limit.window)
        self.status.connected = False
        self.status.role = None
        # Rows removed while it was away may be pruned by the time it is back: reload whole then.
        self._diverged = True
        self.status.last_error = {"at": self._now(), "message": words}

    def _pull_alone_when_down_long(self) -> None:
        now = self._monotonic()
        if self._down_since is None:
            self._down_since = now
        if self._alone is not None:
            self.status.role = "alone"
            return
        if self._sync is None or self._budget is None or now - self._down_since < ALONE_AFTER:
            return
        limit = self._budget.limit.requests
        share = max(1, limit // 2)
        self._sync.standalone_reserve = limit - share
        self.status.role = "alone"
        log.warning(
            "store %s unreachable for %.0f s: pulling the APIBAN list alone, with %d of the key's %d "
            "requests per window, until the store is back",
            self._settings.shown,
            now - self._down_since,
            share,
            limit,
        )
        self._alone = asyncio.create_task(self._sync.run(), name="apiban-mirror-sync-alone")

    async def _stop_pulling_alone(self) -> None:
        self._down_since = None
        task, self._alone = self._alone, None
        if task is None:
            return
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
        assert self._sync is not None
        self._sync.standalone_reserve = 0
        log.info(
            "store %s is back: the APIBAN list is pulled once for all agents again", self._settings.shown
        )

    def _now(self) -> float:
        return self._wall_clock()

    async def _mirror_role(self) -> None:
        """Pull while holding the lease, follow otherwise; returns only by an exception."""
        assert self.store is not None
        if self._sync is None:
            self.status.role = None
            while True:  # nothing shared outside mirror mode yet: only tell whether the store answers
                self.status.schema_version = await self.store.schema_version()
                await asyncio.sleep(self._follow_every)
        shared = MirrorStore(self.store, self._source)
        await shared.ensure_source()
        await self._reload(shared)
        while True:
            lease = await self.store.try_acquire(self.lease_name, self.holder, self._ttl)
            if lease is not None:
                await self._pull(shared, lease)
                await self._reload(shared)
                continue
            if self.status.role != "follower" and self._budget is not None:
                # The key's budget is the puller's: a follower sends no /check of its own while the
                # list loads (such lookups answer "unavailable").
                self._budget.shut_for(FOLLOWER_SHUT)
            self.status.role = "follower"
            if await shared.version() > self._held:
                self._held = await shared.apply_changes(self._sync.mirror, self._held)
                await self._sync.save()  # the state dir's snapshot: what a restart without the store serves
            await asyncio.sleep(self._follow_every)

    async def _reload(self, shared: MirrorStore) -> None:
        """After a start or a pull that ended, the store's list replaces what is held (a snapshot
        of the state dir, pages pulled but never written); unless the store has none yet."""
        assert self._sync is not None
        if not self._diverged:
            return
        fresh = Mirror()
        held = await shared.apply_changes(fresh, 0)
        if held > 0:
            self._sync.current.mirror = fresh
            self._held = held
        self._diverged = False

    async def _pull(self, shared: MirrorStore, lease: Lease) -> None:
        assert self._sync is not None
        assert self.store is not None
        mirror = self._sync.mirror
        self._held = await shared.apply_changes(mirror, self._held)
        # A list held locally (the state dir) that the store has never seen is published whole.
        mirror.changed = set(mirror.entries) if self._held == 0 else set()
        if self._budget is not None:
            await self._adopt_window(lease)
        self._lease = lease
        self._lost.clear()
        self.status.role = "puller"
        log.info("store: pulling the APIBAN list for all agents of this key (lease epoch %d)", lease.epoch)
        if mirror.changed:
            await self._publish(shared, mirror)  # before any page: the store's rows come first
        self._sync.publish = lambda m: self._publish(shared, m)
        task = asyncio.create_task(self._sync.run(), name="apiban-mirror-sync")
        self._pull_task = task
        try:
            while not self._lost.is_set():
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(self._ttl / RENEWALS_PER_TTL):
                        await self._lost.wait()
                if self._lost.is_set() or await self.store.renew(lease.name, self.holder, self._ttl) is None:
                    break
        finally:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
            self._pull_task = None
            self._diverged = True
            self._sync.publish = None
            mirror.changed = None
            self._lease = None
            self.status.role = None
        log.warning("store: this agent no longer pulls the APIBAN list (lease lost)")

    async def _adopt_window(self, lease: Lease) -> None:
        """The key's requests still in APIBAN's window, as the previous pullers recorded them
        (store/budget.py); if they cannot be read, the window is waited out whole."""
        assert self._budget is not None
        if self.shared_budget is not None:
            try:
                await self.shared_budget.adopt_window()
            except STORE_FAILURES as exc:
                log.warning(
                    "store: the key's request window unread (%s); waiting it out", self._redact(str(exc))
                )
            else:
                return
        self._budget.shut_for(self._budget.limit.window if lease.epoch > 1 else 0.0)

    async def _publish(self, shared: MirrorStore, mirror: Mirror) -> None:
        lease = self._lease
        if lease is None or mirror.changed is None:
            return
        changed, mirror.changed = mirror.changed, set()
        try:
            self._held = await shared.save(mirror, changed, lease, self._now())
        except LeaseLost:
            self._stop_pulling()
        except STORE_FAILURES as exc:
            mirror.changed |= changed  # written with the next step, if the lease holds
            self.status.last_error = {"at": self._now(), "message": self._redact(str(exc))}
            self._stop_pulling()

    def _stop_pulling(self) -> None:
        # Cancelled before its next await: no APIBAN request goes out after the lease is gone.
        self._lost.set()
        if self._pull_task is not None:
            self._pull_task.cancel()

    def start(self) -> None:
        self.task = asyncio.create_task(self.run(), name="store-link")

    async def close(self) -> None:
        """Free the lease for another agent at once and close the pool (a clean shutdown)."""
        if self.task is not None:
            self.task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self.task
        await self._stop_pulling_alone()
        if self.store is None:
            return
        with contextlib.suppress(*STORE_FAILURES):
            if self._sync is not None:
                await self.store.release(self.lease_name, self.holder)
        try:
            async with asyncio.timeout(CLOSE_TIMEOUT):
                await self.store.close()
        except STORE_FAILURES:
            self.store.pool.terminate()  # a connection still busy (cancelled mid-statement)

    def to_json(self) -> dict[str, Any]:
        next_attempt = None if self.status.connected else self.status.next_attempt
        return {
            "url": self._settings.shown,
            "connected": self.status.connected,
            "schema_version": self.status.schema_version,
            "last_error": self.status.last_error,
            "role": self.status.role,
            # While unconnected: seconds until the next attempt (the agent serves from memory).
            "reconnect_in": None if next_attempt is None else round(max(0.0, next_attempt - self._now()), 3),
            "budget": None if self.shared_budget is None else self.shared_budget.to_json(),
        }
