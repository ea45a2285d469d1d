"""The APIBAN API, served to the site's own clients from the mirror.

Kamailio, OpenSIPS, the iptables/nftables clients and pfSense all pull APIBAN themselves, each
spending the key's 11 requests per 2 minutes. Pointed at the agent instead, they keep their
configuration but the base URL, and the site spends one budget, once. Answers copy APIBAN's
bodies and statuses (apiban.md §2-§4), including its quirks: the end of the list is a 400, a
key or rate error carries ``ipaddress`` as a string. Keys here are the site's own (``site.keys``),
never the upstream APIBAN key. IDs are the mirror's local serials: one per address, increasing,
kept across restarts, so a client resumes from the last ID it got.
"""

from __future__ import annotations

import hashlib
import hmac
import re
import time
from collections.abc import Callable

from aiohttp import web
from cachetools import TTLCache

from .access import Refusals
from .addresses import NetworkSet, canonical, parse_ip
from .config import RateLimit
from .httpserver import read_body
from .jsonutil import json_response, loads_object
from .mirror import START_ID, Mirror
from .ratelimit import Budget

PAGE_SIZE = 250
MAX_CLIENTS = 10_000  # (key, client address) pairs tracked by the per-client rate limit
MAX_GUESSERS = 10_000  # client addresses whose wrong keys are counted
AUTH_FAILURE_LIMIT = RateLimit(10, 60.0)
# An ID is ASCII digits of a plausible length: str.isdigit() takes "²", and int() of a
# 5,000-digit text raises.
_ID = re.compile("[0-9]{1,19}")
# (method, path, handler name); the paths are also what agent.allow_from leaves open.
_ROUTES = (
    ("GET", "/api/{key}/banned", "banned"),
    ("GET", "/api/{key}/banned/{id}", "banned"),
    ("GET", "/api/{key}/check/{ip}", "check"),
    ("GET", "/ipset/{key}/list", "ipset"),
    ("POST", "/api/get", "get_v2"),
    ("POST", "/api/check", "check_v2"),
)
SITE_PATHS = frozenset(path for _, path, _ in _ROUTES)


def no_new_bans() -> web.Response:
    return json_response({"ipaddress": ["no new bans"], "ID": "none"}, 400)


def not_blocked() -> web.Response:
    return json_response({"ipaddress": ["not blocked"], "ID": "none"}, 400)


def unauthorized() -> web.Response:
    return json_response({"ipaddress": "none", "ID": "unauthorized"}, 403)


def rate_limited() -> web.Response:
    return json_response({"ipaddress": "rate limit exceeded", "ID": "unauthorized"}, 429)


def not_ready() -> web.Response:
    # APIBAN has no such answer; clients treat any non-200 as "try again at the next round".
    return json_response({"ipaddress": "list not loaded yet", "ID": "unavailable"}, 503)


