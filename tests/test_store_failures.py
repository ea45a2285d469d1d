"""The shared store's failures, as they happen: a puller killed with SIGKILL, PostgreSQL stopped for 30 s.

Real processes, real clocks: agent A of the takeover test is ``python -m hepsub_apiban serve`` in a
process of its own, killed with SIGKILL mid-pull; the outage test stops a PostgreSQL cluster of its
own with ``pg_ctl stop -m fast`` for 30 seconds and starts it again on the same port and data. Both
take real time by nature (the lease, the outage) and are marked ``slow``: ``-m "not slow"`` leaves
them out of a quick run.
"""

from __future__ import annotations

import asyncio
import os
import signal
import sys
import time
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

import asyncpg
import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient

from hepsub_apiban.formats.hep import build_hep3
from hepsub_apiban.keys import MIRROR_SYNC, SETTINGS, STORE_LINK
from hepsub_apiban.store import link as shared_mirror

from . import postgres
from .conftest import APIBAN_KEY, AgentFactory, ApibanPeer, assert_no_secret
from .postgres import free_port
from .test_collector import decoded, hep_agent, sip_packet, udp_send
from .test_shared_mirror import max_in_any_window

pytestmark = pytest.mark.slow

Client = TestClient[web.Request, web.Application]
LEASE = 3.0  # store.lease_ttl of these agents, seconds


async def until(done: Callable[[], Awaitable[bool]], what: str, bound: float = 60.0) -> float:
    """Poll ``done`` (a query of the store or of an agent) until true; the seconds it took."""
    began = time.monotonic()
    while not await done():
        if time.monotonic() - began > bound:
            raise AssertionError(f"timed out after {bound:g} s waiting for {what}")
        await asyncio.sleep(0.05)
    return time.monotonic() - began


async def fetch(url: str, query: str, *args: Any) -> list[asyncpg.Record]:
    connection = await asyncpg.connect(url)
    try:
        return await connection.fetch(query, *args)
    finally:
        await connection.close()


def ips(count: int) -> list[str]:
    return [f"45.{(i >> 16) & 255}.{(i >> 8) & 255}.{i & 255}" for i in range(count)]


# ---------------------------------------------------------------- the puller killed with SIGKILL


async def agent_process(tmp_path: Path, apiban: ApibanPeer, store_url: str) -> asyncio.subprocess.Process:
    """Agent A: the real command line, in a process of its own, its output kept in a file."""
    env = {
        **os.environ,
        "HEPSUB_APIBAN_KEY": APIBAN_KEY,
        "HEPSUB_APIBAN_URL": apiban.url,
        "HEPSUB_APIBAN_MODE": "mirror",
        "HEPSUB_STATE_DIR": str(tmp_path / "a-state"),
        "HEPSUB_STORE_URL": store_url,
        "HEPSUB_STORE_LEASE_TTL": str(LEASE),
        "HEPSUB_AGENT_BIND": "127.0.0.1",
        "HEPSUB_AGENT_PORT": str(free_port()),
        "HEPSUB_HEP_UDP": "",
        "HEPSUB_HEP_TCP": "",
    }
    output = (tmp_path / "a.log").open("wb")
    try:
        return await asyncio.create_subprocess_exec(
            sys.executable, "-m", "hepsub_apiban", "serve",
            env=env, stdin=asyncio.subprocess.DEVNULL, stdout=output, stderr=output,
        )  # fmt: skip
    finally:
        output.close()  # the child holds its own copy


