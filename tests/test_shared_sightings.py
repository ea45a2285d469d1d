"""Sightings shared by agents through the store: written as cumulative totals per
writer and life, so nothing is counted twice; read by enrichment with a fallback to memory.

Against a real PostgreSQL (tests/postgres.py). The store "going away" is a TCP relay in front of
the shared test cluster being shut, every connection through it cut: the agent sees exactly what a
dead server or a broken network shows it, and the other tests' cluster keeps running.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Callable
from typing import Any

import asyncpg
import pytest

from hepsub_apiban.apiban.lookups import LookupService
from hepsub_apiban.apiban.mirror import Mirror
from hepsub_apiban.core.addresses import NetworkSet
from hepsub_apiban.core.config import StoreSettings
from hepsub_apiban.formats.hep import build_hep3
from hepsub_apiban.formats.sip import SipInfo
from hepsub_apiban.ingest.sightings import Sightings
from hepsub_apiban.keys import SETTINGS, SHARED_SIGHTINGS, SIGHTINGS, STORE_LINK
from hepsub_apiban.store import sightings as shared_sightings
from hepsub_apiban.store.database import Store
from hepsub_apiban.store.sightings import BACKOFF_MAX, READ_PAUSE, SharedSightings

from .conftest import AgentFactory, ManualClock
from .postgres import Cluster, free_port
from .test_collector import Client, decoded, hep_agent, sip_packet, udp_send, until

SBC = "80.2.2.2"
SCANNER = "45.6.7.8"
REGISTER = SipInfo(method="REGISTER", call_id="r1", from_user="100", user_agent="friendly-scanner")
INVITE = SipInfo(method="INVITE", call_id="i1", from_user="200", user_agent="sipvicious")


def no_store() -> str:
    """A store URL nothing answers at: the agent's own link never connects (nor attaches a store
    the test did not choose), while the agent runs as it does with a store."""
    return f"postgresql://hepsub:unused@127.0.0.1:{free_port()}/hepsub"


def memory(capacity: int = 1000) -> Sightings:
    mirror = Mirror()
    mirror.last_full_sync = 1.0  # loaded and empty: every public address "not listed", no lookups
    return Sightings(LookupService(None, NetworkSet(), mirror=mirror), capacity=capacity)


class Gate:
    """A TCP relay to the test cluster on a port of its own: shut, the store is unreachable."""

    def __init__(self, target: int) -> None:
        self.target = target
        self.port = free_port()
        self._server: asyncio.Server | None = None
        self._relays: set[asyncio.Task[Any]] = set()
        self.holding = False  # connections taken but never answered: a hung server
        self.shut_down = False

    def url(self, store_url: str) -> str:
        return store_url.replace(f":{self.target}/", f":{self.port}/")

    async def open(self) -> None:
        self.shut_down = False
        self._server = await asyncio.start_server(self._relay, "127.0.0.1", self.port)

    async def shut(self) -> None:
        """A dead server: the port refuses, every connection breaks without a goodbye."""
        assert self._server is not None
        # A connection accepted just before, whose relay has not started yet, is not in _relays
        # for the cut: it sees this flag when it starts.
        self.shut_down = True
        self._server.close()
        await self._cut()
        await self._server.wait_closed()
        self._server = None

    async def hold(self) -> None:
        """From now on the store hangs: every connection cut, new ones accepted and left unanswered."""
        self.holding = True
        await self._cut()

    async def _cut(self) -> None:
        for relay in self._relays:
            relay.cancel()
        await asyncio.gather(*self._relays, return_exceptions=True)

    async def _relay(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if self.shut_down:
            writer.transport.abort()
            return
        task = asyncio.current_task()
        assert task is not None
        self._relays.add(task)
        upstream: asyncio.StreamWriter | None = None
        try:
            if self.holding:
                while await reader.read(65536):
                    pass
                return
            upstream_reader, upstream = await asyncio.open_connection("127.0.0.1", self.target)
            await asyncio.gather(_pipe(reader, upstream), _pipe(upstream_reader, writer))
        except (OSError, asyncio.IncompleteReadError):
            pass
        finally:
            self._relays.discard(task)
            for stream in (writer, upstream):
                if stream is not None:
                    stream.transport.abort()


async def _pipe(source: asyncio.StreamReader, sink: asyncio.StreamWriter) -> None:
    while data := await source.read(65536):
        sink.write(data)
        await sink.drain()
    sink.transport.abort()


@pytest.fixture
async def gate(postgres_cluster: Cluster) -> AsyncIterator[Gate]:
    relay = Gate(postgres_cluster.port)
    await relay.open()
    yield relay
    if relay._server is not None:
        await relay.shut()


@pytest.fixture
async def stores(store_url: str) -> AsyncIterator[Callable[..., Any]]:
    """Opens Stores (migrated) on the test's database, closed after the test."""
    opened: list[Store] = []

    async def open_store(url: str = store_url) -> Store:
        store = await Store.connect(StoreSettings(url))
        opened.append(store)
        await store.migrate()
        return store

    yield open_store
    for store in opened:
        await store.close()


