"""Several agents on one APIBAN key through the store: one puller, the others follow.

Against a real PostgreSQL (tests/postgres.py) and the APIBAN fake enforcing 11 requests per
120 s on the same manual clock as the agents' budgets and sync loops; the lease is judged by
the database's own clock, so lease times here are real seconds (shortened for the tests).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path

import asyncpg
import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer

from hepsub_apiban.apiban.mirror import Mirror
from hepsub_apiban.app import Clocks
from hepsub_apiban.core.config import StoreSettings
from hepsub_apiban.fakes.apiban import FakeApiban
from hepsub_apiban.keys import MIRROR_SYNC, STORE_LINK
from hepsub_apiban.store import link as shared_mirror
from hepsub_apiban.store import shared_list
from hepsub_apiban.store.database import SCHEMA, Store
from hepsub_apiban.store.link import StoreLink
from hepsub_apiban.store.shared_list import LeaseLost, MirrorStore

from .conftest import APIBAN_KEY, HOMER_BODY_1, AgentFactory, ApibanPeer, ManualClock
from .postgres import PASSWORD, free_port
from .test_shared_sightings import Gate, gate  # noqa: F401 (the fixture)

Client = TestClient[web.Request, web.Application]
BOUND = 60.0  # real seconds any wait here may take before the test fails


def ips(count: int) -> list[str]:
    return [f"45.{(i >> 16) & 255}.{(i >> 8) & 255}.{i & 255}" for i in range(count)]


QUICK_LEASE = "3"  # store.lease_ttl: a lease of 3 s renewed every second


@pytest.fixture
def quick_lease(monkeypatch: pytest.MonkeyPatch) -> float:
    """With QUICK_LEASE, followers polling every 0.1 s: the same protocol, faster."""
    monkeypatch.setattr(shared_mirror, "FOLLOW_EVERY", 0.1)
    return float(QUICK_LEASE)


class Pair:
    """Two agents on one key, one store, one APIBAN fake, one manual clock."""

    def __init__(self, clock: ManualClock, fake: FakeApiban, a: Client, b: Client) -> None:
        self.clock, self.fake, self.agents = clock, fake, (a, b)

    @staticmethod
    def link(client: Client) -> StoreLink:
        return client.app[STORE_LINK]

    @staticmethod
    def mirror(client: Client) -> Mirror:
        return client.app[MIRROR_SYNC].mirror

    async def roles(self) -> tuple[Client, Client]:
        """(puller, follower), once the lease is decided."""
        await until(lambda: {self.link(c).status.role for c in self.agents} == {"puller", "follower"})
        a, b = self.agents
        return (a, b) if self.link(a).status.role == "puller" else (b, a)

    async def drive(self, done: Callable[[], bool]) -> None:
        """Let whichever sync sleeps on the clock go on, with time moved by what it asked, until done()."""
        async with asyncio.timeout(BOUND):
            while not done():
                sleeper = self.clock._sleeper
                if sleeper is not None and not sleeper.done():
                    self.clock.wake()
                await asyncio.sleep(0.002)

    def accepted(self) -> list[float]:
        return [r.at for r in self.fake.requests if r.status != 429]


async def until(done: Callable[[], bool]) -> None:
    """Poll with a bound: what is awaited happens in another agent's task or in the database."""
    async with asyncio.timeout(BOUND):
        while not done():  # noqa: ASYNC110
            await asyncio.sleep(0.01)


@pytest.fixture
async def pair(
    aiohttp_server: Callable[..., Awaitable[TestServer]],
    aiohttp_client: Callable[[web.Application], Awaitable[Client]],
    tmp_path: Path,
    store_url: str,
    quick_lease: float,
) -> AsyncIterator[Callable[[int], Awaitable[Pair]]]:
    clock = ManualClock()
    fake = FakeApiban(keys=[APIBAN_KEY], clock=clock, wall_clock=clock)
    server = await aiohttp_server(fake.app())
    peer = ApibanPeer(fake, str(server.make_url("")).rstrip("/"))
    clocks = Clocks(monotonic=clock, wall=clock, sleep=clock.sleep)

    async def start(listed: int) -> Pair:
        fake.add_many(ips(listed))
        agents = [
            await AgentFactory(tmp_path / name, aiohttp_client, peer)(
                clocks,
                HEPSUB_APIBAN_MODE="mirror",
                HEPSUB_STORE_URL=store_url,
                HEPSUB_STORE_LEASE_TTL=QUICK_LEASE,
            )
            for name in ("a", "b")
        ]
        return Pair(clock, fake, agents[0], agents[1])

    yield start
    fake.release()


