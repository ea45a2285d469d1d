"""The CrowdSec decision API for bouncers, through the real HTTP stack: shapes, stream semantics
per bouncer (startup, deltas, deletions on expiry and removal), filters, keys and their limits."""

from __future__ import annotations

import re
import time
from pathlib import Path
from typing import Any

import aiohttp

from hepsub_apiban.apiban.mirror import ACTIVE_FOR
from hepsub_apiban.app import Clocks
from hepsub_apiban.keys import BLOCKLIST, MIRROR_SYNC, REFUSALS
from hepsub_apiban.site.decisions import MAX_FILTER_ITEMS, go_duration

from .conftest import AgentFactory, ApibanPeer, ManualClock
from .test_site_api import SITE_KEY, Client, addresses, site_agent, write_list
from .test_site_blocklist import ATTACKER, OTHER, clocked_site_agent, detect

HEADERS = {"X-Api-Key": SITE_KEY, "User-Agent": "crowdsec-custom-bouncer/-"}
GO_DURATION = re.compile(r"-?([0-9]+h)?([0-9]+m)?[0-9]+s")
RFC3339_UTC = re.compile(r"[0-9]{4}-[0-9]{2}-[0-9]{2}T[0-9]{2}:[0-9]{2}:[0-9]{2}Z")


async def pull(client: Client, query: str = "", headers: dict[str, str] | None = None) -> dict[str, Any]:
    response = await client.get(f"/v1/decisions/stream{query}", headers=headers or HEADERS)
    assert response.status == 200
    assert response.content_type == "application/json"
    body: dict[str, Any] = await response.json()
    assert set(body) == {"new", "deleted"}
    return body


def values(decisions: list[dict[str, Any]] | None) -> list[str]:
    return [d["value"] for d in decisions or []]


async def live(client: Client, query: str) -> tuple[int, Any]:
    response = await client.get(f"/v1/decisions{query}", headers=HEADERS)
    return response.status, await response.json()


async def stream_agent(
    agent: AgentFactory, apiban: ApibanPeer, tmp_path: Path, listed: list[str], **env: str
) -> tuple[Client, ManualClock]:
    write_list(tmp_path, apiban, listed)
    return await clocked_site_agent(agent, **env)


async def test_startup_gives_every_active_decision_as_crowdsec_shapes_them(
    agent: AgentFactory, apiban: ApibanPeer, tmp_path: Path
) -> None:
    client, clock = await stream_agent(agent, apiban, tmp_path, addresses(2))
    detection = detect(client, ATTACKER, "auth_failure")  # 4 h
    mirror = client.app[MIRROR_SYNC].mirror
    body = await pull(client, "?startup=true")
    assert body["deleted"] is None
    assert values(body["new"]) == [*addresses(2), ATTACKER]  # in ID order
    listed, local = body["new"][0], body["new"][2]
    last_reported = mirror.entries[addresses(2)[0]].last_reported or 0
    assert listed == {
        "id": mirror.serials[addresses(2)[0]],
        "origin": "apiban",
        "type": "ban",
        "scope": "Ip",
        "value": addresses(2)[0],
        "duration": go_duration(last_reported + ACTIVE_FOR - clock()),
        "until": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(last_reported + ACTIVE_FOR)),
        "scenario": "apiban",
        "simulated": False,
    }
    assert local == {
        "id": detection.serial,
        "origin": "hepsub-apiban",
        "type": "ban",
        "scope": "Ip",
        "value": ATTACKER,
        "duration": "4h0m0s",
        "until": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(detection.until)),
        "scenario": "hepsub-apiban/auth-failure",
        "simulated": False,
    }
    for decision in body["new"]:
        assert isinstance(decision["id"], int)
        assert GO_DURATION.fullmatch(decision["duration"])
        assert RFC3339_UTC.fullmatch(decision["until"])


