"""CrowdSec's local API for bouncers: the site's blocklist as decisions.

Every CrowdSec bouncer (firewall, nginx, custom, ...) can then block what the agent blocks,
pointed at the agent (``api_url``) with one of ``site.keys`` as its ``api_key``. Two routes, as
CrowdSec's LAPI answers them (crowdsec ``pkg/models/localapi_swagger.yaml``, decisions
controller): ``GET /v1/decisions/stream?startup=true|false`` gives ``{"new": [...], "deleted":
[...]}`` (``null`` for an empty list), ``GET /v1/decisions?ip=`` the active decisions of one address
(``null`` for none). A decision is ``{"id", "origin", "type": "ban", "scope": "Ip", "value",
"duration", "until", "scenario", "simulated"}``; APIBAN entries have origin and scenario
``apiban``, local detections origin ``hepsub-apiban`` and scenario ``hepsub-apiban/<rule>``.

The stream remembers each bouncer (its key, address and User-Agent) by a cursor: the highest ID
there was at its last pull, and when that was. ``startup=true``, or a bouncer not remembered, gets
every active decision; later pulls get what was numbered since under ``new`` (new, reported
again by APIBAN, or a detection extended and renumbered by the book) and what ended since under
``deleted``. As CrowdSec does, each address is given once, by its longest decision; an address
still blocked by another source when its longest decision ends is deleted and given again with
the decision that remains, so a bouncer holding each decision for its ``duration`` keeps the right
one.
"""

from __future__ import annotations

import functools
import hashlib
import math
import time
from dataclasses import dataclass
from ipaddress import ip_network
from typing import Any

from aiohttp import web
from cachetools import TTLCache
from multidict import MultiMapping

from ..core.addresses import NetworkSet, parse_ip
from ..core.jsonutil import json_response
from ..core.timing import Clock
from .access import Refused, SiteAccess, digest
from .blocklist import Blocklist, Entry

STREAM_PATH = "/v1/decisions/stream"
DECISIONS_PATH = "/v1/decisions"
DECISION_PATHS = frozenset({STREAM_PATH, DECISIONS_PATH})
MAX_BOUNCERS = 10_000  # cursors remembered; a bouncer forgotten gets everything again
BOUNCER_TTL = 86400.0  # seconds a silent bouncer's cursor is kept
MAX_FILTER_ITEMS = 32  # names in one comma list (origins, scenarios_containing, ...)


def forbidden() -> web.Response:
    return json_response({"message": "access forbidden"}, 403)


def too_many() -> web.Response:
    return json_response({"message": "too many requests"}, 429)


def bad_request(message: str) -> web.Response:
    return json_response({"message": message}, 400)


@dataclass(frozen=True, slots=True)
class Filters:
    """What a bouncer asked to see (go-cs-bouncer's ``scopes``, ``origins``, ``scenarios_containing``,
    ``scenarios_not_containing``; ``type`` on /v1/decisions), as CrowdSec's LAPI applies them."""

    ip_scope: bool = True  # every decision here has scope Ip
    ban_type: bool = True  # ... and type ban
    origins: tuple[str, ...] | None = None
    containing: tuple[str, ...] = ()
    not_containing: tuple[str, ...] = ()

    def admits(self, entry: Entry) -> bool:
        if self is NO_FILTERS:
            return True
        if not (self.ip_scope and self.ban_type):
            return False
        if self.origins is not None and entry.origin not in self.origins:
            return False
        scenario = entry.scenario.lower()
        if self.containing and not any(part in scenario for part in self.containing):
            return False
        return not any(part in scenario for part in self.not_containing)