def max_in_any_window(times: list[float], window: float) -> int:
    return max((sum(1 for t in times[i:] if t < start + window) for i, start in enumerate(times)), default=0)


async def test_two_agents_on_one_key_pull_the_list_once_and_both_answer_from_memory(
    pair: Callable[[int], Awaitable[Pair]],
) -> None:
    rig = await pair(20_000)
    puller, follower = await rig.roles()
    await rig.drive(lambda: len(rig.mirror(puller).entries) >= 5_000)
    # Mid-pull, a follower's lookup of an address it cannot answer yet costs the key nothing.
    early = await (await follower.get("/api/v1/check/8.8.8.8")).json()
    assert early["source"] == "unavailable"
    await rig.drive(lambda: rig.mirror(puller).loaded)
    await until(lambda: rig.mirror(follower).loaded)
    # One agent needs 80 pages of 250 and one "no new bans": so do two.
    assert rig.fake.request_count("banned") == 81
    assert rig.fake.request_count() == 81
    assert all(r.status != 429 for r in rig.fake.requests)
    assert max_in_any_window(rig.accepted(), 120.0) <= 11
    assert len(rig.mirror(follower).entries) == 20_000
    assert rig.mirror(follower).serials == rig.mirror(puller).serials  # one site-API numbering
    for client in (puller, follower):
        listed = await (await client.get(f"/api/v1/check/{ips(20_000)[12_345]}")).json()
        assert listed["source"] == "mirror"
        assert listed["listed"] is True
        unlisted = await (await client.get("/api/v1/check/8.8.8.8")).json()
        assert unlisted["source"] == "mirror"
        assert unlisted["listed"] is False
        status = await (await client.get("/api/v1/status")).json()
        assert status["store"]["connected"] is True
        assert status["store"]["schema_version"] >= 1
        assert PASSWORD not in status["store"]["url"]
    assert rig.fake.request_count() == 81  # the lookups sent nothing upstream
    roles = {(await (await c.get("/api/v1/status")).json())["store"]["role"] for c in rig.agents}
    assert roles == {"puller", "follower"}
    metrics = await (await puller.get("/metrics")).text()
    assert "hepsub_apiban_store_connected 1.0" in metrics
    assert "hepsub_apiban_store_apiban_puller 1.0" in metrics


async def test_the_puller_dies_mid_pull_and_the_other_finishes_from_the_stored_cursor(
    pair: Callable[[int], Awaitable[Pair]], quick_lease: float
) -> None:
    rig = await pair(5_000)
    puller, follower = await rig.roles()
    await rig.drive(lambda: len(rig.mirror(puller).entries) >= 1_500)
    # Stopped where it sleeps: every page it received is written (a page is saved before the sleep).
    await until(lambda: rig.clock._sleeper is not None and not rig.clock._sleeper.done())
    pages_before = rig.fake.request_count("banned")
    await until(lambda: len(rig.mirror(follower).entries) == len(rig.mirror(puller).entries))
    # Killed: its task ends without releasing the lease, which lapses by the database's clock.
    task = rig.link(puller).task
    assert task is not None
    task.cancel()
    died = time.monotonic()
    await until(lambda: rig.link(follower).status.role == "puller")
    assert time.monotonic() - died <= quick_lease + 1.0
    await rig.drive(lambda: rig.mirror(follower).loaded)
    assert set(rig.mirror(follower).entries) == set(ips(5_000))
    # 20 pages and "no new bans", each asked once: the pull went on from the cursor, not from the start.
    assert pages_before < 21
    assert rig.fake.request_count("banned") == 21
    assert all(r.status != 429 for r in rig.fake.requests)