async def stored(store_url: str, ip: str) -> list[asyncpg.Record]:
    connection = await asyncpg.connect(store_url)
    try:
        return await connection.fetch(
            "SELECT writer, packets, methods FROM hepsub.sightings WHERE ip = $1::inet", ip
        )
    finally:
        await connection.close()


def total(rows: list[asyncpg.Record]) -> int:
    return sum(row["packets"] for row in rows)


async def test_a_batch_written_twice_counts_once(stores: Callable[..., Any], store_url: str) -> None:
    sightings = memory()
    shared = SharedSightings(await stores(), sightings, "agent-a")
    for second in range(3):
        sightings.record(SCANNER, SBC, REGISTER, 1_700_000_000.0 + second)
    batch = set(sightings.touched or ())
    assert batch == {SCANNER, SBC}
    assert await shared.flush()
    # The commit went through but its answer was lost: the agent sends the same batch again.
    assert sightings.touched == set()
    sightings.touched = set(batch)
    assert await shared.flush()
    assert total(await stored(store_url, SCANNER)) == 3
    assert total(await stored(store_url, SBC)) == 3
    assert (shared.stats.flushes, shared.stats.rows_written, shared.stats.round_trips) == (2, 4, 2)
    sightings.record(SCANNER, SBC, INVITE, 1_700_000_010.0)
    assert await shared.flush()
    rows = await stored(store_url, SCANNER)
    assert total(rows) == 4
    assert len(rows) == 1  # the writer's one row, updated in place


async def test_an_address_forgotten_and_seen_again_keeps_its_earlier_counts(
    stores: Callable[..., Any], store_url: str
) -> None:
    sightings = memory(capacity=2)
    shared = SharedSightings(await stores(), sightings, "agent-a")
    sightings.record(SCANNER, SBC, REGISTER, 1_700_000_000.0)
    sightings.record(SCANNER, SBC, REGISTER, 1_700_000_001.0)
    assert await shared.flush()
    sightings.record("45.0.0.1", SBC, REGISTER, 1_700_000_002.0)  # SCANNER is forgotten
    assert sightings.get(SCANNER) is None
    sightings.record(SCANNER, SBC, INVITE, 1_700_000_003.0)  # a new life: one packet
    assert await shared.flush()
    assert total(await stored(store_url, SCANNER)) == 3
    reader = SharedSightings(await stores(), memory(), "agent-b")
    seen = (await reader.seen([SCANNER]))[SCANNER]
    assert seen.packets == 3
    assert dict(seen.methods) == {"REGISTER": 2, "INVITE": 1}
    assert (seen.first_seen, seen.last_seen) == (1_700_000_000.0, 1_700_000_003.0)