def test_durations_are_written_as_go_writes_them() -> None:
    assert go_duration(14398.2) == "3h59m59s"  # a moment left counts as a second
    assert go_duration(3600) == "1h0m0s"
    assert go_duration(61) == "1m1s"
    assert go_duration(0.4) == "1s"
    assert go_duration(0) == "0s"
    assert go_duration(-5) == "-5s"
    assert go_duration(7 * 86400) == "168h0m0s"


async def test_later_pulls_give_what_is_new_since_and_what_ended(
    agent: AgentFactory, apiban: ApibanPeer, tmp_path: Path
) -> None:
    client, clock = await stream_agent(agent, apiban, tmp_path, addresses(3))
    mirror = client.app[MIRROR_SYNC].mirror
    assert values((await pull(client, "?startup=true"))["new"]) == addresses(3)
    assert await pull(client, "?startup=false") == {"new": None, "deleted": None}
    assert await pull(client) == {"new": None, "deleted": None}  # go-cs-bouncer sends no startup=false

    clock.advance(600)
    detect(client, ATTACKER)  # scanner_ua: 1 h
    mirror.add(["46.0.0.1", addresses(3)[1]], "1700000500", clock())  # new, and reported again
    body = await pull(client)
    assert values(body["new"]) == [ATTACKER, "46.0.0.1", addresses(3)[1]]
    assert body["deleted"] is None
    assert await pull(client) == {"new": None, "deleted": None}

    clock.advance(1800)
    detect(client, OTHER)
    clock.advance(1800)  # ATTACKER's hour is up; the upkeep has not run
    body = await pull(client)
    assert values(body["new"]) == [OTHER]
    assert values(body["deleted"]) == [ATTACKER]
    assert body["deleted"][0]["duration"] == "0s"
    assert await pull(client) == {"new": None, "deleted": None}  # told once

    clock.advance(7 * 86400 - 4200 + 1)  # the snapshot's entries are 7 days old, the others not yet
    assert mirror.expire(clock()) == 2
    body = await pull(client)
    assert sorted(values(body["deleted"])) == sorted([addresses(3)[0], addresses(3)[2], OTHER])
    assert all(d["duration"].startswith("-") for d in body["deleted"])
    assert body["new"] is None
    assert values((await pull(client, "?startup=true"))["new"]) == ["46.0.0.1", addresses(3)[1]]


async def test_each_bouncer_has_its_own_cursor(
    agent: AgentFactory, apiban: ApibanPeer, tmp_path: Path
) -> None:
    client, _ = await stream_agent(agent, apiban, tmp_path, addresses(2))
    firewall = {**HEADERS, "User-Agent": "crowdsec-firewall-bouncer/v0.0.28"}
    await pull(client, "?startup=true")
    detect(client, ATTACKER)
    assert values((await pull(client))["new"]) == [ATTACKER]
    # Never seen: startup=false without a cursor gets everything, as startup=true does.
    assert values((await pull(client, headers=firewall))["new"]) == [*addresses(2), ATTACKER]
    connector = aiohttp.TCPConnector(local_addr=("127.0.0.2", 0))  # another host, same key and agent
    async with aiohttp.ClientSession(connector=connector) as other:
        url = f"http://127.0.0.1:{client.server.port}/v1/decisions/stream"
        async with other.get(url, headers=HEADERS) as response:
            assert values((await response.json())["new"]) == [*addresses(2), ATTACKER]
    detect(client, OTHER)
    assert values((await pull(client))["new"]) == [OTHER]
    assert values((await pull(client, headers=firewall))["new"]) == [OTHER]
    # A HEAD probe answers 200 and moves no cursor.
    assert (await client.head("/v1/decisions/stream", headers=HEADERS)).status == 200
    detect(client, "5.6.7.10")
    assert values((await pull(client))["new"]) == ["5.6.7.10"]


