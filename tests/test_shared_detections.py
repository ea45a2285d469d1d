"""Served detections shared by agents through the store: one row per address, one ID
every agent's site API and decision stream serves, ends that reach every agent, and an outage of
the store that loses nothing.

Against a real PostgreSQL (tests/postgres.py); the store "going away" is the TCP relay ``Gate`` of
tests/test_shared_sightings.py. Detections reach agent A as real HEP over UDP (the scan of
tests/test_detection_agent.py); the book-level tests report findings to books directly.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import asyncpg
import orjson
import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient

from hepsub_apiban.apiban.mirror import CurrentMirror, Mirror
from hepsub_apiban.app import Clocks
from hepsub_apiban.core.addresses import NetworkSet
from hepsub_apiban.core.config import DetectSettings
from hepsub_apiban.detection.book import MAX_DURATION, Detection, Detections
from hepsub_apiban.detection.detector import PROOF_NONCE, PROOF_TCP, Finding
from hepsub_apiban.keys import DETECTIONS, MIRROR_SYNC, SHARED_DETECTIONS, STORE_LINK
from hepsub_apiban.site.blocklist import Blocklist
from hepsub_apiban.store import detections as shared_detections
from hepsub_apiban.store import link as shared_mirror
from hepsub_apiban.store.database import Store
from hepsub_apiban.store.detections import SharedDetections

from .conftest import AgentFactory, ApibanPeer, ManualClock
from .test_collector import decoded
from .test_detection_agent import ATTACKER, scan, send
from .test_shared_sightings import Gate, gate, stores  # noqa: F401 (fixtures used below)
from .test_site_api import SITE_KEY, addresses, page_all, write_list

Client = TestClient[web.Request, web.Application]
OTHER = "5.6.7.9"
BOUND = 30.0  # real seconds any wait for another agent or the database may take
BOUNCER = {"X-Api-Key": SITE_KEY, "User-Agent": "crowdsec-firewall-bouncer/v0.0.31"}
QUICK_LEASE = "3"  # store.lease_ttl, seconds: renewed every second
UUID_A = "0a0a0a0a-0000-4000-8000-00000000000a"
UUID_B = "0b0b0b0b-0000-4000-8000-00000000000b"


@pytest.fixture(autouse=True)
def quick_sharing(monkeypatch: pytest.MonkeyPatch) -> None:
    """The same protocol, faster: writes every 50 ms, follows every 100 ms, short backoff (and a
    short lease: QUICK_LEASE for store.lease_ttl)."""
    monkeypatch.setattr(shared_detections, "FLUSH_EVERY", 0.05)
    monkeypatch.setattr(shared_detections, "FOLLOW_EVERY", 0.1)
    monkeypatch.setattr(shared_detections, "BACKOFF_MAX", 0.4)
    monkeypatch.setattr(shared_mirror, "FOLLOW_EVERY", 0.1)


async def until(done: Callable[[], bool], what: str) -> None:
    """Poll with a bound: what is awaited happens in another agent's task or in the database."""
    async with asyncio.timeout(BOUND):
        while not done():  # noqa: ASYNC110
            await asyncio.sleep(0.01)
    assert done(), what


async def rows(store_url: str) -> list[asyncpg.Record]:
    connection = await asyncpg.connect(store_url)
    try:
        return await connection.fetch(
            "SELECT host(ip) AS ip, serial, until, rules, agents, ended_at FROM hepsub.detections ORDER BY ip"
        )
    finally:
        await connection.close()


# ---------------------------------------------------------------- books and the store


class Book:
    """A detection book with its serial source (a mirror, as in mirror mode) and its sharing."""

    def __init__(
        self, settings: DetectSettings, store: Store, agent: str, clock: ManualClock, **options: Any
    ) -> None:
        self.clock = clock
        self.mirror = Mirror()
        self.book = Detections(settings, self.mirror.new_serial, clock=clock)
        self.sharing = SharedDetections(self.book, agent, self.mirror, wall_clock=clock, **options)
        self.sharing.attach(store)

    def report(self, ip: str, rule: str, proof: str | None, after: float = 0.0) -> None:
        self.book.report(Finding(ip, rule, f"{rule} evidence", proof, self.clock() + after))


