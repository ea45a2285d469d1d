"""APIBAN data that cannot poison the list: bad pages, short full pulls, non-routable entries.

The fake APIBAN serves each kind of bad page (``FakeApiban.poison``) to the real client and the
real mirror sync, on one manual clock; every bad page must leave the held list, the position and
the saved snapshot exactly as they were, and be retried.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import aiohttp
import orjson
import pytest
from aiohttp.test_utils import TestServer
from hypothesis import given, settings
from hypothesis import strategies as st

from hepsub_apiban.apiban.client import (
    MAX_BODY_BYTES,
    PAGE_SIZE,
    ApibanClient,
    ApibanError,
    BadAnswer,
    Page,
    classify_banned,
    classify_check,
    is_plain_id,
)
from hepsub_apiban.apiban.mirror import START_ID, SnapshotError, mirror_from_snapshot
from hepsub_apiban.app import Clocks
from hepsub_apiban.core.config import RateLimit, load_settings
from hepsub_apiban.core.logs import Redactor
from hepsub_apiban.core.ratelimit import Budget
from hepsub_apiban.fakes.apiban import POISONS, FakeApiban
from hepsub_apiban.keys import MIRROR_SYNC, SETTINGS

from .conftest import APIBAN_KEY, AgentFactory, ApibanPeer, ManualClock, drive_agent_sync
from .test_mirror import DAY, Rig, ips

NOW = 1_700_000_000.0

# What the agent says about each poisoned page (its last error, in /api/v1/status).
POISON_ERRORS = {
    "int_id": "is not a string of up to 20 digits",
    "missing_id": "ID missing is not a string",
    "non_digit_id": "is not a string of up to 20 digits",
    "long_id": "is not a string of up to 20 digits",
    "far_ahead_id": "more than a day ahead",
    "backwards_id": "does not move forward",
    "same_id": "does not move forward",
    "non_string_entries": "other than strings",
    "ipaddress_object": "ipaddress is a JSON dict",
    "not_an_object": "not a JSON object",
    "oversized_page": "has 2,000 addresses",
    "huge_body": f"more than {MAX_BODY_BYTES:,} bytes",
}


def test_every_poison_of_the_fake_is_covered() -> None:
    assert set(POISON_ERRORS) == POISONS


@pytest.fixture
async def rig(aiohttp_server: Callable[..., Awaitable[TestServer]], tmp_path: Path) -> AsyncIterator[Rig]:
    clock = ManualClock(NOW)
    fake = FakeApiban(keys=[APIBAN_KEY], clock=clock, wall_clock=clock)
    server = await aiohttp_server(fake.app())
    async with aiohttp.ClientSession() as session:
        yield Rig(fake, str(server.make_url("")).rstrip("/"), clock, session, tmp_path)


def held(rig: Rig) -> tuple[Any, ...]:
    """Everything a bad page must not touch: the list, its numbering, the position, the file."""
    m = rig.sync.mirror
    return (
        dict(m.entries),
        dict(m.serials),
        m.next_serial,
        m.cursor,
        m.full_pull_started,
        m.last_sync,
        m.last_full_sync,
        rig.path.read_bytes(),
    )


# ------------------------------------------------------------------------ pure classification


@pytest.mark.parametrize(
    ("raw", "after", "message"),
    [
        (b'{"ipaddress":["1.2.3.4"],"ID":1700000100}', "100", "not a string"),
        (b'{"ipaddress":["1.2.3.4"]}', "100", "ID missing"),
        (b'{"ipaddress":["1.2.3.4"],"ID":"17000001\xc2\xb2"}', "100", "not a string of up to 20 digits"),
        (b'{"ipaddress":["1.2.3.4"],"ID":"%s"}' % (b"1" * 21), "100", "up to 20 digits"),
        (b'{"ipaddress":["1.2.3.4"],"ID":"-5"}', "100", "up to 20 digits"),
        (b'{"ipaddress":["1.2.3.4"],"ID":" 1700000100"}', "100", "up to 20 digits"),
        (b'{"ipaddress":["1.2.3.4"],"ID":"1700000100"}', "1700000100", "does not move forward"),
        (b'{"ipaddress":["1.2.3.4"],"ID":"1700000099"}', "1700000100", "does not move forward"),
        (b'{"ipaddress":["1.2.3.4"],"ID":"%d"}' % (NOW + DAY + 1), "100", "more than a day ahead"),
        (b'{"ipaddress":["1.2.3.4",5],"ID":"1700000100"}', "100", "other than strings"),
        (b'{"ipaddress":["1.2.3.4",null],"ID":"1700000100"}', "100", "other than strings"),
        (b'{"ipaddress":"1.2.3.4","ID":"1700000100"}', "100", "not a page of addresses"),
        (b'{"ipaddress":{"1.2.3.4":1},"ID":"1700000100"}', "100", "ipaddress is a JSON dict"),
        (b'{"ipaddress":7,"ID":"none"}', "100", "ipaddress is a JSON int"),
        (b'{"ID":"1700000100"}', "100", "not a page of addresses"),
        (b'[["1.2.3.4"],"1700000100"]', "100", "not a JSON object"),
        (orjson.dumps({"ipaddress": ["1.2.3.4"] * (PAGE_SIZE + 1), "ID": "1700000100"}), "100", "251"),
        (b'{"ipaddress":["1.2.3.4"],"ID":"1700000100"}', None, None),
    ],
)
def test_a_page_must_have_the_documented_shape(raw: bytes, after: str | None, message: str | None) -> None:
    if message is None:  # the control: the same page, well formed
        assert classify_banned(200, raw, after=after, now=NOW) == Page(("1.2.3.4",), "1700000100", False)
        return
    with pytest.raises(BadAnswer, match=message):
        classify_banned(200, raw, after=after, now=NOW)


@pytest.mark.parametrize(
    ("status", "raw", "expected"),
    [
        (400, b'{"ipaddress":["no new bans"],"ID":"none"}', Page((), None, True)),
        (400, b'{"ipaddress":"no new bans","ID":"none"}', Page((), None, True)),
        (400, b'{"ipaddress":["no new bans"]}', Page((), None, True)),
        (200, b'{"ID":"none"}', Page((), None, True)),
        (200, b'{"ipaddress":["1.2.3.4"],"ID":"none"}', Page(("1.2.3.4",), None, True)),
        # A string that is not an address does not spoil its page: the mirror skips it.
        (
            200,
            b'{"ipaddress":["1.2.3.4","x"],"ID":"1700000100"}',
            Page(("1.2.3.4", "x"), "1700000100", False),
        ),
    ],
)
def test_documented_ends_and_odd_strings_are_still_answers(status: int, raw: bytes, expected: Page) -> None:
    assert classify_banned(status, raw, after="100", now=NOW) == expected


def test_an_end_with_a_full_page_is_still_bounded() -> None:
    raw = orjson.dumps({"ipaddress": ["1.2.3.4"] * 10_000, "ID": "none"})
    with pytest.raises(BadAnswer, match="10,000 addresses"):
        classify_banned(400, raw, after="100", now=NOW)


def test_ids_are_plain_ascii_numbers_of_bounded_length() -> None:
    assert is_plain_id("100")
    assert is_plain_id("9" * 20)
    for bad in ("", "²", "1²", "9" * 21, "1\n", " 1", "+1", "1_0", "١٢", 17, None):
        assert not is_plain_id(bad), bad


JSON_LEAF = (
    st.none()
    | st.booleans()
    | st.integers(-(2**63), 2**64 - 1)
    | st.floats(allow_nan=False)
    | st.text(max_size=20)
)
JSON = st.recursive(
    JSON_LEAF,
    lambda children: (
        st.lists(children, max_size=5) | st.dictionaries(st.text(max_size=8), children, max_size=5)
    ),
    max_leaves=30,
)
ID_LIKE = st.sampled_from(["none", "unauthorized", "100", "1700000100", "9" * 25, "²"]) | JSON
IPADDRESS_LIKE = (
    st.lists(st.sampled_from(["1.2.3.4", "no new bans", "not blocked", "::1", "x"]) | JSON, max_size=300)
    | st.sampled_from(["no new bans", "not blocked", "rate limit exceeded", "none"])
    | JSON
)
BODY = st.fixed_dictionaries({}, optional={"ipaddress": IPADDRESS_LIKE, "ID": ID_LIKE}).map(orjson.dumps)
STATUS = st.sampled_from([200, 400, 401, 403, 404, 429, 500, 503]) | st.integers(100, 599)


@settings(max_examples=250, deadline=None)
@given(
    status=STATUS,
    raw=st.binary(max_size=300) | BODY,
    after=st.none() | st.sampled_from(["100", "1700000100"]),
)
def test_random_bodies_give_a_page_or_an_apiban_error(status: int, raw: bytes, after: str | None) -> None:
    try:
        page = classify_banned(status, raw, after=after, now=NOW)
    except ApibanError:
        return
    assert len(page.ips) <= PAGE_SIZE
    assert all(isinstance(ip, str) for ip in page.ips)
    assert page.end == (page.next_id is None)
    if page.next_id is not None:
        assert is_plain_id(page.next_id)
        assert int(page.next_id) <= NOW + DAY
        assert after is None or int(page.next_id) > int(after)


@settings(max_examples=250, deadline=None)
@given(status=STATUS, raw=st.binary(max_size=300) | BODY, ip=st.sampled_from(["1.2.3.4", "::1", "x"]))
def test_random_check_answers_give_a_verdict_or_an_apiban_error(status: int, raw: bytes, ip: str) -> None:
    try:
        answer = classify_check(ip, status, raw)
    except ApibanError:
        return
    assert answer.id is None or is_plain_id(answer.id)


# ------------------------------------------------------------------- bad pages, real sockets


@pytest.mark.parametrize("kind", sorted(POISONS))
async def test_a_bad_page_in_a_full_pull_changes_nothing_and_is_retried(rig: Rig, kind: str) -> None:
    listed = ips(600)
    rig.fake.add_many(listed)
    await rig.run_until(lambda: len(rig.sync.mirror.entries) == 250)  # the first page is in
    before = held(rig)
    rig.fake.poison = kind
    delays = [await rig.sync.step() for _ in range(3)]
    assert delays == [5.0, 10.0, 20.0]  # retried with backoff
    assert rig.fake.request_count("banned") == 4
    assert held(rig) == before
    assert not rig.sync.mirror.loaded
    assert rig.sync.status.state == "failing"
    assert rig.client.last_error is not None
    assert POISON_ERRORS[kind] in rig.client.last_error.message
    assert rig.client.requests[("banned", "bad_answer")] == 3
    rig.fake.poison = None
    await rig.run_until(lambda: rig.sync.mirror.loaded)
    assert set(rig.sync.mirror.entries) == set(listed)
    assert rig.sync.mirror.cursor == rig.fake.listed(listed[-1])


@pytest.mark.parametrize("kind", sorted(POISONS))
async def test_a_bad_page_in_an_incremental_pull_changes_nothing(rig: Rig, kind: str) -> None:
    rig.fake.add_many(ips(300))
    await rig.run_until(lambda: rig.sync.mirror.loaded)
    rig.clock.advance(300)
    news = ips(5, start=10_000)
    for ip in news:
        rig.fake.add(ip)  # IDs from the shared clock: just now
    before = held(rig)
    rig.fake.poison = kind
    delay = await rig.sync.step()
    assert delay == 5.0
    assert held(rig) == before
    assert rig.sync.mirror.loaded  # the list held still answers
    rig.fake.poison = None
    rig.clock.advance(delay)
    await rig.run_until(lambda: rig.sync.mirror.last_sync != before[5])
    assert set(news) <= set(rig.sync.mirror.entries)
    assert len(rig.sync.mirror.entries) == 305
    assert rig.sync.mirror.cursor == rig.fake.listed(news[-1])


async def test_an_oversized_body_releases_its_connection(
    aiohttp_server: Callable[..., Awaitable[TestServer]],
) -> None:
    fake = FakeApiban(keys=[APIBAN_KEY], rate_limit=None)
    fake.add_many(ips(10))
    fake.poison = "huge_body"
    server = await aiohttp_server(fake.app())
    settings = load_settings(
        None, {"HEPSUB_APIBAN_URL": str(server.make_url("")).rstrip("/"), "HEPSUB_APIBAN_KEY": APIBAN_KEY}
    ).apiban
    # One connection in the pool: an answer left holding it would make the next request wait
    # for the whole timeout and fail as Transient.
    connector = aiohttp.TCPConnector(limit=1)
    async with aiohttp.ClientSession(connector=connector) as session:
        budget = Budget(RateLimit(1000, 1.0), ManualClock())
        client = ApibanClient(session, settings, budget, Redactor([APIBAN_KEY]))
        for _ in range(3):
            with pytest.raises(BadAnswer, match="more than 1,048,576 bytes"):
                await client.banned(START_ID)
        fake.poison = None
        page = await client.banned(START_ID)
    assert len(page.ips) == 10
    assert fake.request_count("banned") == 4


# ------------------------------------------------------------------------ short full pulls


async def test_a_short_full_pull_is_retried_keeping_the_list_and_accepted_once_it_repeats(
    agent: AgentFactory, apiban: ApibanPeer
) -> None:
    clock = ManualClock(NOW)
    apiban.fake.rate_limit = None  # the fake counts on real time; the agent's budget on the manual clock
    listed = ips(1000)
    apiban.fake.add_many(listed)
    client = await agent(Clocks(monotonic=clock, wall=clock, sleep=clock.sleep), HEPSUB_APIBAN_MODE="mirror")
    sync = client.app[MIRROR_SYNC]
    await drive_agent_sync(clock, lambda: sync.mirror.loaded)
    first_full = sync.mirror.last_full_sync
    assert sync.mirror.last_full_entries == 1000
    for ip in listed[300:]:
        apiban.fake.remove(ip)  # APIBAN (or a proxy cutting the feed short) now gives 300
    clock.advance(6 * DAY)  # while the agent sleeps: the weekly re-pull is due
    clock.wake()
    await drive_agent_sync(clock, lambda: sync.status.full_pull_rejected is not None)

    status = (await (await client.get("/api/v1/status")).json())["mirror"]
    rejected = status["full_pull_rejected"]
    assert rejected["entries"] == 300
    assert rejected["expected"] == 1000
    assert rejected["at"] == clock.now
    assert rejected["repeats"] == 1
    assert "under half" in rejected["reason"]
    assert status["entries"] == 1000  # nothing swept
    assert status["loaded"] is True
    assert status["last_full_sync"] == first_full
    assert status["full_pulls_rejected"] == 1
    assert (await client.get("/readyz")).status == 200
    assert clock.sleeps[-1] == 300.0  # retried after a backoff
    raw = (client.app[SETTINGS].state.dir / "mirror.json").read_bytes()
    saved = orjson.loads(raw)
    assert saved["cursor"] == START_ID  # not saved as complete: a restart pulls the whole list again
    assert saved["full_pull_started"] is not None
    assert saved["last_full_sync"] == first_full
    assert saved["last_full_entries"] == 1000
    assert len(saved["entries"]) == 1000
    assert sync.mirror.verdict(listed[999]) is not None  # still answers as listed

    clock.wake()
    await drive_agent_sync(clock, lambda: sync.status.full_pulls_rejected == 2)
    assert sync.status.full_pull_rejected is not None
    assert sync.status.full_pull_rejected.repeats == 2
    assert clock.sleeps[-1] == 600.0
    assert len(sync.mirror.entries) == 1000
    clock.wake()
    await drive_agent_sync(clock, lambda: sync.mirror.last_full_sync != first_full)
    # The third pull in a row agreeing on the smaller size is taken as APIBAN's list.
    assert set(sync.mirror.entries) == set(listed[:300])
    assert sync.mirror.last_full_entries == 300
    status = (await (await client.get("/api/v1/status")).json())["mirror"]
    assert status["full_pull_rejected"] is None
    assert status["full_pulls_rejected"] == 2
    metrics = await (await client.get("/metrics")).text()
    assert "hepsub_apiban_mirror_full_pulls_rejected_total 2.0" in metrics


async def test_a_cut_short_pull_then_a_whole_one_sweeps_nothing_it_should_keep(rig: Rig) -> None:
    listed = ips(1000)
    rig.fake.add_many(listed)
    await rig.run_until(lambda: rig.sync.mirror.loaded)
    ids = {ip: rig.fake.listed(ip) for ip in listed}
    for ip in listed[400:]:
        rig.fake.remove(ip)
    rig.clock.advance(6 * DAY)
    await rig.run_until(lambda: rig.sync.status.full_pull_rejected is not None)
    assert len(rig.sync.mirror.entries) == 1000
    for ip in listed[400:]:  # the feed is whole again
        rig.fake.add(ip, int(ids[ip] or 0))
    full = rig.sync.mirror.last_full_sync
    await rig.run_until(lambda: rig.sync.mirror.last_full_sync != full)
    assert set(rig.sync.mirror.entries) == set(listed)
    assert rig.sync.status.full_pull_rejected is None
    assert rig.sync.mirror.last_full_entries == 1000


def pull_ended(rig: Rig) -> Callable[[], bool]:
    """True once the full pull under way is rejected or accepted."""
    rejected, full = rig.sync.status.full_pulls_rejected, rig.sync.mirror.last_full_sync
    return lambda: rig.sync.status.full_pulls_rejected > rejected or rig.sync.mirror.last_full_sync != full


async def test_short_pulls_that_disagree_start_the_count_again(rig: Rig) -> None:
    listed = ips(1000)
    rig.fake.add_many(listed)
    await rig.run_until(lambda: rig.sync.mirror.loaded)
    rig.clock.advance(6 * DAY)
    sizes = [300, 450, 440, 445]  # 450 is not 300 within 10%: three agreeing ones are 450, 440, 445
    for size in sizes:
        for ip in listed[size:]:
            rig.fake.remove(ip)
        for ip in listed[:size]:
            if rig.fake.listed(ip) is None:
                rig.fake.add(ip)
        delays = await rig.run_until(pull_ended(rig))
        rig.clock.advance(delays[-1])  # the backoff before the next pull
    assert rig.sync.status.full_pulls_rejected == 3
    assert rig.sync.mirror.last_full_entries == 445
    assert len(rig.sync.mirror.entries) == 445


# ---------------------------------------------------------------------- non-routable entries

SITE_KEY = "site-poison-key"
NON_ROUTABLE = ["127.0.0.1", "10.0.0.1", "::1", "192.168.1.10", "::ffff:127.0.0.1"]
ROUTABLE = "45.1.2.3"
TRUNK = "46.9.9.9"  # routable, listed by APIBAN, but a trusted peer in the site's allow-list


async def test_non_routable_and_allow_listed_entries_are_served_to_no_one(
    agent: AgentFactory, apiban: ApibanPeer
) -> None:
    clock = ManualClock()
    apiban.fake.add_many([*NON_ROUTABLE[:2], ROUTABLE, TRUNK, *NON_ROUTABLE[2:]])
    client = await agent(
        Clocks(sleep=clock.sleep),
        HEPSUB_APIBAN_MODE="mirror",
        HEPSUB_SITE_KEYS=SITE_KEY,
        HEPSUB_ALLOW_CIDRS="46.9.0.0/16",
    )
    sync = client.app[MIRROR_SYNC]
    await drive_agent_sync(clock, lambda: sync.mirror.loaded)
    assert set(sync.mirror.entries) == {ROUTABLE, TRUNK}  # the allow-list is applied when serving

    banned = await client.get(f"/api/{SITE_KEY}/banned/100")
    body = await banned.json()
    assert (banned.status, body["ipaddress"]) == (200, [ROUTABLE])
    assert (await client.get(f"/api/{SITE_KEY}/banned/{body['ID']}")).status == 400  # and nothing after
    assert await (await client.get(f"/ipset/{SITE_KEY}/list")).text() == f"{ROUTABLE}\n"
    auth = {"Authorization": f"Bearer {SITE_KEY}"}
    got = await (await client.post("/api/get", data=b'{"set":"sip","id":"100"}', headers=auth)).json()
    assert got["ipaddress"] == [ROUTABLE]
    for ip in [*NON_ROUTABLE, TRUNK]:
        check = await client.get(f"/api/{SITE_KEY}/check/{ip}")
        assert (check.status, await check.json()) == (400, {"ipaddress": ["not blocked"], "ID": "none"})
        checkv2 = await client.post("/api/check", data=orjson.dumps({"ipaddress": ip}), headers=auth)
        assert checkv2.status == 400
    assert (await client.get(f"/api/{SITE_KEY}/check/{ROUTABLE}")).status == 200

    enrichment = {"data": {"sid": ["c@x"], "source_ip": [*NON_ROUTABLE, ROUTABLE, TRUNK]}, "fromts": 1}
    answer = await (await client.post("/get/cdr", json=enrichment)).json()
    assert answer[ROUTABLE]["listed"] is True
    assert (answer[TRUNK]["listed"], answer[TRUNK]["source"]) == (False, "allowlist")
    for ip in ("127.0.0.1", "10.0.0.1", "::1", "192.168.1.10"):
        assert (answer[ip]["listed"], answer[ip]["source"]) == (False, "private")
    status = (await (await client.get("/api/v1/status")).json())["mirror"]
    assert status["dropped"] == {"non_routable": 5}
    metrics = await (await client.get("/metrics")).text()
    assert 'hepsub_apiban_mirror_dropped_total{reason="non_routable"} 5.0' in metrics


async def test_non_routable_entries_of_an_old_snapshot_are_dropped(
    agent: AgentFactory, apiban: ApibanPeer, tmp_path: Path
) -> None:
    from .test_site_api import write_list

    write_list(tmp_path, apiban, [ROUTABLE, "46.1.1.1"])
    path = tmp_path / "state" / "mirror.json"
    document = orjson.loads(path.read_bytes())
    serial = document["next_serial"]
    document["entries"] += [["127.0.0.1", "1700000000", document["entries"][0][2], serial]]
    document["next_serial"] = serial + 1
    path.write_bytes(orjson.dumps(document))
    client = await agent(HEPSUB_APIBAN_MODE="mirror", HEPSUB_SITE_KEYS=SITE_KEY)
    sync = client.app[MIRROR_SYNC]
    assert sync.status.snapshot_loaded
    assert set(sync.mirror.entries) == {ROUTABLE, "46.1.1.1"}
    assert sync.mirror.dropped["non_routable"] == 1
    assert await (await client.get(f"/ipset/{SITE_KEY}/list")).text() == f"{ROUTABLE}\n46.1.1.1\n"


def test_a_loaded_snapshot_never_holds_a_non_routable_address() -> None:
    entries: list[list[object]] = [
        ["::1", "1700000000", int(NOW), 1],
        ["45.0.0.1", "1700000000", int(NOW), 2],
    ]
    document = {
        "format": "hepsub-apiban/mirror",
        "version": 2,
        "source": "src",
        "saved_at": NOW,
        "cursor": "1700000000",
        "next_serial": 10,
        "entries": entries,
    }
    mirror = mirror_from_snapshot(orjson.dumps(document), "src", NOW)
    assert set(mirror.entries) == {"45.0.0.1"}
    assert set(mirror.serials) == {"45.0.0.1"}
    entries.append(["45.0.0.1", "1700000000", int(NOW), 3])
    with pytest.raises(SnapshotError, match="repeats"):
        mirror_from_snapshot(orjson.dumps(document), "src", NOW)