class SiteApi:
    def __init__(
        self,
        keys: tuple[str, ...],
        mirror: Mirror | None,
        allow: NetworkSet,
        rate_limit: RateLimit,
        clock: Callable[[], float] = time.monotonic,
        *,
        auth_failure_limit: RateLimit = AUTH_FAILURE_LIMIT,
        refusals: Refusals | None = None,
        body_timeout: float = 10.0,
    ) -> None:
        # Only digests are compared, each against every key: the time taken says nothing of a key.
        self._key_digests = tuple(_digest(key) for key in keys)
        self.mirror = mirror  # set once the application has started its mirror
        self._allow = allow
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
        self._body_timeout = body_timeout
        self.requests = 0

    def routes(self) -> list[web.RouteDef]:
        return [web.route(method, path, getattr(self, name)) for method, path, name in _ROUTES]

    # ---------------------------------------------------------------- access

    def _refuse(self, request: web.Request, key: str | None) -> web.Response | None:
        """APIBAN's answer for a bad key, a key guesser or a client over its rate, else None."""
        self.requests += 1
        client = canonical(request.remote) or "unknown"
        failures = self._failures.get(client)
        if failures is not None and failures.wait_time() > 0:
            self._refusals.refuse("site", "too many bad keys", client)
            return rate_limited()
        if not self._known(key):
            failures = failures or Budget(self._failure_limit, self._clock)
            failures.try_acquire()
            # Stored again so the entry lives a full window after the latest failure.
            self._failures[client] = failures
            self._refusals.refuse("site", "bad key", client)
            return unauthorized()
        assert key is not None
        budget = self._budgets.get((key, client))
        if budget is None:
            budget = Budget(self._limit, self._clock)
            self._budgets[(key, client)] = budget
        if budget.try_acquire():
            return None
        self._refusals.refuse("site", "over site.rate_limit", client)
        return rate_limited()

    def _known(self, key: str | None) -> bool:
        if key is None:
            return False
        digest = _digest(key)
        found = False
        for known in self._key_digests:  # no early exit
            found |= hmac.compare_digest(known, digest)
        return found

    def _skip(self, ip: str) -> bool:
        # The allow-list is site policy: never hand a trusted trunk to a blocking client.
        address = parse_ip(ip)
        return address is None or address in self._allow

    def _loaded(self) -> Mirror | None:
        return self.mirror if self.mirror is not None and self.mirror.loaded else None

    # ---------------------------------------------------------------- answers

    def _page(self, after: str | None) -> web.Response:
        mirror = self._loaded()
        if mirror is None:
            return not_ready()
        start = after or START_ID
        if not _ID.fullmatch(start):
            return no_new_bans()
        ips, last = mirror.page_after(int(start), PAGE_SIZE, self._skip)
        if last is None:
            return no_new_bans()
        return json_response({"ipaddress": ips, "ID": str(last)}, 200)

    def _check(self, text: object) -> web.Response:
        mirror = self._loaded()
        if mirror is None:
            return not_ready()
        address = parse_ip(text)
        if address is None:
            return json_response({}, 400)
        serial = mirror.serials.get(address.text)
        if serial is None or self._skip(address.text):
            return not_blocked()
        return json_response({"ipaddress": [text], "ID": str(serial)}, 200)

    # ---------------------------------------------------------------- handlers

    async def banned(self, request: web.Request) -> web.Response:
        return self._refuse(request, request.match_info["key"]) or self._page(request.match_info.get("id"))

    async def check(self, request: web.Request) -> web.Response:
        return self._refuse(request, request.match_info["key"]) or self._check(request.match_info["ip"])

    async def ipset(self, request: web.Request) -> web.Response:
        refused = self._refuse(request, request.match_info["key"])
        if refused is not None:
            return refused
        mirror = self._loaded()
        if mirror is None:
            return not_ready()
        ips, _ = mirror.page_after(-1, len(mirror.serials), self._skip)
        return web.Response(text="".join(f"{ip}\n" for ip in ips), content_type="text/plain")

    async def get_v2(self, request: web.Request) -> web.Response:
        refused = self._refuse(request, _bearer(request))
        if refused is not None:
            return refused
        # golib sends no Content-Type: read the body whatever it claims to be.
        body = loads_object(await read_body(request, self._body_timeout))
        if body is None:
            return json_response({}, 400)
        start = body.get("id", START_ID)
        return self._page(str(start) if isinstance(start, str | int) else None)

    async def check_v2(self, request: web.Request) -> web.Response:
        refused = self._refuse(request, _bearer(request))
        if refused is not None:
            return refused
        body = loads_object(await read_body(request, self._body_timeout))
        return self._check(body.get("ipaddress") if body else None)


def _digest(key: str) -> bytes:
    # surrogatepass: a header or path may decode to lone surrogates, which plain UTF-8 refuses.
    return hashlib.sha256(key.encode("utf-8", "surrogatepass")).digest()


def _bearer(request: web.Request) -> str | None:
    scheme, _, token = request.headers.get("Authorization", "").partition(" ")
    return token.strip() or None if scheme.lower() == "bearer" else None
