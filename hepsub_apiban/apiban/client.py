"""APIBAN v1 client: ``GET /api/{key}/check/{ip}`` and ``GET /api/{key}/banned[/{id}]``.

APIBAN's answers are inconsistent (``ipaddress`` is a list or a string; ``ID`` is digits,
``none`` or ``unauthorized``; "not blocked" comes as 200 or 400; the end of the list is a 400),
so every answer is classified from its status *and* its body by the pure functions below,
and the I/O part only fetches bytes. Every request first spends one unit of the shared
budget, so the client never exceeds ``apiban.rate_limit`` whatever the load.

Nothing APIBAN (or anything on the way) sends is trusted further than its documented shape:
a body is read up to ``MAX_BODY_BYTES`` and no further; a page has at most ``PAGE_SIZE``
string addresses and an ``ID`` of ASCII digits that moves forward and is not far ahead of this
host's clock. Anything else is a ``BadAnswer``: retried later, never applied.
"""

from __future__ import annotations

import re
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol, TypeVar
from urllib.parse import quote

import aiohttp

from ..core.addresses import canonical
from ..core.config import ApibanSettings
from ..core.jsonutil import BodyTooLarge, loads_object, read_capped
from ..core.logs import Redactor, safe_text
from ..core.ratelimit import Budget

_T = TypeVar("_T")

# A page of 250 IPv6 addresses in their longest spelling is about 12 KB; a megabyte is generous
# and still bounds what one answer can cost (an unbounded read once peaked at 3.3 GB).
MAX_BODY_BYTES = 1 << 20
PAGE_SIZE = 250  # docs/peers/apiban.md#paging: "banned ip addresses in batches of 250"
# IDs are unix seconds (10 digits); 20 digits still fit milliseconds or nanoseconds, and keep
# int() on them cheap.
MAX_ID_DIGITS = 20
_PLAIN_ID = re.compile(f"[0-9]{{1,{MAX_ID_DIGITS}}}")  # ASCII only: str.isdigit() takes "²"
# An ID is the unix time of an entry (docs/peers/apiban.md#paging); one more than a day ahead of this host's
# clock cannot be, whatever the time zone or clock skew, and would skip every ban until then.
ID_AHEAD_LIMIT = 86400.0


class ApibanError(Exception):
    """An APIBAN request gave no usable answer; ``outcome`` labels it in metrics."""

    outcome = "error"


class BadKey(ApibanError):
    outcome = "bad_key"


class RateLimited(ApibanError):
    outcome = "rate_limited"


class Transient(ApibanError):
    """5xx, timeout or connection failure: worth retrying later."""

    outcome = "transient"


class BadAnswer(ApibanError):
    outcome = "bad_answer"


class BudgetSpent(ApibanError):
    """Our own budget is spent; nothing was sent."""

    outcome = "budget_spent"


class SharedGate(Protocol):
    """The key's budget shared with other agents (store/budget.py), behind this agent's own."""

    def may_spend(self, reserve: int = 0) -> bool: ...

    async def admit(self, reserve: int = 0) -> str | None: ...

    def block_for(self, seconds: float) -> None: ...


@dataclass(frozen=True, slots=True)
class CheckAnswer:
    listed: bool
    id: str | None = None


@dataclass(frozen=True, slots=True)
class Page:
    ips: tuple[str, ...]
    next_id: str | None  # None once APIBAN says there is nothing newer
    end: bool


def _texts(body: dict[str, Any]) -> list[str]:
    """``ipaddress`` as a list of strings, whichever shape APIBAN used."""
    value = body.get("ipaddress")
    if isinstance(value, str):
        return [value]
    if isinstance(value, list):
        return [item for item in value if isinstance(item, str)]
    return []


def _id(body: dict[str, Any]) -> str | None:
    # A string, as documented (docs/peers/apiban.md#paging); a number is not accepted: the Go clients every
    # APIBAN user runs decode ID into a string, so APIBAN cannot be sending numbers.
    value = body.get("ID")
    return value if isinstance(value, str) else None


def is_plain_id(value: object) -> bool:
    """An APIBAN ID: ASCII digits only, at most ``MAX_ID_DIGITS`` of them."""
    return isinstance(value, str) and _PLAIN_ID.fullmatch(value) is not None


