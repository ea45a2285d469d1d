"""In-package fake of homer-app's agent-subscription API (HOMER 7), faithful to ``docs/peers/homer-app.md``.

It reproduces what an external HEPSUB agent can observe of homer-app (sipcapture/homer-app, echo v4,
gorm v1 on PostgreSQL, validator.v9), including its oddities:

* ``POST /api/v3/agent/subscribe`` (no JWT; ``Auth-Token`` checked by the handler) in homer-app's
  order: echo bind, validate, token, DB. Re-POSTing a uuid is the refresh; every subscribe also
  purges the expired rows of all agents. Errors are ``400 {"data":{},"message":...}``, never 401/403.
* ``POST /api/v3/auth`` issues JWT-like tokens for the JWT group: ``DELETE``/``GET`` of
  ``/agent/subscribe[/{uuid}]``, ``GET /agent/type[/{type}]`` and ``POST /agent/search/{uuid}/{type}``.
  ``Auth-Token`` opens that group only with ``token_access`` (``enable_token_access``).
* :meth:`FakeHomer.search_agent` calls the agent the way homer-app's ``DoSearchByPost`` does with the
  default HEPSUB mapping: the exact body bytes, headers, URL, timestamp widening and answer wrapper.
* The Download PCAP button (``POST /api/v3/agent/search/{uuid}/download``): the row is found by
  ``type LIKE '%download%'``, no mapping applies, the last child of ``param.search`` is posted as
  JSON to the agent's ``{path}/download`` and its bytes come back as an ``octet-stream`` attachment.
  The uuid and type of the path are URL-escaped before the ``LIKE``, as in homer-app, so a
  registered type with ``;`` is never found by its own search.

Expiry is only a filter, as in homer-app: nothing expires rows in the background. Time comes from the
injected ``wall_clock`` (row dates) and ``clock`` (``Subscription.at``). The fake never logs: the
subscribe errors echo the token, and tests assert that no token reaches any log.
"""

from __future__ import annotations

import base64
import json
import math
import os
import re
import secrets
import time
import uuid as uuidlib
from collections.abc import Awaitable, Callable, Iterable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, Final
from urllib.parse import quote_plus

import aiohttp
import orjson
from aiohttp import web
from aiohttp.typedefs import Middleware
from yarl import URL

__all__ = ["AgentRow", "FakeHomer", "Subscription"]

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
Answer = tuple[int, Any]

TOKEN_HEADER: Final = "Auth-Token"  # auth_settings.auth_token_header default
GO_USER_AGENT: Final = "Go-http-client/1.1"

# gorm v1 leaves zero-valued fields with a `default` tag out of the INSERT, so PostgreSQL fills these in.
DB_DEFAULTS: Final[Mapping[str, Any]] = {
    "port": 8080,
    "protocol": "log",
    "path": "/api/search",
    "node": "testnode",
    "type": "type",
}

# The hepsub_mapping_schema rows the migration seeds, all with the same default mapping
# (docs/peers/homer-app.md#enrichment-request).
MAPPED_PROFILES: Final = frozenset({(1, "default"), (1, "call"), (1, "registration")})
DEFAULT_SOURCE_FIELDS: Final = ("sid", "source_ip")
LOOKUP_FIELD: Final = '{"data":$source_field,"fromts":$fromts,"tots":$tots}'
LOOKUP_RANGE: Final = (-300, 200)

_STRUCT: Final = "TableAgentLocationSession"
# json name -> Go type of model.TableAgentLocationSession; `id` is json:"-" and cannot be bound.
_AGENT_FIELDS: Final[Mapping[str, str]] = {
    "uuid": "string",
    "gid": "int",
    "host": "string",
    "port": "int",
    "protocol": "string",
    "path": "string",
    "node": "string",
    "type": "string",
    "ttl": "int",
    "create_date": "time.Time",
    "expire_date": "time.Time",
    "active": "int",
}
# validate:"required" fields, in struct order, with their Go names (validator reports Go names).
_REQUIRED: Final = (("uuid", "GUID"), ("gid", "Gid"), ("host", "Host"))

