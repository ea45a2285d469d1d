"""In-process fake of the APIBAN API (apiban.org), quirks included.

Serves the documented v1 contract (key in the URL path), the apiv2 POST endpoints and the ipset list,
with the status/body inconsistencies real clients have to survive (see docs/peers/apiban.md, #endpoints to
#statuses, and #fake):

* ``GET  /api/{key}/banned[/{id}]``  250-IP pages in ascending ID order; 400 "no new bans" at the end.
* ``GET  /api/{key}/check/{ip}``     200 listed / 400 (or 200) "not blocked" / 400 ``{}`` for a bad IP.
* ``POST /api/get``, ``POST /api/check``  apiv2: ``Authorization: Bearer <key>``, JSON body, no
  Content-Type required (golib sends none); same answers as ``banned`` and ``check``.
* ``GET  /ipset/{key}/list``         text/plain, one listed IP per line.

Every request passes the same stages, in this order: the simulated network (``hang``, then ``delay``),
an outage (``fail_status``), the key, the per-key rate limit, the broken-body toggles
(``invalid_json``, ``empty_object``), then the normal answer. All state lives on the instance, so tests
can run several fakes side by side; the toggles are plain attributes and may be flipped at any time.

A poisoned feed (APIBAN compromised, or anything on the way): ``poison`` set to one of ``POISONS``
spoils every ``/banned`` (and apiv2 ``get``) answer that has addresses to give; each way a page can be
wrong is described in fakes/apiban_poison.py.

Non-routable entries need no toggle: ``add`` lists any address, ``127.0.0.1``, ``10.0.0.1`` or ``::1``
included, as a poisoned feed would.
"""

from __future__ import annotations

import asyncio
import bisect
import ipaddress
import re
import time
from collections import deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from http import HTTPStatus
from typing import Any, Final

from aiohttp import web

from ..core.jsonutil import json_response, loads_object
from .apiban_poison import POISONS, Spoilt, poisoned_page

__all__ = ["KINDS", "PAGE_SIZE", "POISONS", "FakeApiban", "RecordedRequest"]

PAGE_SIZE: Final = 250
KINDS: Final = frozenset({"banned", "check", "get", "checkv2", "ipset"})

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address

# Body of the truncated-JSON toggle: cut inside a string, as a dropped connection would.
TRUNCATED_JSON: Final = b'{"ipaddress":["1.2'

# Only plain ASCII digits are IDs; int() would also take "+5", " 5" or "1_0", which APIBAN surely does not.
_ID_RE: Final = re.compile(r"[0-9]+")
_BEARER_RE: Final = re.compile(r"bearer\s+(\S+)\s*", re.IGNORECASE)


@dataclass(frozen=True, slots=True)
class RecordedRequest:
    """One request as the fake answered it. Deliberately holds no key: keys are secrets."""

    method: str
    kind: str
    key_ok: bool
    status: int
    at: float
    asked: str | None = None  # the ID a /banned (or apiv2 get) request asked for; None: from the start


def _parse_ip(text: object) -> IPAddress | None:
    if not isinstance(text, str):  # ip_address() would accept an int from a JSON body
        return None
    try:
        return ipaddress.ip_address(text)
    except ValueError:
        return None


def _bearer_key(request: web.Request) -> str | None:
    match = _BEARER_RE.fullmatch(request.headers.get("Authorization", ""))
    return match.group(1) if match else None