def filters_from(query: MultiMapping[str]) -> Filters | str:
    """The filters of a query, or what is wrong with it. Unknown parameters are ignored."""
    lists: dict[str, tuple[str, ...]] = {}
    for name in ("scopes", "origins", "scenarios_containing", "scenarios_not_containing", "type"):
        items = tuple(item.strip() for item in query.get(name, "").split(",") if item.strip())
        if len(items) > MAX_FILTER_ITEMS:
            return f"'{name}' names more than {MAX_FILTER_ITEMS} items"
        lists[name] = items
    scopes = [scope.lower() for scope in lists["scopes"]]
    filters = Filters(
        ip_scope=not scopes or "ip" in scopes,
        ban_type=not lists["type"] or "ban" in lists["type"],
        origins=lists["origins"] or None,
        containing=tuple(part.lower() for part in lists["scenarios_containing"]),
        not_containing=tuple(part.lower() for part in lists["scenarios_not_containing"]),
    )
    return NO_FILTERS if filters == NO_FILTERS else filters


NO_FILTERS = Filters()


def go_duration(seconds: float) -> str:
    """Whole seconds as Go's ``time.Duration.String()`` writes them ("3h59m58s", "-5s"); a
    moment left counts as a second, so an active decision never says "0s"."""
    whole = math.ceil(abs(seconds))
    return _go_duration(-whole if seconds < 0 else whole)


# A startup pull writes thousands of decisions, most of an APIBAN page with the same end: the
# texts are cached by whole second.
@functools.lru_cache(maxsize=4096)
def _go_duration(whole: int) -> str:
    sign = "-" if whole < 0 else ""
    hours, rest = divmod(abs(whole), 3600)
    minutes, secs = divmod(rest, 60)
    if hours:
        return f"{sign}{hours}h{minutes}m{secs}s"
    if minutes:
        return f"{sign}{minutes}m{secs}s"
    return f"{sign}{secs}s"


def rfc3339(at: float) -> str:
    return _rfc3339(int(at))


@functools.lru_cache(maxsize=4096)
def _rfc3339(at: int) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(at))


def decision(entry: Entry, now: float) -> dict[str, Any]:
    return {
        "id": entry.serial,
        "origin": entry.origin,
        "type": "ban",
        "scope": "Ip",
        "value": entry.ip,
        "duration": go_duration(entry.until - now),
        "until": rfc3339(entry.until),
        "scenario": entry.scenario,
        "simulated": False,
    }


def decisions_body(entries: list[Entry], now: float) -> list[dict[str, Any]] | None:
    """CrowdSec's list: in ID order, ``null`` when empty."""
    return [decision(entry, now) for entry in sorted(entries, key=_serial)] or None


@dataclass(frozen=True, slots=True)
class Cursor:
    serial: int  # the highest ID there was at the bouncer's last pull
    at: float  # when that pull was (wall clock)