async def test_a_store_that_is_down_does_not_stop_the_agent(agent: AgentFactory) -> None:
    url = f"postgresql://hepsub:{PASSWORD}@127.0.0.1:{free_port()}/hepsub"
    client = await agent(HEPSUB_STORE_URL=url)
    answer = await client.post("/get/cdr", data=HOMER_BODY_1, headers={"Content-Type": "application/json"})
    assert answer.status == 200
    await until(lambda: client.app[STORE_LINK].status.last_error is not None)
    status = await (await client.get("/api/v1/status")).json()
    store = status["store"]
    assert store["connected"] is False
    assert store["role"] is None
    assert store["url"] == f"postgresql://hepsub:***@127.0.0.1:{url.rsplit(':', 1)[1].split('/')[0]}/hepsub"
    assert PASSWORD not in str(status)
    assert (await client.get("/readyz")).status == 200  # readiness is about lookups, not the store
    metrics = await (await client.get("/metrics")).text()
    assert "hepsub_apiban_store_connected 0.0" in metrics


async def test_without_a_store_url_there_is_no_store(agent: AgentFactory) -> None:
    client = await agent()
    status = await (await client.get("/api/v1/status")).json()
    assert status["store"] is None
    assert STORE_LINK not in client.app


@pytest.fixture
async def store(store_url: str) -> AsyncIterator[Store]:
    connected = await Store.connect(StoreSettings(store_url))
    await connected.migrate()
    yield connected
    await connected.close()


async def test_a_write_under_a_lease_that_changed_hands_is_refused_and_changes_nothing(store: Store) -> None:
    shared = MirrorStore(store, "source-1")
    await shared.ensure_source()
    mirror = Mirror()
    mirror.changed = set()
    mirror.add(["45.0.0.1", "45.0.0.2"], "1700000001", 1_700_000_000.0)
    old = await store.try_acquire("apiban-puller:source-1", "agent-a", 30.0)
    assert old is not None
    assert await shared.save(mirror, mirror.changed, old, 1_700_000_000.0) == 1
    assert await store.release("apiban-puller:source-1", "agent-a")
    new = await store.try_acquire("apiban-puller:source-1", "agent-b", 30.0)
    assert new is not None
    assert new.epoch == old.epoch + 1
    mirror.add(["45.0.0.3"], "1700000002", 1_700_000_001.0)
    with pytest.raises(LeaseLost):
        await shared.save(mirror, {"45.0.0.3"}, old, 1_700_000_001.0)
    assert await shared.version() == 1
    follower = Mirror()
    assert await shared.apply_changes(follower, 0) == 1
    assert set(follower.entries) == {"45.0.0.1", "45.0.0.2"}


async def test_a_first_publish_renumbers_entries_at_or_below_an_id_already_handed_out(store: Store) -> None:
    # Another agent told the store its own list's last ID (store/detections.py does so when it joins);
    # its site clients may have paged to there. This puller's list, numbered a moment later in
    # memory, overlaps that range: the overlapping entries move above it, keeping their order, so a
    # client resuming from that ID still sees them; the rest keep their serials.
    shared = MirrorStore(store, "source-4")
    await shared.ensure_source()
    lease = await store.try_acquire("apiban-puller:source-4", "agent-b", 30.0)
    assert lease is not None
    puller = Mirror()
    puller.changed = set()
    now = 1_700_000_000.0
    listed = [f"45.0.1.{i}" for i in range(1, 11)]
    puller.add(listed, "1700000001", now)
    before = dict(puller.serials)
    handed_out = before[listed[3]]  # the other agent's last ID falls on the fourth entry
    await store.pool.execute(f"UPDATE {SCHEMA}.detection_counter SET serial = $1", handed_out)
    await shared.save(puller, puller.changed, lease, now)

    assert [puller.serials[ip] for ip in listed[4:]] == [before[ip] for ip in listed[4:]]
    moved = [puller.serials[ip] for ip in listed[:4]]
    assert moved == sorted(moved)
    assert min(moved) > max(before.values()) > handed_out
    order = [ip for _, ip in puller.after(0)]
    assert order == [*listed[4:], *listed[:4]]
    follower = Mirror()
    await shared.apply_changes(follower, 0)
    assert follower.serials == puller.serials
    assert follower.next_serial > max(moved)


