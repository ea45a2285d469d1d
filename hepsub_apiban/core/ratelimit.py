"""Sliding-window request budget: never more than N requests in any S seconds.

APIBAN allows 11 requests per 2 minutes per key and answers 429 past that. The budget is
shared by everything that talks to APIBAN (list pulls, per-IP checks, retries), so the
agent throttles itself instead of being throttled.
"""

from __future__ import annotations

import contextlib
from collections import deque
from collections.abc import Iterable

from .config import RateLimit
from .timing import Clock


class Budget:
    """The APIBAN key's request window in this process: never more than N requests in any S seconds.

    Owns the times of the requests sent and a block (after a 429, or while another agent pulls). Spent
    by the ``ApibanClient`` before every request; read by the mirror sync, the lookups (``headroom``)
    and ``SharedBudget``, which puts the key's window shared by several agents behind it.

    Never sleeps or awaits: callers ask (``wait_time``, ``headroom``) and decide; every call is linear
    in the requests of one window (11 for APIBAN).
    """

    def __init__(self, limit: RateLimit, clock: Clock) -> None:
        self.limit = limit
        self._clock = clock
        self._sent: deque[float] = deque()
        self._blocked_until = 0.0

    def _forget_old(self, now: float) -> None:
        horizon = now - self.limit.window
        while self._sent and self._sent[0] <= horizon:
            self._sent.popleft()

    def used(self) -> int:
        """Requests spent in the current window."""
        self._forget_old(self._clock())
        return len(self._sent)

    def wait_time(self, reserve: int = 0) -> float:
        """Seconds until a request may be sent while leaving ``reserve`` requests of the window unspent."""
        now = self._clock()
        self._forget_old(now)
        wait = max(0.0, self._blocked_until - now)
        allowed = max(1, self.limit.requests - reserve)
        if len(self._sent) >= allowed:
            # The oldest request that must age out for the count to drop below ``allowed``.
            wait = max(wait, self._sent[len(self._sent) - allowed] + self.limit.window - now)
        return wait

    def headroom(self, reserve: int = 0) -> int:
        """Requests that may be sent now while leaving ``reserve`` requests of the window unspent."""
        now = self._clock()
        self._forget_old(now)
        if self._blocked_until > now:
            return 0
        return max(0, self.limit.requests - reserve - len(self._sent))

    def try_acquire(self, reserve: int = 0) -> bool:
        """Spend one request if the window allows it (leaving ``reserve`` unspent), without waiting."""
        return self.take(reserve) is not None

    def take(self, reserve: int = 0) -> float | None:
        """``try_acquire``, giving the time the request was counted at (for ``refund``), or None."""
        if self.headroom(reserve) <= 0:
            return None
        at = self._clock()
        self._sent.append(at)
        return at

    def refund(self, at: float) -> None:
        """Give back the request counted at ``at``: another gate (store/budget.py) refused it, so it
        was never sent. That one exactly, not the newest: a later one may have gone out."""
        with contextlib.suppress(ValueError):  # already aged out of the window
            self._sent.remove(at)

    def block_for(self, seconds: float) -> None:
        """Send nothing for ``seconds`` (after a 429 the upstream window is full, whatever we counted)."""
        self._blocked_until = max(self._blocked_until, self._clock() + seconds)

    def adopt(self, ages: Iterable[float], blocked_for: float = 0.0) -> None:
        """Add the key's window as the store recorded it (store/budget.py): requests sent ``ages``
        seconds ago, and nothing for ``blocked_for`` seconds in place of any earlier shut. A request
        of this process that the store recorded too counts twice: the safe side."""
        now = self._clock()
        self._sent = deque(sorted([*self._sent, *(now - age for age in ages)]))
        self._blocked_until = now + max(0.0, blocked_for)

    def shut_for(self, seconds: float) -> None:
        """Send nothing for ``seconds`` from now, replacing any earlier block, even a longer one:
        another agent holds the key's budget (store/link.py) until this one is told otherwise."""
        self._blocked_until = self._clock() + seconds
