"""Served local detections in the site API: one list with the APIBAN mirror, IDs from one sequence.

The detections are reported to the agent's book directly (a rule's finding with its proof); the way
real SIP over HEP gets there is covered by the detection tests and the CrowdSec bouncer test.
"""

from __future__ import annotations

import time
from pathlib import Path

from hepsub_apiban.app import Clocks
from hepsub_apiban.detection.book import Detection
from hepsub_apiban.detection.detector import PROOF_TCP, Finding
from hepsub_apiban.keys import BLOCKLIST, DETECTIONS, MIRROR_SYNC

from .conftest import AgentFactory, ApibanPeer, ManualClock
from .test_site_api import SITE_KEY, Client, addresses, get, page_all, site_agent, write_list

ATTACKER = "5.6.7.8"
OTHER = "5.6.7.9"


def detect(client: Client, ip: str, rule: str = "scanner_ua", proof: str | None = PROOF_TCP) -> Detection:
    """A rule's finding, as the detector reports it; served when it carries a proof."""
    book = client.app[DETECTIONS]
    book.report(Finding(ip, rule, "3 requests from a scanner in 60 s", proof, client.app[BLOCKLIST].now()))
    found = book.get(ip)
    assert found is not None
    return found


async def ipset(client: Client) -> list[str]:
    response = await client.get(f"/ipset/{SITE_KEY}/list")
    assert response.status == 200
    return (await response.text()).splitlines()


async def clocked_site_agent(agent: AgentFactory, **env: str) -> tuple[Client, ManualClock]:
    clock = ManualClock(time.time())  # the snapshot write_list leaves is of now
    return await site_agent(agent, Clocks(wall=clock), **env), clock


async def test_detections_continue_the_mirrors_sequence_across_pages(
    agent: AgentFactory, apiban: ApibanPeer, tmp_path: Path
) -> None:
    listed = addresses(260)
    write_list(tmp_path, apiban, listed)
    client, clock = await clocked_site_agent(agent)
    mirror = client.app[MIRROR_SYNC].mirror
    first = detect(client, ATTACKER)
    later = addresses(300, start=1000)
    mirror.add(later, "1700000500", clock())  # an incremental pull after the detection
    second = detect(client, OTHER, "auth_failure")
    assert first.serial is not None
    assert second.serial is not None
    assert max(mirror.serials[ip] for ip in listed) < first.serial < mirror.serials[later[0]]
    assert mirror.serials[later[-1]] < second.serial

    expected = [*listed, ATTACKER, *later, OTHER]
    ips, ids = await page_all(client)
    assert ips == expected
    assert [int(i) for i in ids] == sorted(int(i) for i in ids)
    for page, entry_id in enumerate(ids):  # every ID handed out continues exactly after its page
        rest, _ = await page_all(client, entry_id)
        assert rest == expected[(page + 1) * 250 :]
    assert (await page_all(client, str(first.serial)))[0] == [*later, OTHER]
    assert await ipset(client) == expected

    # A client at the end gets what comes next, whichever source it comes from.
    third = detect(client, "5.6.7.10")
    mirror.add(["46.0.0.1"], "1700000600", clock())
    assert (await page_all(client, ids[-1]))[0] == ["5.6.7.10", "46.0.0.1"]
    assert third.serial is not None
    assert third.serial < mirror.serials["46.0.0.1"]


