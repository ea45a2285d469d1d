"""The APIBAN API the agent serves to its site, from the mirror, through the real HTTP stack."""

from __future__ import annotations

import random
import time
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient

from hepsub_apiban.apiban.mirror import Mirror, snapshot_source
from hepsub_apiban.app import Clocks
from hepsub_apiban.keys import METRICS, MIRROR_SYNC, REFUSALS

from .conftest import APIBAN_KEY, AgentFactory, ApibanPeer, ManualClock

Client = TestClient[web.Request, web.Application]
SITE_KEY = "site-local-key-1"
UNAUTHORIZED = {"ipaddress": "none", "ID": "unauthorized"}
RATE_LIMITED = {"ipaddress": "rate limit exceeded", "ID": "unauthorized"}


def addresses(count: int, start: int = 0) -> list[str]:
    return [f"{45 + (i >> 16)}.{(i >> 8) & 255}.{i & 255}.7" for i in range(start, start + count)]


def write_list(tmp_path: Path, apiban: ApibanPeer, ips: list[str]) -> None:
    """A loaded mirror in the state dir, as a previous run of the agent left it."""
    mirror = Mirror()
    now = time.time()
    mirror.add(ips, "1700000000", now)
    mirror.cursor = "1700000000"
    mirror.last_full_sync = mirror.last_sync = now
    state = tmp_path / "state"
    state.mkdir(exist_ok=True)
    (state / "mirror.json").write_bytes(mirror.to_snapshot(snapshot_source(apiban.url, APIBAN_KEY), now))


async def site_agent(agent: AgentFactory, clocks: Clocks | None = None, **env: str) -> Client:
    return await agent(clocks, HEPSUB_APIBAN_MODE="mirror", HEPSUB_SITE_KEYS=f"{SITE_KEY},another-key", **env)


async def get(client: Client, path: str) -> tuple[int, Any]:
    response = await client.get(path)
    return response.status, await response.json()


async def page_all(client: Client, start: str = "100") -> tuple[list[str], list[str]]:
    """Every address from ``start`` to the end, and the IDs handed out on the way."""
    ips, ids, cursor = [], [], start
    for _ in range(1000):
        status, body = await get(client, f"/api/{SITE_KEY}/banned/{cursor}")
        if status == 400:
            assert body == {"ipaddress": ["no new bans"], "ID": "none"}
            return ips, ids
        assert status == 200
        assert len(body["ipaddress"]) <= 250
        ips += body["ipaddress"]
        cursor = body["ID"]
        ids.append(cursor)
    raise AssertionError("paging did not end")


async def test_paging_20000_addresses_returns_each_once_in_order_and_resumes_anywhere(
    agent: AgentFactory, apiban: ApibanPeer, tmp_path: Path
) -> None:
    listed = addresses(20_000)
    write_list(tmp_path, apiban, listed)
    client = await site_agent(agent)
    ips, ids = await page_all(client)
    assert ips == listed
    assert len(ids) == 80
    assert all(i.isdigit() for i in ids)
    assert [int(i) for i in ids] == sorted(int(i) for i in ids)
    first = await (await client.get(f"/api/{SITE_KEY}/banned")).json()
    assert first["ipaddress"] == listed[:250]
    for page in random.Random(3).sample(range(80), 6):
        rest, _ = await page_all(client, ids[page])
        assert rest == listed[(page + 1) * 250 :]
    for page, entry_id in enumerate(ids[:-1]):  # every ID handed out continues exactly after its page
        status, body = await get(client, f"/api/{SITE_KEY}/banned/{entry_id}")
        assert status == 200
        assert body["ipaddress"] == listed[(page + 1) * 250 : (page + 2) * 250]


async def test_ids_survive_a_restart_and_new_entries_follow_the_last_id(
    agent: AgentFactory, apiban: ApibanPeer, tmp_path: Path
) -> None:
    listed = addresses(600)
    write_list(tmp_path, apiban, listed)
    first = await site_agent(agent)
    _, ids = await page_all(first)
    await first.close()
    second = await site_agent(agent)
    assert await page_all(second) == (listed, ids)  # same IDs after the restart
    mirror = second.app[MIRROR_SYNC].mirror
    mirror.add(["46.1.1.1", listed[3]], "1700000999", time.time())  # an incremental pull: new, reactivated
    rest, _ = await page_all(second, ids[-1])
    assert rest == ["46.1.1.1", listed[3]]


