"""Check mode, several agents, one APIBAN key: one request budget for the key, kept in the store.

Against a real PostgreSQL (tests/postgres.py) and the APIBAN fake enforcing 11 requests per 120 s.
The agents' own budgets and the fake run on one manual clock that the tests move; the store's
window is judged by the database's clock (real seconds), which does not move much in a test, so
a window that must slide (the last test) uses a short real one.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer

from hepsub_apiban.app import Clocks
from hepsub_apiban.core.config import RateLimit, StoreSettings
from hepsub_apiban.core.ratelimit import Budget
from hepsub_apiban.fakes.apiban import FakeApiban
from hepsub_apiban.keys import APIBAN, STORE_LINK
from hepsub_apiban.store import budget as shared_budget
from hepsub_apiban.store.budget import SharedBudget
from hepsub_apiban.store.database import Store

from . import test_shared_sightings
from .conftest import APIBAN_KEY, AgentFactory, ApibanPeer, ManualClock
from .test_shared_mirror import BOUND, max_in_any_window, until
from .test_shared_sightings import Gate

Client = TestClient[web.Request, web.Application]
gate = test_shared_sightings.gate  # the fixture: a TCP relay to the store that the test can shut


def addresses(count: int, third: int = 0) -> list[str]:
    return [f"45.9.{third}.{i}" for i in range(1, count + 1)]


def shared(client: Client) -> SharedBudget:
    budget = client.app[STORE_LINK].shared_budget
    assert budget is not None
    return budget


async def connected(client: Client) -> None:
    await until(lambda: shared(client)._store is not None)


async def check(client: Client, ip: str) -> dict[str, Any]:
    response = await client.get(f"/api/v1/check/{ip}")
    assert response.status == 200
    body: dict[str, Any] = await response.json()
    return body


class Rig:
    def __init__(self, clock: ManualClock, fake: FakeApiban, agents: list[Client]) -> None:
        self.clock, self.fake, self.agents = clock, fake, agents

    def accepted(self) -> list[float]:
        return [r.at for r in self.fake.requests if r.status != 429]


@pytest.fixture
async def rig(
    aiohttp_server: Callable[..., Awaitable[TestServer]],
    aiohttp_client: Callable[[web.Application], Awaitable[Client]],
    tmp_path: Path,
    store_url: str,
) -> AsyncIterator[Callable[..., Awaitable[Rig]]]:
    clock = ManualClock()
    fake = FakeApiban(keys=[APIBAN_KEY], clock=clock, wall_clock=clock)
    server = await aiohttp_server(fake.app())
    peer = ApibanPeer(fake, str(server.make_url("")).rstrip("/"))

    async def start(url: str = store_url, count: int = 2, **env: str) -> Rig:
        clocks = Clocks(monotonic=clock, wall=clock, sleep=clock.sleep)
        agents = [
            await AgentFactory(tmp_path / f"agent{n}", aiohttp_client, peer)(
                clocks, HEPSUB_STORE_URL=url, **env
            )
            for n in range(count)
        ]
        return Rig(clock, fake, agents)

    yield start
    fake.release()


async def test_two_agents_bursting_on_one_key_send_at_most_the_limit_and_never_get_429(
    rig: Callable[..., Awaitable[Rig]],
) -> None:
    setup = await rig()
    a, b = setup.agents
    for client in (a, b):
        await connected(client)
    listed = addresses(40)[::5]
    for ip in listed:
        setup.fake.add(ip)
    # 40 new addresses on each agent at once: each agent's own budget would send 11, 22 in all.
    answers = await asyncio.gather(
        *(check(client, ip) for ip in addresses(40) for client in (a, b)),
    )
    assert setup.fake.request_count("check") == 11
    assert all(r.status != 429 for r in setup.fake.requests)
    assert max_in_any_window(setup.accepted(), 120.0) <= 11
    checked = [answer for answer in answers if answer["source"] == "check"]
    assert len(checked) == 11
    assert all(answer["listed"] is (answer["ip"] in listed) for answer in checked)
    # The others answer as an agent whose budget is spent: unknown for now, never an error.
    unanswered = [answer for answer in answers if answer["source"] != "check"]
    assert unanswered
    assert all(answer["listed"] is None and answer["source"] == "unavailable" for answer in unanswered)
    assert any("shared by the 2 agents of this key" in answer["reason"] for answer in unanswered)
    # Both agents had a part: the store's window, not one agent's, was the limit.
    granted = [shared(client).stats.granted for client in (a, b)]
    assert sum(granted) == 11
    # A refused request was not counted by the agent's own budget: it may still spend its own 11.
    assert [client.app[APIBAN].budget.used() for client in (a, b)] == granted
    for client in (a, b):
        status = await (await client.get("/api/v1/status")).json()
        budget = status["store"]["budget"]
        assert budget["shared"] is True
        assert budget["agents"] == 2
        assert budget["refused"] > 0
        metrics = await (await client.get("/metrics")).text()
        assert "hepsub_apiban_store_budget_shared 1.0" in metrics
        assert 'hepsub_apiban_store_budget_requests_total{outcome="refused"}' in metrics
    # Still within the window (the database's clock has hardly moved): nothing more goes out.
    setup.clock.advance(121.0)  # the agents' own windows are free again; the key's is not
    assert (await check(a, "45.9.1.1"))["source"] == "unavailable"
    assert setup.fake.request_count("check") == 11


async def test_a_429_blocks_every_agent_of_the_key(rig: Callable[..., Awaitable[Rig]]) -> None:
    setup = await rig()
    a, b = setup.agents
    for client in (a, b):
        await connected(client)
    setup.fake.rate_limit = (0, 120.0)  # APIBAN's window is full, whatever the agents counted
    refused = await check(a, "45.9.0.1")
    assert refused["listed"] is None
    assert [r.status for r in setup.fake.requests] == [429]
    await until(lambda: shared(a).stats.blocks == 1)
    setup.fake.rate_limit = (11, 120.0)
    answer = await check(b, "45.9.0.2")
    assert answer["source"] == "unavailable"
    assert "shared by the 2 agents" in answer["reason"]
    assert setup.fake.request_count() == 1  # b sent nothing into the blocked window


async def test_while_the_store_is_down_an_agent_waits_a_window_then_spends_its_share(
    rig: Callable[..., Awaitable[Rig]], gate: Gate, store_url: str
) -> None:
    setup = await rig(gate.url(store_url), count=2)
    a, b = setup.agents
    for client in (a, b):
        await connected(client)
    assert (await check(b, "45.9.0.1"))["source"] == "check"  # b is known to the store: 2 agents
    assert (await check(a, "45.9.0.2"))["source"] == "check"
    await gate.shut()
    # The first window of an outage: the other agents' requests in it are unknown, so none.
    first = await check(a, "45.9.0.3")
    assert first["source"] == "unavailable"
    assert "no APIBAN request for one window" in first["reason"]
    status = (await (await a.get("/api/v1/status")).json())["store"]["budget"]
    assert status["shared"] is False
    assert status["fallback_allowance"] == 5  # 11 // 2 agents
    assert 0 < status["fallback_opens_in"] <= 120.0
    metrics = await (await a.get("/metrics")).text()
    assert "hepsub_apiban_store_budget_shared 0.0" in metrics
    sent = setup.fake.request_count()
    setup.clock.advance(121.0)
    answers = [await check(a, ip) for ip in addresses(8, third=3)]
    assert [answer["source"] for answer in answers] == ["check"] * 5 + ["unavailable"] * 3
    assert "share of the APIBAN budget (5 of 11/120 s, 2 agents) is spent" in answers[-1]["reason"]
    assert setup.fake.request_count() == sent + 5
    assert all(r.status != 429 for r in setup.fake.requests)
    # The store back: the shared window again (the pause after a failure has passed on the clock).
    await gate.open()
    setup.clock.advance(shared_budget.PAUSE)
    await until(lambda: a.app[STORE_LINK].status.connected)
    assert (await check(a, "45.9.4.1"))["source"] == "check"
    assert shared(a).shared


async def test_the_shared_window_slides_by_the_database_clock(
    aiohttp_server: Callable[..., Awaitable[TestServer]],
    aiohttp_client: Callable[[web.Application], Awaitable[Client]],
    tmp_path: Path,
    store_url: str,
) -> None:
    # Real time throughout: the fake counts 3 per 1 s on the test's clock, the store on its own.
    fake = FakeApiban(keys=[APIBAN_KEY], rate_limit=(3, 1.0))
    server = await aiohttp_server(fake.app())
    peer = ApibanPeer(fake, str(server.make_url("")).rstrip("/"))
    agents = [
        await AgentFactory(tmp_path / name, aiohttp_client, peer)(
            HEPSUB_STORE_URL=store_url, HEPSUB_APIBAN_RATE_LIMIT="3/1"
        )
        for name in ("a", "b")
    ]
    for client in agents:
        await connected(client)
    loop = asyncio.get_running_loop()
    ends = loop.time() + 4.5
    n = 0
    async with asyncio.timeout(BOUND):
        while loop.time() < ends:
            n += 1
            await asyncio.gather(*(check(client, f"45.8.{n}.{i}") for i, client in enumerate(agents)))
            await asyncio.sleep(0.05)
    accepted = [r.at for r in fake.requests if r.status != 429]
    assert all(r.status != 429 for r in fake.requests)
    assert max_in_any_window(accepted, 1.0) <= 3
    # 3 per window of 1 s and the store's second of slack: about 3 every 2 s, so at least 6.
    assert len(accepted) >= 6


@pytest.fixture
async def stores(store_url: str) -> AsyncIterator[Callable[[], Awaitable[Store]]]:
    opened: list[Store] = []

    async def open_store() -> Store:
        store = await Store.connect(StoreSettings(store_url))
        await store.migrate()
        opened.append(store)
        return store

    yield open_store
    for store in opened:
        await store.close()


async def test_many_agents_asking_at_once_get_exactly_the_limit(
    stores: Callable[[], Awaitable[Store]],
) -> None:
    # Eight agents, each with its own connections, five requests each, all at the same moment:
    # the row's UPDATE is re-checked on its newest version, so the eleventh slot goes once.
    budgets = []
    for n in range(8):
        budget = SharedBudget(
            Budget(RateLimit(11, 120.0), ManualClock()), "source-x", f"agent-{n}", timeout=10.0
        )
        budget.attach(await stores())
        budgets.append(budget)
    answers = await asyncio.gather(*(budget.admit() for budget in budgets for _ in range(5)))
    assert sum(answer is None for answer in answers) == 11
    assert sum(budget.stats.granted for budget in budgets) == 11
    assert all(budget.shared for budget in budgets)
    late = SharedBudget(Budget(RateLimit(11, 120.0), ManualClock()), "source-x", "agent-late")
    late.attach(await stores())
    assert await late.admit() is not None  # the window is full, for a ninth agent too
    assert late.agents == 9  # the eight that asked and itself: its fallback share would be 11 // 9
    assert late.fallback_allowance() == 1


async def test_a_new_puller_takes_over_the_window_its_predecessor_recorded(
    stores: Callable[[], Awaitable[Store]],
) -> None:
    old_clock, new_clock = ManualClock(), ManualClock(5_000.0)  # two hosts' clocks disagree
    old = SharedBudget(Budget(RateLimit(11, 120.0), old_clock), "source-y", "old", gating=False)
    old.attach(await stores())
    for _ in range(4):
        assert await old.admit() is None  # recorded, never refused: the puller's own budget decides
    old.block_for(0.0)  # a 429 of no length: the key is not blocked
    await asyncio.gather(*old._writes)
    local = Budget(RateLimit(11, 120.0), new_clock)
    local.shut_for(365 * 86400.0)  # it was a follower
    new = SharedBudget(local, "source-y", "new", gating=False)
    new.attach(await stores())
    await new.adopt_window()
    assert local.used() == 4  # the predecessor's requests, counted as sent now
    assert local.headroom() == 7
    assert local.wait_time(reserve=8) == pytest.approx(120.0)
    new_clock.advance(120.0)
    assert local.used() == 0


def test_a_refund_gives_back_that_request_not_a_later_one() -> None:
    clock = ManualClock()
    budget = Budget(RateLimit(3, 10.0), clock)
    first = budget.take()
    clock.advance(4.0)
    assert budget.take() is not None
    assert first is not None
    budget.refund(first)  # the first was refused by the shared window; the second went out
    clock.advance(7.0)  # 11 s after the first, 7 after the second
    assert budget.used() == 1
    assert budget.wait_time(reserve=2) == pytest.approx(3.0)