async def test_the_reader_adds_every_agents_rows_to_its_own_memory(stores: Callable[..., Any]) -> None:
    a_memory, b_memory = memory(), memory()
    a = SharedSightings(await stores(), a_memory, "agent-a")
    b = SharedSightings(await stores(), b_memory, "agent-b")
    a_memory.record(SCANNER, SBC, REGISTER, 1_700_000_000.0)
    a_memory.record(SCANNER, SBC, REGISTER, 1_700_000_001.0)
    b_memory.record(SCANNER, SBC, INVITE, 1_700_000_005.0)
    assert await a.flush()
    assert await b.flush()
    b_memory.record(SCANNER, SBC, INVITE, 1_700_000_009.0)  # not flushed yet: B's memory counts it
    seen = await b.seen([SCANNER, SBC, "45.9.9.9"])
    assert set(seen) == {SCANNER, SBC}
    scanner = seen[SCANNER]
    assert scanner.packets == 4
    assert dict(scanner.methods) == {"REGISTER": 2, "INVITE": 2}
    assert (scanner.first_seen, scanner.last_seen) == (1_700_000_000.0, 1_700_000_009.0)
    assert set(scanner.user_agents) == {"friendly-scanner", "sipvicious"}
    assert set(scanner.users) == {"100", "200"}
    assert seen[SBC].packets == 4
    assert seen[SBC].methods == {}
    # The answer's copies are its own: the memory keeps B's counts only.
    assert b_memory.get(SCANNER).packets == 2  # type: ignore[union-attr]
    assert dict(b_memory.get(SCANNER).methods) == {"INVITE": 2}  # type: ignore[union-attr]


async def test_rows_not_written_for_days_are_pruned(stores: Callable[..., Any], store_url: str) -> None:
    sightings = memory()
    shared = SharedSightings(await stores(), sightings, "agent-a")
    sightings.record(SCANNER, SBC, REGISTER, 1_700_000_000.0)  # a HEP timestamp long past
    assert await shared.flush()
    assert await shared.prune() == 0  # pruned by when it was written, not by the packet's time
    connection = await asyncpg.connect(store_url)
    try:
        await connection.execute(
            "UPDATE hepsub.sightings SET written_at = now() - interval '4 days' WHERE ip = $1::inet", SBC
        )
    finally:
        await connection.close()
    assert await shared.prune() == 1
    assert await stored(store_url, SBC) == []
    assert total(await stored(store_url, SCANNER)) == 1