async def test_check_answers_as_apiban_does(agent: AgentFactory, apiban: ApibanPeer, tmp_path: Path) -> None:
    write_list(tmp_path, apiban, ["45.0.0.7", "2a01:4f8::5"])
    client = await site_agent(agent)
    status, body = await get(client, f"/api/{SITE_KEY}/check/45.0.0.7")
    assert status == 200
    assert body["ipaddress"] == ["45.0.0.7"]
    assert body["ID"].isdigit()
    assert (await get(client, f"/api/{SITE_KEY}/check/2A01:04F8::5"))[0] == 200
    assert await get(client, f"/api/{SITE_KEY}/check/8.8.8.8") == (
        400,
        {"ipaddress": ["not blocked"], "ID": "none"},
    )
    assert await get(client, f"/api/{SITE_KEY}/check/999.1.1.1") == (400, {})


async def test_allow_listed_addresses_are_never_served(
    agent: AgentFactory, apiban: ApibanPeer, tmp_path: Path
) -> None:
    listed = addresses(300)
    write_list(tmp_path, apiban, listed)
    client = await site_agent(agent, HEPSUB_ALLOW_CIDRS=f"{listed[10]},{listed[260]}/32")
    ips, _ = await page_all(client)
    assert ips == [ip for ip in listed if ip not in (listed[10], listed[260])]
    assert (await get(client, f"/api/{SITE_KEY}/check/{listed[10]}"))[0] == 400
    text = await (await client.get(f"/ipset/{SITE_KEY}/list")).text()
    assert listed[10] not in text.splitlines()


async def test_ipset_list_is_one_address_per_line(
    agent: AgentFactory, apiban: ApibanPeer, tmp_path: Path
) -> None:
    listed = addresses(700)
    write_list(tmp_path, apiban, listed)
    client = await site_agent(agent)
    response = await client.get(f"/ipset/{SITE_KEY}/list")
    assert response.status == 200
    assert response.content_type == "text/plain"
    assert (await response.text()).splitlines() == listed


async def test_v2_endpoints_take_the_key_as_a_bearer_token(
    agent: AgentFactory, apiban: ApibanPeer, tmp_path: Path
) -> None:
    listed = addresses(300)
    write_list(tmp_path, apiban, listed)
    client = await site_agent(agent)
    auth = {"Authorization": f"Bearer {SITE_KEY}"}
    # golib sends no Content-Type.
    response = await client.post("/api/get", data=b'{"set":"sip","id":"100"}', headers=auth)
    body = await response.json()
    assert body["ipaddress"] == listed[:250]
    response = await client.post(
        "/api/get", data=b'{"set":"sip","id":"%s"}' % body["ID"].encode(), headers=auth
    )
    assert (await response.json())["ipaddress"] == listed[250:]
    response = await client.post("/api/check", data=b'{"set":"sip","ipaddress":"45.0.0.7"}', headers=auth)
    assert response.status == 200
    response = await client.post("/api/get", data=b'{"id":"100"}', headers={"Authorization": "Bearer wrong"})
    assert response.status == 403


async def test_unknown_key_and_rate_limit_answer_as_apiban(
    agent: AgentFactory, apiban: ApibanPeer, tmp_path: Path
) -> None:
    write_list(tmp_path, apiban, addresses(10))
    client = await site_agent(agent, HEPSUB_SITE_RATE_LIMIT="3/60")
    assert await get(client, "/api/not-a-site-key/banned/100") == (
        403,
        {"ipaddress": "none", "ID": "unauthorized"},
    )
    for _ in range(3):
        assert (await get(client, f"/api/{SITE_KEY}/banned/100"))[0] == 200
    assert await get(client, f"/api/{SITE_KEY}/banned/100") == (
        429,
        {"ipaddress": "rate limit exceeded", "ID": "unauthorized"},
    )
    assert (await get(client, "/api/another-key/banned/100"))[0] == 200  # the limit is per key


async def test_off_without_site_keys_and_503_until_the_list_is_in(agent: AgentFactory) -> None:
    client = await agent(HEPSUB_APIBAN_MODE="mirror")
    assert (await client.get(f"/api/{SITE_KEY}/banned/100")).status == 404
    loading = await site_agent(agent, HEPSUB_APIBAN_URL="http://127.0.0.1:9")
    assert (await get(loading, f"/api/{SITE_KEY}/banned/100"))[0] == 503
    assert (await client.get("/api/v1/check/8.8.8.8")).status == 200  # the agent's own API is untouched