async def test_two_agents_share_one_entry_per_address_with_rules_merged_and_the_later_end(
    agent: AgentFactory,
    stores: Callable[..., Awaitable[Store]],  # noqa: F811 (the fixture)
    store_url: str,
) -> None:
    settings = agent.settings().detect
    clock = ManualClock(time.time())
    a = Book(settings, await stores(), "agent-a", clock)
    b = Book(settings, await stores(), "agent-b", clock)

    a.report(ATTACKER, "scanner_ua", PROOF_TCP)
    provisional = a.book.get(ATTACKER).serial  # type: ignore[union-attr]
    assert provisional is not None
    assert a.sharing.pending() == 1
    await a.sharing.flush()
    [row] = await rows(store_url)
    assert row["serial"] >= provisional  # a renumbering upward for A's own clients
    assert a.book.get(ATTACKER).serial == row["serial"]  # type: ignore[union-attr]
    assert await b.sharing.follow() == 1
    seen_by_b = b.book.get(ATTACKER)
    assert seen_by_b is not None
    assert (seen_by_b.served, seen_by_b.serial, seen_by_b.until) == (True, row["serial"], row["until"])
    assert seen_by_b.agents == ("agent-a",)
    assert seen_by_b.to_json()["agents"] == ["agent-a"]
    assert b.mirror.next_serial > row["serial"]  # B's own serials continue above the shared ID

    # B detects the same address by another rule, for longer: one entry, rules joined, B's end;
    # the end moved hours past what clients were told, so the entry is handed out again.
    b.report(ATTACKER, "auth_failure", PROOF_NONCE, after=60)
    longer = b.book.get(ATTACKER).until  # type: ignore[union-attr]
    await b.sharing.flush()
    [merged] = await rows(store_url)
    assert merged["until"] == longer
    assert merged["serial"] > row["serial"]
    assert set(orjson.loads(merged["rules"])) == {"scanner_ua", "auth_failure"}
    assert orjson.loads(merged["agents"]) == ["agent-a", "agent-b"]
    await a.sharing.follow()
    on_a = a.book.get(ATTACKER)
    assert on_a is not None
    assert (on_a.serial, on_a.until) == (merged["serial"], longer)
    assert set(on_a.rules) == {"scanner_ua", "auth_failure"}

    # A's rule fires again: its shorter end changes nothing, the entry keeps its ID.
    a.report(ATTACKER, "scanner_ua", PROOF_TCP, after=120)
    await a.sharing.flush()
    [again] = await rows(store_url)
    assert (again["serial"], again["until"]) == (merged["serial"], longer)

    # Flagged only (no proof): it stays local, whatever the rule.
    a.report(OTHER, "scanner_ua", None)
    assert a.book.get(OTHER).action == "flag"  # type: ignore[union-attr]
    assert a.sharing.pending() == 0
    await a.sharing.flush()
    assert [r["ip"] for r in await rows(store_url)] == [ATTACKER]


async def test_an_end_on_one_agent_reaches_another_whose_clock_is_behind(
    agent: AgentFactory,
    stores: Callable[..., Awaitable[Store]],  # noqa: F811 (the fixture)
    store_url: str,
) -> None:
    settings = agent.settings().detect
    a = Book(settings, await stores(), "agent-a", ManualClock(time.time()))
    b = Book(settings, await stores(), "agent-b", ManualClock(time.time()))
    a.report(ATTACKER, "scanner_ua", PROOF_TCP)
    await a.sharing.flush()
    await b.sharing.follow()
    detection = b.book.get(ATTACKER)
    assert detection is not None
    serial, end = detection.serial, detection.until

    a.clock.advance(end - a.clock() + 1)
    assert a.book.expire() == 1
    await a.sharing.flush()
    [row] = await rows(store_url)
    assert row["ended_at"] == end
    assert b.book.get(ATTACKER) is not None  # B's clock says it still lasts ...
    await b.sharing.follow()
    assert b.book.get(ATTACKER) is None  # ... but A ended it: it ends on B too
    assert [(at, d.ip, d.serial) for at, d in b.book.ended] == [(end, ATTACKER, serial)]
    assert a.sharing.stats.ends_written == 1

    # Detected again later: a new entry under a new ID.
    a.report(ATTACKER, "scanner_ua", PROOF_TCP)
    await a.sharing.flush()
    await b.sharing.follow()
    again = b.book.get(ATTACKER)
    assert again is not None
    assert again.serial is not None
    assert serial is not None
    assert again.serial > serial


# ---------------------------------------------------------------- agents