class FakeApiban:
    """A fake APIBAN server; ``app()`` gives an aiohttp application serving this instance's state."""

    def __init__(
        self,
        keys: Iterable[str] = ("test-key",),
        *,
        rate_limit: tuple[int, float] | None = (11, 120.0),
        clock: Callable[[], float] = time.monotonic,
        wall_clock: Callable[[], float] = time.time,
    ) -> None:
        self.keys: set[str] = set(keys)
        self.rate_limit = rate_limit
        self._clock = clock
        self._wall_clock = wall_clock
        # Quirk toggles (see the module docstring for the order in which they apply).
        self.ipaddress_as_string = False  # mid doc: "no new bans" as a string, not a one-item list
        self.not_blocked_status = 400  # the doc's 4xx; palner's Go mock answers 200
        self.bad_key_status = 403  # the doc's 403; palner's Go mock (and a Rust client) use 401
        self.fail_status: int | None = None  # e.g. 503, seen from /api/get in 2025 (apiban-client-go#4)
        self.delay = 0.0
        self.hang = False
        self.invalid_json = False
        self.empty_object = False
        self.page_size = PAGE_SIZE
        self._poison: str | None = None
        self.oversized_count = 2000
        self.huge_body_bytes = 4 << 20
        # Observation.
        self.requests: list[RecordedRequest] = []
        # Data: IDs are unix-second ints, unique; _ids is kept sorted for paging by bisect.
        self._ids: list[int] = []
        self._ip_by_id: dict[int, str] = {}
        self._id_by_addr: dict[IPAddress, int] = {}
        self._windows: dict[str, deque[float]] = {}
        self._released = asyncio.Event()
        self._closed = False

    # ------------------------------------------------------------------ data

    def add(self, ip: str, ts: int | None = None) -> str:
        """List ``ip`` and return its ID.

        ``ts=None`` means "now" by ``wall_clock``, but never before the newest entry: a fresh ban must
        show up to a client that already paged to the end. An explicit ``ts`` may land in the middle
        (a client past that ID will not see it, as with the real forward-only stream). A taken ID is
        bumped to the next free second. Re-adding a listed IP moves it to the new ID, the way APIBAN
        reactivates an address. Raises ValueError for a non-IP, which is a bug in the test.
        """
        addr = ipaddress.ip_address(ip)
        self._unlist(addr)
        new_id = self._free_id(ts)
        bisect.insort(self._ids, new_id)
        self._ip_by_id[new_id] = ip
        self._id_by_addr[addr] = new_id
        return str(new_id)

    def add_many(self, ips: Iterable[str], start_ts: int = 1_700_000_000) -> None:
        """List ``ips`` in order under strictly increasing IDs ``start_ts``, ``start_ts + 1``, ..."""
        ts = start_ts
        for ip in ips:
            ts = int(self.add(ip, ts)) + 1

    def remove(self, ip: str) -> None:
        """Stop listing ``ip``, as APIBAN does once an address has been inactive for 7 days."""
        self._unlist(ipaddress.ip_address(ip))

    def listed(self, ip: str) -> str | None:
        """The ID under which ``ip`` is listed (compared canonically), or None."""
        addr = _parse_ip(ip)
        found = None if addr is None else self._id_by_addr.get(addr)
        return None if found is None else str(found)

    def _unlist(self, addr: IPAddress) -> None:
        old = self._id_by_addr.pop(addr, None)
        if old is not None:
            del self._ip_by_id[old]
            del self._ids[bisect.bisect_left(self._ids, old)]

    def _free_id(self, ts: int | None) -> int:
        if ts is None:
            ts = int(self._wall_clock())
            if self._ids and ts <= self._ids[-1]:
                ts = self._ids[-1] + 1
        while ts in self._ip_by_id:
            ts += 1
        return ts

    @property
    def poison(self) -> str | None:
        """How ``/banned`` pages are spoilt (one of ``POISONS``, see the module docstring), or None."""
        return self._poison

    @poison.setter
    def poison(self, kind: str | None) -> None:
        if kind is not None and kind not in POISONS:
            raise ValueError(f"unknown poison {kind!r}; expected one of {sorted(POISONS)}")
        self._poison = kind

    # ------------------------------------------------------------ observation

    def request_count(self, kind: str | None = None) -> int:
        """Requests answered so far, all or of one kind ("banned", "check", "get", "checkv2", "ipset")."""
        if kind is None:
            return len(self.requests)
        if kind not in KINDS:
            raise ValueError(f"unknown request kind {kind!r}; expected one of {sorted(KINDS)}")
        return sum(1 for r in self.requests if r.kind == kind)

    def release(self) -> None:
        """Wake every request hung so far; they then answer normally. Later ones hang again while ``hang``."""
        self._released.set()
        # A fresh event keeps ``hang`` meaningful for later requests; the woken ones hold the old one.
        self._released = asyncio.Event()

    def close(self) -> None:
        """Release hung requests for good: after this, ``hang`` is ignored (final teardown)."""
        self._closed = True
        self.release()

    # ------------------------------------------------------------------- app

    def app(self) -> web.Application:
        # The v1 URLs carry the key, so aiohttp's access log would write it out: switch it off here,
        # where it overrides whatever the runner (tests, ``demo``) passes.
        app = web.Application(handler_args={"access_log": None})
        app.router.add_get("/api/{key}/banned", self._handle_banned)
        app.router.add_get("/api/{key}/banned/{id}", self._handle_banned)
        app.router.add_get("/api/{key}/check/{ip}", self._handle_check)
        app.router.add_post("/api/get", self._handle_get_v2)
        app.router.add_post("/api/check", self._handle_check_v2)
        app.router.add_get("/ipset/{key}/list", self._handle_ipset)
        app.on_shutdown.append(self._on_shutdown)
        return app

    async def _on_shutdown(self, _app: web.Application) -> None:
        # A hung handler would otherwise hold the server's shutdown until its timeout.
        self.release()

    # --------------------------------------------------------------- handlers

    async def _handle_banned(self, request: web.Request) -> web.Response:
        after = request.match_info.get("id")
        return await self._serve(
            request, "banned", request.match_info["key"], lambda: self._page(after), asked=after
        )

    async def _handle_check(self, request: web.Request) -> web.Response:
        ip = request.match_info["ip"]
        return await self._serve(request, "check", request.match_info["key"], lambda: self._check(ip))

    async def _handle_get_v2(self, request: web.Request) -> web.Response:
        body = loads_object(await request.read())  # read() ignores Content-Type, which golib omits
        return await self._serve(request, "get", _bearer_key(request), lambda: self._get_v2(body))

    async def _handle_check_v2(self, request: web.Request) -> web.Response:
        body = loads_object(await request.read())
        return await self._serve(request, "checkv2", _bearer_key(request), lambda: self._check_v2(body))

    async def _handle_ipset(self, request: web.Request) -> web.Response:
        return await self._serve(request, "ipset", request.match_info["key"], self._ipset)

    async def _serve(
        self,
        request: web.Request,
        kind: str,
        key: str | None,
        answer: Callable[[], web.Response],
        asked: str | None = None,
    ) -> web.Response:
        await self._network()
        # Taken after the simulated network, i.e. when the "server" sees the request; the rate limiter
        # and RecordedRequest.at use this same instant.
        now = self._clock()
        key_ok = key is not None and key in self.keys
        # Not ``refusal or answer()``: a Response is a MutableMapping, so an empty one is falsy.
        response = self._refusal(key, key_ok, now)
        if response is None:
            response = answer()
        self.requests.append(RecordedRequest(request.method, kind, key_ok, response.status, now, asked))
        return response

    async def _network(self) -> None:
        if self.hang and not self._closed:
            await self._released.wait()
        if self.delay > 0:
            await asyncio.sleep(self.delay)

    def _refusal(self, key: str | None, key_ok: bool, now: float) -> web.Response | None:
        """The answer that pre-empts the normal one (outage, key, rate limit, broken body), if any."""
        if self.fail_status is not None:
            # Outages come from a proxy in front of the API: plain text, not JSON.
            return web.Response(status=self.fail_status, text=self._reason(self.fail_status))
        if key is None or not key_ok:
            return json_response({"ipaddress": "none", "ID": "unauthorized"}, self.bad_key_status)
        if self._rate_limited(key, now):
            return json_response({"ipaddress": "rate limit exceeded", "ID": "unauthorized"}, 429)
        if self.invalid_json:
            return web.Response(status=200, body=TRUNCATED_JSON, content_type="application/json")
        if self.empty_object:
            return json_response({}, 200)
        return None

    @staticmethod
    def _reason(status: int) -> str:
        try:
            return HTTPStatus(status).phrase
        except ValueError:
            return "Error"

    def _rate_limited(self, key: str, now: float) -> bool:
        """Sliding window per key: at most N accepted requests in any S seconds.

        How APIBAN counts refused requests is unknown. Only requests that were NOT answered 429 take a
        slot, so a client that keeps its own sliding-window budget of N per S never sees a 429, and a
        client that ignores 429s still recovers S seconds after its last accepted request. A slot taken
        at time t is free again at t + S exactly (the same boundary a client pruning ``t <= now - S`` uses).
        """
        if self.rate_limit is None:
            return False
        limit, window = self.rate_limit
        stamps = self._windows.setdefault(key, deque())
        while stamps and stamps[0] <= now - window:
            stamps.popleft()
        if len(stamps) >= limit:
            return True
        stamps.append(now)
        return False

    # ---------------------------------------------------------------- answers

    def _page(self, after: str | None) -> web.Response:
        start = self._start_index(after)
        chunk = [] if start is None else self._ids[start : start + self.page_size]
        if not chunk:
            return self._no_new_bans()
        ips, page_id = [self._ip_by_id[i] for i in chunk], str(chunk[-1])
        if self._poison is not None:
            return self._poisoned(self._poison, ips, page_id, after)
        return json_response({"ipaddress": ips, "ID": page_id}, 200)

    def _poisoned(self, kind: str, ips: list[str], page_id: str, after: str | None) -> web.Response:
        asked = int(after) if after is not None and _ID_RE.fullmatch(after) else None
        spoilt = Spoilt(self._wall_clock(), self.page_size, self.oversized_count, self.huge_body_bytes)
        return poisoned_page(kind, ips, page_id, asked, spoilt)

    def _start_index(self, after: str | None) -> int | None:
        """Index of the first entry newer than ``after``; no ID, "100" or any old ID means the start."""
        if after is None:
            return 0
        if not _ID_RE.fullmatch(after):
            return None  # a non-numeric ID (e.g. "none" sent back) gets "no new bans"
        return bisect.bisect_right(self._ids, int(after))

    def _no_new_bans(self) -> web.Response:
        text: str | list[str] = "no new bans" if self.ipaddress_as_string else ["no new bans"]
        return json_response({"ipaddress": text, "ID": "none"}, 400)

    def _check(self, ip: object) -> web.Response:
        addr = _parse_ip(ip)
        if addr is None:
            return json_response({}, 400)  # palner's mock, for 10.0.0.257, a bad IPv6 or a DNS name
        found = self._id_by_addr.get(addr)
        if found is None:
            return json_response({"ipaddress": ["not blocked"], "ID": "none"}, self.not_blocked_status)
        # Echo the IP as asked: baningo requires ipaddress == [the IP it sent].
        return json_response({"ipaddress": [ip], "ID": str(found)}, 200)

    def _get_v2(self, body: dict[str, Any] | None) -> web.Response:
        # ``set`` (sip|http|all) is accepted and ignored: the fake has a single dataset.
        if body is None:
            return json_response({}, 400)
        after = body.get("id")
        if isinstance(after, int) and not isinstance(after, bool):
            after = str(after)
        if after is not None and not isinstance(after, str):
            return self._no_new_bans()
        return self._page(after)

    def _check_v2(self, body: dict[str, Any] | None) -> web.Response:
        return json_response({}, 400) if body is None else self._check(body.get("ipaddress"))

    def _ipset(self) -> web.Response:
        text = "".join(f"{self._ip_by_id[i]}\n" for i in self._ids)
        return web.Response(status=200, text=text, content_type="text/plain")