async def test_a_flood_of_one_packet_sources_is_written_a_slice_per_flush(
    stores: Callable[..., Any], store_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(shared_sightings, "BATCH_ROWS", 20)
    monkeypatch.setattr(shared_sightings, "SINGLES_PER_FLUSH", 10)
    sightings = memory()
    shared = SharedSightings(await stores(), sightings, "agent-a")
    spoofed = [f"45.1.0.{n}" for n in range(1, 51)]
    for ip in spoofed:  # one packet each, to the SBC, which every packet touches
        sightings.record(ip, SBC, REGISTER, 1_700_000_000.0)
    sightings.record(SCANNER, SBC, REGISTER, 1_700_000_001.0)
    sightings.record(SCANNER, SBC, REGISTER, 1_700_000_002.0)
    assert await shared.flush()
    # The SBC and the scanner (more than one packet each) and 10 of the 50 singles.
    assert shared.stats.rows_written == 12
    assert total(await stored(store_url, SBC)) == 52
    assert total(await stored(store_url, SCANNER)) == 2
    assert shared.pending() == 40
    # Quieter flushes write the rest, nothing twice: 40 left, 10 a flush while more than 20 wait.
    while shared.pending():
        assert await shared.flush()
    connection = await asyncpg.connect(store_url)
    try:
        written = await connection.fetch("SELECT host(ip) AS ip, packets FROM hepsub.sightings")
    finally:
        await connection.close()
    assert sorted(row["ip"] for row in written) == sorted([*spoofed, SBC, SCANNER])
    assert shared.stats.rows_written == 52


def test_the_addresses_waiting_for_a_write_are_bounded_by_the_sightings() -> None:
    sightings = memory(capacity=3)
    sightings.touched = set()
    for n in range(1, 5):
        sightings.record(f"45.0.0.{n}", SBC, REGISTER, 1_700_000_000.0 + n)
    # Only what is remembered waits: 45.0.0.1 and 45.0.0.2 were forgotten before any write.
    assert sightings.touched == {SBC, "45.0.0.3", "45.0.0.4"}
    assert sightings.evicted_unwritten == 2


async def test_a_packet_received_by_agent_a_shows_in_agent_b_enrichment_within_3_s(
    agent: AgentFactory, stores: Callable[..., Any], store_url: str
) -> None:
    a = await hep_agent(
        agent, HEPSUB_AGENT_UUID="0a0a0a0a-0000-4000-8000-00000000000a", HEPSUB_STORE_URL=store_url
    )
    b = await hep_agent(
        agent, HEPSUB_AGENT_UUID="0b0b0b0b-0000-4000-8000-00000000000b", HEPSUB_STORE_URL=store_url
    )
    for client in (a, b):  # each application attaches its sightings once its store is connected
        link = client.app[STORE_LINK]
        await until(lambda link=link: link.status.connected, "the store connected")
    udp_send(b, build_hep3(sip_packet(SCANNER, method="INVITE", call_id="b1")))
    await until(lambda: decoded(b, "udp") == 1, "B's packet")
    began = time.monotonic()
    udp_send(a, *(build_hep3(sip_packet(SCANNER, call_id=f"a{n}")) for n in range(3)))
    await until(lambda: decoded(a, "udp") == 3, "A's packets")
    body = {"data": {"sid": ["a1"], "source_ip": [SCANNER]}, "fromts": 1_700_000_000_000}
    while True:
        answer = await (await b.post("/get/cdr", json=body)).json()
        if answer[SCANNER]["seen"]["packets"] == 4:
            break
        assert time.monotonic() - began < 3.0, answer[SCANNER]["seen"]
        await asyncio.sleep(0.1)
    assert answer[SCANNER]["seen"]["methods"] == {"REGISTER": 3, "INVITE": 1}
    assert answer[SCANNER]["seen"]["user_agents"] == ["friendly-scanner"]
    assert b.app[SIGHTINGS].get(SCANNER).packets == 1  # type: ignore[union-attr]
    written = (await (await a.get("/api/v1/status")).json())["store"]["sightings"]
    assert written["up"] is True
    assert written["rows_written"] >= 2  # the scanner and the SBC it sent to
    assert written["failures"] == 0
    metrics = await (await a.get("/metrics")).text()
    assert f"hepsub_apiban_store_sightings_rows_total {float(written['rows_written'])}" in metrics


async def agent_behind_hung_store(
    agent: AgentFactory, gate: Gate, stores: Callable[..., Any], store_url: str
) -> Client:
    """An agent whose sightings store is reached through ``gate``, which it received SCANNER's
    INVITE (Call-ID b1) from, with the gate then holding: the store hangs."""
    b = await hep_agent(agent, HEPSUB_STORE_URL=no_store())  # the test attaches the store itself
    b.app[SHARED_SIGHTINGS].attach(await stores(gate.url(store_url)))
    udp_send(b, build_hep3(sip_packet(SCANNER, method="INVITE", call_id="b1")))
    await until(lambda: decoded(b, "udp") == 1, "B's packet")
    await gate.hold()
    return b


async def test_enrichment_answers_from_memory_within_the_deadline_while_the_store_hangs(
    agent: AgentFactory, gate: Gate, stores: Callable[..., Any], store_url: str
) -> None:
    b = await agent_behind_hung_store(agent, gate, stores, store_url)
    sharing = b.app[SHARED_SIGHTINGS]
    body = {"data": {"sid": ["b1"], "source_ip": [SCANNER]}, "fromts": 1_700_000_000_000}
    deadline = b.app[SETTINGS].agent.deadline
    for _ in range(3):
        began = time.monotonic()
        response = await b.post("/get/cdr", json=body)
        answer = await response.json()
        assert response.status == 200
        assert time.monotonic() - began < deadline
        assert answer[SCANNER]["seen"]["packets"] == 1
        assert answer[SCANNER]["seen"]["methods"] == {"INVITE": 1}
    # One read waited for its timeout; the next ones did not ask the hung store again.
    assert (sharing.stats.reads, sharing.stats.read_failures, sharing.stats.reads_skipped) == (1, 1, 2)
    gate.holding = False  # the writer's flush under way gets its answer; the app closes quickly


async def test_the_store_down_and_back_loses_and_double_counts_nothing(
    gate: Gate, stores: Callable[..., Any], store_url: str
) -> None:
    a_memory, b_memory = memory(), memory()
    a = SharedSightings(await stores(gate.url(store_url)), a_memory, "agent-a")
    clock = ManualClock()
    b = SharedSightings(
        await stores(gate.url(store_url)), b_memory, "agent-b", read_timeout=0.2, monotonic=clock
    )
    for n in range(5):
        a_memory.record(SCANNER, SBC, REGISTER, 1_700_000_000.0 + n)
    b_memory.record(SCANNER, SBC, INVITE, 1_700_000_000.0)
    assert await a.flush()
    assert (await b.seen([SCANNER]))[SCANNER].packets == 6

    await gate.shut()
    for n in range(7):
        a_memory.record(SCANNER, SBC, INVITE, 1_700_000_010.0 + n)
    a_memory.record("45.0.0.9", SBC, REGISTER, 1_700_000_020.0)
    assert not await a.flush()
    assert not await a.flush()  # still down: kept again, not lost
    assert (a.stats.failures, a.stats.up, a.pending()) == (2, False, 3)
    began = time.monotonic()
    local = await b.seen([SCANNER])
    assert time.monotonic() - began < 1.0  # well within agent.deadline
    assert local[SCANNER].packets == 1  # B's memory only
    assert b.stats.read_failures == 1
    assert (await b.seen([SCANNER]))[SCANNER].packets == 1  # not tried again at once
    assert b.stats.reads_skipped == 1

    await gate.open()
    assert total(await stored(store_url, SCANNER)) == 5  # nothing arrived while it was down
    for _ in range(3):  # the pool may hand out a connection broken by the outage once
        if await a.flush():
            break
    assert a.stats.up is True
    assert a.pending() == 0
    rows = await stored(store_url, SCANNER)
    assert total(rows) == 12 + 1 - 1  # A's 12 packets; B's one was never flushed
    assert total(await stored(store_url, "45.0.0.9")) == 1
    assert total(await stored(store_url, SBC)) == 13
    assert await a.flush()  # nothing new: nothing written, nothing added
    assert total(await stored(store_url, SCANNER)) == 12
    assert (await b.seen([SCANNER]))[SCANNER].packets == 1  # within READ_PAUSE: memory only
    clock.advance(READ_PAUSE)
    for _ in range(3):  # B's pool too may hand out a connection broken by the outage once
        seen = await b.seen([SCANNER])
        if seen[SCANNER].packets > 1:
            break
        clock.advance(READ_PAUSE)
    assert seen[SCANNER].packets == 13


async def test_the_writer_backs_off_while_the_store_fails(
    gate: Gate, stores: Callable[..., Any], store_url: str
) -> None:
    clock = ManualClock()
    sightings = memory()
    shared = SharedSightings(await stores(gate.url(store_url)), sightings, "agent-a", sleep=clock.sleep)
    task = asyncio.create_task(shared.run())
    try:
        await gate.shut()
        delays = []
        for n in range(8):
            sightings.record(SCANNER, SBC, REGISTER, 1_700_000_000.0 + n)
            delays.append(await clock.next_sleep())
            clock.wake()
        assert delays == [1.0, 2.0, 4.0, 8.0, 16.0, BACKOFF_MAX, BACKOFF_MAX, BACKOFF_MAX]
        await gate.open()
        await clock.next_sleep()
        for _ in range(3):  # a connection broken by the outage may fail one more flush
            clock.wake()
            if await clock.next_sleep() == 1.0:
                break
        assert shared.stats.up is True
        assert total(await stored(store_url, SCANNER)) == 8
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)


async def test_an_agent_stopping_writes_its_last_sightings(
    agent: AgentFactory, stores: Callable[..., Any], store_url: str
) -> None:
    a = await hep_agent(agent, HEPSUB_STORE_URL=no_store())  # the test attaches the store itself
    sharing = a.app[SHARED_SIGHTINGS]
    udp_send(a, build_hep3(sip_packet(SCANNER, call_id="last")))
    await until(lambda: decoded(a, "udp") == 1, "the packet")
    store = await stores()
    assert total(await stored(store_url, SCANNER)) == 0  # no store yet: nothing was written
    sharing.attach(store)  # and the agent stops at once, before its next flush
    await a.close()
    assert total(await stored(store_url, SCANNER)) == 1
    assert sharing.stats.flushes == 1