async def mirror_agent(
    tmp_path: Path, name: str, make: Callable[[web.Application], Awaitable[Client]], apiban: ApibanPeer,
    clock: ManualClock, listed: list[str], **env: str,
) -> Client:  # fmt: skip
    """An agent of its own state dir with a loaded APIBAN list, HEP on UDP, the site API and the store."""
    (tmp_path / name).mkdir()
    write_list(tmp_path / name, apiban, listed)
    factory = AgentFactory(tmp_path / name, make, apiban)
    return await factory(
        Clocks(wall=clock),
        HEPSUB_APIBAN_MODE="mirror",
        HEPSUB_SITE_KEYS=SITE_KEY,
        HEPSUB_HEP_UDP="127.0.0.1:0",
        **env,
    )


async def check(client: Client, ip: str) -> tuple[int, Any]:
    response = await client.get(f"/api/{SITE_KEY}/check/{ip}")
    return response.status, await response.json()


async def decisions(client: Client, startup: bool) -> dict[str, Any]:
    response = await client.get(f"/v1/decisions/stream?startup={str(startup).lower()}", headers=BOUNCER)
    assert response.status == 200
    body: dict[str, Any] = await response.json()
    return body


def of(decisions: list[dict[str, Any]] | None, ip: str) -> list[dict[str, Any]]:
    return [d for d in decisions or [] if d["value"] == ip]


async def test_a_detection_served_by_a_is_served_by_bs_site_api_and_decision_stream_with_the_same_id(
    store_url: str,  # first: the database outlives the agents
    aiohttp_client: Callable[[web.Application], Awaitable[Client]],
    apiban: ApibanPeer,
    tmp_path: Path,
) -> None:
    listed = addresses(300)
    clock_a, clock_b = ManualClock(time.time()), ManualClock(time.time())
    a = await mirror_agent(
        tmp_path, "a", aiohttp_client, apiban, clock_a, listed,
        HEPSUB_STORE_LEASE_TTL=QUICK_LEASE, HEPSUB_STORE_URL=store_url, HEPSUB_AGENT_UUID=UUID_A,
    )  # fmt: skip
    # A pulls, B follows. Were B (whose list is numbered a few milliseconds after A's) to pull, the
    # entries of its list numbered at or below A's last ID would be renumbered above it when first
    # published (store/shared_list.py), and B's site API would list them last: right, but not the
    # order this test pins.
    await until(lambda: a.app[STORE_LINK].status.role == "puller", "A pulls the list")
    b = await mirror_agent(
        tmp_path, "b", aiohttp_client, apiban, clock_b, listed,
        HEPSUB_STORE_LEASE_TTL=QUICK_LEASE, HEPSUB_STORE_URL=store_url, HEPSUB_AGENT_UUID=UUID_B,
    )  # fmt: skip
    await until(lambda: all(c.app[STORE_LINK].status.role for c in (a, b)), "the roles decided")
    await until(lambda: all(c.app[SHARED_DETECTIONS].stats.up for c in (a, b)), "sharing detections")
    startup = await decisions(b, startup=True)  # B's bouncer, before the detection
    assert of(startup["new"], ATTACKER) == []

    send(a, scan())
    await until(lambda: decoded(a, "udp") == 50, "the scan on A")
    assert a.app[DETECTIONS].get(ATTACKER).served  # type: ignore[union-attr]
    # Every finding of the scan written (a finding marks the address at once, on the ingest path).
    await until(lambda: a.app[SHARED_DETECTIONS].pending() == 0, "A's writes")
    [row] = await rows(store_url)
    for client in (a, b):  # A adopts what the store made of its writes, B follows
        book = client.app[DETECTIONS]
        await until(
            lambda book=book: (
                (found := book.get(ATTACKER)) is not None
                and (found.serial, found.until, list(found.rules))
                == (row["serial"], row["until"], [*orjson.loads(row["rules"])])
            ),
            "the store's entry",
        )
    shared_id = str(row["serial"])

    # The site API: the same ID on both, after every APIBAN entry (a client resuming sees it).
    for client in (a, b):
        assert await check(client, ATTACKER) == (200, {"ipaddress": [ATTACKER], "ID": shared_id})
        ips, ids = await page_all(client)
        assert ips == [*listed, ATTACKER]
        assert ids[-1] == shared_id
    mirror_ids = b.app[MIRROR_SYNC].mirror.serials.values()
    assert max(mirror_ids) < row["serial"]

    # The decision stream: B's bouncer gets it as new, with the same ID and end as A's.
    new = of((await decisions(b, startup=False))["new"], ATTACKER)
    on_a = of((await decisions(a, startup=True))["new"], ATTACKER)
    assert [d["id"] for d in new] == [d["id"] for d in on_a] == [row["serial"]]
    assert (new[0]["until"], new[0]["scenario"]) == (on_a[0]["until"], on_a[0]["scenario"])
    assert new[0]["origin"] == "hepsub-apiban"

    # /api/v1/detections and enrichment on B say who detected it.
    found = (await (await b.get("/api/v1/detections")).json())["detections"]
    assert [(d["ip"], d["ID"], d["agents"], d["action"]) for d in found] == [
        (ATTACKER, shared_id, [UUID_A], "serve")
    ]
    body = {"data": {"sid": ["call-1"], "source_ip": [ATTACKER]}, "fromts": 1, "tots": 2}
    answer = await (await b.post("/get/cdr", json=body)).json()
    assert (answer[ATTACKER]["detected"]["action"], answer[ATTACKER]["detected"]["agents"]) == (
        "serve",
        [UUID_A],
    )
    status = (await (await a.get("/api/v1/status")).json())["store"]["detections"]
    assert (status["up"], status["rows_written"] >= 1, status["failures"]) == (True, True, 0)
    metrics = await (await b.get("/metrics")).text()
    assert "hepsub_apiban_store_detections_adopted_total" in metrics

    # The end on A (its clock passes the end; B's is hours behind) reaches B's bouncer as deleted.
    end = a.app[DETECTIONS].get(ATTACKER).until  # type: ignore[union-attr]
    clock_a.advance(end - clock_a() + 1)
    ended = of((await decisions(a, startup=False))["deleted"], ATTACKER)
    assert [(d["id"], d["until"], d["scenario"]) for d in ended] == [
        (d["id"], d["until"], d["scenario"]) for d in on_a
    ]
    await until(lambda: b.app[DETECTIONS].get(ATTACKER) is None, "the end on B")
    deleted = of((await decisions(b, startup=False))["deleted"], ATTACKER)
    assert [d["id"] for d in deleted] == [row["serial"]]
    assert await check(b, ATTACKER) == (400, {"ipaddress": ["not blocked"], "ID": "none"})
    assert clock_b() < end