def _common_error(status: int, body: dict[str, Any] | None) -> ApibanError | None:
    if body is None:
        if status >= 500:
            return Transient(f"APIBAN answered {status}")
        return BadAnswer(f"APIBAN answered {status} with a body that is not a JSON object")
    texts = " ".join(_texts(body)).lower()
    if status == 429 or "rate limit" in texts:
        return RateLimited("APIBAN rate limit exceeded (429)")
    if status in (401, 403) or _id(body) == "unauthorized":
        return BadKey(f"APIBAN refused the key ({status}); check apiban.key")
    if status >= 500:
        return Transient(f"APIBAN answered {status}")
    return None


def classify_check(ip: str, status: int, raw: bytes) -> CheckAnswer:
    """Verdict of one ``/check/{ip}`` answer; raises ``ApibanError`` when it is not one."""
    body = loads_object(raw)
    error = _common_error(status, body)
    if error is not None:
        raise error
    assert body is not None
    texts = _texts(body)
    entry_id = _id(body)
    if any(text.lower() == "not blocked" for text in texts):
        return CheckAnswer(listed=False)
    if 200 <= status < 300 and is_plain_id(entry_id) and canonical(ip) in map(canonical, texts):
        return CheckAnswer(listed=True, id=entry_id)
    if status in (400, 404) and entry_id == "none":
        return CheckAnswer(listed=False)
    raise BadAnswer(f"unexpected APIBAN check answer ({status})")


def classify_banned(status: int, raw: bytes, *, after: str | None = None, now: float | None = None) -> Page:
    """One page of ``/banned``; the 400 "no new bans" end of list is a normal answer.

    ``after`` is the ID the page was asked for and ``now`` this host's unix time: the page's ID
    must be above the first and not more than ``ID_AHEAD_LIMIT`` ahead of the second.
    """
    body = loads_object(raw)
    error = _common_error(status, body)
    if error is not None:
        raise error
    assert body is not None
    texts = _addresses(body.get("ipaddress"))
    entry_id = body.get("ID")
    # The documented ends: ID "none" (any status, with or without a last few addresses), or
    # "no new bans" with ID "none" or no ID at all (docs/peers/apiban.md#paging, #statuses).
    if entry_id == "none" or (entry_id is None and any(t.lower() == "no new bans" for t in texts)):
        return Page(tuple(t for t in texts if t.lower() != "no new bans"), next_id=None, end=True)
    if status != 200 or not isinstance(body.get("ipaddress"), list):
        raise BadAnswer(f"unexpected APIBAN banned answer ({status}): not a page of addresses")
    _check_next_id(entry_id, after, now)
    assert isinstance(entry_id, str)
    return Page(tuple(texts), next_id=entry_id, end=False)


def _addresses(value: object) -> list[str]:
    """``ipaddress`` of a page: a list of at most ``PAGE_SIZE`` strings, or one string (the
    documented string-typed "no new bans"); anything else is not an APIBAN page."""
    if value is None:
        return []  # allowed for {"ID": "none"}, which needs no addresses; a page is checked apart
    if isinstance(value, str):
        return [value]
    if not isinstance(value, list):
        raise BadAnswer(f"APIBAN page: ipaddress is a JSON {type(value).__name__}, not a list")
    if len(value) > PAGE_SIZE:
        raise BadAnswer(f"APIBAN page has {len(value):,} addresses; pages hold at most {PAGE_SIZE}")
    if not all(isinstance(item, str) for item in value):
        raise BadAnswer("APIBAN page: ipaddress holds something other than strings")
    return value


def _check_next_id(entry_id: object, after: str | None, now: float | None) -> None:
    if not is_plain_id(entry_id):
        raise BadAnswer(f"APIBAN page: ID {_shown(entry_id)} is not a string of up to {MAX_ID_DIGITS} digits")
    assert isinstance(entry_id, str)
    value = int(entry_id)
    if after is not None and is_plain_id(after) and value <= int(after):
        raise BadAnswer(f"APIBAN page: ID {entry_id} does not move forward from {after}")
    if now is not None and value > now + ID_AHEAD_LIMIT:
        raise BadAnswer(
            f"APIBAN page: ID {entry_id} is more than a day ahead of this host's clock"
            " (IDs are unix times); check the clock if every page says so"
        )


def _shown(value: object) -> str:
    return "missing" if value is None else safe_text(repr(value), 40)


@dataclass(slots=True)
class UpstreamError:
    at: float  # unix seconds
    message: str