async def test_an_address_is_given_once_by_its_longest_decision(
    agent: AgentFactory, apiban: ApibanPeer, tmp_path: Path
) -> None:
    listed = addresses(2)
    client, clock = await stream_agent(agent, apiban, tmp_path, listed)
    mirror = client.app[MIRROR_SYNC].mirror
    detection = detect(client, listed[0], "auth_failure")  # 4 h, beside APIBAN's 7 days
    body = await pull(client, "?startup=true")
    assert [(d["value"], d["origin"]) for d in body["new"]] == [(listed[0], "apiban"), (listed[1], "apiban")]
    status, both = await live(client, f"?ip={listed[0]}")  # the live route gives every decision
    assert status == 200
    assert [d["origin"] for d in both] == ["apiban", "hepsub-apiban"]

    # A full pull that does not report it again drops APIBAN's entry: the bouncer holds 7 days, so
    # it is deleted and given again with the detection that remains.
    clock.advance(10)
    mirror.begin_full_pull(clock())
    mirror.add([listed[1]], "1700000900", clock())
    mirror.complete_full_pull(clock())
    body = await pull(client)
    assert [(d["value"], d["origin"]) for d in body["deleted"]] == [(listed[0], "apiban")]
    assert [(d["value"], d["id"]) for d in body["new"]] == [(listed[0], detection.serial)]
    assert (await live(client, f"?ip={listed[0]}"))[1][0]["origin"] == "hepsub-apiban"

    # The reverse: a detection ending while APIBAN still lists the address is no news.
    other = detect(client, listed[1])
    assert other.served
    assert (await pull(client))["new"] is None  # APIBAN's 7 days outlast its hour
    clock.advance(3600)
    assert await pull(client) == {"new": None, "deleted": None}


async def test_filters_go_cs_bouncer_sends(agent: AgentFactory, apiban: ApibanPeer, tmp_path: Path) -> None:
    client, _ = await stream_agent(agent, apiban, tmp_path, addresses(1))
    detect(client, ATTACKER)
    detect(client, OTHER, "auth_failure")
    cases = {
        "origins=apiban": [addresses(1)[0]],
        "origins=hepsub-apiban%2Capiban": [addresses(1)[0], ATTACKER, OTHER],
        "scenarios_containing=SCANNER%2Cauth": [ATTACKER, OTHER],
        "scenarios_not_containing=apiban": [],
        "scenarios_containing=hepsub&scenarios_not_containing=auth": [ATTACKER],
        "scopes=ip%2Crange": [addresses(1)[0], ATTACKER, OTHER],
        "scopes=range": [],
        "dedup=false&unknown=1": [addresses(1)[0], ATTACKER, OTHER],  # ignored
    }
    for query, expected in cases.items():
        assert values((await pull(client, f"?startup=true&{query}"))["new"]) == expected, query
    assert values((await live(client, "?type=captcha"))[1]) == []
    too_many = ",".join(["a"] * (MAX_FILTER_ITEMS + 1))
    response = await client.get(f"/v1/decisions/stream?origins={too_many}", headers=HEADERS)
    assert response.status == 400
    assert "origins" in (await response.json())["message"]


async def test_live_queries(agent: AgentFactory, apiban: ApibanPeer, tmp_path: Path) -> None:
    listed = addresses(3)
    client, clock = await stream_agent(agent, apiban, tmp_path, listed, HEPSUB_ALLOW_CIDRS=listed[2])
    detect(client, ATTACKER)
    assert values((await live(client, f"?ip={ATTACKER}"))[1]) == [ATTACKER]
    assert values((await live(client, f"?scope=Ip&value={ATTACKER}"))[1]) == [ATTACKER]
    assert values((await live(client, f"?range={ATTACKER}/32"))[1]) == [ATTACKER]
    assert values((await live(client, "?range=45.0.0.0/16&contains=false"))[1]) == listed[:2]
    assert await live(client, "?range=45.0.0.0/16") == (200, None)  # no Ip decision holds a /16
    assert values((await live(client, ""))[1]) == [*listed[:2], ATTACKER]
    assert await live(client, "?ip=8.8.8.8") == (200, None)
    assert await live(client, f"?ip={listed[2]}") == (200, None)  # allow-listed: never handed out
    assert await live(client, f"?scope=range&value={ATTACKER}") == (200, None)
    assert (await live(client, "?ip=not-an-ip"))[0] == 400
    assert (await live(client, "?range=45.0.0.0/99"))[0] == 400
    clock.advance(3600)
    assert await live(client, f"?ip={ATTACKER}") == (200, None)