async def test_the_puller_killed_with_sigkill_is_replaced_within_the_lease_from_the_cursor(
    agent: AgentFactory, apiban: ApibanPeer, store_url: str, tmp_path: Path
) -> None:
    # 1,500 entries: 6 pages of 250 and "no new bans", 7 requests, within one window of 11 (one
    # kept for lookups) whoever sends them; each answer takes 0.4 s, so A is killed mid-pull.
    apiban.fake.add_many(ips(1_500))
    apiban.fake.delay = 0.4
    a = await agent_process(tmp_path, apiban, store_url)
    try:
        lease = "SELECT holder, epoch FROM hepsub.leases"
        cursor = "SELECT cursor, version FROM hepsub.apiban_sources"

        async def a_pulls() -> bool:
            try:
                return bool(await fetch(store_url, lease))
            except asyncpg.UndefinedTableError:
                return False  # A has not migrated the schema yet

        await until(a_pulls, "agent A to take the puller's lease", bound=30.0)
        b = await agent(
            HEPSUB_APIBAN_MODE="mirror", HEPSUB_STORE_URL=store_url, HEPSUB_STORE_LEASE_TTL=str(LEASE)
        )
        link = b.app[STORE_LINK]

        async def follows() -> bool:
            return link.status.role == "follower"

        await until(follows, "agent B to follow")

        async def two_pages_saved() -> bool:
            rows = await fetch(store_url, cursor)
            return bool(rows) and rows[0]["cursor"] not in ("100", "") and rows[0]["version"] >= 2

        await until(two_pages_saved, "A to save two pages")
        a.send_signal(signal.SIGKILL)
        killed = time.monotonic()
        assert await a.wait() == -signal.SIGKILL
        saved = (await fetch(store_url, cursor))[0]["cursor"]
        # The page A was waiting for is answered (to no one) after the fake's delay; B cannot take
        # the lease before it lapses, seconds later.
        await asyncio.sleep(apiban.fake.delay + 0.2)
        sent_by_a = len(apiban.fake.requests)
        assert 0 < sent_by_a < 7  # mid-pull

        async def b_pulls() -> bool:
            return link.status.role == "puller"

        await until(b_pulls, "agent B to take over")
        assert time.monotonic() - killed <= LEASE + 1.0
        mirror = b.app[MIRROR_SYNC].mirror

        async def loaded() -> bool:
            return mirror.loaded

        await until(loaded, "agent B to finish the pull", bound=30.0)
    finally:
        if a.returncode is None:
            a.kill()
            await a.wait()
    assert set(mirror.entries) == set(ips(1_500))
    requests = apiban.fake.requests
    assert all(r.status != 429 for r in requests)
    assert max_in_any_window([r.at for r in requests], 120.0) <= 11
    asked = [r.asked for r in requests if r.kind == "banned"]
    assert asked.count("100") == 1  # the list was asked from the start once: by A
    # B went on from the cursor A saved; at most the page A was waiting for when it died is asked twice.
    by_b = asked[sent_by_a:]
    assert by_b[0] == saved
    assert len(asked) - len(set(asked)) <= 1
    assert len(requests) <= 8
    status = await (await b.get("/api/v1/status")).json()
    assert status["store"]["role"] == "puller"
    assert status["store"]["budget"]["shared"] is True
    assert_no_secret((tmp_path / "a.log").read_text(errors="replace"))


# ---------------------------------------------------------------- PostgreSQL stopped for 30 s

OUTAGE = 30.0  # seconds PostgreSQL is down
LOAD_EVERY = 0.25  # seconds between enrichment requests (4 per second)
CALLERS = ("45.20.0.1", "45.20.0.2", "45.20.0.3")  # the HEP senders; enrichment asks about them
SBC = "80.20.0.9"  # the address they all call


@pytest.fixture
def own_cluster() -> Iterator[postgres.Cluster]:
    """A cluster for this test alone: stopping it must not stop the other tests' store."""
    yield from postgres.throwaway_cluster()


class Load:
    """HOMER's enrichment requests, a few per second, each timed; some ask for a new address."""

    def __init__(self, client: Client) -> None:
        self.client = client
        self.answers: list[tuple[int, float]] = []  # (status, seconds)
        self.task: asyncio.Task[None] | None = None

    async def run(self) -> None:
        n = 0
        while True:
            n += 1
            body = {
                "data": {"sid": [f"call-{n}"], "source_ip": [*CALLERS, f"45.21.{n >> 8}.{n & 255}"]},
                "fromts": 1_700_000_000_000,
            }
            began = time.monotonic()
            response = await self.client.post("/get/cdr", json=body)
            await response.read()
            self.answers.append((response.status, time.monotonic() - began))
            await asyncio.sleep(LOAD_EVERY)

    def start(self) -> None:
        self.task = asyncio.create_task(self.run())

    async def stop(self) -> None:
        assert self.task is not None
        self.task.cancel()
        await asyncio.gather(self.task, return_exceptions=True)


async def stored_packets(url: str) -> dict[str, int]:
    rows = await fetch(
        url, "SELECT host(ip) AS ip, sum(packets) AS packets FROM hepsub.sightings GROUP BY ip"
    )
    return {row["ip"]: int(row["packets"]) for row in rows}