async def test_a_store_outage_loses_no_detection_once_it_is_back(
    store_url: str,  # first: the database outlives the agents
    gate: Gate,  # noqa: F811 (the fixture)
    agent: AgentFactory,
) -> None:
    a = await agent(
        HEPSUB_HEP_UDP="127.0.0.1:0", HEPSUB_SITE_KEYS=SITE_KEY, HEPSUB_STORE_LEASE_TTL=QUICK_LEASE,
        HEPSUB_STORE_URL=gate.url(store_url), HEPSUB_STATE_DIR=str(agent.tmp_path / "a"),
    )  # fmt: skip
    b = await agent(
        HEPSUB_SITE_KEYS=SITE_KEY,
        HEPSUB_STORE_LEASE_TTL=QUICK_LEASE,
        HEPSUB_STORE_URL=store_url,
        HEPSUB_STATE_DIR=str(agent.tmp_path / "b"),
    )
    sharing = a.app[SHARED_DETECTIONS]
    await until(lambda: a.app[STORE_LINK].status.connected and sharing.stats.up is not False, "A's store")
    await gate.shut()
    send(a, scan())
    await until(lambda: a.app[DETECTIONS].get(ATTACKER) is not None, "A's detection")
    await until(lambda: sharing.stats.failures >= 2, "failed writes")
    # A serves it meanwhile, under its own ID; B knows nothing of it yet.
    local = of((await decisions(a, startup=True))["new"], ATTACKER)
    assert len(local) == 1
    assert b.app[DETECTIONS].get(ATTACKER) is None
    assert (await rows(store_url)) == []
    status = (await (await a.get("/api/v1/status")).json())["store"]["detections"]
    assert (status["up"], status["waiting"]) == (False, 1)

    await gate.open()
    await until(lambda: b.app[DETECTIONS].get(ATTACKER) is not None, "the detection on B after the outage")
    [row] = await rows(store_url)
    await until(lambda: a.app[DETECTIONS].get(ATTACKER).serial == row["serial"], "A's ID from the store")  # type: ignore[union-attr]
    on_a = of((await decisions(a, startup=True))["new"], ATTACKER)
    on_b = of((await decisions(b, startup=True))["new"], ATTACKER)
    assert [d["id"] for d in on_a] == [d["id"] for d in on_b] == [row["serial"]]
    assert on_a[0]["until"] == on_b[0]["until"]
    assert sharing.pending() == 0


async def test_without_a_store_url_nothing_is_shared(agent: AgentFactory) -> None:
    client = await agent(HEPSUB_HEP_UDP="127.0.0.1:0")
    assert SHARED_DETECTIONS not in client.app
    send(client, scan())
    await until(lambda: client.app[DETECTIONS].get(ATTACKER) is not None, "the detection")
    found = (await (await client.get("/api/v1/detections")).json())["detections"]
    assert "agents" not in found[0]
    assert client.app[DETECTIONS].on_shared is None


