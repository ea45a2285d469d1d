"""The HOMER fake through real HTTP: what an agent sees of homer-app (docs/peers/homer-app.md, #registration
to #fan-out, #request-fixtures).
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import orjson
import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer, unused_port
from pytest_aiohttp import AiohttpClient, AiohttpServer

from hepsub_apiban.fakes.homer import AgentRow, FakeHomer

TOKEN = "homer-test-token"
AGENT_UUID = "3f1c2b7e-8d4a-4c1e-9b2f-0a6d5e4c3b21"
OTHER_UUID = "9e8d7c6b-5a49-4382-a1b0-c9d8e7f6a5b4"
WALL = 1_700_000_000.0  # 2023-11-14T22:13:20Z
# docs/peers/homer-app.md#request-fixtures fixture #1, byte for byte, from the UI's from=1669986439123 /
# to=1669987039456.
BODY_1 = (
    b'{"data":{"sid":["a84b4c76e66710@pc33.example.com"],"source_ip":["192.168.1.10","203.0.113.7"]},'
    b'"fromts":1669986139000,"tots":1669987239000}'
)
CALL_ID = "a84b4c76e66710@pc33.example.com"
SOURCE_IPS = ["192.168.1.10", "203.0.113.7"]

Client = TestClient[web.Request, web.Application]


class Clock:
    def __init__(self, now: float) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


@dataclass
class Peer:
    fake: FakeHomer
    client: Client
    wall: Clock
    mono: Clock

    async def subscribe(self, headers: dict[str, str] | None = None, **fields: Any) -> tuple[int, Any]:
        body = {"uuid": AGENT_UUID, **REGISTRATION, **fields}
        sent = {"Auth-Token": TOKEN} if headers is None else headers
        response = await self.client.post("/api/v3/agent/subscribe", json=body, headers=sent)
        return response.status, await response.json()

    async def login(self) -> dict[str, str]:
        response = await self.client.post(
            "/api/v3/auth", json={"username": "admin", "password": "sipcapture"}
        )
        assert response.status == 201
        return {"Authorization": f"Bearer {(await response.json())['token']}"}


REGISTRATION: dict[str, Any] = {
    "gid": 10,
    "host": "127.0.0.1",
    "port": 18088,
    "protocol": "http",
    "path": "/get",
    "node": "apiban",
    "type": "cdr",
    "ttl": 300,
}

MakePeer = Callable[..., Awaitable[Peer]]


@pytest.fixture
def make_peer(aiohttp_client: AiohttpClient) -> MakePeer:
    async def make(**options: Any) -> Peer:
        wall, mono = Clock(WALL), Clock(50.0)
        fake = FakeHomer(clock=mono, wall_clock=wall, **options)
        return Peer(fake, await aiohttp_client(fake.app()), wall, mono)

    return make


@pytest.fixture
async def peer(make_peer: MakePeer) -> Peer:
    return await make_peer()


# --------------------------------------------------------------------- subscribe
async def test_subscribe_answers_201_and_stores_the_row(peer: Peer) -> None:
    status, body = await peer.subscribe()

    assert status == 201
    assert body == {
        "data": {"expire_date": "2023-11-14T22:18:20Z", "expire_ts": 1_700_000_300, "uuid": AGENT_UUID},
        "message": "successfully created agent record",
    }
    assert peer.fake.rows == {
        AGENT_UUID: AgentRow(
            AGENT_UUID, 10, "127.0.0.1", 18088, "http", "/get", "apiban", "cdr", WALL, WALL + 300, True
        )
    }
    assert peer.fake.active_rows() == list(peer.fake.rows.values())
    [seen] = peer.fake.subscriptions
    assert (seen.at, seen.status, seen.body["uuid"], seen.headers["Auth-Token"]) == (
        50.0,
        201,
        AGENT_UUID,
        TOKEN,
    )


async def test_resubscribing_the_same_uuid_is_the_refresh(peer: Peer) -> None:
    await peer.subscribe()
    peer.wall.now += 270

    status, body = await peer.subscribe(ttl=600, node="apiban-2")

    assert status == 201
    assert body["data"]["expire_ts"] == WALL + 270 + 600
    [row] = peer.fake.rows.values()
    assert (row.create_date, row.expire_date, row.node) == (WALL + 270, WALL + 870, "apiban-2")


async def test_any_subscribe_purges_every_expired_row(make_peer: MakePeer) -> None:
    peer = await make_peer(seed_dummy=True)
    [dummy] = peer.fake.rows.values()
    assert (dummy.node, dummy.type, dummy.protocol) == ("rtpnode01", "cdr", "rtp")
    assert dummy.expire_date < WALL
    assert peer.fake.active_rows() == []
    await peer.subscribe(uuid=OTHER_UUID, ttl=5)
    assert set(peer.fake.rows) == {OTHER_UUID}  # the dummy is gone
    peer.wall.now += 10  # OTHER expires, and stays listed until someone subscribes

    assert set(peer.fake.rows) == {OTHER_UUID}
    assert peer.fake.active_rows() == []
    await peer.subscribe()

    assert set(peer.fake.rows) == {AGENT_UUID}


async def test_missing_fields_get_the_database_defaults_and_ttl_zero(peer: Peer) -> None:
    status, _ = await peer.subscribe()
    body = {"uuid": OTHER_UUID, "gid": 3, "host": "agent.example", "extra": "ignored"}
    response = await peer.client.post("/api/v3/agent/subscribe", json=body, headers={"Auth-Token": TOKEN})

    assert (status, response.status) == (201, 201)
    row = peer.fake.rows[OTHER_UUID]
    assert (row.port, row.protocol, row.path, row.node, row.type) == (
        8080,
        "log",
        "/api/search",
        "testnode",
        "type",
    )
    assert row.expire_date == WALL  # ttl 0: already expired for lookups
    assert [r.uuid for r in peer.fake.active_rows()] == [AGENT_UUID]


async def test_keys_bind_case_insensitively_and_the_uuid_is_stored_canonical(peer: Peer) -> None:
    upper = AGENT_UUID.upper()
    body = {**REGISTRATION, "UUID": upper, "Port": 9999}
    response = await peer.client.post("/api/v3/agent/subscribe", json=body, headers={"Auth-Token": TOKEN})

    assert response.status == 201
    assert (await response.json())["data"]["uuid"] == upper  # echoed as sent
    assert peer.fake.rows[AGENT_UUID].port == 9999


@pytest.mark.parametrize("content_type", ["text/plain", "application/x-www-form-urlencoded"])
async def test_a_body_that_is_not_json_is_415_in_a_400(peer: Peer, content_type: str) -> None:
    response = await peer.client.post(
        "/api/v3/agent/subscribe",
        data=orjson.dumps({"uuid": AGENT_UUID, **REGISTRATION}),
        headers={"Auth-Token": TOKEN, "Content-Type": content_type},
    )

    assert response.status == 400
    assert await response.json() == {"data": {}, "message": "code=415, message=Unsupported Media Type"}
    assert peer.fake.rows == {}
    assert peer.fake.subscriptions[0].status == 400


async def test_a_charset_suffix_is_still_json(peer: Peer) -> None:
    response = await peer.client.post(
        "/api/v3/agent/subscribe",
        data=orjson.dumps({"uuid": AGENT_UUID, **REGISTRATION}),
        headers={"Auth-Token": TOKEN, "Content-Type": "application/json; charset=utf-8"},
    )
    assert response.status == 201


@pytest.mark.parametrize(
    ("port", "got"), [("18088", "string"), (18088.5, "number 18088.5"), (18088.0, "number 18088.0")]
)
async def test_a_port_that_is_not_a_json_integer_fails_the_bind(peer: Peer, port: Any, got: str) -> None:
    status, body = await peer.subscribe(port=port)

    assert status == 400
    assert body["data"] == {}
    prefix = f"code=400, message=Unmarshal type error: expected=int, got={got}, field=port, offset="
    assert body["message"].startswith(prefix)
    assert "Go struct field TableAgentLocationSession.port of type int" in body["message"]
    assert peer.fake.rows == {}


async def test_broken_json_is_a_syntax_error(peer: Peer) -> None:
    response = await peer.client.post(
        "/api/v3/agent/subscribe",
        data=b'{"uuid": x}',
        headers={"Auth-Token": TOKEN, "Content-Type": "application/json"},
    )
    assert response.status == 400
    assert (await response.json())["message"].startswith("code=400, message=Syntax error: offset=")


async def test_gid_zero_fails_validation(peer: Peer) -> None:
    status, body = await peer.subscribe(gid=0)

    assert (status, body) == (
        400,
        {
            "data": {},
            "message": "Key: 'TableAgentLocationSession.Gid' Error:Field validation for 'Gid' failed on the "
            "'required' tag",
        },
    )


async def test_every_missing_required_field_is_reported_in_struct_order(peer: Peer) -> None:
    status, body = await peer.subscribe(uuid="", host="", gid=0)

    assert status == 400
    template = (
        "Key: 'TableAgentLocationSession.{0}' Error:Field validation for '{0}' failed on the 'required' tag"
    )
    assert body["message"].split("\n") == [template.format(name) for name in ("GUID", "Gid", "Host")]


async def test_validation_comes_before_the_token_check(peer: Peer) -> None:
    status, body = await peer.subscribe(headers={}, gid=0)
    assert (status, "'Gid'" in body["message"]) == (400, True)


async def test_a_missing_or_empty_token_is_a_400(peer: Peer) -> None:
    for headers in ({}, {"Auth-Token": ""}):
        status, body = await peer.subscribe(headers=headers)
        assert (status, body) == (
            400,
            {"data": {}, "message": "Auth-Token header not present or has empty value"},
        )
    assert peer.fake.rows == {}


async def test_an_unknown_token_is_echoed_in_the_400(peer: Peer) -> None:
    status, body = await peer.subscribe(headers={"Auth-Token": "nope"})

    assert (status, body) == (
        400,
        {"data": {}, "message": "no auth_token found or it has been expired: [nope]"},
    )
    assert [s.status for s in peer.fake.subscriptions] == [400]


async def test_a_uuid_postgres_cannot_read_is_a_database_error(peer: Peer) -> None:
    status, body = await peer.subscribe(uuid="apiban-1")

    assert (status, body) == (
        400,
        {"data": {}, "message": 'pq: invalid input syntax for type uuid: "apiban-1"'},
    )


async def test_fail_next_answers_the_database_error_then_recovers(peer: Peer) -> None:
    peer.fake.fail_next = 2

    answers = [await peer.subscribe() for _ in range(3)]

    assert [status for status, _ in answers] == [400, 400, 201]
    assert answers[0][1] == {"data": {}, "message": "pq: database is down"}
    assert peer.fake.fail_next == 0
    assert [s.status for s in peer.fake.subscriptions] == [400, 400, 201]


# --------------------------------------------------------------------- JWT group
async def test_login_issues_a_jwt_and_rejects_a_wrong_password(peer: Peer) -> None:
    wrong = await peer.client.post("/api/v3/auth", json={"username": "admin", "password": "x"})
    right = await peer.client.post("/api/v3/auth", json={"username": "admin", "password": "sipcapture"})

    assert wrong.status == 401
    assert await wrong.json() == {"statuscode": 401, "message": "incorrect password", "error": "unauthorized"}
    assert right.status == 201
    body = await right.json()
    assert body["user"] == {"admin": True}
    assert body["token"].count(".") == 2
    assert body["token"] in peer.fake.jwts


async def test_delete_needs_a_jwt(peer: Peer) -> None:
    await peer.subscribe()
    url = f"/api/v3/agent/subscribe/{AGENT_UUID}"

    anonymous = await peer.client.delete(url)
    forged = await peer.client.delete(url, headers={"Authorization": "Bearer a.b.c"})
    with_token = await peer.client.delete(url, headers={"Auth-Token": TOKEN})
    auth = await peer.login()
    deleted = await peer.client.delete(url, headers=auth)
    again = await peer.client.delete(url, headers=auth)

    assert (anonymous.status, await anonymous.json()) == (401, {"message": "missing or malformed jwt"})
    assert (forged.status, await forged.json()) == (401, {"message": "invalid or expired jwt"})
    assert with_token.status == 401  # enable_token_access is off by default
    assert deleted.status == 200
    assert await deleted.read() == (
        b'{"message":"successfully deleted agent record","data":"' + AGENT_UUID.encode() + b'"}'
    )
    assert (again.status, await again.json()) == (
        400,
        {"data": {}, "message": f"no agent's record found for guid {AGENT_UUID}"},
    )
    assert peer.fake.rows == {}
    assert peer.fake.deletions == [(AGENT_UUID, 200), (AGENT_UUID, 400)]  # refused auth never reaches it


async def test_delete_takes_the_auth_token_with_token_access(make_peer: MakePeer) -> None:
    peer = await make_peer(token_access=True)
    await peer.subscribe()

    unknown = await peer.client.delete(f"/api/v3/agent/subscribe/{AGENT_UUID}", headers={"Auth-Token": "x"})
    response = await peer.client.delete(
        f"/api/v3/agent/subscribe/{AGENT_UUID}", headers={"Auth-Token": TOKEN}
    )

    assert (unknown.status, response.status) == (401, 200)
    assert peer.fake.rows == {}


async def test_listing_shows_every_row_expired_ones_too(peer: Peer) -> None:
    await peer.subscribe(uuid=OTHER_UUID, ttl=10, node="b")
    peer.wall.now += 20
    auth = await peer.login()
    # OTHER is expired but only purged by a subscribe; list before that happens.
    response = await peer.client.get("/api/v3/agent/subscribe", headers=auth)

    assert response.status == 200
    assert await response.read() == (
        b'{"data":[{"active":1,"create_date":"2023-11-14T22:13:20Z","expire_date":"2023-11-14T22:13:30Z",'
        b'"gid":10,"host":"127.0.0.1","node":"b","path":"/get","port":18088,"protocol":"http","ttl":0,'
        b'"type":"cdr","uuid":"'
        + OTHER_UUID.encode()
        + b'"}],"message":"successfully retrieved agent records"}'
    )


async def test_listing_by_type_shows_unexpired_rows_whose_type_contains_it(peer: Peer) -> None:
    await peer.subscribe(type="pcap;download")
    await peer.subscribe(uuid=OTHER_UUID, type="cdr", ttl=1)
    peer.wall.now += 5
    auth = await peer.login()

    download = await peer.client.get("/api/v3/agent/type/download", headers=auth)
    cdr = await peer.client.get("/api/v3/agent/type/cdr", headers=auth)

    assert download.status == 200
    assert [row["uuid"] for row in (await download.json())["data"]] == [AGENT_UUID]
    assert (cdr.status, await cdr.json()) == (
        400,
        {"data": {}, "message": "no agent subscription object found for type cdr"},
    )


async def test_unknown_paths_under_the_api_need_a_jwt_first(peer: Peer) -> None:
    anonymous = await peer.client.get("/api/v3/nothing-here")
    auth = await peer.login()
    known = await peer.client.get("/api/v3/nothing-here", headers=auth)

    assert (anonymous.status, known.status) == (401, 404)
    assert await known.json() == {"message": "Not Found"}


# --------------------------------------------------------------------- calling the agent
@dataclass
class TinyAgent:
    """An agent that records what homer-app sends and answers what the test sets."""

    seen: list[tuple[str, bytes, dict[str, str]]] = field(default_factory=list)
    answer: Callable[[], web.StreamResponse] = lambda: web.json_response({CALL_ID: {"t_sec": 1669986139}})
    hang: asyncio.Event = field(default_factory=asyncio.Event)
    hanging: bool = False

    async def handle(self, request: web.Request) -> web.StreamResponse:
        self.seen.append((request.path, await request.read(), dict(request.headers)))
        if self.hanging:
            await self.hang.wait()
        return self.answer()

    def app(self) -> web.Application:
        app = web.Application()
        app.router.add_post("/get/{type}", self.handle)
        return app


@pytest.fixture
async def tiny(aiohttp_server: AiohttpServer) -> AsyncIterator[tuple[TinyAgent, TestServer]]:
    agent = TinyAgent()
    server = await aiohttp_server(agent.app())
    yield agent, server
    agent.hang.set()  # lets a hanging handler finish before the server is closed


async def test_search_posts_homer_apps_exact_body_and_wraps_the_answer(
    peer: Peer, tiny: tuple[TinyAgent, TestServer]
) -> None:
    agent, server = tiny
    await peer.subscribe(port=server.port)

    status, body = await peer.fake.search_agent(AGENT_UUID, "cdr", sids=[CALL_ID], source_ips=SOURCE_IPS)

    assert (status, body) == (
        200,
        {
            "data": {CALL_ID: {"t_sec": 1669986139}},
            "message": "request answer",
            "node": "apiban",
            "uuid": AGENT_UUID,
        },
    )
    [(path, sent, headers)] = agent.seen
    assert (path, sent) == ("/get/cdr", BODY_1)
    assert headers["Content-Type"] == "application/json"
    assert headers["User-Agent"] == "Go-http-client/1.1"
    assert "Authorization" not in headers
    assert "Auth-Token" not in headers
    assert "Accept" not in headers


async def test_search_sorts_extra_mapping_keys_and_widens_other_timestamps(
    peer: Peer, tiny: tuple[TinyAgent, TestServer]
) -> None:
    agent, server = tiny
    await peer.subscribe(port=server.port)

    await peer.fake.search_agent(
        AGENT_UUID,
        "cdr",
        sids=["x@y"],
        source_ips=["203.0.113.7"],
        extra={"dst_ip": ["10.0.0.5"]},
        from_ms=1700000300999,
        to_ms=1700000900001,
    )

    assert agent.seen[0][1] == (
        b'{"data":{"dst_ip":["10.0.0.5"],"sid":["x@y"],"source_ip":["203.0.113.7"]},'
        b'"fromts":1700000000000,"tots":1700001100000}'
    )


@pytest.mark.parametrize("reply", [b"", b"<html>oops</html>"])
async def test_an_answer_that_is_not_json_becomes_data_null(
    peer: Peer, tiny: tuple[TinyAgent, TestServer], reply: bytes
) -> None:
    agent, server = tiny
    agent.answer = lambda: web.Response(status=500, body=reply)
    await peer.subscribe(port=server.port)

    status, body = await peer.fake.search_agent(AGENT_UUID, "cdr", sids=[CALL_ID], source_ips=SOURCE_IPS)

    assert (status, body) == (
        200,
        {"data": None, "message": "request answer", "node": "apiban", "uuid": AGENT_UUID},
    )


async def test_the_agent_status_is_ignored_when_the_body_is_json(
    peer: Peer, tiny: tuple[TinyAgent, TestServer]
) -> None:
    agent, server = tiny
    agent.answer = lambda: web.json_response({"error": "no"}, status=503)
    await peer.subscribe(port=server.port)

    assert await peer.fake.search_agent(AGENT_UUID, "cdr", sids=[], source_ips=[]) == (
        200,
        {"data": {"error": "no"}, "message": "request answer", "node": "apiban", "uuid": AGENT_UUID},
    )


async def test_a_refused_connection_is_a_400_with_gos_error(peer: Peer) -> None:
    port = unused_port()
    await peer.subscribe(port=port)

    status, body = await peer.fake.search_agent(AGENT_UUID, "cdr", sids=[CALL_ID], source_ips=SOURCE_IPS)

    url = f"http://127.0.0.1:{port}/get/cdr"
    message = f'Post "{url}": dial tcp 127.0.0.1:{port}: connect: connection refused'
    assert (status, body) == (400, {"data": {}, "message": message})


async def test_a_hanging_agent_times_out_into_a_400(peer: Peer, tiny: tuple[TinyAgent, TestServer]) -> None:
    agent, server = tiny
    agent.hanging = True
    await peer.subscribe(port=server.port)

    status, body = await peer.fake.search_agent(
        AGENT_UUID, "cdr", sids=[CALL_ID], source_ips=SOURCE_IPS, timeout=0.2
    )

    assert status == 400
    assert body["message"].endswith("Client.Timeout exceeded while awaiting headers)")


async def test_the_default_protocol_log_cannot_be_called(peer: Peer) -> None:
    await peer.subscribe(protocol="")

    status, body = await peer.fake.search_agent(AGENT_UUID, "cdr", sids=[], source_ips=[])

    assert (status, body["message"]) == (
        400,
        'Post "log://127.0.0.1:18088/get/cdr": unsupported protocol scheme "log"',
    )


async def test_expired_or_other_type_rows_are_record_not_found(
    peer: Peer, tiny: tuple[TinyAgent, TestServer]
) -> None:
    agent, server = tiny
    await peer.subscribe(port=server.port, ttl=60)

    wrong_type = await peer.fake.search_agent(AGENT_UUID, "wav", sids=[], source_ips=[])
    substring = await peer.fake.search_agent(AGENT_UUID, "cd", sids=[], source_ips=[])
    peer.wall.now += 61
    expired = await peer.fake.search_agent(AGENT_UUID, "cdr", sids=[], source_ips=[])

    not_found = (400, {"data": {}, "message": "record not found"})
    assert (wrong_type, expired) == (not_found, not_found)
    assert substring[0] == 200
    assert agent.seen[0][0] == "/get/cd"


async def test_search_route_takes_the_uis_body(peer: Peer, tiny: tuple[TinyAgent, TestServer]) -> None:
    agent, server = tiny
    await peer.subscribe(port=server.port)
    auth = await peer.login()
    url = f"/api/v3/agent/search/{AGENT_UUID}/cdr"
    call = {"sid": [CALL_ID], "source_ip": SOURCE_IPS, "callid": [CALL_ID]}
    ui = {
        "param": {"search": {"1_call": call}, "transaction": {}},
        "timestamp": {"from": 1669986439123, "to": 1669987039456},
    }

    anonymous = await peer.client.post(url, json=ui)
    response = await peer.client.post(url, json=ui, headers=auth)

    assert anonymous.status == 401
    assert response.status == 200
    assert await response.read() == (
        b'{"data":{"' + CALL_ID.encode() + b'":{"t_sec":1669986139}},"message":"request answer",'
        b'"node":"apiban","uuid":"' + AGENT_UUID.encode() + b'"}'
    )
    assert [sent for _, sent, _ in agent.seen] == [BODY_1]  # only the mapping's source_fields travel


@pytest.mark.parametrize(
    ("search", "status", "message"),
    [
        ({"call": {"sid": [], "source_ip": []}}, 400, "Agent HEPSUB: key is wrong: 1"),
        ({"1_call_x": {"sid": [], "source_ip": []}}, 400, "Agent HEPSUB: key is wrong: 3"),
        ({"7_call": {"sid": [], "source_ip": []}}, 400, "agent HEPSUB couldn't find agent mapping"),
        ({"1_call": {"sid": [], "source_ip": "1.2.3.4"}}, 500, "Internal Server Error"),
    ],
)
async def test_search_route_rejects_what_homer_app_rejects(
    peer: Peer, tiny: tuple[TinyAgent, TestServer], search: dict[str, Any], status: int, message: str
) -> None:
    agent, server = tiny
    await peer.subscribe(port=server.port)
    auth = await peer.login()

    response = await peer.client.post(
        f"/api/v3/agent/search/{AGENT_UUID}/cdr",
        json={"param": {"search": search}, "timestamp": {"from": 1, "to": 2}},
        headers=auth,
    )

    assert (response.status, (await response.json())["message"]) == (status, message)
    assert agent.seen == []


# --------------------------------------------------------------------- the Download PCAP button
HEP_OBJECT = {"type": "download", "call_id": CALL_ID, "ips": ["203.0.113.7"]}
BUTTON = {
    "param": {"search": {"1_call": {"sid": [CALL_ID], "source_ip": SOURCE_IPS, "__hep__": [HEP_OBJECT]}}},
    "timestamp": {"from": 1669986439123, "to": 1669987039456},
}


async def test_download_posts_the_calls_object_unmapped_to_path_download(
    peer: Peer, tiny: tuple[TinyAgent, TestServer]
) -> None:
    agent, server = tiny
    agent.answer = lambda: web.Response(body=b"\xd4\xc3\xb2\xa1pcap bytes", content_type="text/plain")
    await peer.subscribe(port=server.port, type="cdr-download")
    auth = await peer.login()

    response = await peer.client.post(
        f"/api/v3/agent/search/{AGENT_UUID}/download", json=BUTTON, headers=auth
    )

    assert response.status == 200
    assert response.content_type == "application/octet-stream"
    disposition = f"attachment; filename=export-{AGENT_UUID}-2023-11-14T22:13:20Z.pcap"
    assert response.headers["Content-Disposition"] == disposition
    assert await response.read() == b"\xd4\xc3\xb2\xa1pcap bytes"  # verbatim, whatever its type
    [(path, sent, headers)] = agent.seen
    assert path == "/get/download"  # the literal word, not the registered type
    assert (
        sent
        == (  # no mapping, no timestamps: the "1_call" object as Go marshals it
            b'{"__hep__":[{"call_id":"' + CALL_ID.encode() + b'","ips":["203.0.113.7"],"type":"download"}],'
            b'"sid":["' + CALL_ID.encode() + b'"],"source_ip":["192.168.1.10","203.0.113.7"]}'
        )
    )
    assert headers["Content-Type"] == "application/json"


async def test_download_needs_download_in_the_registered_type(
    peer: Peer, tiny: tuple[TinyAgent, TestServer]
) -> None:
    agent, server = tiny
    await peer.subscribe(port=server.port, type="cdr")
    auth = await peer.login()

    response = await peer.client.post(
        f"/api/v3/agent/search/{AGENT_UUID}/download", json=BUTTON, headers=auth
    )

    assert (response.status, await response.json()) == (400, {"data": {}, "message": "record not found"})
    assert agent.seen == []


async def test_a_semicolon_in_the_type_hides_the_agent_from_its_own_search(
    peer: Peer, tiny: tuple[TinyAgent, TestServer]
) -> None:
    """homer-app URL-escapes the type before its LIKE: "cdr;download" looks for "cdr%3Bdownload"."""
    agent, server = tiny
    await peer.subscribe(port=server.port, type="cdr;download")

    status, body = await peer.fake.search_agent(AGENT_UUID, "cdr;download", sids=[], source_ips=[])
    dashed = await peer.subscribe(port=server.port, type="cdr-download")
    found = await peer.fake.search_agent(AGENT_UUID, "cdr-download", sids=[], source_ips=[])

    assert (status, body) == (400, {"data": {}, "message": "record not found"})
    assert dashed[0] == 201
    assert found[0] == 200
    assert [path for path, _, _ in agent.seen] == ["/get/cdr-download"]
