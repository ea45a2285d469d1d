"""/api/v1/sightings with a store: any agent lists what every agent saw, within
a few seconds, bounded by the route's limit; with the store failing, this agent's own view, said
to be partial. Two real agents, real UDP, a real PostgreSQL; the hung store is the ``Gate`` relay.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from typing import Any

import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient

from hepsub_apiban.formats.hep import build_hep3
from hepsub_apiban.keys import SHARED_SIGHTINGS, STORE_LINK
from hepsub_apiban.store import sightings as shared_sightings
from hepsub_apiban.store.database import Store

from .conftest import AgentFactory
from .test_collector import decoded, hep_agent, sip_packet, udp_send, until
from .test_shared_sightings import Gate, agent_behind_hung_store, gate, stores  # noqa: F401 (fixtures used below)

Client = TestClient[web.Request, web.Application]
SCANNER = "45.6.7.8"
ONLY_A = "45.1.1.1"
ONLY_B = "45.2.2.2"


async def listing(client: Client, query: str = "") -> dict[str, Any]:
    response = await client.get(f"/api/v1/sightings{query}")
    assert response.status == 200
    body: dict[str, Any] = await response.json()
    return body


def by_ip(body: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {s["ip"]: s for s in body["sightings"]}


async def test_any_agent_lists_what_every_agent_saw_within_a_few_seconds(
    store_url: str, agent: AgentFactory
) -> None:
    a = await hep_agent(agent, HEPSUB_STORE_URL=store_url, HEPSUB_STATE_DIR=str(agent.tmp_path / "a"))
    b = await hep_agent(agent, HEPSUB_STORE_URL=store_url, HEPSUB_STATE_DIR=str(agent.tmp_path / "b"))
    for client in (a, b):
        link = client.app[STORE_LINK]
        await until(lambda link=link: link.status.connected, "the store connected")
    udp_send(b, build_hep3(sip_packet(SCANNER, method="INVITE", call_id="b1")))
    udp_send(b, build_hep3(sip_packet(ONLY_B, call_id="b2")))
    await until(lambda: decoded(b, "udp") == 2, "B's packets")
    began = time.monotonic()
    udp_send(a, *(build_hep3(sip_packet(SCANNER, call_id=f"a{n}")) for n in range(3)))
    udp_send(a, build_hep3(sip_packet(ONLY_A, call_id="a9")))
    await until(lambda: decoded(a, "udp") == 4, "A's packets")
    while True:
        body = await listing(b)
        seen = by_ip(body)
        if SCANNER in seen and seen[SCANNER]["packets"] == 4 and ONLY_A in seen:
            break
        assert time.monotonic() - began < 3.0, body
        await asyncio.sleep(0.1)
    assert body["partial"] is False
    assert seen[SCANNER]["methods"] == {"REGISTER": 3, "INVITE": 1}
    assert seen[ONLY_A]["packets"] == 1  # an address B never saw
    assert seen[ONLY_B]["packets"] == 1  # one only B saw, written or not
    # Newest first, and the limit bounds the merged answer.
    times = [s["last_seen"] for s in body["sightings"]]
    assert times == sorted(times, reverse=True)
    limited = await listing(b, "?limit=2")
    assert len(limited["sightings"]) == 2
    assert limited["partial"] is False
    # A's view is the same sum.
    assert by_ip(await listing(a))[SCANNER]["packets"] == 4


async def test_a_hung_store_leaves_the_local_view_and_says_it_is_partial(
    store_url: str,
    gate: Gate,  # noqa: F811 (the fixture)
    stores: Callable[..., Awaitable[Store]],  # noqa: F811 (the fixture)
    agent: AgentFactory,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(shared_sightings, "RECENT_TIMEOUT", 0.3)
    b = await agent_behind_hung_store(agent, gate, stores, store_url)
    sharing = b.app[SHARED_SIGHTINGS]
    began = time.monotonic()
    body = await listing(b)
    assert time.monotonic() - began < 2.0
    assert body["partial"] is True
    assert by_ip(body)[SCANNER]["packets"] == 1
    assert sharing.stats.read_failures == 1
    # The next listings do not ask the hung store again for a while: no wait, still partial.
    began = time.monotonic()
    for _ in range(3):
        assert (await listing(b))["partial"] is True
    assert time.monotonic() - began < 0.3
    assert (sharing.stats.read_failures, sharing.stats.reads_skipped) == (1, 3)
    gate.holding = False


async def test_without_a_store_the_listing_is_as_before(agent: AgentFactory) -> None:
    client = await hep_agent(agent)
    udp_send(client, build_hep3(sip_packet(SCANNER)))
    await until(lambda: decoded(client, "udp") == 1, "the packet")
    body = await listing(client)
    assert set(body) == {"sightings", "total"}
    assert SCANNER in by_ip(body)