def test_a_site_api_page_never_ends_between_two_entries_of_one_id(agent: AgentFactory) -> None:
    """An ID shared with an APIBAN entry (the store numbered a detection while the puller numbered
    a page): a client resuming from the page's last ID still gets both."""
    clock = ManualClock(time.time())
    mirror = Mirror()
    mirror.add(["45.0.0.1", "45.0.0.2", "45.0.0.3"], "1700000000", clock())
    book = Detections(agent.settings().detect, mirror.new_serial, clock=clock)
    tied = mirror.serials["45.0.0.2"]
    end = clock() + 3600
    shared = Detection(ATTACKER, clock(), end, {"scanner_ua": "e"}, PROOF_TCP, serial=tied)
    assert book.adopt(shared, clock()) is shared
    blocklist = Blocklist(
        NetworkSet(), include_local=True, clock=clock, mirror=CurrentMirror(mirror), book=book
    )
    first, last = blocklist.page_after(0, 2, clock())
    assert (first, last) == (["45.0.0.1", "45.0.0.2", ATTACKER], tied)
    assert blocklist.page_after(tied, 2, clock()) == (["45.0.0.3"], mirror.serials["45.0.0.3"])


async def test_the_writer_backs_off_while_the_store_fails_and_catches_up(
    store_url: str,
    gate: Gate,  # noqa: F811 (the fixture)
    stores: Callable[..., Awaitable[Store]],  # noqa: F811 (the fixture)
    agent: AgentFactory,
) -> None:
    clock = ManualClock(time.time())
    store = await stores(gate.url(store_url))
    a = Book(agent.settings().detect, store, "agent-a", clock, monotonic=clock, sleep=clock.sleep)
    sharing = a.sharing
    task = asyncio.create_task(sharing.run())
    try:
        await gate.shut()
        a.report(ATTACKER, "scanner_ua", PROOF_TCP)
        delays = []
        for n in range(6):
            delays.append(await clock.next_sleep())
            if n < 5:
                clock.wake()
        assert delays == [0.05, 0.1, 0.2, 0.4, 0.4, 0.4]  # quick_sharing's FLUSH_EVERY and BACKOFF_MAX
        assert (sharing.stats.up, sharing.stats.failures, sharing.pending()) == (False, 5, 1)
        await gate.open()
        for _ in range(5):  # a connection broken by the outage may fail one more try
            clock.wake()
            if await clock.next_sleep() == 0.05:
                break
        assert sharing.stats.up is True
        assert sharing.pending() == 0
        [row] = await rows(store_url)
        assert a.book.get(ATTACKER).serial == row["serial"]  # type: ignore[union-attr]
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)


async def test_rows_are_checked_before_they_are_served(
    store_url: str,
    stores: Callable[..., Awaitable[Store]],  # noqa: F811 (the fixture)
    agent: AgentFactory,
) -> None:
    """The store is shared, not blindly trusted: an agent serves only rules it knows, never longer
    than its own longest detection, and skips a row it cannot read."""
    clock = ManualClock(time.time())
    b = Book(agent.settings().detect, await stores(), "agent-b", clock)
    connection = await asyncpg.connect(store_url)
    try:
        insert = (
            "INSERT INTO hepsub.detections (ip, serial, since, until, announced_until, rules, proof,"
            " repeats, agents, change) VALUES ($1, $2, $3, $4, $4, $5, 'used TCP/TLS', 0, $6, $7)"
        )
        decade = clock() + 10 * 365 * 86400
        rules = '{"no_such_rule": "x", "scanner_ua": "y"}'
        await connection.execute(insert, ATTACKER, 5, clock(), decade, rules, '["agent-x"]', 1)
        await connection.execute(insert, OTHER, 6, clock(), decade, rules, '{"not": "a list"}', 2)
        await connection.execute("UPDATE hepsub.detection_counter SET change = 2, serial = 6")
    finally:
        await connection.close()
    assert await b.sharing.follow() == 1
    assert b.sharing.held == 2
    detection = b.book.get(ATTACKER)
    assert detection is not None
    assert (detection.serial, list(detection.rules), detection.agents) == (5, ["scanner_ua"], ("agent-x",))
    assert detection.until == clock() + MAX_DURATION
    assert b.book.get(OTHER) is None
    assert b.mirror.next_serial == 6  # its own serials continue above every ID it serves
