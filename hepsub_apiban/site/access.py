"""Who may read the site's blocklist: the keys of ``site.keys``, each client within its rate.

One gate for every API those keys open (the APIBAN-compatible site API and the CrowdSec decision
API), so a key guesser has one failure budget whichever door it knocks on. Each API answers a
refusal in its own peer's words.
"""

from __future__ import annotations

import enum
import hashlib
import hmac
import time

from aiohttp import web
from cachetools import TTLCache

from ..core.access import Refusals
from ..core.addresses import canonical
from ..core.config import RateLimit
from ..core.ratelimit import Budget
from ..core.timing import Clock

MAX_CLIENTS = 10_000  # (key, client address) pairs tracked by the per-client rate limit
MAX_GUESSERS = 10_000  # client addresses whose wrong keys are counted
AUTH_FAILURE_LIMIT = RateLimit(10, 60.0)
CHANNEL = "site"  # the refusals' channel in /metrics and /api/v1/status


class Refused(enum.Enum):
    BAD_KEY = "bad key"
    TOO_MANY_BAD_KEYS = "too many bad keys"
    RATE_LIMITED = "over site.rate_limit"


class SiteAccess:
    """The key gate of the site's APIs: which ``site.keys`` may read, each client within its rate.

    Owns digests of the keys, each client's rate and the key guessers' failure budget; shared by
    ``SiteApi`` and ``DecisionApi``, so a guesser has one budget whichever door it knocks on.

    Never compares a key in a time that depends on it (digests, each against every key), and never
    keeps more clients than its bound.
    """

    def __init__(
        self,
        keys: tuple[str, ...],
        rate_limit: RateLimit,
        clock: Clock = time.monotonic,
        *,
        auth_failure_limit: RateLimit = AUTH_FAILURE_LIMIT,
        refusals: Refusals | None = None,
    ) -> None:
        # Only digests are compared, each against every key: the time taken says nothing of a key.
        self._key_digests = tuple(digest(key) for key in keys)
        self._limit = rate_limit
        self._failure_limit = auth_failure_limit
        self._clock = clock
        self._budgets: TTLCache[tuple[str, str], Budget] = TTLCache(
            maxsize=MAX_CLIENTS, ttl=rate_limit.window, timer=clock
        )
        self._failures: TTLCache[str, Budget] = TTLCache(
            maxsize=MAX_GUESSERS, ttl=auth_failure_limit.window, timer=clock
        )
        self._refusals = refusals or Refusals(clock=clock)
        self.requests = 0

    def refuse(self, request: web.Request, key: str | None) -> Refused | None:
        """Why this request may not be answered (a bad key, a key guesser, a client over its rate),
        or None."""
        self.requests += 1
        client = canonical(request.remote) or "unknown"
        failures = self._failures.get(client)
        if failures is not None and failures.wait_time() > 0:
            return self._refused(Refused.TOO_MANY_BAD_KEYS, client)
        if not self.known(key):
            failures = failures or Budget(self._failure_limit, self._clock)
            failures.try_acquire()
            # Stored again so the entry lives a full window after the latest failure.
            self._failures[client] = failures
            return self._refused(Refused.BAD_KEY, client)
        assert key is not None
        budget = self._budgets.get((key, client))
        if budget is None:
            budget = Budget(self._limit, self._clock)
            self._budgets[(key, client)] = budget
        if budget.try_acquire():
            return None
        return self._refused(Refused.RATE_LIMITED, client)

    def _refused(self, why: Refused, client: str) -> Refused:
        self._refusals.refuse(CHANNEL, why.value, client)
        return why

    def known(self, key: str | None) -> bool:
        if key is None:
            return False
        key_digest = digest(key)
        found = False
        for known in self._key_digests:  # no early exit
            found |= hmac.compare_digest(known, key_digest)
        return found


def digest(key: str) -> bytes:
    # surrogatepass: a header or path may decode to lone surrogates, which plain UTF-8 refuses.
    return hashlib.sha256(key.encode("utf-8", "surrogatepass")).digest()