_INT64: Final = range(-(2**63), 2**63)
# PostgreSQL's uuid input: 32 hex digits, an optional '-' after any group of four, optional {braces}.
_PG_UUID: Final = re.compile(r"(\{)?[0-9a-fA-F]{4}(?:-?[0-9a-fA-F]{4}){7}(?(1)\})")
_RFC3339: Final = re.compile(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d(\.\d+)?(Z|[+-]\d\d:\d\d)")
_GO_ATOI: Final = re.compile(r"[+-]?[0-9]+")
# Go's json.Marshal escapes these even inside strings; orjson does not.
_GO_ESCAPES: Final = (
    (b"<", b"\\u003c"),
    (b">", b"\\u003e"),
    (b"&", b"\\u0026"),
    ("\u2028".encode(), b"\\u2028"),
    ("\u2029".encode(), b"\\u2029"),
)
# How Go's encoding/json words the stdlib decoder's syntax errors.
_GO_SYNTAX: Final[Mapping[str, str]] = {
    "Expecting value": "looking for beginning of value",
    "Expecting property name enclosed in double quotes": "looking for beginning of object key string",
    "Expecting ':' delimiter": "after object key",
    "Expecting ',' delimiter": "after object key:value pair",
    "Extra data": "after top-level value",
}
_GO_HEADERS: Final = {
    "Content-Type": "application/json",
    "User-Agent": GO_USER_AGENT,
    "Accept-Encoding": "gzip",  # Go's transport adds it (and decompresses), as aiohttp does
}


@dataclass
class AgentRow:
    """One row of homer-app's agent_location_session table."""

    uuid: str
    gid: int
    host: str
    port: int
    protocol: str
    path: str
    node: str
    type: str
    create_date: float
    expire_date: float
    active: bool

    def as_json(self) -> dict[str, Any]:
        """The row as homer-app lists it: ttl is never stored, active is an int column."""
        return {
            "uuid": self.uuid,
            "gid": self.gid,
            "host": self.host,
            "port": self.port,
            "protocol": self.protocol,
            "path": self.path,
            "node": self.node,
            "type": self.type,
            "ttl": 0,
            "create_date": rfc3339(self.create_date),
            "expire_date": rfc3339(self.expire_date),
            "active": int(self.active),
        }


@dataclass(frozen=True)
class Subscription:
    """One POST /api/v3/agent/subscribe as received, whatever it was answered."""

    at: float
    status: int
    body: Any
    headers: dict[str, str]


class _Refused(Exception):
    """A request homer-app rejects; ``str()`` is the message of its 400 envelope."""


class _GoPanic(Exception):
    """Where homer-app's Go code panics (a failed type assertion)."""


class FakeHomer:
    """homer-app's agent registry and agent caller; all state is on the instance."""

    def __init__(
        self,
        tokens: Iterable[str] = ("homer-test-token",),
        *,
        users: Mapping[str, str] = {"admin": "sipcapture"},  # copied, never mutated
        token_access: bool = False,
        clock: Callable[[], float] = time.monotonic,
        wall_clock: Callable[[], float] = time.time,
        seed_dummy: bool = False,
        api_prefix: str = "",
    ) -> None:
        self.tokens: set[str] = set(tokens)
        self.users: dict[str, str] = dict(users)
        self.token_access = token_access
        self.api_prefix = api_prefix  # http_settings.api_prefix
        self.rows: dict[str, AgentRow] = {}
        self.subscriptions: list[Subscription] = []
        self.deletions: list[tuple[str, int]] = []
        self.jwts: set[str] = set()
        self.fail_next = 0
        self.fail_message = "pq: database is down"
        # Keys of the mapping's source_fields (Preferences -> HEPSUB) that the search route forwards.
        self.source_fields: list[str] = list(DEFAULT_SOURCE_FIELDS)
        self.agent_timeout = 10.0  # http_client.connection_timeout
        self._clock = clock
        self._wall_clock = wall_clock
        if seed_dummy:
            self._seed_dummy()

    # ----------------------------------------------------------------- state
    def active_rows(self) -> list[AgentRow]:
        now = self._wall_clock()
        return [row for row in self.rows.values() if row.expire_date > now]

    def _seed_dummy(self) -> None:
        # migration.go seeds this row with expire_date = now at install time, i.e. already expired; it
        # breaks the UI fan-out until some agent subscribes and thereby purges it
        # (docs/peers/homer-app.md#fan-out).
        seeded = self._wall_clock() - 60.0
        guid = str(uuidlib.uuid4())
        self.rows[guid] = AgentRow(
            guid, 10, "127.0.0.1", 8080, "rtp", "/api/search", "rtpnode01", "cdr", seeded, seeded, True
        )

    def _purge(self, guid: str, now: float) -> None:
        """DELETE ... WHERE guid = ? OR expire_date < NOW()."""
        for key in [k for k, row in self.rows.items() if k == guid or row.expire_date < now]:
            del self.rows[key]

    # ----------------------------------------------------------------- app
    def app(self) -> web.Application:
        app = web.Application(middlewares=[self._echo_fallback()])
        api = f"{self.api_prefix}/api/v3"
        app.router.add_post(f"{api}/agent/subscribe", self._subscribe)
        app.router.add_post(f"{api}/auth", self._login)
        app.router.add_get(f"{api}/agent/subscribe", self._jwt(self._list_all))
        app.router.add_get(f"{api}/agent/type", self._jwt(self._list_all))
        app.router.add_get(f"{api}/agent/subscribe/{{uuid}}", self._jwt(self._get_one))
        app.router.add_delete(f"{api}/agent/subscribe/{{uuid}}", self._jwt(self._delete))
        app.router.add_get(f"{api}/agent/type/{{type}}", self._jwt(self._by_type))
        app.router.add_post(f"{api}/agent/search/{{uuid}}/{{type}}", self._jwt(self._search))
        return app

    def _echo_fallback(self) -> Middleware:
        api = f"{self.api_prefix}/api/v3/"

        @web.middleware
        async def middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
            try:
                return await handler(request)
            except (web.HTTPNotFound, web.HTTPMethodNotAllowed) as exc:
                # echo routes a group's unknown paths through the group's middleware, so under
                # /api/v3 a request without a JWT gets 401 rather than 404.
                denied = self._jwt_denied(request) if request.path.startswith(api) else None
                text = "Not Found" if exc.status == 404 else "Method Not Allowed"
                return denied or go_json_response(exc.status, {"message": text})

        return middleware

    # ----------------------------------------------------------------- subscribe
    async def _subscribe(self, request: web.Request) -> web.Response:
        at = self._clock()
        raw = await request.read()
        try:
            status, payload = self._register(request, raw)
        except _Refused as exc:
            status, payload = 400, bad(str(exc))
        self.subscriptions.append(Subscription(at, status, _json_or_none(raw), dict(request.headers)))
        return go_json_response(status, payload)

    def _register(self, request: web.Request, raw: bytes) -> Answer:
        fields = bind_agent(request, raw)
        problem = validation_error(fields)
        if problem:
            raise _Refused(problem)
        token = request.headers.get(TOKEN_HEADER, "")
        if not token:
            raise _Refused(f"{TOKEN_HEADER} header not present or has empty value")
        if token not in self.tokens:
            raise _Refused(f"no auth_token found or it has been expired: [{token}]")
        if self.fail_next > 0:
            self.fail_next -= 1
            raise _Refused(self.fail_message)
        guid = pg_uuid(fields["uuid"])
        now = self._wall_clock()
        self._purge(guid, now)
        row = _new_row(guid, fields, now)
        self.rows[guid] = row
        data = {"expire_date": rfc3339(row.expire_date), "expire_ts": math.floor(row.expire_date)}
        # The reply carries the uuid as sent; the table (and every later read) holds PG's canonical form.
        data["uuid"] = fields["uuid"]
        return 201, {"data": data, "message": "successfully created agent record"}

    # ----------------------------------------------------------------- JWT group
    async def _login(self, request: web.Request) -> web.Response:
        body = _json_or_none(await request.read())
        user = body.get("username") if isinstance(body, dict) else None
        password = body.get("password") if isinstance(body, dict) else None
        if not isinstance(user, str) or user not in self.users or self.users[user] != password:
            return go_json_response(
                401, {"statuscode": 401, "message": "incorrect password", "error": "unauthorized"}
            )
        token = _jwt_like(user, self._wall_clock())
        self.jwts.add(token)
        scope = str(uuidlib.uuid5(uuidlib.NAMESPACE_URL, f"homer-user:{user}"))
        return go_json_response(201, {"token": token, "scope": scope, "user": {"admin": True}})

    def _jwt(self, handler: Handler) -> Handler:
        async def guarded(request: web.Request) -> web.StreamResponse:
            return self._jwt_denied(request) or await handler(request)

        return guarded

    def _jwt_denied(self, request: web.Request) -> web.Response | None:
        """echo's JWT middleware, with homer-app's Skipper for enable_token_access."""
        token = request.headers.get(TOKEN_HEADER, "")
        if self.token_access and token and token in self.tokens:
            return None
        scheme, _, jwt = request.headers.get("Authorization", "").partition(" ")
        if scheme.lower() != "bearer" or not jwt:
            return go_json_response(401, {"message": "missing or malformed jwt"})
        if jwt not in self.jwts:
            return go_json_response(401, {"message": "invalid or expired jwt"})
        return None

    async def _list_all(self, request: web.Request) -> web.Response:
        # Expired rows included: this is what the UI fans out over (docs/peers/homer-app.md#fan-out).
        rows = [row.as_json() for row in _by_guid(self.rows.values())]
        return go_json_response(200, {"data": rows, "message": "successfully retrieved agent records"})

    async def _get_one(self, request: web.Request) -> web.Response:
        status, payload = self._lookup_guid(query_escape(request.match_info["uuid"]))
        return go_json_response(status, payload)

    def _lookup_guid(self, guid: str) -> Answer:
        try:
            row = self.rows.get(pg_uuid(guid))
        except _Refused as exc:
            return 400, bad(str(exc))
        if row is None:
            return 400, bad(f"no agent's record found for guid {guid}")
        return 200, {"data": [row.as_json()], "message": "agent record"}

    async def _delete(self, request: web.Request) -> web.Response:
        given = request.match_info["uuid"]
        guid = query_escape(given)
        status, payload = self._lookup_guid(guid)
        self.deletions.append((given, status))
        if status != 200:
            return go_json_response(status, payload)
        self._purge(pg_uuid(guid), self._wall_clock())  # also drops every expired row, as homer-app does
        # homer-app builds this reply with Sprintf, so its key order is not sorted.
        body = f'{{"message":"successfully deleted agent record","data":"{guid}"}}'
        return web.Response(status=200, body=body.encode(), content_type="application/json")

    async def _by_type(self, request: web.Request) -> web.Response:
        wanted = request.match_info["type"]
        now = self._wall_clock()
        rows = [
            r for r in _by_guid(self.rows.values()) if r.expire_date > now and like_contains(r.type, wanted)
        ]
        if not rows:
            return go_json_response(400, bad(f"no agent subscription object found for type {wanted}"))
        return go_json_response(200, {"data": [row.as_json() for row in rows], "message": "agent record"})

    # ----------------------------------------------------------------- search
    async def _search(self, request: web.Request) -> web.StreamResponse:
        guid = query_escape(request.match_info["uuid"])
        type_ = query_escape(request.match_info["type"])
        try:
            search, from_ms, to_ms = bind_search(request, await request.read())
        except _Refused:
            return go_json_response(400, bad("User Request Format is incorrect"))
        found = self._find_agent(guid, type_)
        if not isinstance(found, AgentRow):
            return go_json_response(*found)
        if type_ == "download":
            return await self._download(found, guid, search)
        try:
            data = pick_source_fields(search, self.source_fields)
        except _Refused as exc:
            return go_json_response(400, bad(str(exc)))
        except _GoPanic:
            # As with echo's Recover middleware (http_settings.debug); without it Go drops the connection.
            return go_json_response(500, {"message": "Internal Server Error"})
        status, payload = await self._call_agent(found, type_, data, from_ms, to_ms, self.agent_timeout)
        return go_json_response(status, payload)

    async def _download(self, row: AgentRow, guid: str, search: Any) -> web.StreamResponse:
        """DoSearchByPost for ``download``: no mapping; the last child of param.search, marshalled,
        is the body posted to ``{path}/download``, and the agent's bytes go back as the file."""
        url = f"{row.protocol}://{row.host}:{row.port}{row.path}/download"
        try:
            payload = await post_like_go(url, row.protocol, download_body(search), self.agent_timeout)
        except _Refused as exc:
            return go_json_response(400, bad(str(exc)))
        stamp = datetime.fromtimestamp(self._wall_clock(), UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
        disposition = f"attachment; filename=export-{guid}-{stamp}.pcap"
        return web.Response(
            body=payload,
            content_type="application/octet-stream",
            headers={"Content-Disposition": disposition},
        )

    async def search_agent(
        self,
        uuid: str,
        type: str,  # the name of homer-app's path parameter
        *,
        sids: list[str],
        source_ips: list[str],
        extra: Mapping[str, list[str]] | None = None,
        from_ms: int = 1669986439123,
        to_ms: int = 1669987039456,
        timeout: float = 10.0,  # noqa: ASYNC109 - the client timeout homer-app configures, not a deadline
    ) -> tuple[int, Any]:
        """What ``POST /api/v3/agent/search/{uuid}/{type}`` does, with ``extra`` as more source_fields.

        Returns (400, record not found) without an unexpired matching row, (400, 'Post "<url>": ...')
        when the agent cannot be reached in time, else (200, homer-app's wrapper of the agent's JSON,
        ``data`` None when it was not JSON). The Download button's ``download`` is the HTTP route only.
        """
        guid, type_ = query_escape(uuid), query_escape(type)
        found = self._find_agent(guid, type_)
        if not isinstance(found, AgentRow):
            return found
        data: dict[str, Any] = {"sid": sids, "source_ip": source_ips, **(extra or {})}
        return await self._call_agent(found, type_, data, from_ms, to_ms, timeout)

    def _find_agent(self, guid: str, type_: str) -> AgentRow | Answer:
        """``expire_date > NOW() AND guid = '<guid>' AND type LIKE '%<type>%'``; gorm's Find on a struct."""
        try:
            row = self.rows.get(pg_uuid(guid))
        except _Refused as exc:
            return 400, bad(str(exc))
        if row is None or row.expire_date <= self._wall_clock() or not like_contains(row.type, type_):
            return 400, bad("record not found")
        return row

    async def _call_agent(
        self, row: AgentRow, type_: str, data: Mapping[str, Any], from_ms: int, to_ms: int, limit_s: float
    ) -> Answer:
        body = lookup_body(data, from_ms, to_ms)
        # homer-app appends the type of the request URL (escaped), which is the agent's full type when
        # the UI fans out.
        url = f"{row.protocol}://{row.host}:{row.port}{row.path}/{type_}"
        try:
            answer = await post_like_go(url, row.protocol, body, limit_s)
        except _Refused as exc:
            return 400, bad(str(exc))
        wrapper = {"data": go_decode(answer), "message": "request answer", "node": row.node, "uuid": row.uuid}
        return 200, wrapper


# --------------------------------------------------------------------- echo bind / validate
def bind_agent(request: web.Request, raw: bytes) -> dict[str, Any]:
    """echo's DefaultBinder on model.TableAgentLocationSession; raises _Refused with echo's text."""
    fields: dict[str, Any] = {name: _zero(kind) for name, kind in _AGENT_FIELDS.items()}
    if _no_body(request):
        return fields  # echo skips binding when ContentLength == 0: validation reports the fields
    if not _is_json(request):
        raise _Refused("code=415, message=Unsupported Media Type")
    value, text = decode_first_value(raw)
    if value is None:
        return fields
    if not isinstance(value, dict):
        raise _type_error(_go_kind(value), f"model.{_STRUCT}", "", len(text))
    for key, item in value.items():
        name = _match_field(key)
        if name is not None and item is not None:
            fields[name] = _bind_field(name, item, text, key)
    return fields


def validation_error(fields: Mapping[str, Any]) -> str | None:
    """validator.v9 ValidationErrors.Error() for the `required` tags that fail."""
    lines = [
        f"Key: '{_STRUCT}.{go}' Error:Field validation for '{go}' failed on the 'required' tag"
        for name, go in _REQUIRED
        if not fields[name]
    ]
    return "\n".join(lines) or None


def bind_search(request: web.Request, raw: bytes) -> tuple[Any, int, int]:
    """Bind model.SearchObject: param.search is a json.RawMessage, timestamp.from/to are int64.

    Only the fields the agent search reads are checked; a failure raises _Refused.
    """
    if _no_body(request):
        return None, 0, 0
    if not _is_json(request):
        raise _Refused("code=415, message=Unsupported Media Type")
    value, _ = decode_first_value(raw)
    top = _object_or_refuse(value)
    param, stamp = _object_or_refuse(top.get("param")), _object_or_refuse(top.get("timestamp"))
    bounds = [stamp.get("from"), stamp.get("to")]
    if any(
        b is not None and (isinstance(b, bool) or not isinstance(b, int) or b not in _INT64) for b in bounds
    ):
        raise _Refused("timestamp.from/to must be int64")
    return param.get("search"), bounds[0] or 0, bounds[1] or 0


def pick_source_fields(search: Any, source_fields: Iterable[str]) -> dict[str, Any]:
    """DoSearchByPost's key check and $source_field: first key `<hepid>_<profile>`, array values."""
    children = search if isinstance(search, dict) else {}
    if not children:
        raise _Refused("agent HEPSUB couldn't find agent mapping")
    key, value = next(iter(children.items()))  # Go ranges a map: with the UI's single key, the first
    parts = key.split("_")
    if len(parts) != 2:
        raise _Refused(f"Agent HEPSUB: key is wrong: {len(parts)}")
    hepid = int(parts[0]) if _GO_ATOI.fullmatch(parts[0]) else 0  # strconv.Atoi, error ignored
    if (hepid, parts[1]) not in MAPPED_PROFILES:
        raise _Refused("agent HEPSUB couldn't find agent mapping")
    picked: dict[str, Any] = {}
    for name in source_fields:
        item = value.get(name) if isinstance(value, dict) else None
        if not isinstance(item, list):
            raise _GoPanic(f"interface conversion: {name} is not []interface {{}}")
        picked[name] = item
    return picked


def _no_body(request: web.Request) -> bool:
    return request.content_length == 0 or not request.body_exists


def _is_json(request: web.Request) -> bool:
    # echo: strings.HasPrefix(Content-Type, "application/json"), so "; charset=utf-8" passes. Form and
    # XML bodies, which echo would bind too, are answered like any other media type here.
    return request.headers.get("Content-Type", "").startswith("application/json")


def _object_or_refuse(value: Any) -> dict[str, Any]:
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise _Refused("not an object")
    return value


def decode_first_value(raw: bytes) -> tuple[Any, str]:
    """Go's json.Decoder.Decode: the first JSON value; trailing bytes are not read.

    Invalid UTF-8 becomes U+FFFD as in Go. Returns the value and the decoded text.
    """
    text = raw.decode("utf-8", "replace")
    start = len(text) - len(text.lstrip(" \t\r\n"))
    if start == len(text):
        raise _Refused(_echo_error("EOF", "EOF"))
    decoder = json.JSONDecoder(parse_constant=_reject_constant)
    try:
        value, _ = decoder.raw_decode(text, start)
    except json.JSONDecodeError as exc:
        raise _syntax_error(text, exc.pos, exc.msg) from None
    except ValueError:  # NaN / Infinity, which Go does not accept
        raise _syntax_error(text, start, "Expecting value") from None
    return value, text


def _reject_constant(name: str) -> Any:
    raise ValueError(name)


def _syntax_error(text: str, pos: int, msg: str) -> _Refused:
    if pos >= len(text):
        return _Refused(_echo_error("unexpected EOF", "unexpected EOF"))
    detail = f"invalid character {text[pos]!r} {_GO_SYNTAX.get(msg, 'looking for beginning of value')}"
    return _Refused(_echo_error(f"Syntax error: offset={pos + 1}, error={detail}", detail))


def _echo_error(message: str, internal: str) -> str:
    """echo.HTTPError.Error() of a bind failure (code 400 with the decoder error as Internal)."""
    return f"code=400, message={message}, internal={internal}"


def _type_error(got: str, expected: str, field_name: str, offset: int) -> _Refused:
    if field_name:
        internal = (
            f"json: cannot unmarshal {got} into Go struct field {_STRUCT}.{field_name} of type {expected}"
        )
    else:
        internal = f"json: cannot unmarshal {got} into Go value of type {expected}"
    message = f"Unmarshal type error: expected={expected}, got={got}, field={field_name}, offset={offset}"
    return _Refused(_echo_error(message, internal))


def _match_field(key: str) -> str | None:
    """encoding/json matches keys to fields exactly first, then case-insensitively."""
    if key in _AGENT_FIELDS:
        return key
    folded = key.casefold()
    return next((name for name in _AGENT_FIELDS if name.casefold() == folded), None)


def _bind_field(name: str, item: Any, text: str, key: str) -> Any:
    kind = _AGENT_FIELDS[name]
    if kind == "time.Time":
        return _bind_time(item)
    ok = isinstance(item, str) if kind == "string" else _is_go_int(item)
    if not ok:
        raise _type_error(_go_kind(item), kind, name, _value_end(text, key, item))
    return item


def _is_go_int(item: Any) -> bool:
    # A JSON number with a fraction or exponent (Python float) fails strconv.ParseInt, even 8080.0.
    return isinstance(item, int) and not isinstance(item, bool) and item in _INT64


def _bind_time(item: Any) -> Any:
    if not isinstance(item, str):
        reason = "Time.UnmarshalJSON: input is not a JSON string"
        raise _Refused(_echo_error(reason, reason))
    if not _RFC3339.fullmatch(item):
        reason = f'parsing time "\\"{item}\\"" as "\\"2006-01-02T15:04:05Z07:00\\"": cannot parse'
        raise _Refused(_echo_error(reason, reason))
    return item


def _go_kind(item: Any) -> str:
    """UnmarshalTypeError.Value: what the JSON held."""
    if isinstance(item, bool):
        return "bool"
    if isinstance(item, int | float):
        return f"number {item}"
    if isinstance(item, str):
        return "string"
    return "array" if isinstance(item, list) else "object"


def _value_end(text: str, key: str, item: Any) -> int:
    """Approximates UnmarshalTypeError.Offset: the byte offset just past the offending value."""
    found = re.search(re.escape(json.dumps(key, ensure_ascii=False)) + r"\s*:\s*", text)
    return (found.end() if found else 0) + len(orjson.dumps(item))


def _zero(kind: str) -> Any:
    return {"string": "", "int": 0}.get(kind)


def pg_uuid(text: str) -> str:
    """The canonical form PostgreSQL stores for a uuid column, or its input-syntax error."""
    if not _PG_UUID.fullmatch(text):
        raise _Refused(f'pq: invalid input syntax for type uuid: "{text}"')
    return str(uuidlib.UUID(hex=re.sub(r"[{}-]", "", text)))


def _new_row(guid: str, fields: Mapping[str, Any], now: float) -> AgentRow:
    def stored(name: str) -> Any:
        return fields[name] or DB_DEFAULTS[name]

    return AgentRow(
        uuid=guid,
        gid=fields["gid"],
        host=fields["host"],
        port=stored("port"),
        protocol=stored("protocol"),
        path=stored("path"),
        node=stored("node"),
        type=stored("type"),
        create_date=now,
        expire_date=now + fields["ttl"],
        active=True,
    )


# --------------------------------------------------------------------- outbound call
def lookup_body(data: Mapping[str, Any], from_ms: int, to_ms: int) -> bytes:
    """The default mapping's lookup_field with homer-app's sequential string replacements.

    The replacements run one after the other on the whole text, so a "$fromts" inside a Call-ID is
    replaced too, exactly as in homer-app.
    """
    body = LOOKUP_FIELD.replace("$source_field", go_marshal(data).decode())
    body = body.replace("$fromts", str(widen_ms(from_ms, LOOKUP_RANGE[0])))
    body = body.replace("$tots", str(widen_ms(to_ms, LOOKUP_RANGE[1])))
    return body.encode()


def download_body(search: Any) -> bytes:
    """What homer-app posts for ``download``: the last child of param.search as Go marshals it
    (gabs ``String()``), e.g. the UI's ``{"__hep__": [...], ...}``; nothing when there is none."""
    children = list(search.values()) if isinstance(search, dict) else []
    return go_marshal(children[-1]) if children else b""


def widen_ms(ms: int, offset_s: int) -> int:
    """ms -> whole seconds (Go integer division truncates toward zero) -> + offset -> x1000."""
    seconds = abs(ms) // 1000 * (1 if ms >= 0 else -1)
    return (seconds + offset_s) * 1000


async def post_like_go(url: str, scheme: str, body: bytes, limit_s: float) -> bytes:
    """POST like homer-app's http.Client: fresh connection, Go's headers, errors worded as Go's.

    Raises _Refused with Go's url.Error text when there is no answer; a body that breaks off is
    returned as read so far (homer-app ignores ReadAll's error), here as empty.
    """
    where = f"Post {go_quote(url)}"
    if scheme.lower() not in ("http", "https"):
        raise _Refused(f'{where}: unsupported protocol scheme "{scheme}"')
    try:
        target = URL(url, encoded=True)
    except ValueError as exc:
        raise _Refused(f"parse {go_quote(url)}: {exc}") from None
    client_timeout = aiohttp.ClientTimeout(total=limit_s)
    # A session per call: homer-app closes idle connections after each call, so nothing is reused.
    async with aiohttp.ClientSession(timeout=client_timeout, skip_auto_headers=("Accept",)) as session:
        try:
            async with session.post(target, data=body, headers=_GO_HEADERS) as response:
                return await _read_all(response)
        except (TimeoutError, aiohttp.ClientError, ValueError) as exc:
            raise _Refused(f"{where}: {go_client_error(exc)}") from None


async def _read_all(response: aiohttp.ClientResponse) -> bytes:
    try:
        return await response.read()
    except (TimeoutError, aiohttp.ClientError):
        return b""


def go_client_error(exc: BaseException) -> str:
    """The part after 'Post "<url>": ' in the error Go's http.Client would report."""
    if isinstance(exc, aiohttp.ClientConnectorDNSError):
        return f"dial tcp: lookup {exc.host}: no such host"
    if isinstance(exc, aiohttp.ClientConnectorError):
        address = f"[{exc.host}]:{exc.port}" if ":" in exc.host else f"{exc.host}:{exc.port}"
        # Go reports the errno text ("connection refused"); asyncio's strerror names the call instead.
        code = exc.os_error.errno if exc.os_error else None
        reason = os.strerror(code) if code else str(exc.os_error or exc)
        return f"dial tcp {address}: connect: {reason[:1].lower()}{reason[1:]}"
    if isinstance(exc, TimeoutError):
        return "context deadline exceeded (Client.Timeout exceeded while awaiting headers)"
    if isinstance(exc, aiohttp.ServerDisconnectedError):
        return "EOF"
    return str(exc) or type(exc).__name__


def go_quote(text: str) -> str:
    """strconv.Quote for the printable ASCII URLs this fake builds."""
    return '"' + text.replace("\\", "\\\\").replace('"', '\\"') + '"'


# --------------------------------------------------------------------- Go JSON
def go_marshal(value: Any) -> bytes:
    """json.Marshal of decoded JSON: keys sorted, numbers as float64 prints them, HTML escaped."""
    out = orjson.dumps(_as_float64(value), option=orjson.OPT_SORT_KEYS)
    for plain, escaped in _GO_ESCAPES:
        out = out.replace(plain, escaped)
    return out


def go_decode(raw: bytes) -> Any:
    """gabs.ParseJSON(buf).Data(): the whole body as JSON, or None when it is not JSON."""
    try:
        return _as_float64(orjson.loads(raw.decode("utf-8", "replace")))
    except orjson.JSONDecodeError:
        return None


def _as_float64(value: Any) -> Any:
    """Numbers as Go holds them in interface{}: float64, printed without '.0' when integral."""
    if isinstance(value, dict):
        return {key: _as_float64(item) for key, item in value.items()}
    if isinstance(value, list):
        return [_as_float64(item) for item in value]
    if isinstance(value, bool) or not isinstance(value, int | float):
        return value
    number = float(value)
    return int(number) if math.isfinite(number) and number.is_integer() and abs(number) < 1e21 else number


def go_json_response(status: int, payload: Any) -> web.Response:
    return web.Response(status=status, body=go_marshal(payload), content_type="application/json")


def bad(message: str) -> dict[str, Any]:
    """httpresponse.CreateBadResponse's envelope."""
    return {"data": {}, "message": message}


def _json_or_none(raw: bytes) -> Any:
    try:
        return orjson.loads(raw)
    except orjson.JSONDecodeError:
        return None


# --------------------------------------------------------------------- small helpers
def rfc3339(ts: float) -> str:
    """time.Time's JSON form (RFC3339Nano, UTC, trailing zeros of the fraction dropped)."""
    moment = datetime.fromtimestamp(ts, UTC)
    fraction = f"{moment.microsecond:06d}".rstrip("0")
    return moment.strftime("%Y-%m-%dT%H:%M:%S") + (f".{fraction}" if fraction else "") + "Z"


def query_escape(text: str) -> str:
    """Go's url.QueryEscape, which homer-app applies to the uuid and type path parameters."""
    return quote_plus(text, safe="")


def like_contains(value: str, needle: str) -> bool:
    """PostgreSQL ``value LIKE '%needle%'``: % and _ in the needle are wildcards, backslash escapes."""
    pattern, chars = [".*"], iter(needle)
    for char in chars:
        if char == "\\":
            pattern.append(re.escape(next(chars, "\\")))
        else:
            pattern.append({"%": ".*", "_": "."}.get(char) or re.escape(char))
    pattern.append(".*")
    return re.fullmatch("".join(pattern), value, re.DOTALL) is not None


def _by_guid(rows: Iterable[AgentRow]) -> list[AgentRow]:
    return sorted(rows, key=lambda row: row.uuid)


def _jwt_like(user: str, now: float) -> str:
    """A token shaped like homer-app's HS256 JWT; only this fake's set of issued tokens validates it."""

    def part(data: bytes) -> str:
        return base64.urlsafe_b64encode(data).rstrip(b"=").decode()

    header = orjson.dumps({"alg": "HS256", "typ": "JWT"})
    claims = orjson.dumps({"username": user, "admin": True, "exp": int(now) + 1200 * 60})
    return ".".join((part(header), part(claims), part(secrets.token_bytes(32))))