async def test_a_follower_applies_additions_and_removals_and_keeps_tombstones(store: Store) -> None:
    shared = MirrorStore(store, "source-2")
    await shared.ensure_source()
    lease = await store.try_acquire("apiban-puller:source-2", "agent-a", 30.0)
    assert lease is not None
    puller = Mirror()
    puller.changed = set()
    puller.begin_full_pull(1_700_000_000.0)
    puller.add(["45.0.0.1", "45.0.0.2", "2a01:4f8::5"], "1700000001", 1_700_000_000.0)
    puller.complete_full_pull(1_700_000_000.0)
    await shared.save(puller, puller.changed, lease, 1_700_000_000.0)
    follower = Mirror()
    held = await shared.apply_changes(follower, 0)
    assert follower.loaded
    assert follower.serials == puller.serials
    puller.changed = set()
    later = 1_700_000_000.0 + 8 * 86400  # past APIBAN's 7 days: all expire
    puller.add(["45.0.0.9"], "1700000009", later)
    puller.expire(later)
    version = await shared.save(puller, puller.changed, lease, later)
    assert await shared.apply_changes(follower, held) == version
    assert set(follower.entries) == {"45.0.0.9"}
    assert follower.serials == puller.serials
    assert {verdict.ip for _, verdict, _ in follower.removed} == {"45.0.0.1", "45.0.0.2", "2a01:4f8::5"}
    assert [serial for _, serial in follower.after(0)] == [serial for _, serial in puller.after(0)]

    # A week on, the removed rows go (the mirror's own tombstones last as long); the live one stays.
    week = later + shared_list.TOMBSTONE_SECONDS + 1
    puller.add(["45.0.0.10"], "1700000010", week)
    await shared.save(puller, puller.changed, lease, week)
    rows = await store.pool.fetch("SELECT host(ip) AS ip, removed_at FROM hepsub.apiban_entries")
    assert {row["ip"] for row in rows} == {"45.0.0.9", "45.0.0.10"}
    assert shared.pruned == 3


async def test_the_puller_keeps_its_lease_when_the_store_drops_its_connections(
    agent: AgentFactory, apiban: ApibanPeer, store_url: str, quick_lease: float
) -> None:
    apiban.fake.add_many(ips(10))
    client = await agent(
        HEPSUB_APIBAN_MODE="mirror", HEPSUB_STORE_URL=store_url, HEPSUB_STORE_LEASE_TTL=QUICK_LEASE
    )
    link = client.app[STORE_LINK]
    await until(lambda: link.status.role == "puller" and client.app[MIRROR_SYNC].mirror.loaded)
    mine = "SELECT pid FROM pg_stat_activity WHERE datname = current_database() AND application_name = $1"
    admin = await asyncpg.connect(store_url)
    try:
        dropped = {row["pid"] for row in await admin.fetch(mine, "hepsub-apiban")}
        await admin.fetch(f"SELECT pg_terminate_backend(pid) FROM ({mine}) AS agent", "hepsub-apiban")
        expires = await admin.fetchval("SELECT expires_at FROM hepsub.leases")
        renewed = False
        async with asyncio.timeout(BOUND):
            while not renewed:  # a renewal after the connections were cut: the pool opened new ones
                await asyncio.sleep(0.05)
                renewed = await admin.fetchval("SELECT expires_at FROM hepsub.leases") > expires
        now = {row["pid"] for row in await admin.fetch(mine, "hepsub-apiban")}
    finally:
        await admin.close()
    assert dropped
    assert now
    assert not now & dropped
    assert link.status.connected
    assert link.status.role == "puller"
    listed = await (await client.get(f"/api/v1/check/{ips(10)[3]}")).json()
    assert listed["source"] == "mirror"