async def test_check_and_ipset_answer_a_detection_while_it_lasts(
    agent: AgentFactory, apiban: ApibanPeer, tmp_path: Path
) -> None:
    write_list(tmp_path, apiban, addresses(3))
    client, clock = await clocked_site_agent(agent)
    detection = detect(client, ATTACKER)  # scanner_ua: 1 h
    assert await get(client, f"/api/{SITE_KEY}/check/{ATTACKER}") == (
        200,
        {"ipaddress": [ATTACKER], "ID": str(detection.serial)},
    )
    bearer = {"Authorization": f"Bearer {SITE_KEY}"}
    response = await client.post("/api/check", data=b'{"ipaddress":"%s"}' % ATTACKER.encode(), headers=bearer)
    assert (response.status, (await response.json())["ID"]) == (200, str(detection.serial))
    assert ATTACKER in await ipset(client)

    clock.advance(3600)  # its hour is up: it leaves /check and /ipset without waiting for upkeep
    assert await get(client, f"/api/{SITE_KEY}/check/{ATTACKER}") == (
        400,
        {"ipaddress": ["not blocked"], "ID": "none"},
    )
    assert await ipset(client) == addresses(3)
    assert (await page_all(client))[0] == addresses(3)


async def test_an_address_listed_and_detected_is_listed_once_under_the_mirrors_id(
    agent: AgentFactory, apiban: ApibanPeer, tmp_path: Path
) -> None:
    listed = addresses(5)
    write_list(tmp_path, apiban, listed)
    client, _ = await clocked_site_agent(agent)
    detect(client, listed[2])
    detect(client, ATTACKER)
    assert (await page_all(client))[0] == [*listed, ATTACKER]
    assert await ipset(client) == [*listed, ATTACKER]
    serial = client.app[MIRROR_SYNC].mirror.serials[listed[2]]
    assert (await get(client, f"/api/{SITE_KEY}/check/{listed[2]}"))[1]["ID"] == str(serial)


async def test_flagged_allow_listed_and_excluded_detections_are_not_listed(
    agent: AgentFactory, apiban: ApibanPeer, tmp_path: Path
) -> None:
    write_list(tmp_path, apiban, addresses(3))
    client, _ = await clocked_site_agent(agent, HEPSUB_ALLOW_CIDRS="5.6.7.9/32")
    flagged = detect(client, ATTACKER, proof=None)  # one rule and no proof: shown in HOMER only
    assert not flagged.served
    allowed = detect(client, OTHER)  # restored from before the address was allow-listed, say
    assert allowed.served
    assert await ipset(client) == addresses(3)
    assert (await page_all(client))[0] == addresses(3)
    assert (await get(client, f"/api/{SITE_KEY}/check/{OTHER}"))[0] == 400

    excluded, _ = await clocked_site_agent(agent, HEPSUB_SITE_INCLUDE_LOCAL="false")
    detect(excluded, "5.6.7.10")
    assert await ipset(excluded) == addresses(3)
    assert (await get(excluded, f"/api/{SITE_KEY}/check/5.6.7.10"))[0] == 400


async def test_v2_get_pages_the_merged_list(agent: AgentFactory, apiban: ApibanPeer, tmp_path: Path) -> None:
    listed = addresses(250)
    write_list(tmp_path, apiban, listed)
    client, _ = await clocked_site_agent(agent)
    detection = detect(client, ATTACKER)
    bearer = {"Authorization": f"Bearer {SITE_KEY}"}
    first = await (await client.post("/api/get", data=b'{"id":"100"}', headers=bearer)).json()
    assert first["ipaddress"] == listed
    response = await client.post("/api/get", data=b'{"id":"%s"}' % first["ID"].encode(), headers=bearer)
    assert await response.json() == {"ipaddress": [ATTACKER], "ID": str(detection.serial)}
    response = await client.post("/api/get", data=b'{"id":%d}' % (detection.serial or 0), headers=bearer)
    assert response.status == 400  # the end of the list, APIBAN's way


async def test_check_mode_has_no_list_to_serve_and_says_503(agent: AgentFactory) -> None:
    client = await agent(HEPSUB_SITE_KEYS=SITE_KEY)  # apiban.mode = check
    detect(client, ATTACKER)
    assert (await get(client, f"/api/{SITE_KEY}/banned"))[0] == 503
    assert (await get(client, f"/api/{SITE_KEY}/check/{ATTACKER}"))[0] == 503
    assert (await client.get(f"/ipset/{SITE_KEY}/list")).status == 503
