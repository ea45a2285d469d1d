"""APIBAN requests spent: by a cold start with a large list, and by enrichment requests after it.

    python bench/apiban_requests.py [--listed 20000] [--enrichments 1000]

Runs the real agent application and the built-in APIBAN fake, which enforces APIBAN's 11
requests per 120 s per key, on one simulated clock: the agent's sleeps advance it instantly, so
a cold start that takes a quarter of an hour of real time runs in seconds and every request keeps
its exact simulated timestamp. Then it posts homer-app-shaped enrichment requests (10 IPs each,
half of them listed) over real HTTP and counts the APIBAN requests they cause.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import random
import tempfile
from collections.abc import AsyncIterator
from pathlib import Path

from aiohttp.test_utils import BaseTestServer, TestClient, TestServer
from common import BENCH_KEY, machine, public_ips, table

from hepsub_apiban.app import Clocks, create_app
from hepsub_apiban.core.config import load_settings
from hepsub_apiban.fakes.apiban import FakeApiban
from hepsub_apiban.keys import LOOKUPS, MIRROR_SYNC


class SimulatedTime:
    """A clock that jumps forward when the agent sleeps, until it is frozen."""

    def __init__(self) -> None:
        self.now = 1_800_000_000.0
        self.frozen = False

    def __call__(self) -> float:
        return self.now

    async def sleep(self, seconds: float) -> None:
        if self.frozen:  # after the cold start: no background polls while enrichment is measured
            await asyncio.Event().wait()
        self.now += seconds
        await asyncio.sleep(0)


async def run(listed_count: int, enrichments: int) -> None:
    time = SimulatedTime()
    feed = FakeApiban(keys=[BENCH_KEY], clock=time, wall_clock=time)
    pool = public_ips(listed_count + 5000, seed=4)
    listed, clean = pool[:listed_count], pool[listed_count:]
    feed.add_many(listed)
    async with TestServer(feed.app()) as feed_server, _agent(feed_server, time) as agent:
        started = time.now
        for _ in range(100_000):  # real time: the cold start takes ~1 s of it
            if agent.app[LOOKUPS].ready:
                break
            await asyncio.sleep(0.001)
        else:
            raise RuntimeError("the agent did not load the list")
        time.frozen = True
        cold_requests = feed.request_count()
        cold_429 = sum(1 for r in feed.requests if r.status == 429)
        held = len(agent.app[MIRROR_SYNC].mirror.entries)
        cold_seconds = time.now - started
        window_max = _max_in_window([r.at for r in feed.requests], 120.0)
        rng = random.Random(9)
        for n in range(enrichments):
            ips = rng.sample(listed, 5) + rng.sample(clean, 5)
            body = {"data": {"sid": [f"call-{n}@bench"], "source_ip": ips}, "fromts": 1669986139000}
            answer = await (await agent.post("/get/cdr", json=body)).json()
            assert len(answer[f"call-{n}@bench"]["listed"]) == 5
        after = feed.requests[cold_requests:]
    print(f"machine: {machine()}")
    print(
        table(
            ["phase", "APIBAN requests", "429 answers", "simulated time", "most requests in any 120 s"],
            [
                [
                    f"cold start, {listed_count:,} listed ({held:,} held)",
                    cold_requests,
                    cold_429,
                    f"{cold_seconds / 60:.1f} min",
                    window_max,
                ],
                [
                    f"{enrichments:,} enrichment requests after it (10 IPs each)",
                    len(after),
                    sum(1 for r in after if r.status == 429),
                    "-",
                    "-",
                ],
            ],
        )
    )


@contextlib.asynccontextmanager
async def _agent(feed_server: BaseTestServer, time: SimulatedTime) -> AsyncIterator[TestClient]:  # type: ignore[type-arg]
    with tempfile.TemporaryDirectory(prefix="hepsub-bench-") as tmp:
        env = {
            "HEPSUB_APIBAN_URL": str(feed_server.make_url("")).rstrip("/"),
            "HEPSUB_APIBAN_KEY": BENCH_KEY,
            "HEPSUB_STATE_DIR": str(Path(tmp) / "state"),
        }
        clocks = Clocks(monotonic=time, wall=time, sleep=time.sleep)
        async with TestClient(TestServer(create_app(load_settings(None, env), clocks=clocks))) as client:
            yield client


def _max_in_window(times: list[float], window: float) -> int:
    return max((sum(1 for t in times[i:] if t < start + window) for i, start in enumerate(times)), default=0)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--listed", type=int, default=20_000)
    parser.add_argument("--enrichments", type=int, default=1000)
    arguments = parser.parse_args()
    asyncio.run(run(arguments.listed, arguments.enrichments))
