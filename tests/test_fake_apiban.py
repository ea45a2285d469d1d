"""The fake APIBAN server, exercised through real HTTP (it is the contract other tests rely on)."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import orjson
import pytest
from aiohttp import ClientResponse
from aiohttp.test_utils import TestClient
from aiohttp.web import Application, Request
from pytest_aiohttp import AiohttpClient

from hepsub_apiban.fakes.apiban import POISONS, FakeApiban, RecordedRequest

KEY = "k-3f9c1e7a-secret"
Client = TestClient[Request, Application]
Serve = Callable[[FakeApiban], Awaitable[Client]]


class FakeClock:
    def __init__(self, now: float = 1000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


@pytest.fixture
async def serve(aiohttp_client: AiohttpClient) -> AsyncIterator[Serve]:
    """Start a fake on a real socket; hung requests are released at teardown."""
    fakes: list[FakeApiban] = []

    async def start(fake: FakeApiban) -> Client:
        fakes.append(fake)
        return await aiohttp_client(fake.app())

    yield start
    for fake in fakes:
        fake.release()


@pytest.fixture
def fake() -> FakeApiban:
    return FakeApiban([KEY])


@pytest.fixture
async def client(serve: Serve, fake: FakeApiban) -> Client:
    return await serve(fake)


async def body_of(resp: ClientResponse) -> Any:
    assert resp.content_type == "application/json"
    return orjson.loads(await resp.read())


def ips(n: int) -> list[str]:
    return [f"10.{i // 65536}.{i // 256 % 256}.{i % 256}" for i in range(n)]


# ----------------------------------------------------------------- /banned


@pytest.mark.parametrize("first_url", [f"/api/{KEY}/banned", f"/api/{KEY}/banned/100"])
async def test_paging_follows_id_to_the_end(fake: FakeApiban, client: Client, first_url: str) -> None:
    listed = ips(600)
    fake.add_many(listed, start_ts=1_700_000_000)
    got: list[str] = []
    statuses: list[int] = []
    url = first_url
    while True:
        resp = await client.get(url)
        body = await body_of(resp)
        statuses.append(resp.status)
        if body["ID"] == "none":
            break
        got += body["ipaddress"]
        assert body["ID"] == fake.listed(body["ipaddress"][-1])  # ID = last IP of this page
        url = f"/api/{KEY}/banned/{body['ID']}"
    assert got == listed
    assert statuses == [200, 200, 200, 400]
    assert body == {"ipaddress": ["no new bans"], "ID": "none"}
    assert fake.request_count("banned") == 4


async def test_page_sizes_and_ids(fake: FakeApiban, client: Client) -> None:
    fake.add_many(ips(600), start_ts=1_700_000_000)
    first = await body_of(await client.get(f"/api/{KEY}/banned/100"))
    assert len(first["ipaddress"]) == 250
    assert first["ID"] == "1700000249"
    last = await body_of(await client.get(f"/api/{KEY}/banned/1700000499"))
    assert len(last["ipaddress"]) == 100
    assert last["ID"] == "1700000599"


async def test_id_between_entries_and_before_first(fake: FakeApiban, client: Client) -> None:
    fake.add("1.1.1.1", 1000)
    fake.add("2.2.2.2", 2000)
    fake.add("3.3.3.3", 3000)
    from_start = await body_of(await client.get(f"/api/{KEY}/banned/999"))
    assert from_start == {"ipaddress": ["1.1.1.1", "2.2.2.2", "3.3.3.3"], "ID": "3000"}
    after_gap = await body_of(await client.get(f"/api/{KEY}/banned/1500"))
    assert after_gap == {"ipaddress": ["2.2.2.2", "3.3.3.3"], "ID": "3000"}
    after_exact = await body_of(await client.get(f"/api/{KEY}/banned/2000"))
    assert after_exact == {"ipaddress": ["3.3.3.3"], "ID": "3000"}


@pytest.mark.parametrize("bad_id", ["none", "abc", "-5", "12x"])
async def test_non_numeric_id_is_no_new_bans(fake: FakeApiban, client: Client, bad_id: str) -> None:
    fake.add("1.1.1.1")
    resp = await client.get(f"/api/{KEY}/banned/{bad_id}")
    assert resp.status == 400
    assert await body_of(resp) == {"ipaddress": ["no new bans"], "ID": "none"}


async def test_empty_list_is_no_new_bans(client: Client) -> None:
    resp = await client.get(f"/api/{KEY}/banned")
    assert resp.status == 400
    assert await body_of(resp) == {"ipaddress": ["no new bans"], "ID": "none"}


async def test_no_new_bans_as_string(fake: FakeApiban, client: Client) -> None:
    fake.ipaddress_as_string = True
    resp = await client.get(f"/api/{KEY}/banned/100")
    assert resp.status == 400
    assert await body_of(resp) == {"ipaddress": "no new bans", "ID": "none"}


async def test_new_ban_after_catching_up_is_served(fake: FakeApiban, client: Client) -> None:
    last = fake.add("1.1.1.1", 2_000_000_000)  # newer than the wall clock below
    assert (await client.get(f"/api/{KEY}/banned/{last}")).status == 400
    new = fake.add("2.2.2.2")
    assert int(new) > int(last)
    assert await body_of(await client.get(f"/api/{KEY}/banned/{last}")) == {
        "ipaddress": ["2.2.2.2"],
        "ID": new,
    }


# ------------------------------------------------------------- data model


def test_ids_unique_and_increasing() -> None:
    fake = FakeApiban(wall_clock=lambda: 1_700_000_000.7)
    assert fake.add("1.1.1.1") == "1700000000"
    assert fake.add("2.2.2.2") == "1700000001"  # same wall-clock second: bumped
    assert fake.add("3.3.3.3", 1_700_000_000) == "1700000002"  # explicit but taken: bumped
    assert fake.add("4.4.4.4", 5) == "5"  # explicit and free: kept, even before the others
    fake.add_many(["5.5.5.5", "6.6.6.6", "7.7.7.7"], start_ts=1_700_000_001)
    assert [fake.listed(ip) for ip in ("5.5.5.5", "6.6.6.6", "7.7.7.7")] == [
        "1700000003",
        "1700000004",
        "1700000005",
    ]


def test_readding_moves_ip_to_new_id() -> None:
    fake = FakeApiban()
    fake.add("1.1.1.1", 100_000)
    fake.add("1.1.1.1", 200_000)
    assert fake.listed("1.1.1.1") == "200000"


def test_listed_compares_canonically() -> None:
    fake = FakeApiban()
    fake.add("2001:DB8:0:0::1", 100_000)
    assert fake.listed("2001:db8::1") == "100000"
    assert fake.listed("2001:db8::2") is None
    assert fake.listed("not-an-ip") is None
    with pytest.raises(ValueError, match="does not appear to be an IPv4 or IPv6 address"):
        fake.add("10.0.0.257")


def test_request_count_rejects_unknown_kind() -> None:
    with pytest.raises(ValueError, match="unknown request kind"):
        FakeApiban().request_count("bannned")


# ------------------------------------------------------------------ /check


async def test_check_hit(fake: FakeApiban, client: Client) -> None:
    ts = fake.add("1.2.3.251", 1_698_425_647)
    resp = await client.get(f"/api/{KEY}/check/1.2.3.251")
    assert resp.status == 200
    assert await body_of(resp) == {"ipaddress": ["1.2.3.251"], "ID": ts}


async def test_check_ipv6_written_differently(fake: FakeApiban, client: Client) -> None:
    ts = fake.add("2001:db8::1", 1_698_425_647)
    resp = await client.get(f"/api/{KEY}/check/2001:0DB8:0:0:0:0:0:1")
    assert resp.status == 200
    assert await body_of(resp) == {"ipaddress": ["2001:0DB8:0:0:0:0:0:1"], "ID": ts}


@pytest.mark.parametrize("status", [400, 200])
async def test_check_miss(fake: FakeApiban, client: Client, status: int) -> None:
    fake.not_blocked_status = status
    fake.add("1.1.1.1")
    resp = await client.get(f"/api/{KEY}/check/1.2.3.4")
    assert resp.status == status
    assert await body_of(resp) == {"ipaddress": ["not blocked"], "ID": "none"}


@pytest.mark.parametrize("bad_ip", ["10.0.0.257", "2001:db8::g", "sip.example.com", "01.2.3.4"])
async def test_check_invalid_ip(client: Client, bad_ip: str) -> None:
    resp = await client.get(f"/api/{KEY}/check/{bad_ip}")
    assert resp.status == 400
    assert await body_of(resp) == {}


# --------------------------------------------------------------------- key


@pytest.mark.parametrize("status", [403, 401])
async def test_bad_key(fake: FakeApiban, client: Client, status: int) -> None:
    fake.bad_key_status = status
    fake.add("1.1.1.1")
    for url in ("/api/wrong/banned/100", "/api/wrong/check/1.1.1.1", "/ipset/wrong/list"):
        resp = await client.get(url)
        assert resp.status == status
        assert await body_of(resp) == {"ipaddress": "none", "ID": "unauthorized"}
    assert [r.key_ok for r in fake.requests] == [False, False, False]


async def test_key_never_recorded(fake: FakeApiban, client: Client) -> None:
    await client.get(f"/api/{KEY}/banned")
    await client.post("/api/get", data=b"{}", headers={"Authorization": f"Bearer {KEY}"})
    assert fake.requests[0] == RecordedRequest("GET", "banned", True, 400, fake.requests[0].at)
    assert KEY not in repr(fake.requests)


async def test_key_never_logged(fake: FakeApiban, client: Client, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    await client.get(f"/api/{KEY}/check/1.2.3.4")
    await client.get(f"/ipset/{KEY}/list")
    assert KEY not in caplog.text  # aiohttp's access log would print the v1 URL


# -------------------------------------------------------------- rate limit


async def test_rate_limit_and_recovery(serve: Serve) -> None:
    clock = FakeClock()
    fake = FakeApiban([KEY, "other"], rate_limit=(3, 120.0), clock=clock)
    client = await serve(fake)
    url = f"/api/{KEY}/check/1.2.3.4"
    assert [(await client.get(url)).status for _ in range(3)] == [400, 400, 400]
    clock.now += 60
    resp = await client.get(url)
    assert resp.status == 429
    assert await body_of(resp) == {"ipaddress": "rate limit exceeded", "ID": "unauthorized"}
    assert (await client.get("/api/other/check/1.2.3.4")).status == 400  # the budget is per key
    clock.now += 59.9
    assert (await client.get(url)).status == 429  # 429s took no slot, but the first ones still hold
    clock.now += 0.1  # exactly 120 s after the first three
    assert [(await client.get(url)).status for _ in range(4)] == [400, 400, 400, 429]
    assert [r.status for r in fake.requests].count(429) == 3
    assert fake.requests[-1].at == clock.now


async def test_bad_key_and_outage_take_no_slot(serve: Serve) -> None:
    fake = FakeApiban([KEY], rate_limit=(1, 120.0), clock=FakeClock())
    client = await serve(fake)
    assert (await client.get("/api/wrong/banned")).status == 403
    fake.fail_status = 503
    assert (await client.get(f"/api/{KEY}/banned")).status == 503
    fake.fail_status = None
    assert (await client.get(f"/api/{KEY}/banned")).status == 400
    assert (await client.get(f"/api/{KEY}/banned")).status == 429


async def test_rate_limit_disabled(serve: Serve) -> None:
    fake = FakeApiban([KEY], rate_limit=None, clock=FakeClock())
    client = await serve(fake)
    statuses = {(await client.get(f"/api/{KEY}/banned")).status for _ in range(30)}
    assert statuses == {400}


# ---------------------------------------------------------- broken upstream


async def test_fail_status(fake: FakeApiban, client: Client) -> None:
    fake.fail_status = 503
    for url in (f"/api/{KEY}/banned", "/api/wrong/check/1.1.1.1"):  # before the key is looked at
        resp = await client.get(url)
        assert resp.status == 503
        assert resp.content_type == "text/plain"
        assert await resp.text() == "Service Unavailable"
    resp = await client.post("/api/get", data=b'{"set":"sip","id":"100"}')
    assert resp.status == 503
    assert [r.status for r in fake.requests] == [503, 503, 503]


async def test_invalid_json(fake: FakeApiban, client: Client) -> None:
    fake.add("1.2.3.4")
    fake.invalid_json = True
    resp = await client.get(f"/api/{KEY}/banned/100")
    assert resp.status == 200
    assert resp.content_type == "application/json"
    raw = await resp.read()
    assert raw.startswith(b'{"ipaddress":[')
    with pytest.raises(orjson.JSONDecodeError):
        orjson.loads(raw)


async def test_invalid_json_comes_after_key_check(fake: FakeApiban, client: Client) -> None:
    fake.invalid_json = True
    assert (await client.get("/api/wrong/banned")).status == 403


async def test_empty_object(fake: FakeApiban, client: Client) -> None:
    fake.add("1.2.3.4")
    fake.empty_object = True
    for url in (f"/api/{KEY}/banned/100", f"/api/{KEY}/check/1.2.3.4"):
        resp = await client.get(url)
        assert resp.status == 200
        assert await body_of(resp) == {}


async def test_delay(fake: FakeApiban, client: Client) -> None:
    fake.add("1.2.3.4")
    fake.delay = 0.05
    loop = asyncio.get_running_loop()
    started = loop.time()
    resp = await client.get(f"/api/{KEY}/check/1.2.3.4")
    assert loop.time() - started >= 0.05
    assert resp.status == 200


async def test_hang_and_release(fake: FakeApiban, client: Client) -> None:
    fake.add("1.2.3.4")
    fake.hang = True
    pending = [asyncio.create_task(client.get(f"/api/{KEY}/check/1.2.3.4")) for _ in range(2)]
    done, _ = await asyncio.wait(pending, timeout=0.1)
    assert not done
    assert fake.request_count() == 0  # recorded when answered
    fake.release()
    responses = await asyncio.wait_for(asyncio.gather(*pending), timeout=5)
    assert [r.status for r in responses] == [200, 200]
    assert fake.request_count("check") == 2
    # Still hanging for new requests until hang is cleared.
    later = asyncio.create_task(client.get(f"/api/{KEY}/banned"))
    done, _ = await asyncio.wait([later], timeout=0.1)
    assert not done
    fake.hang = False
    fake.release()
    assert (await asyncio.wait_for(later, timeout=5)).status == 200


async def test_close_stops_hanging(fake: FakeApiban, client: Client) -> None:
    fake.hang = True
    fake.close()
    resp = await asyncio.wait_for(client.get(f"/api/{KEY}/banned"), timeout=5)
    assert resp.status == 400


# ------------------------------------------------------------------ apiv2


def bearer(key: str = KEY) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


async def post(client: Client, path: str, body: bytes, headers: dict[str, str]) -> ClientResponse:
    # golib sends no Content-Type; the fake must not need one.
    return await client.post(path, data=body, headers=headers, skip_auto_headers={"Content-Type"})


async def test_v2_get_pages(fake: FakeApiban, client: Client) -> None:
    listed = ips(300)
    fake.add_many(listed, start_ts=1_700_000_000)
    resp = await post(client, "/api/get", b'{"set":"sip","id":"100"}', bearer())
    first = await body_of(resp)
    assert resp.status == 200
    assert (len(first["ipaddress"]), first["ID"]) == (250, "1700000249")
    body = orjson.dumps({"set": "all", "id": first["ID"]})
    second = await body_of(await post(client, "/api/get", body, bearer()))
    assert first["ipaddress"] + second["ipaddress"] == listed
    resp = await post(client, "/api/get", orjson.dumps({"set": "sip", "id": second["ID"]}), bearer())
    assert resp.status == 400
    assert await body_of(resp) == {"ipaddress": ["no new bans"], "ID": "none"}
    assert fake.request_count("get") == 3
    assert fake.request_count("banned") == 0


async def test_v2_get_without_id_starts_at_the_beginning(fake: FakeApiban, client: Client) -> None:
    fake.add("1.1.1.1", 1000)
    assert await body_of(await post(client, "/api/get", b'{"set":"sip"}', bearer())) == {
        "ipaddress": ["1.1.1.1"],
        "ID": "1000",
    }


@pytest.mark.parametrize(
    "headers", [{}, {"Authorization": "Bearer wrong"}, {"Authorization": f"Basic {KEY}"}, bearer("")]
)
async def test_v2_bad_bearer(fake: FakeApiban, client: Client, headers: dict[str, str]) -> None:
    resp = await post(client, "/api/get", b'{"set":"sip","id":"100"}', headers)
    assert resp.status == 403
    assert await body_of(resp) == {"ipaddress": "none", "ID": "unauthorized"}
    assert fake.requests[-1].key_ok is False


@pytest.mark.parametrize("path", ["/api/get", "/api/check"])
@pytest.mark.parametrize("body", [b"", b"not json", b"[1,2]"])
async def test_v2_malformed_body(client: Client, path: str, body: bytes) -> None:
    resp = await post(client, path, body, bearer())
    assert resp.status == 400
    assert await body_of(resp) == {}


async def test_v2_check(fake: FakeApiban, client: Client) -> None:
    ts = fake.add("1.2.3.4")
    hit = await post(client, "/api/check", b'{"set":"sip","ipaddress":"1.2.3.4"}', bearer())
    assert (hit.status, await body_of(hit)) == (200, {"ipaddress": ["1.2.3.4"], "ID": ts})
    miss = await post(client, "/api/check", b'{"set":"sip","ipaddress":"5.6.7.8"}', bearer())
    assert (miss.status, await body_of(miss)) == (400, {"ipaddress": ["not blocked"], "ID": "none"})
    bad = await post(client, "/api/check", b'{"set":"sip","ipaddress":16909060}', bearer())
    assert (bad.status, await body_of(bad)) == (400, {})
    assert fake.request_count("checkv2") == 3
    assert {r.method for r in fake.requests} == {"POST"}


async def test_v2_shares_the_key_budget(serve: Serve) -> None:
    fake = FakeApiban([KEY], rate_limit=(2, 120.0), clock=FakeClock())
    client = await serve(fake)
    assert (await client.get(f"/api/{KEY}/banned")).status == 400
    assert (await post(client, "/api/get", b'{"id":"100"}', bearer())).status == 400
    assert (await post(client, "/api/check", b'{"ipaddress":"1.1.1.1"}', bearer())).status == 429


# ------------------------------------------------------------------ ipset


async def test_ipset_list(fake: FakeApiban, client: Client) -> None:
    fake.add("2.2.2.2", 2000)
    fake.add("1.1.1.1", 1000)
    fake.add("2001:db8::1", 3000)
    resp = await client.get(f"/ipset/{KEY}/list")
    assert resp.status == 200
    assert resp.content_type == "text/plain"
    assert (await resp.text()).splitlines() == ["1.1.1.1", "2.2.2.2", "2001:db8::1"]
    assert fake.request_count("ipset") == 1


async def test_ipset_empty(client: Client) -> None:
    resp = await client.get(f"/ipset/{KEY}/list")
    assert resp.status == 200
    assert await resp.text() == ""


# ---------------------------------------------------------------- poisoned pages


async def _page(client: Client, url: str = f"/api/{KEY}/banned/1700000000") -> tuple[int, bytes]:
    resp = await client.get(url)
    return resp.status, await resp.read()


async def test_poisons_spoil_pages_as_documented(serve: Serve) -> None:
    clock = FakeClock(1_800_000_000.0)
    fake = FakeApiban([KEY], wall_clock=clock, rate_limit=None)
    fake.add_many(["1.1.1.1", "2.2.2.2"], start_ts=1_700_000_001)
    expected: dict[str, object] = {
        "int_id": {"ipaddress": ["1.1.1.1", "2.2.2.2"], "ID": 1700000002},
        "missing_id": {"ipaddress": ["1.1.1.1", "2.2.2.2"]},
        "non_digit_id": {"ipaddress": ["1.1.1.1", "2.2.2.2"], "ID": "170000000\u00b2"},
        "long_id": {"ipaddress": ["1.1.1.1", "2.2.2.2"], "ID": "0" * 5000 + "1700000002"},
        "far_ahead_id": {"ipaddress": ["1.1.1.1", "2.2.2.2"], "ID": str(1_800_000_000 + 365 * 86400)},
        "backwards_id": {"ipaddress": ["1.1.1.1", "2.2.2.2"], "ID": "1699999999"},
        "same_id": {"ipaddress": ["1.1.1.1", "2.2.2.2"], "ID": "1700000000"},
        "non_string_entries": {
            "ipaddress": [16909060, None, {"ip": "1.1.1.1"}, "1.1.1.1", "2.2.2.2"],
            "ID": "1700000002",
        },
        "ipaddress_object": {
            "ipaddress": {"1.1.1.1": "1700000002", "2.2.2.2": "1700000002"},
            "ID": "1700000002",
        },
        "not_an_object": [["1.1.1.1", "2.2.2.2"], "1700000002"],
    }
    assert set(expected) | {"oversized_page", "huge_body"} == POISONS
    client = await serve(fake)
    for kind, body in expected.items():
        fake.poison = kind
        status, raw = await _page(client)
        assert (status, orjson.loads(raw)) == (200, body), kind
    fake.poison = "oversized_page"
    status, raw = await _page(client)
    page = orjson.loads(raw)
    assert len(page["ipaddress"]) == 2000
    assert page["ipaddress"][:3] == ["1.1.1.1", "2.2.2.2", "23.0.0.0"]
    assert page["ID"] == "1700000002"
    fake.poison = "huge_body"
    fake.huge_body_bytes = 3 << 20
    resp = await client.get(f"/api/{KEY}/banned/1700000000")
    assert resp.headers["Transfer-Encoding"] == "chunked"
    assert "Content-Length" not in resp.headers
    page = orjson.loads(await resp.read())
    assert len(page["ipaddress"]) > (3 << 20) // 20
    assert page["ID"] == "1700000002"
    # The end of the list is never spoilt, and the poison stays on the /banned pages.
    status, raw = await _page(client, f"/api/{KEY}/banned/1700000002")
    assert (status, orjson.loads(raw)) == (400, {"ipaddress": ["no new bans"], "ID": "none"})
    assert (await client.get(f"/api/{KEY}/check/1.1.1.1")).status == 200
    fake.poison = None
    status, raw = await _page(client)
    assert orjson.loads(raw) == {"ipaddress": ["1.1.1.1", "2.2.2.2"], "ID": "1700000002"}


def test_an_unknown_poison_is_a_test_bug() -> None:
    fake = FakeApiban([KEY])
    with pytest.raises(ValueError, match="unknown poison"):
        fake.poison = "int-id"