async def test_local_detections_only_with_include_local_and_without_a_mirror(
    agent: AgentFactory, apiban: ApibanPeer, tmp_path: Path
) -> None:
    excluded, _ = await stream_agent(agent, apiban, tmp_path, addresses(1), HEPSUB_SITE_INCLUDE_LOCAL="false")
    detect(excluded, ATTACKER)
    assert values((await pull(excluded, "?startup=true"))["new"]) == addresses(1)
    assert await live(excluded, f"?ip={ATTACKER}") == (200, None)

    clock = ManualClock(time.time())
    check_mode = await agent(Clocks(wall=clock), HEPSUB_SITE_KEYS=SITE_KEY)  # no list: detections only
    assert await pull(check_mode, "?startup=true") == {"new": None, "deleted": None}
    detect(check_mode, ATTACKER)
    assert values((await pull(check_mode))["new"]) == [ATTACKER]
    clock.advance(3600)
    assert values((await pull(check_mode))["deleted"]) == [ATTACKER]
    assert check_mode.app[BLOCKLIST].mirror is None


async def test_bad_keys_get_crowdsecs_403_then_the_site_apis_limit(
    agent: AgentFactory, apiban: ApibanPeer, tmp_path: Path
) -> None:
    write_list(tmp_path, apiban, addresses(1))
    clock = ManualClock()
    client = await site_agent(agent, Clocks(monotonic=clock), HEPSUB_SITE_AUTH_FAILURE_LIMIT="3/60")
    forbidden = {"message": "access forbidden"}
    for headers in ({"X-Api-Key": "wrong"}, {}, {"X-Api-Key": SITE_KEY + "x"}):
        response = await client.get("/v1/decisions/stream?startup=true", headers=headers)
        assert (response.status, await response.json()) == (403, forbidden)
    response = await client.get("/v1/decisions/stream?startup=true", headers=HEADERS)
    assert response.status == 429  # the right key too, from this address, until the window frees
    assert (await client.get(f"/api/{SITE_KEY}/banned")).status == 429  # one budget for both APIs
    assert (await client.get("/v1/decisions?ip=1.2.3.4", headers=HEADERS)).status == 429
    clock.advance(60)
    assert (await client.get("/v1/decisions/stream?startup=true", headers=HEADERS)).status == 200
    assert client.app[REFUSALS].to_json()["site"] == {"bad key": 3, "too many bad keys": 3}


async def test_the_site_rate_limit_holds_for_bouncers_and_routes_need_site_keys(
    agent: AgentFactory, apiban: ApibanPeer, tmp_path: Path
) -> None:
    write_list(tmp_path, apiban, addresses(1))
    client = await site_agent(agent, HEPSUB_SITE_RATE_LIMIT="2/60")
    statuses = [(await client.get("/v1/decisions/stream", headers=HEADERS)).status for _ in range(3)]
    assert statuses == [200, 200, 429]
    assert (await client.get("/v1/decisions/stream", headers={"X-Api-Key": "another-key"})).status == 200
    without_keys = await agent(HEPSUB_APIBAN_MODE="mirror")
    assert (await without_keys.get("/v1/decisions/stream", headers=HEADERS)).status == 404


async def test_agent_allow_from_leaves_the_decision_api_to_its_keys(
    agent: AgentFactory, apiban: ApibanPeer, tmp_path: Path
) -> None:
    write_list(tmp_path, apiban, addresses(1))
    client = await site_agent(agent, HEPSUB_AGENT_ALLOW_FROM="192.0.2.1/32")
    assert (await client.get("/api/v1/status")).status == 403
    assert values((await pull(client, "?startup=true"))["new"]) == addresses(1)
