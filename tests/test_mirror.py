"""Mirror mode against the APIBAN fake, with one manual clock for the agent, its budget and the fake.

Time only moves when the sync sleeps, so an hour-long cold start runs in milliseconds and every
request's timestamp is exact.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path

import aiohttp
import orjson
import pytest
from aiohttp.test_utils import TestServer

from hepsub_apiban.apiban.client import ApibanClient
from hepsub_apiban.apiban.mirror import (
    ACTIVE_FOR,
    START_ID,
    CurrentMirror,
    Mirror,
    MirrorSync,
    SnapshotError,
    mirror_from_snapshot,
    snapshot_source,
)
from hepsub_apiban.app import Clocks
from hepsub_apiban.core.config import load_settings
from hepsub_apiban.core.logs import Redactor
from hepsub_apiban.core.ratelimit import Budget
from hepsub_apiban.core.trouble import duration
from hepsub_apiban.fakes.apiban import FakeApiban
from hepsub_apiban.keys import MIRROR_SYNC

from .conftest import APIBAN_KEY, AgentFactory, ApibanPeer, ManualClock, drive_agent_sync

DAY = 86400.0


def ips(count: int, start: int = 0) -> list[str]:
    return [f"45.{(i >> 16) & 255}.{(i >> 8) & 255}.{i & 255}" for i in range(start, start + count)]


class Rig:
    """A MirrorSync wired to a fake APIBAN that enforces its own limit on the same clock."""

    def __init__(
        self, fake: FakeApiban, url: str, clock: ManualClock, session: aiohttp.ClientSession, state: Path
    ):
        self.fake, self.clock = fake, clock
        settings = load_settings(None, {"HEPSUB_APIBAN_URL": url, "HEPSUB_APIBAN_KEY": APIBAN_KEY}).apiban
        self.budget = Budget(settings.rate_limit, clock)
        self.client = ApibanClient(session, settings, self.budget, Redactor([APIBAN_KEY]), clock)
        self.path = state / "mirror.json"
        self.source = snapshot_source(url, APIBAN_KEY)
        self.sync = self.new_sync()

    def new_sync(self) -> MirrorSync:
        return MirrorSync(
            self.client,
            CurrentMirror(),
            poll_interval=300,
            snapshot_path=self.path,
            source=self.source,
            wall_clock=self.clock,
            sleep=self.clock.sleep,
        )

    async def run_until(self, done: Callable[[], bool], max_steps: int = 5000) -> list[float]:
        """Run sync steps, sleeping on the manual clock, until ``done()``; returns the delays."""
        delays: list[float] = []
        if done():
            return delays
        for _ in range(max_steps):
            delays.append(await self.sync.step())
            if done():
                return delays  # time stays at the moment the condition came true
            self.clock.advance(delays[-1])
        raise AssertionError("sync did not get there")

    def accepted_times(self) -> list[float]:
        return [r.at for r in self.fake.requests if r.status != 429]


@pytest.fixture
async def rig(aiohttp_server: Callable[..., Awaitable[TestServer]], tmp_path: Path) -> AsyncIterator[Rig]:
    clock = ManualClock()
    fake = FakeApiban(keys=[APIBAN_KEY], clock=clock, wall_clock=clock)
    server = await aiohttp_server(fake.app())
    async with aiohttp.ClientSession() as session:
        yield Rig(fake, str(server.make_url("")).rstrip("/"), clock, session, tmp_path)


def max_in_any_window(times: list[float], window: float) -> int:
    return max((sum(1 for t in times[i:] if t < start + window) for i, start in enumerate(times)), default=0)


async def test_cold_full_pull_pages_within_the_budget_and_never_meets_a_429(rig: Rig) -> None:
    listed = ips(3000)
    rig.fake.add_many(listed)
    started = rig.clock.now
    await rig.run_until(lambda: rig.sync.mirror.loaded)
    assert set(rig.sync.mirror.entries) == set(listed)
    assert rig.fake.request_count("banned") == 13  # 12 pages of 250, then "no new bans"
    assert all(r.status != 429 for r in rig.fake.requests)
    assert max_in_any_window(rig.accepted_times(), 120.0) <= 10  # 11/120 less one kept for checks
    assert rig.clock.now - started >= 120.0  # 13 requests cannot fit in one window


async def test_429_mid_pull_keeps_the_pages_and_resumes_from_the_last_good_id(rig: Rig) -> None:
    rig.fake.add_many(ips(2000))
    rig.fake.rate_limit = (4, 120.0)  # APIBAN stricter than our budget (another instance on the key)
    delays = await rig.run_until(lambda: bool(rig.fake.requests) and rig.fake.requests[-1].status == 429)
    assert delays[-1] == pytest.approx(120.0)  # after a 429 the whole window is waited out
    assert len(rig.sync.mirror.entries) == 1000
    assert rig.sync.mirror.cursor == rig.fake.listed(ips(2000)[999])
    await rig.run_until(lambda: rig.sync.mirror.loaded)
    assert len(rig.sync.mirror.entries) == 2000
    statuses = [r.status for r in rig.fake.requests]
    assert statuses.count(200) == 8  # every page fetched once: nothing pulled twice
    assert statuses.count(429) >= 1


async def test_outage_mid_pull_keeps_progress_and_backs_off(rig: Rig) -> None:
    rig.fake.add_many(ips(1000))
    await rig.run_until(lambda: len(rig.sync.mirror.entries) == 500)
    rig.fake.fail_status = 503
    delays = [await rig.sync.step() for _ in range(3)]
    assert delays == [5.0, 10.0, 20.0]
    assert len(rig.sync.mirror.entries) == 500
    assert rig.sync.status.state == "failing"
    rig.fake.fail_status = None
    await rig.run_until(lambda: rig.sync.mirror.loaded)
    assert len(rig.sync.mirror.entries) == 1000
    assert [r.status for r in rig.fake.requests].count(200) == 4


def _messages(caplog: pytest.LogCaptureFixture, name: str) -> list[tuple[str, str]]:
    return [(r.levelname, r.getMessage()) for r in caplog.records if r.name == name]


async def test_an_apiban_outage_during_the_sync_is_failing_still_failing_recovered(
    rig: Rig, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level("INFO", logger="hepsub_apiban.mirror")
    rig.fake.add_many(ips(1000))
    await rig.run_until(lambda: len(rig.sync.mirror.entries) == 500)
    cursor = rig.sync.mirror.cursor
    caplog.clear()
    rig.fake.fail_status = 503
    started, attempts = rig.clock.now, 0
    while rig.clock.now - started < 11 * 60:  # retried after 5, 10, 20 ... up to 300 s
        rig.clock.advance(await rig.sync.step())
        attempts += 1
    rig.fake.fail_status = None
    await rig.run_until(lambda: rig.sync.mirror.loaded)
    lines = [(level, text) for level, text in _messages(caplog, "hepsub_apiban.mirror") if "sync" in text]
    assert lines[0] == ("WARNING", f"APIBAN list sync failing: APIBAN answered 503; paused at ID {cursor}")
    still = [text for level, text in lines[1:-1]]
    assert len(still) == 2, lines  # at 5 and 10 minutes, not once per retry
    assert all(text.startswith("APIBAN list sync still failing after ") for text in still)
    assert still[1].endswith(": APIBAN answered 503")
    assert lines[-1] == (
        "INFO",
        f"APIBAN list sync recovered after {attempts} failed attempts over "
        f"{duration(rig.clock.now - started)}; resumed at ID {cursor}",
    )


async def test_incremental_pull_fetches_only_what_is_new(rig: Rig) -> None:
    rig.fake.add_many(ips(300))
    await rig.run_until(lambda: rig.sync.mirror.loaded)
    before = rig.fake.request_count()
    rig.clock.advance(300)
    assert await rig.sync.step() == 300.0  # nothing new: one request, then wait for the next poll
    assert rig.fake.request_count() == before + 1
    rig.clock.advance(300)
    for ip in ips(5, start=10_000):
        rig.fake.add(ip)
    await rig.run_until(lambda: "45.0.39.20" in rig.sync.mirror.entries)
    new = rig.sync.mirror.entries["45.0.39.20"]
    assert new.listed is True
    assert new.source == "mirror"
    assert new.id == rig.fake.listed("45.0.39.20")
    assert new.last_reported == int(rig.clock.now)
    assert rig.fake.request_count() - before == 2  # the idle poll, then the page with the news
    assert len(rig.sync.mirror.entries) == 305


async def test_entries_expire_seven_days_after_last_reported(rig: Rig) -> None:
    rig.fake.add_many(ips(10))
    await rig.run_until(lambda: rig.sync.mirror.loaded)
    mirror = rig.sync.mirror
    rig.clock.advance(ACTIVE_FOR - 1)
    rig.fake.rate_limit = None
    rig.fake.fail_status = 503  # no full re-pull can refresh them
    await rig.sync.step()
    assert len(mirror.entries) == 10
    rig.clock.advance(1)
    await rig.sync.step()
    assert mirror.entries == {}


async def test_weekly_full_repull_sweeps_what_apiban_no_longer_lists(rig: Rig) -> None:
    listed = ips(600)
    rig.fake.add_many(listed)
    await rig.run_until(lambda: rig.sync.mirror.loaded)
    first_full = rig.sync.mirror.last_full_sync
    rig.fake.remove(listed[0])
    rig.fake.remove(listed[599])
    rig.clock.advance(7 * DAY - 1200)  # incremental polls go on; none reports the old entries again
    await rig.run_until(lambda: rig.sync.mirror.full_pull_started is not None)
    # The re-pull runs while the old list still answers: nothing drops out before its pages return.
    while rig.sync.mirror.full_pull_started is not None:
        assert listed[599] in rig.sync.mirror.entries
        rig.clock.advance(await rig.sync.step())
    assert rig.sync.mirror.last_full_sync != first_full
    assert rig.clock.now - first_full < ACTIVE_FOR
    entries = rig.sync.mirror.entries
    assert listed[0] not in entries
    assert listed[599] not in entries
    assert len(entries) == 598
    assert all(v.last_reported and v.last_reported >= rig.clock.now - 600 for v in entries.values())


async def test_snapshot_round_trip_resumes_without_a_full_pull(rig: Rig) -> None:
    rig.fake.add_many([*ips(700), "2a01:4f8::5"])
    await rig.run_until(lambda: rig.sync.mirror.loaded)
    original = rig.sync.mirror
    assert rig.path.exists()
    assert not list(rig.path.parent.glob(".mirror.json.*"))  # temp files renamed or removed
    restarted = rig.new_sync()
    restarted.load_snapshot()
    assert restarted.mirror.loaded
    assert restarted.mirror.entries == original.entries
    assert restarted.mirror.cursor == original.cursor
    assert "2a01:4f8::5" in restarted.mirror.entries
    before = rig.fake.request_count()
    rig.sync = restarted
    rig.clock.advance(300)
    await rig.sync.step()
    assert rig.fake.request_count() == before + 1  # one incremental request, not a full pull


async def test_restart_mid_pull_continues_from_the_saved_id(rig: Rig) -> None:
    rig.fake.add_many(ips(1000))
    await rig.run_until(lambda: len(rig.sync.mirror.entries) == 500)
    restarted = rig.new_sync()
    restarted.load_snapshot()
    assert not restarted.mirror.loaded
    assert restarted.mirror.cursor == rig.sync.mirror.cursor != START_ID
    rig.sync = restarted
    await rig.run_until(lambda: rig.sync.mirror.loaded)
    assert [r.status for r in rig.fake.requests].count(200) == 4


@pytest.mark.parametrize(
    "content",
    [
        b"",
        b"not json",
        b'{"format":"something-else","version":1}',
        b'{"format":"hepsub-apiban/mirror","version":99}',
        b"TRUNCATE",
        b"BAD-ENTRY",
        b"FOREIGN",
    ],
)
async def test_corrupt_or_foreign_snapshot_is_reported_and_ignored(rig: Rig, content: bytes) -> None:
    rig.fake.add_many(ips(300))
    await rig.run_until(lambda: rig.sync.mirror.loaded)
    good = rig.path.read_bytes()
    if content == b"TRUNCATE":
        content = good[: len(good) // 2]
    elif content == b"BAD-ENTRY":
        document = orjson.loads(good)
        document["entries"][5][0] = "999.1.1.1"
        content = orjson.dumps(document)
    elif content == b"FOREIGN":
        document = orjson.loads(good)
        document["source"] = snapshot_source("https://apiban.org", "another-key")
        content = orjson.dumps(document)
    rig.path.write_bytes(content)
    restarted = rig.new_sync()
    restarted.load_snapshot()
    assert restarted.mirror.entries == {}
    assert not restarted.mirror.loaded
    assert restarted.status.snapshot_error
    assert APIBAN_KEY not in restarted.status.snapshot_error


def test_snapshot_parser_rejects_partial_trust() -> None:
    mirror = Mirror()
    mirror.add(["1.2.3.4", "5.6.7.8"], "1700000000", 1_700_000_000)
    document = orjson.loads(mirror.to_snapshot("src", 1_700_000_000))
    document["entries"].append(["1.2.3.4", "1700000001", "yesterday"])
    with pytest.raises(SnapshotError, match="entry 2"):
        mirror_from_snapshot(orjson.dumps(document), "src")


async def test_budget_ceiling_holds_over_a_long_run(rig: Rig) -> None:
    rig.fake.add_many(ips(5000))
    await rig.run_until(lambda: rig.sync.mirror.loaded)
    for n in range(20):  # then incremental polls, each with news
        rig.fake.add(ips(1, start=50_000 + n)[0])
        rig.clock.advance(await rig.sync.step())
    times = rig.accepted_times()
    assert max_in_any_window(times, 120.0) <= 11
    assert all(r.status == 200 or r.status == 400 for r in rig.fake.requests)


# ----------------------------------------------------------------------------- through the agent


async def test_agent_serves_from_the_mirror_with_no_upstream_requests(
    agent: AgentFactory, apiban: ApibanPeer
) -> None:
    clock = ManualClock()
    apiban.fake.add_many(["1.2.3.4", "2a01:4f8::5", "9.9.1.1", *ips(400)])
    client = await agent(
        Clocks(sleep=clock.sleep), HEPSUB_APIBAN_MODE="mirror", HEPSUB_ALLOW_CIDRS="9.9.0.0/16"
    )
    await drive_agent_sync(clock, lambda: client.app[MIRROR_SYNC].mirror.loaded)
    assert (await client.get("/readyz")).status == 200
    before = apiban.fake.request_count()
    body = {
        "data": {"sid": ["c@x"], "source_ip": ["1.2.3.4", "2A01:04F8::5", "9.9.1.1", "8.8.8.8"]},
        "fromts": 1,
    }
    answer = await (await client.post("/get/cdr", json=body)).json()
    assert answer["c@x"]["listed"] == ["1.2.3.4", "2a01:4f8::5"]
    assert answer["1.2.3.4"]["source"] == "mirror"
    # /banned gives one ID per page (250 addresses): the ID of the page's last entry.
    assert answer["1.2.3.4"]["ID"] == apiban.fake.listed(ips(400)[246])
    assert answer["1.2.3.4"]["last_reported"].endswith(" UTC")
    # "Date modified" in the HOMER tab: when the list last changed, not the call's time.
    assert answer["c@x"]["t_sec"] == int(client.app[MIRROR_SYNC].mirror.last_sync or 0) > 1
    assert answer["9.9.1.1"] | {"fields": []} == {
        "(1) verdict": "in allow.cidrs: never reported as listed",
        "ip": "9.9.1.1",
        "listed": False,
        "source": "allowlist",
        "fields": [],
    }
    assert answer["8.8.8.8"]["source"] == "mirror"
    assert answer["8.8.8.8"]["listed"] is False
    for _ in range(50):
        await client.post("/get/cdr", json=body)
    assert apiban.fake.request_count() == before  # zero upstream requests on the lookup path
    status = await (await client.get("/api/v1/status")).json()
    assert status["mirror"]["entries"] == 403
    assert status["mirror"]["loaded"] is True
    assert status["mirror"]["last_sync_age"] is not None
    assert status["mirror"]["next_sync"] is not None
    assert status["apiban"]["budget"]["used"] == 3
    metrics = await (await client.get("/metrics")).text()
    assert "hepsub_apiban_mirror_entries 403.0" in metrics
    assert "hepsub_apiban_mirror_loaded 1.0" in metrics


async def test_until_the_list_is_in_lookups_fall_back_to_check(
    agent: AgentFactory, apiban: ApibanPeer
) -> None:
    clock = ManualClock()
    apiban.fake.add("1.2.3.4")
    client = await agent(Clocks(sleep=clock.sleep), HEPSUB_APIBAN_MODE="mirror")
    await clock.next_sleep()  # the first page is in; the sync waits for its next step
    assert client.app[MIRROR_SYNC].mirror.loaded is False
    ready = await client.get("/readyz")
    assert ready.status == 503
    verdict = await (await client.get("/api/v1/check/8.8.8.8")).json()
    assert verdict["source"] == "check"
    assert apiban.fake.request_count("check") == 1
    listed = await (await client.get("/api/v1/check/1.2.3.4")).json()
    assert listed["source"] == "mirror"  # a partial list already answers "listed" for sure


def spread_over_the_last_week(rig: Rig, count: int) -> None:
    """``count`` entries with IDs evenly spread over APIBAN's 7 days, as a real list has them."""
    step = ACTIVE_FOR / count
    for n, ip in enumerate(ips(count)):
        rig.fake.add(ip, int(rig.clock.now - ACTIVE_FOR + (n + 1) * step))