@pytest.mark.parametrize("keys", ["v1", "a/b", "x y"])
def test_site_keys_that_would_clash_with_routes_are_refused(keys: str) -> None:
    from hepsub_apiban.core.config import ConfigError, load_settings

    with pytest.raises(ConfigError, match=r"site\.keys"):
        load_settings(None, {"HEPSUB_SITE_KEYS": keys})


# --------------------------------------------------------------------------- key guessing


async def test_key_guessing_is_cut_to_429_per_address_until_the_window_frees(
    agent: AgentFactory, apiban: ApibanPeer, tmp_path: Path
) -> None:
    write_list(tmp_path, apiban, addresses(10))
    clock = ManualClock()
    client = await site_agent(agent, Clocks(monotonic=clock), HEPSUB_SITE_AUTH_FAILURE_LIMIT="10/60")
    guesses = [await get(client, f"/api/guess-{n}/banned") for n in range(300)]
    assert guesses[:10] == [(403, UNAUTHORIZED)] * 10
    assert guesses[10:] == [(429, RATE_LIMITED)] * 290
    assert await get(client, f"/api/{SITE_KEY}/banned") == (429, RATE_LIMITED)  # even the right key
    bearer = {"Authorization": f"Bearer {SITE_KEY}"}
    assert (await client.post("/api/get", data=b'{"id": "100"}', headers=bearer)).status == 429

    # Another address (Linux answers on all of 127/8) is not affected.
    connector = aiohttp.TCPConnector(local_addr=("127.0.0.2", 0))
    async with aiohttp.ClientSession(connector=connector) as other:
        url = f"http://127.0.0.1:{client.server.port}/api/{SITE_KEY}/banned"
        async with other.get(url) as response:
            assert response.status == 200

    clock.advance(59.0)
    assert (await get(client, f"/api/{SITE_KEY}/banned"))[0] == 429
    clock.advance(1.0)  # the first failures leave the window
    assert (await get(client, f"/api/{SITE_KEY}/banned"))[0] == 200
    assert (await get(client, "/api/guess-again/banned"))[0] == 403

    counts = client.app[REFUSALS].counts
    assert counts[("site", "bad key")] == 11
    assert counts[("site", "too many bad keys")] == 293
    metrics = client.app[METRICS].render().decode().splitlines()
    assert 'hepsub_apiban_refused_total{channel="site",reason="bad key"} 11.0' in metrics
    assert 'hepsub_apiban_refused_total{channel="site",reason="too many bad keys"} 293.0' in metrics


async def test_bearer_guessing_counts_too_and_the_rate_limit_is_a_refusal(
    agent: AgentFactory, apiban: ApibanPeer, tmp_path: Path
) -> None:
    write_list(tmp_path, apiban, addresses(10))
    client = await site_agent(agent, HEPSUB_SITE_AUTH_FAILURE_LIMIT="3/60", HEPSUB_SITE_RATE_LIMIT="2/60")
    statuses = []
    for key in ("a", SITE_KEY[:-1], SITE_KEY, SITE_KEY, SITE_KEY, SITE_KEY + "x", "b"):
        response = await client.post(
            "/api/get", data=b'{"id": "100"}', headers={"Authorization": f"Bearer {key}"}
        )
        statuses.append(response.status)
    assert statuses == [403, 403, 200, 200, 429, 403, 429]
    assert client.app[REFUSALS].to_json()["site"] == {
        "bad key": 3,
        "over site.rate_limit": 1,
        "too many bad keys": 1,
    }


async def test_each_configured_key_works_and_near_misses_do_not(
    agent: AgentFactory, apiban: ApibanPeer, tmp_path: Path
) -> None:
    write_list(tmp_path, apiban, addresses(10))
    client = await site_agent(agent, HEPSUB_SITE_AUTH_FAILURE_LIMIT="100/60")
    for wrong in ("s", SITE_KEY[:-1], SITE_KEY + "1", SITE_KEY.upper(), SITE_KEY * 50, "another-ke"):
        assert (await client.get(f"/api/{wrong}/banned")).status == 403, wrong
    for right in (SITE_KEY, "another-key"):
        assert (await client.get(f"/api/{right}/banned")).status == 200, right
