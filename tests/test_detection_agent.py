"""Local detection through the running agent: HEP over real UDP in, the HTTP API out.

A scan is sent as the capture would carry it (the attacker's requests and our server's 404s, each
one HEP packet) and must show in /api/v1/detections, the enrichment answer, sightings, status and
metrics; forged packets (outside hep.allow_from, a wrong hep.auth_key) must accuse no one; and the
book must come back after a restart.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import orjson

from hepsub_apiban.formats.hep import build_hep3
from hepsub_apiban.keys import COLLECTOR, DETECTIONS, SIGHTINGS

from .conftest import AgentFactory
from .test_collector import Client, hep_agent, sip_packet, until
from .test_hep_access import metric, udp_from

ATTACKER = "5.6.7.8"
SERVER = "10.0.0.1"
KEY = "capture-KEY-4471"


def packet(src: str, dst: str, text: str, key: str | None = None) -> bytes:
    auth_key = None if key is None else key.encode()
    return build_hep3(dataclasses.replace(sip_packet(src, dst), payload=text.encode(), auth_key=auth_key))


def scan(attacker: str = ATTACKER, extensions: int = 25, key: str | None = None) -> list[bytes]:
    """svwar's REGISTER walk over extensions, each answered 404 by our registrar."""
    datagrams = []
    for extension in range(100, 100 + extensions):
        call_id = f"scan-{extension}"
        datagrams.append(
            packet(
                attacker,
                SERVER,
                f"REGISTER sip:{SERVER} SIP/2.0\r\n"
                f"Via: SIP/2.0/UDP {attacker}:5060;branch=z9hG4bK{extension}\r\n"
                f'From: "{extension}" <sip:{extension}@{SERVER}>;tag=1\r\nTo: <sip:{extension}@{SERVER}>\r\n'
                f"Call-ID: {call_id}\r\nCSeq: 1 REGISTER\r\nUser-Agent: friendly-scanner\r\n\r\n",
                key,
            )
        )
        datagrams.append(
            packet(
                SERVER,
                attacker,
                f"SIP/2.0 404 Not Found\r\nVia: SIP/2.0/UDP {attacker}:5060;branch=z9hG4bK{extension}\r\n"
                f"Call-ID: {call_id}\r\nCSeq: 1 REGISTER\r\n\r\n",
                key,
            )
        )
    return datagrams


def send(client: Client, datagrams: list[bytes], source: str = "127.0.0.1") -> None:
    udp_from(client, source, *datagrams)


async def detections(client: Client, query: str = "") -> list[dict[str, Any]]:
    response = await client.get(f"/api/v1/detections{query}")
    assert response.status == 200
    body: dict[str, Any] = await response.json()
    return body["detections"]  # type: ignore[no-any-return]


async def test_a_scan_shows_in_detections_enrichment_sightings_status_and_metrics(
    agent: AgentFactory,
) -> None:
    client = await hep_agent(agent)
    send(client, scan())
    await until(lambda: client.app[COLLECTOR].stats.packets["udp"] == 50, "50 decoded packets")

    found = await detections(client)
    assert [d["ip"] for d in found] == [ATTACKER]
    assert set(found[0]["rules"]) == {"scanner-ua", "user-enumeration", "extension-scan"}
    assert found[0]["action"] == "serve"
    assert found[0]["served_because"] == "two different rules fired"
    assert await detections(client, "?rule=user-enumeration&action=serve") == found
    assert await detections(client, "?rule=toll-fraud") == []
    assert await detections(client, "?action=flag") == []
    assert await detections(client, f"?since={found[0]['since'] + 1}") == []
    for bad in ("?rule=nope", "?action=block", "?since=yesterday"):
        response = await client.get(f"/api/v1/detections{bad}")
        assert response.status == 400
        assert "error" in await response.json()

    body = {"data": {"sid": ["call-1"], "source_ip": [ATTACKER, "8.8.4.4"]}, "fromts": 1, "tots": 2}
    answer = orjson.loads(await (await client.post("/get/cdr", data=orjson.dumps(body))).read())
    assert "detected here: 1 (5.6.7.8)" in answer["call-1"]["summary"]
    assert answer["call-1"]["detected"] == [ATTACKER]
    detected = answer[ATTACKER]["detected"]
    assert detected["action"] == "serve"
    assert detected["since"].endswith(" UTC")
    assert detected["until"].endswith(" UTC")
    assert any(
        line.startswith("user-enumeration: requests for 5 users failed") for line in detected["evidence"]
    )
    assert "detected" not in answer["8.8.4.4"]

    sightings = (await (await client.get("/api/v1/sightings")).json())["sightings"]
    attacker = next(s for s in sightings if s["ip"] == ATTACKER)
    assert attacker["detected"]["rules"] == found[0]["rules"]

    status = (await (await client.get("/api/v1/status")).json())["detection"]
    assert status["enabled"] is True
    assert status["active"] == {"serve": 1, "flag": 0}
    assert status["findings"]["scanner-ua/flag"] == 1  # alone at first, then served with the second rule
    assert await metric(client, "hepsub_apiban_detections_active", action="serve") == 1
    assert (
        await metric(client, "hepsub_apiban_detections_total", action="serve", rule="user-enumeration") == 5
    )


async def test_detection_can_be_turned_off(agent: AgentFactory) -> None:
    client = await hep_agent(agent, HEPSUB_DETECT_ENABLED="false")
    send(client, scan())
    await until(lambda: client.app[COLLECTOR].stats.packets["udp"] == 50, "50 decoded packets")
    body = await (await client.get("/api/v1/detections")).json()
    assert body == {"detections": [], "enabled": False}
    assert (await (await client.get("/api/v1/status")).json())["detection"] == {"enabled": False}


async def test_forged_hep_accuses_no_one(agent: AgentFactory) -> None:
    client = await hep_agent(agent, HEPSUB_HEP_ALLOW_FROM="127.0.0.2/32", HEPSUB_HEP_AUTH_KEY=KEY)
    send(client, scan(key=KEY), source="127.0.0.3")  # outside hep.allow_from, right key
    send(client, scan(key="wrong-key"), source="127.0.0.2")  # allowed sender, wrong key
    send(client, scan(key=None), source="127.0.0.2")  # allowed sender, no key
    refusals = client.app[COLLECTOR].refusals.counts
    await until(lambda: sum(refusals.values()) == 150, "150 refusals")
    assert await detections(client) == []
    assert len(client.app[DETECTIONS]) == 0
    send(client, scan(key=KEY), source="127.0.0.2")  # the real capture agent
    await until(lambda: len(client.app[DETECTIONS]) == 1, "the detection")


async def test_detections_survive_a_restart(agent: AgentFactory) -> None:
    first = await hep_agent(agent)
    send(first, scan())
    await until(lambda: len(first.app[DETECTIONS]) == 1, "the detection")
    before = await detections(first)
    await first.close()  # the shutdown saves the book in state.dir

    second = await hep_agent(agent)
    after = await detections(second)
    assert after == before
    assert (second.app[DETECTIONS].dirty, len(second.app[DETECTIONS])) == (False, 1)
    # Seen again after the restart: its sighting is protected and says it is detected.
    send(second, scan(extensions=1))
    await until(lambda: second.app[SIGHTINGS].get(ATTACKER) is not None, "the sighting")
    assert second.app[SIGHTINGS].get(ATTACKER).protected  # type: ignore[union-attr]
    sightings = (await (await second.get("/api/v1/sightings")).json())["sightings"]
    assert next(s for s in sightings if s["ip"] == ATTACKER)["detected"]["ip"] == ATTACKER