class DecisionApi:
    """CrowdSec's decision API for bouncers: the site's ``Blocklist`` as decisions, streamed per bouncer.

    Owns the cursor of each bouncer (``MAX_BOUNCERS`` at most); built by ``create_app`` beside
    ``SiteApi`` with the same blocklist and key gate.

    Never makes an upstream request, and gives each address once, by its longest decision.
    """

    def __init__(self, access: SiteAccess, blocklist: Blocklist, clock: Clock = time.monotonic) -> None:
        self._access = access
        self.blocklist = blocklist
        self._cursors: TTLCache[bytes, Cursor] = TTLCache(MAX_BOUNCERS, BOUNCER_TTL, timer=clock)

    def routes(self) -> list[web.RouteDef]:
        return [web.get(STREAM_PATH, self.stream), web.get(DECISIONS_PATH, self.decisions)]

    def _admit(self, request: web.Request) -> Filters | web.Response:
        """The filters a bouncer asked for; or CrowdSec's 403 for a bad key, 429 for a key guesser
        or a bouncer over its rate, 400 for filters out of bounds."""
        refused = self._access.refuse(request, request.headers.get("X-Api-Key"))
        if refused is not None:
            return forbidden() if refused is Refused.BAD_KEY else too_many()
        filters = filters_from(request.query)
        return bad_request(filters) if isinstance(filters, str) else filters

    # ---------------------------------------------------------------- /v1/decisions/stream

    async def stream(self, request: web.Request) -> web.Response:
        filters = self._admit(request)
        if isinstance(filters, web.Response):
            return filters
        if request.method == "HEAD":  # a reachability probe: no body, and the cursor stays
            return web.Response()
        blocklist = self.blocklist
        now = blocklist.now()
        blocklist.settle(now)
        bouncer = _bouncer(request)
        cursor = None if request.query.get("startup") == "true" else self._cursors.get(bouncer)
        deleted: list[Entry] = []
        if cursor is None:
            new = self._everything(now, filters)
        else:
            new, deleted = self._since(cursor, now, filters)
        self._cursors[bouncer] = Cursor(blocklist.high_water(now), now)
        return json_response({"new": decisions_body(new, now), "deleted": decisions_body(deleted, now)})

    def _everything(self, now: float, filters: Filters) -> list[Entry]:
        longest: dict[str, Entry] = {}
        for entry in self.blocklist.active(now):
            if filters.admits(entry):
                held = longest.get(entry.ip)
                if held is None or entry.until > held.until:
                    longest[entry.ip] = entry
        return list(longest.values())

    def _since(self, cursor: Cursor, now: float, filters: Filters) -> tuple[list[Entry], list[Entry]]:
        blocklist = self.blocklist
        changed = set(blocklist.numbered_after(cursor.serial, now))
        gone: dict[str, Entry] = {}
        for entry in blocklist.ended_since(cursor.at):
            if filters.admits(entry) and (entry.ip not in gone or entry.until > gone[entry.ip].until):
                gone[entry.ip] = entry
        new: list[Entry] = []
        deleted: list[Entry] = []
        for ip in changed | gone.keys():
            remaining = [e for e in blocklist.entries_for(ip, now) if filters.admits(e)]
            best = max(remaining, key=_until, default=None)
            ended = gone.get(ip)
            # An ended decision matters to a bouncer only if it could be the one the bouncer holds:
            # none remains, or what remains ends sooner (it is then given again after the delete).
            if ended is not None and (best is None or ended.until > best.until):
                deleted.append(ended)
                if best is not None:
                    new.append(best)
            elif best is not None and best.serial > cursor.serial:
                new.append(best)  # a shorter newcomer beside what the bouncer holds is no news
        return new, deleted

    # ---------------------------------------------------------------- /v1/decisions

    async def decisions(self, request: web.Request) -> web.Response:
        filters = self._admit(request)
        if isinstance(filters, web.Response):
            return filters
        now = self.blocklist.now()
        found = self._matching(request.query, now)
        if isinstance(found, str):
            return bad_request(found)
        return json_response(decisions_body([e for e in found if filters.admits(e)], now))

    def _matching(self, query: MultiMapping[str], now: float) -> list[Entry] | str:
        """Active decisions of ``ip`` (or ``scope``/``value``, or within ``range``); all without them."""
        blocklist = self.blocklist
        value = query.get("ip") or query.get("value")
        if value is not None:
            if query.get("scope", "ip").lower() != "ip":
                return []
            address = parse_ip(value)
            if address is None:
                return f"'{value[:64]}' is not an IP address"
            return blocklist.entries_for(address.text, now)
        if "range" in query:
            try:
                network = ip_network(query["range"], strict=False)
            except ValueError:
                return f"'{query['range'][:64]}' is not an IP range"
            if query.get("contains", "true") != "false":  # decisions that contain the whole range
                return blocklist.entries_for(str(network[0]), now) if network.num_addresses == 1 else []
            inside = NetworkSet((network,))
            return [e for e in blocklist.active(now) if _within(e.ip, inside)]
        return list(blocklist.active(now))


def _within(ip: str, network: NetworkSet) -> bool:
    address = parse_ip(ip)
    return address is not None and address in network


def _bouncer(request: web.Request) -> bytes:
    """Who pulls: its key, address and User-Agent (two bouncers of one host are told apart)."""
    key = request.headers.get("X-Api-Key", "")
    agent = request.headers.get("User-Agent", "")[:200]
    return hashlib.sha256(b"\0".join((digest(key), (request.remote or "").encode(), agent.encode()))).digest()


def _serial(entry: Entry) -> int:
    return entry.serial


def _until(entry: Entry) -> float:
    return entry.until