async def test_postgresql_stopped_for_30_s_under_enrichment_load(
    agent: AgentFactory, own_cluster: postgres.Cluster, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level("INFO", logger="hepsub_apiban.shared_mirror")
    url = own_cluster.url()
    client = await hep_agent(agent, HEPSUB_STORE_URL=url)
    deadline = client.app[SETTINGS].agent.deadline
    link = client.app[STORE_LINK]

    async def connected() -> bool:
        return link.status.connected

    await until(connected, "the store")
    sent: dict[str, int] = dict.fromkeys((*CALLERS, SBC), 0)
    packets = 0

    def send(rounds: int) -> None:
        nonlocal packets
        for _ in range(rounds):
            for ip in CALLERS:
                packets += 1
                udp_send(client, build_hep3(sip_packet(ip, SBC, call_id=f"c{packets}")))
                sent[ip] += 1
                sent[SBC] += 1

    async def all_decoded() -> bool:
        return decoded(client, "udp") == packets

    send(2)
    await until(all_decoded, "the first packets")

    async def written() -> bool:
        totals = await stored_packets(url)
        return all(totals.get(ip) == n for ip, n in sent.items())

    await until(written, "the first sightings in the store")
    load = Load(client)
    load.start()
    try:
        await asyncio.sleep(1.0)
        await asyncio.to_thread(own_cluster.stop_fast)
        stopped = time.monotonic()
        send(5)  # received while the store is down: buffered
        await until(all_decoded, "the packets sent during the outage")

        async def noticed() -> bool:
            return not link.status.connected

        await until(noticed, "the agent to notice the store is down", bound=10.0)
        await asyncio.sleep(3.0)
        during = await (await client.get("/api/v1/status")).json()
        for _ in range(20):  # read between two attempts: during one, the next is "now" (0)
            if during["store"]["reconnect_in"]:
                break
            await asyncio.sleep(0.1)
            during = await (await client.get("/api/v1/status")).json()
        metrics_during = await (await client.get("/metrics")).text()
        ready_during = await client.get("/readyz")
        await asyncio.sleep(max(0.0, OUTAGE - (time.monotonic() - stopped)))
        await asyncio.to_thread(own_cluster.launch)
        restarted = time.monotonic()
        caught_up = await until(written, "the buffered sightings to arrive", bound=70.0)

        async def reconnected() -> bool:
            return link.status.connected

        await until(reconnected, "the agent to reconnect", bound=70.0)
        reconnect = time.monotonic() - restarted
        await asyncio.sleep(2.5)  # more flushes: nothing may be added twice
    finally:
        await load.stop()
    assert await stored_packets(url) == sent
    # Within the link's longest wait between reconnections, and the writer's next step after it.
    assert caught_up <= shared_mirror.RECONNECT_MAX + 3.0
    after = await (await client.get("/api/v1/status")).json()
    metrics_after = await (await client.get("/metrics")).text()

    statuses = {status for status, _ in load.answers}
    slowest = max(seconds for _, seconds in load.answers)
    assert statuses == {200}
    assert slowest < deadline, f"an enrichment answer took {slowest:.3f} s"
    assert len(load.answers) >= OUTAGE / (LOAD_EVERY + deadline)

    store = during["store"]
    assert ready_during.status == 200  # readiness is about the lookups, which answer from memory
    assert "reconnecting" in (await ready_during.json())["store"]
    assert 0 < store["reconnect_in"] <= shared_mirror.RECONNECT_MAX
    assert store["connected"] is False
    assert store["last_error"] is not None
    assert store["sightings"]["up"] is False
    assert store["sightings"]["waiting"] == len(CALLERS) + 1  # the callers and the SBC they called
    assert store["sightings"]["failures"] >= 1
    assert store["budget"]["shared"] is False
    assert store["sightings"]["read_failures"] >= 1
    assert "hepsub_apiban_store_connected 0.0" in metrics_during
    assert f"hepsub_apiban_store_sightings_waiting {float(len(CALLERS) + 1)}" in metrics_during
    assert "hepsub_apiban_store_budget_shared 0.0" in metrics_during

    store = after["store"]
    assert store["connected"] is True
    assert store["last_error"] is None
    assert store["reconnect_in"] is None
    assert (await (await client.get("/readyz")).json()) == {"ready": True}
    assert store["sightings"]["up"] is True
    assert store["sightings"]["waiting"] == 0
    assert store["sightings"]["evicted_unwritten"] == 0
    assert "hepsub_apiban_store_connected 1.0" in metrics_after
    # The outage is two lines, however many reconnection attempts it took (under 5 minutes).
    link_log = [r for r in caplog.records if r.name == "hepsub_apiban.shared_mirror"]
    outage = [r.getMessage() for r in link_log if r.getMessage().startswith("store ")]
    assert len(outage) == 2, outage
    assert outage[0].endswith("; serving from memory, retrying")
    assert " failing: " in outage[0]
    assert " recovered after " in outage[1]
    print(
        f"{len(load.answers)} answers, slowest {slowest:.3f} s; caught up {caught_up:.1f} s, "
        f"reconnected {reconnect:.1f} s after the restart"
    )
