"""APIBAN v1 client: ``GET /api/{key}/check/{ip}`` and ``GET /api/{key}/banned[/{id}]``.

APIBAN's answers are inconsistent (``ipaddress`` is a list or a string; ``ID`` is digits,
``none`` or ``unauthorized``; "not blocked" comes as 200 or 400; the end of the list is a 400),
so every answer is classified from its status *and* its body by the pure functions below,
and the I/O part only fetches bytes. Every request first spends one unit of the shared
budget, so the client never exceeds ``apiban.rate_limit`` whatever the load.
"""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, TypeVar
from urllib.parse import quote

import aiohttp

from .addresses import canonical
from .config import ApibanSettings
from .jsonutil import loads_object
from .logs import Redactor
from .ratelimit import Budget

_T = TypeVar("_T")


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
    value = body.get("ID")
    if isinstance(value, int) and not isinstance(value, bool):
        return str(value)
    return value if isinstance(value, str) else None


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
    if 200 <= status < 300 and entry_id and entry_id.isdigit() and canonical(ip) in map(canonical, texts):
        return CheckAnswer(listed=True, id=entry_id)
    if status in (400, 404) and entry_id == "none":
        return CheckAnswer(listed=False)
    raise BadAnswer(f"unexpected APIBAN check answer ({status})")


def classify_banned(status: int, raw: bytes) -> Page:
    """One page of ``/banned``; the 400 "no new bans" end of list is a normal answer."""
    body = loads_object(raw)
    error = _common_error(status, body)
    if error is not None:
        raise error
    assert body is not None
    texts = _texts(body)
    entry_id = _id(body)
    if entry_id == "none" or any(text.lower() == "no new bans" for text in texts):
        return Page(tuple(t for t in texts if canonical(t)), next_id=None, end=True)
    if status == 200 and entry_id and entry_id.isdigit():
        return Page(tuple(texts), next_id=entry_id, end=False)
    raise BadAnswer(f"unexpected APIBAN banned answer ({status})")


@dataclass(slots=True)
class UpstreamError:
    at: float  # unix seconds
    message: str


class ApibanClient:
    """One per process; shares the process' ClientSession and the key's budget."""

    def __init__(
        self,
        session: aiohttp.ClientSession,
        settings: ApibanSettings,
        budget: Budget,
        redactor: Redactor,
        wall_clock: Callable[[], float] = time.time,
    ) -> None:
        self._session = session
        self._base = f"{settings.url}/api/{quote(settings.key, safe='')}"
        self._timeout = aiohttp.ClientTimeout(total=settings.timeout)
        self._timeout_s = settings.timeout
        self._redact = redactor
        self._wall_clock = wall_clock
        self.budget = budget
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
        return self._judge("banned", lambda: classify_banned(status, raw))

    def _judge(self, endpoint: str, classify: Callable[[], _T]) -> _T:
        try:
            result = classify()
        except ApibanError as exc:
            self._failed(endpoint, exc)
            if isinstance(exc, RateLimited):
                # Whatever we counted, APIBAN's window is full: wait a whole window.
                self.budget.block_for(self.budget.limit.window)
            raise
        self.requests[(endpoint, "ok")] += 1
        self.last_success = self._wall_clock()
        return result

    async def _get(self, endpoint: str, path: str, reserve: int = 0) -> tuple[int, bytes]:
        # Never waits for the budget: lookups have a deadline, and the mirror sync waits on its
        # own (injectable) clock before it asks.
        if not self.budget.try_acquire(reserve):
            exc: ApibanError = BudgetSpent(
                f"APIBAN request budget ({self.budget.limit} s) is spent; next request in "
                f"{self.budget.wait_time():.0f} s"
                if reserve == 0
                else f"the share of the APIBAN request budget ({self.budget.limit} s) for "
                "lookups of captured addresses is spent"
            )
            self.requests[(endpoint, exc.outcome)] += 1
            raise exc
        try:
            async with self._session.get(
                f"{self._base}/{path}", timeout=self._timeout, allow_redirects=False
            ) as response:
                return response.status, await response.read()
        except TimeoutError:
            error: ApibanError = Transient(f"APIBAN did not answer within {self._timeout_s:g} s")
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