async def test_first_pull_progress_carries_an_estimate_from_the_entries_ages(
    rig: Rig, caplog: pytest.LogCaptureFixture
) -> None:
    spread_over_the_last_week(rig, 3000)
    caplog.set_level("INFO", logger="hepsub_apiban.mirror")
    await rig.run_until(lambda: rig.sync.mirror.loaded)
    progress = [r.getMessage() for r in caplog.records if r.getMessage().startswith("APIBAN list: synced")]
    # 10 pages in the first window (one request kept for checks), then the wait is logged.
    assert progress[0].startswith("APIBAN list: synced 2,500 of ~3,000 addresses (10 pages), "), progress


async def test_progress_says_so_far_when_ids_are_not_recent_times(
    rig: Rig, caplog: pytest.LogCaptureFixture
) -> None:
    rig.fake.add_many(ips(3000), start_ts=int(rig.clock.now - 30 * DAY))  # IDs a month old: no estimate
    caplog.set_level("INFO", logger="hepsub_apiban.mirror")
    await rig.run_until(lambda: rig.sync.mirror.loaded)
    progress = [r.getMessage() for r in caplog.records if r.getMessage().startswith("APIBAN list: synced")]
    assert progress[0].startswith("APIBAN list: synced 2,500 addresses so far (10 pages), "), progress