async def test_entries_numbered_before_a_detection_id_was_taken_are_written_above_it(store: Store) -> None:
    shared = MirrorStore(store, "source-3")
    await shared.ensure_source()
    lease = await store.try_acquire("apiban-puller:source-3", "agent-a", 30.0)
    assert lease is not None
    now = 1_700_000_000.0
    puller = Mirror()
    puller.changed = set()
    puller.begin_full_pull(now)
    puller.add(["45.0.0.1", "45.0.0.2"], "1700000001", now)
    await shared.save(puller, puller.changed, lease, now)
    written = dict(puller.serials)
    # The next page is numbered in memory; before it is written, another agent's detection takes
    # an ID above those numbers (what store/detections.py does under the counter's lock).
    puller.changed = set()
    puller.add(["45.0.0.3", "45.0.0.4"], "1700000002", now)
    page = {ip: puller.serials[ip] for ip in ("45.0.0.3", "45.0.0.4")}
    detection_id = max(page.values()) + 5
    await store.pool.execute("UPDATE hepsub.detection_counter SET serial = $1", detection_id)
    puller.add(["45.0.0.1"], "1700000002", now)  # a full pull re-reports an entry already written
    await shared.save(puller, puller.changed, lease, now)
    rows = {
        r["ip"]: r["serial"]
        for r in await store.pool.fetch("SELECT host(ip) AS ip, serial FROM hepsub.apiban_entries")
    }
    assert rows == puller.serials
    assert all(rows[ip] > detection_id for ip in page)
    assert rows["45.0.0.3"] < rows["45.0.0.4"]  # in the order they were numbered
    assert {ip: rows[ip] for ip in written} == written  # written before: their serials stay
    stored_next = await store.pool.fetchval(
        "SELECT next_serial FROM hepsub.apiban_sources WHERE source = 'source-3'"
    )
    assert stored_next > max(rows.values())


async def test_a_store_down_for_long_leaves_the_agent_pulling_alone_with_half_the_budget(
    aiohttp_server: Callable[..., Awaitable[TestServer]],
    aiohttp_client: Callable[[web.Application], Awaitable[Client]],
    tmp_path: Path,
    store_url: str,
    gate: Gate,  # noqa: F811 (the fixture)
    monkeypatch: pytest.MonkeyPatch,
    quick_lease: float,
) -> None:
    monkeypatch.setattr(shared_mirror, "ALONE_AFTER", 0.0)  # at the first failure, not after 5 minutes
    monkeypatch.setattr(shared_mirror, "RECONNECT_MAX", 0.5)
    await gate.shut()  # the store is down from the start
    clock = ManualClock()
    fake = FakeApiban(keys=[APIBAN_KEY], clock=clock, wall_clock=clock)
    fake.add_many(ips(3_000))
    server = await aiohttp_server(fake.app())
    peer = ApibanPeer(fake, str(server.make_url("")).rstrip("/"))
    client = await AgentFactory(tmp_path, aiohttp_client, peer)(
        Clocks(monotonic=clock, wall=clock, sleep=clock.sleep),
        HEPSUB_APIBAN_MODE="mirror",
        HEPSUB_STORE_URL=gate.url(store_url),
        HEPSUB_STORE_LEASE_TTL=QUICK_LEASE,
    )
    rig = Pair(clock, fake, client, client)
    link = rig.link(client)
    await until(lambda: link.status.role == "alone")
    await rig.drive(lambda: rig.mirror(client).loaded)
    assert len(rig.mirror(client).entries) == 3_000
    # 12 pages and "no new bans", at most 5 of the key's 11 requests in any window: another agent
    # of the key cut off from the store the same way may spend the other half.
    assert rig.fake.request_count("banned") == 13
    assert max_in_any_window(rig.accepted(), 120.0) <= 5
    assert all(r.status != 429 for r in rig.fake.requests)
    status = await (await client.get("/api/v1/status")).json()
    assert status["store"]["role"] == "alone"
    # The store back: the agent takes the lease and publishes what it pulled for the others.
    await gate.open()
    await until(lambda: link.status.role == "puller")

    async def published() -> int:
        connection = await asyncpg.connect(store_url)
        try:
            count: int = await connection.fetchval("SELECT count(*) FROM hepsub.apiban_entries")
            return count
        finally:
            await connection.close()

    async with asyncio.timeout(BOUND):
        while await published() < 3_000:  # noqa: ASYNC110 (the database's count, not an event)
            await asyncio.sleep(0.05)
    # Published, not pulled again: the puller's sync goes on from the cursor (one "anything new?").
    starts = [r for r in rig.fake.requests if r.kind == "banned" and r.asked in (None, "100")]
    assert len(starts) == 1
    assert rig.fake.request_count("banned") <= 14
    assert all(r.status != 429 for r in rig.fake.requests)
    fake.release()
