"""The APIBAN API, served to the site's own clients from the mirror.

Kamailio, OpenSIPS, the iptables/nftables clients and pfSense all pull APIBAN themselves, each
spending the key's 11 requests per 2 minutes. Pointed at the agent instead, they keep their
configuration but the base URL, and the site spends one budget, once. Answers copy APIBAN's
bodies and statuses (docs/peers/apiban.md#paging to #statuses), including its quirks: the end of the list is
a 400, a key or rate error carries ``ipaddress`` as a string. Keys here are the site's own (``site.keys``),
never the upstream APIBAN key. IDs are the mirror's local serials: one per address, increasing,
kept across restarts, so a client resumes from the last ID it got. Served local detections join
the list (``site.include_local``) with IDs from the same sequence (``blocklist``).
"""

from __future__ import annotations

import re

from aiohttp import web

from ..apiban.mirror import START_ID
from ..core.addresses import parse_ip
from ..core.httpserver import read_body
from ..core.jsonutil import json_response, loads_object
from .access import Refused, SiteAccess
from .blocklist import Blocklist

PAGE_SIZE = 250
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
    """The APIBAN-compatible API for the site's own clients (Kamailio, OpenSIPS, ipset, pfSense).

    Owns nothing but its routes: answers come from the ``Blocklist`` and the key gate (``SiteAccess``)
    it is built with, in APIBAN's bodies and statuses. Built by ``create_app`` when ``site.keys`` is set,
    its routes added after the agent's own.

    Never makes an upstream request (a site client reads the mirror, never APIBAN), never hands out the
    upstream APIBAN key (site keys are the site's own), and answers 503 until the list is in, not an
    empty list.
    """

    def __init__(self, access: SiteAccess, blocklist: Blocklist, *, body_timeout: float = 10.0) -> None:
        self._access = access
        self.blocklist = blocklist
        self._body_timeout = body_timeout

    def routes(self) -> list[web.RouteDef]:
        return [web.route(method, path, getattr(self, name)) for method, path, name in _ROUTES]

    # ---------------------------------------------------------------- access

    def _refuse(self, request: web.Request, key: str | None) -> web.Response | None:
        """APIBAN's answer for a bad key, a key guesser or a client over its rate, else None."""
        refused = self._access.refuse(request, key)
        if refused is None:
            return None
        return unauthorized() if refused is Refused.BAD_KEY else rate_limited()

    # ---------------------------------------------------------------- answers
    # Check mode holds no list: the site API answers 503 there, as while the first full pull runs.

    def _page(self, after: str | None) -> web.Response:
        blocklist = self.blocklist
        if not blocklist.loaded:
            return not_ready()
        start = after or START_ID
        if not _ID.fullmatch(start):
            return no_new_bans()
        ips, last = blocklist.page_after(int(start), PAGE_SIZE, blocklist.now())
        if last is None:
            return no_new_bans()
        return json_response({"ipaddress": ips, "ID": str(last)}, 200)

    def _check(self, text: object) -> web.Response:
        blocklist = self.blocklist
        if not blocklist.loaded:
            return not_ready()
        address = parse_ip(text)
        if address is None:
            return json_response({}, 400)
        serial = blocklist.check(address.text, blocklist.now())
        if serial is None:
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
        blocklist = self.blocklist
        if not blocklist.loaded:
            return not_ready()
        ips = blocklist.everything(blocklist.now())
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


def _bearer(request: web.Request) -> str | None:
    scheme, _, token = request.headers.get("Authorization", "").partition(" ")
    return token.strip() or None if scheme.lower() == "bearer" else None