class ApibanClient:
    """The one way to APIBAN: ``/check`` and ``/banned`` requests, parsed and classified.

    Owns the per-endpoint outcome counters and the last error; shares the process' ``ClientSession``
    and the key's ``Budget`` (and, with a store, the key's window in it: ``shared``). Used by the
    lookups and the mirror sync (and by ``hepsub-apiban check``, outside the agent).

    Never sends a request the budget does not allow, never puts the key in a log line or an error
    (the ``Redactor``), and never lets a malformed answer through as a verdict or a page.
    """

    def __init__(
        self,
        session: aiohttp.ClientSession,
        settings: ApibanSettings,
        budget: Budget,
        redactor: Redactor,
        wall_clock: Callable[[], float] = time.time,
        *,
        shared: SharedGate | None = None,
    ) -> None:
        self._session = session
        self._base = f"{settings.url}/api/{quote(settings.key, safe='')}"
        self._timeout = aiohttp.ClientTimeout(total=settings.timeout)
        self._timeout_s = settings.timeout
        self._redact = redactor
        self._wall_clock = wall_clock
        self.budget = budget
        self.shared = shared  # with store.url: the key's window shared by its agents
        self.requests: Counter[tuple[str, str]] = Counter()  # (endpoint, outcome) -> count
        self.last_error: UpstreamError | None = None
        self.last_success: float | None = None

    async def check(self, ip: str, reserve: int = 0) -> CheckAnswer:
        """``reserve``: requests of the window this check must leave to others (a background check)."""
        status, raw = await self._get("check", f"check/{quote(ip, safe='')}", reserve)
        return self._judge("check", lambda: classify_check(ip, status, raw))

    async def banned(self, since: str | None = None) -> Page:
        path = "banned" if since is None else f"banned/{quote(since, safe='')}"
        status, raw = await self._get("banned", path)
        now = self._wall_clock()
        return self._judge("banned", lambda: classify_banned(status, raw, after=since, now=now))

    def _judge(self, endpoint: str, classify: Callable[[], _T]) -> _T:
        try:
            result = classify()
        except ApibanError as exc:
            self._failed(endpoint, exc)
            if isinstance(exc, RateLimited):
                # Whatever we counted, APIBAN's window is full: wait a whole window.
                self.budget.block_for(self.budget.limit.window)
                if self.shared is not None:
                    self.shared.block_for(self.budget.limit.window)
            raise
        self.requests[(endpoint, "ok")] += 1
        self.last_success = self._wall_clock()
        return result

    async def _get(self, endpoint: str, path: str, reserve: int = 0) -> tuple[int, bytes]:
        # Never waits for the budget: lookups have a deadline, and the mirror sync waits on its
        # own (injectable) clock before it asks.
        spent_at = self.budget.take(reserve)
        if spent_at is None:
            exc: ApibanError = BudgetSpent(
                f"APIBAN request budget ({self.budget.limit} s) is spent; next request in "
                f"{self.budget.wait_time():.0f} s"
                if reserve == 0
                else f"the share of the APIBAN request budget ({self.budget.limit} s) for "
                "lookups of captured addresses is spent"
            )
            self.requests[(endpoint, exc.outcome)] += 1
            raise exc
        if self.shared is not None:
            refusal = await self.shared.admit(reserve)
            if refusal is not None:
                self.budget.refund(spent_at)  # not sent: this agent's own window keeps the slot
                exc = BudgetSpent(refusal)
                self.requests[(endpoint, exc.outcome)] += 1
                raise exc
        try:
            async with self._session.get(
                f"{self._base}/{path}", timeout=self._timeout, allow_redirects=False
            ) as response:
                return response.status, await read_capped(response, MAX_BODY_BYTES)
        except BodyTooLarge as too_big:
            error: ApibanError = BadAnswer(f"APIBAN sent {too_big}")
        except TimeoutError:
            error = Transient(f"APIBAN did not answer within {self._timeout_s:g} s")
        except aiohttp.ClientError as exc:
            # aiohttp messages may carry the URL, and the key is in its path.
            error = Transient(self._redact(f"APIBAN unreachable: {type(exc).__name__}: {exc}"))
        self._failed(endpoint, error)
        raise error

    def _failed(self, endpoint: str, exc: ApibanError) -> None:
        self.requests[(endpoint, exc.outcome)] += 1
        self.last_error = UpstreamError(self._wall_clock(), self._redact(str(exc)))

    def last_error_text(self) -> str:
        return self.last_error.message if self.last_error else "no error recorded"

    def requests_sent(self) -> int:
        return sum(n for (_, outcome), n in self.requests.items() if outcome != BudgetSpent.outcome)
