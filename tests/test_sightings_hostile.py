"""Sightings under forged HEP traffic: protected eviction, bounded per-address data, the budget share."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator

import orjson
import pytest

from hepsub_apiban.apiban.lookups import LookupService
from hepsub_apiban.apiban.mirror import ACTIVE_FOR, Mirror
from hepsub_apiban.app import Clocks
from hepsub_apiban.core.addresses import NetworkSet
from hepsub_apiban.core.config import RateLimit
from hepsub_apiban.core.ratelimit import Budget
from hepsub_apiban.formats.hep import build_hep3
from hepsub_apiban.formats.sip import SipInfo
from hepsub_apiban.ingest import sighting as sightings_module
from hepsub_apiban.ingest.sightings import OTHER_METHOD, SIP_METHODS, STATUS_CODES, Sightings
from hepsub_apiban.keys import APIBAN, LOOKUPS, SIGHTINGS

from .conftest import AgentFactory, ApibanPeer, ManualClock
from .test_collector import (
    Client,
    Connections,
    decoded,
    hep_agent,
    sightings,
    sip_packet,
    tcp,  # noqa: F401  (the fixture)
    udp_send,
    until,
)
from .test_lookups import (
    ip,
    service,  # noqa: F401  (the fixture)
)

SBC = "80.2.2.2"  # the site's public SIP address: the receiver of every forged packet
LISTED = "80.9.9.9"
REGISTER = SipInfo(method="REGISTER", call_id="c1", from_user="100", user_agent="friendly-scanner")


def mirror_store(*listed: str, capacity: int = 1000) -> tuple[Sightings, Mirror]:
    mirror = Mirror()
    mirror.add(listed, "1700000000", 1.0)
    mirror.last_full_sync = 1.0
    return Sightings(LookupService(None, NetworkSet(), mirror=mirror), capacity=capacity), mirror


def spoofed(count: int, first_octet: int = 45) -> Iterator[str]:
    """``count`` distinct public addresses, one per forged packet."""
    return (f"{first_octet}.{n >> 16}.{(n >> 8) & 255}.{n & 255}" for n in range(count))


def test_listed_address_survives_a_million_spoofed_sources() -> None:
    store, _ = mirror_store(LISTED, "80.7.7.7", capacity=1000)
    store.record(LISTED, SBC, REGISTER, 1.0)  # one packet, then silence
    store.record("80.1.1.1", SBC, REGISTER, 1.0)  # an ordinary sender, seen as long ago
    record = store.record
    for n, src in enumerate(spoofed(1_000_000)):
        record(src, SBC, REGISTER, 2.0)
        if n == 500_000:
            record("80.7.7.7", SBC, REGISTER, 2.0)  # listed, seen in the middle of the flood
    kept = store.get(LISTED)
    assert kept is not None
    assert (kept.listed, kept.packets) == (True, 1)
    assert kept.methods == {"REGISTER": 1}
    assert store.get("80.7.7.7") is not None
    assert store.get("80.1.1.1") is None  # ordinary sightings still make room
    assert store.get("45.15.66.63") is not None  # the last forged source
    assert len(store) == 1000
    assert store.evicted == 1_000_004 - 1000  # every address ever seen, less those kept
    assert (store.listed_count(), store.protected_count(), store.evicted_protected) == (2, 2, 0)
    assert [s.ip for s in store.values(listed=True)] == ["80.7.7.7", LISTED]


def test_protection_follows_the_verdict_and_the_detection_flag() -> None:
    store, mirror = mirror_store(LISTED, capacity=100)
    for src in (LISTED, "80.1.1.1", "80.1.1.2"):
        store.record(src, "10.0.0.1", REGISTER, 1.0)
    assert [s.ip for s in store.values()] == ["10.0.0.1", "80.1.1.2", "80.1.1.1", LISTED]
    assert [s.ip for s in store.values(listed=False)] == ["10.0.0.1", "80.1.1.2", "80.1.1.1"]
    mirror.add(["80.1.1.1"], "1700000100", 1.0)  # listed after it was first seen
    store.record("80.1.1.1", "10.0.0.1", REGISTER, 1.0)  # its next packet reads the verdict
    assert store.flag("80.1.1.2") is True  # local detection found it hostile
    assert store.flag("80.200.0.1") is False  # never seen
    assert store.listed_count() == 2
    for src in spoofed(500):
        store.record(src, "10.0.0.1", REGISTER, 2.0)
    assert all(store.get(a) is not None for a in (LISTED, "80.1.1.1", "80.1.1.2"))
    # Unlisted (the mirror expires the entries) and unflagged: ordinary again, and forgotten.
    mirror.expire(1.0 + ACTIVE_FOR + 1)
    store.record(LISTED, "10.0.0.1", REGISTER, 3.0)
    store.flag("80.1.1.2", False)
    assert (store.listed_count(), store.protected_count()) == (1, 1)  # 80.1.1.1: no packet since
    for src in spoofed(500, first_octet=46):
        store.record(src, "10.0.0.1", REGISTER, 4.0)
    assert (store.get(LISTED), store.get("80.1.1.2")) == (None, None)
    assert store.get("80.1.1.1") is not None


def test_protected_sightings_go_only_when_nothing_else_is_left() -> None:
    senders = [f"80.3.{n >> 8}.{n & 255}" for n in range(150)]
    store, _ = mirror_store(*senders, capacity=100)
    for src in senders:
        store.record(src, "10.0.0.1", REGISTER, 1.0)
    assert len(store) == 100
    assert store.listed_count() == store.protected_count() == 99  # and the receiver
    # Past 99 listed senders, each new one pushes out the one ordinary sighting (the receiver),
    # which comes back with the same packet and pushes out the least recently seen listed one.
    assert (store.evicted, store.evicted_protected) == (2 * 51, 51)
    assert [s.ip for s in store.values(listed=True)] == senders[:50:-1]


def test_one_address_cannot_grow_its_answer() -> None:
    store, _ = mirror_store(capacity=100)
    for n in range(100_000):
        text = f"{n:07d}" * 29  # 203 characters, all different
        if n % 2:
            info = SipInfo(method=f"M{n}", call_id=text, from_user=text, user_agent=text)
        else:
            info = SipInfo(method="INVITE", status=n // 2 % 1000, call_id=text, user_agent=text)
        store.record("80.4.4.4", SBC, info, 1.0)
    sighting = store.get("80.4.4.4")
    assert sighting is not None
    methods = sighting.methods
    assert sum(methods.values()) == 100_000
    buckets = {*SIP_METHODS, OTHER_METHOD, "?"} | {str(c) for c in STATUS_CODES}
    assert set(methods) <= buckets | {f"{c}xx" for c in range(1, 7)}
    assert methods[OTHER_METHOD] == 50_000
    assert min(methods["?"], methods["4xx"], methods["401"]) > 0
    assert (len(sighting.user_agents), len(sighting.users), len(sighting.call_ids)) == (5, 10, 10)
    assert len(orjson.dumps(sighting.to_json())) < 4096
    assert len(orjson.dumps(sighting.summary())) < 2048


def test_shared_user_agents_stay_bounded_and_samples_read_the_same(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(sightings_module, "_agents", {})
    monkeypatch.setattr(sightings_module, "USER_AGENT_TABLE", 100)
    store, _ = mirror_store(capacity=1000)
    phones = list(spoofed(2))
    for phone in phones:  # the same model: one string and one sample between them
        store.record(phone, SBC, SipInfo(method="REGISTER", call_id=f"c-{phone}", from_user="100",
                                         user_agent="".join(["Yealink ", "T46S"])), 1.0)  # fmt: skip
    first, second = (store.get(phone) for phone in phones)
    assert first is not None
    assert second is not None
    assert first.user_agents == ("Yealink T46S",)
    assert first.user_agents is second.user_agents
    for n, forged in enumerate(spoofed(500, first_octet=46)):
        store.record(forged, SBC, SipInfo(method="OPTIONS", user_agent=f"forged-{n}"), 2.0)
    assert len(sightings_module._agents) == 100  # a full table keeps further agents per address
    assert store.get("46.0.1.243").user_agents == ("forged-499",)  # type: ignore[union-attr]
    # The samples are kept packed in one string; what is read back is a tuple of them.
    store.record(phones[0], SBC, SipInfo(method="INVITE", call_id="c-2", from_user="100"), 3.0)
    assert (first.users, first.call_ids) == (("100",), (f"c-{phones[0]}", "c-2"))
    assert first.methods == {"REGISTER": 1, "INVITE": 1}
    first.methods["REGISTER"] += 5  # a copy: the sighting's counts are its own
    assert first.to_json()["methods"] == {"REGISTER": 1, "INVITE": 1}


def test_nasty_sample_values_stay_small_and_one_line(caplog: pytest.LogCaptureFixture) -> None:
    store, _ = mirror_store(LISTED, capacity=100)
    nasty = [
        '"\\' * 100,  # every byte escaped in JSON
        "\x00\x1b[2J\n" * 50,  # control characters: six bytes of JSON each if kept
        "\U0001f4a3" * 200,  # four bytes of UTF-8 each
        "ok\nAPIBAN-listed 1.2.3.4 in captured SIP: forged line",
    ]
    for n in range(40):
        value = f"{nasty[n % 4]}{n}"
        store.record(LISTED, SBC, SipInfo("INVITE", None, value, value, None, value), 1.0)
    sighting = store.get(LISTED)
    assert sighting is not None
    for value in (*sighting.user_agents, *sighting.users, *sighting.call_ids):
        assert len(value.encode()) <= 128
        assert value.isprintable()
    assert len(orjson.dumps(sighting.to_json())) < 8192
    lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith("APIBAN-listed")]
    assert len(lines) == 1  # the rest are within the log period
    assert not any(c in lines[0] for c in "\n\r\x00\x1b")


async def test_listed_sender_survives_a_spoofed_udp_flood(agent: AgentFactory, apiban: ApibanPeer) -> None:
    apiban.fake.add("45.9.9.9")
    client = await hep_agent(agent, HEPSUB_SIGHTINGS_MAX="100")
    udp_send(client, build_hep3(sip_packet("45.9.9.9")))
    await until(lambda: bool((s := client.app[SIGHTINGS].get("45.9.9.9")) and s.listed), "the verdict")
    forged = [build_hep3(sip_packet(src)) for src in spoofed(2000, first_octet=46)]
    for start in range(0, len(forged), 100):  # batches the socket buffer holds: no datagram is lost
        udp_send(client, *forged[start : start + 100])
        await until(lambda n=start + 101: decoded(client, "udp") == n, f"{start + 101} packets")
    store = client.app[SIGHTINGS]
    assert (len(store), store.evicted) == (100, 2002 - 100)  # 2001 senders and the receiver
    assert list(await sightings(client, "?listed=true")) == ["45.9.9.9"]
    status = await (await client.get("/api/v1/status")).json()
    assert status["hep"]["sightings"]["protected"] == 1
    assert status["hep"]["sightings"]["evicted_protected"] == 0


async def enrich(client: Client, address: str) -> bool | None:
    body = {"data": {"sid": ["call-1"], "source_ip": [address]}, "fromts": 1_700_000_000_000}
    answer = await (await client.post("/get/cdr", json=body)).json()
    listed: bool | None = answer[address]["listed"]
    return listed


async def flood_tcp(client: Client, connections: Connections, sources: Iterator[str], total: int) -> None:
    _, writer = await connections.open(client)
    writer.write(b"".join(build_hep3(sip_packet(src)) for src in sources))
    await writer.drain()
    await until(lambda: decoded(client, "tcp") == total, f"{total} packets")
    for _ in range(3):  # checks queued by the last packets start, then land
        await client.app[SIGHTINGS].settle()
        await client.app[LOOKUPS].settle()


async def test_check_mode_flood_spends_only_its_share_of_the_budget(
    agent: AgentFactory,
    apiban: ApibanPeer,
    tcp: Connections,  # noqa: F811
) -> None:
    apiban.fake.rate_limit = None  # the agent's own budget (11 per 120 s, on the manual clock) is tested
    apiban.fake.add("81.0.0.9")
    clock = ManualClock()
    client = await agent(
        Clocks(monotonic=clock), HEPSUB_HEP_UDP="", HEPSUB_HEP_TCP="127.0.0.1:0", HEPSUB_SIGHTINGS_MAX="1000"
    )
    share = 5  # floor(0.5 x 11)
    await flood_tcp(client, tcp, spoofed(300), 300)
    assert apiban.fake.request_count("check") == share
    # HOMER asks during the flood and finds the rest of the window: 11 - 5 lookups, all answered.
    answers = [await enrich(client, address) for address in ("81.0.0.9", *(f"81.0.0.{n}" for n in range(5)))]
    assert answers == [True, False, False, False, False, False]
    assert await enrich(client, "81.0.0.100") is None  # the whole window is now spent
    checked = [s for s in client.app[SIGHTINGS].values() if s.listed is not None and s.ip.startswith("45.")]
    assert len(checked) == share
    # A new window: the flood goes on (new sources and the unchecked ones) and again takes only its share.
    clock.advance(120)
    await flood_tcp(client, tcp, spoofed(300, first_octet=47), 600)
    assert apiban.fake.request_count("check") == 11 + share
    assert await enrich(client, "81.0.0.101") is False
    assert client.app[APIBAN].budget.used() == share + 1


def spend(lookups: LookupService, requests: int) -> Budget:
    """The lookups' APIBAN budget, with ``requests`` of its window spent by other callers."""
    budget = lookups._client.budget  # type: ignore[union-attr]
    assert all(budget.try_acquire() for _ in range(requests))
    return budget


async def test_homer_joining_a_queued_background_check_sends_it_with_its_budget(
    service: tuple[LookupService, ManualClock],  # noqa: F811
    apiban: ApibanPeer,
) -> None:
    lookups, _ = service
    spend(lookups, 5)  # the background share (5 of 11) is used up
    assert not lookups.may_look_up(0.5)
    alone = await lookups.lookup(ip("8.8.8.8"), 1.0, share=0.5)
    assert (alone.listed, apiban.fake.request_count()) == (None, 0)
    # HOMER asks for the address a background check has queued but not sent: it goes out once, as HOMER's.
    background, homer = await asyncio.gather(
        lookups.lookup(ip("8.8.4.4"), 1.0, share=0.5), lookups.lookup(ip("8.8.4.4"), 1.0)
    )
    assert (background.listed, homer.listed) == (False, False)
    assert apiban.fake.request_count() == 1


async def test_queued_background_checks_count_against_the_share(
    service: tuple[LookupService, ManualClock],  # noqa: F811
    apiban: ApibanPeer,
) -> None:
    lookups, _ = service
    budget = spend(lookups, 4)
    assert lookups.may_look_up(0.5)  # one request of the share is left
    first = asyncio.ensure_future(lookups.lookup(ip("8.8.8.8"), 1.0, share=0.5))
    await asyncio.sleep(0)  # its check is queued, not sent yet
    assert not lookups.may_look_up(0.5)
    assert lookups.may_look_up(1.0)  # HOMER's part of the window is untouched
    assert (await first).listed is False
    assert (budget.used(), apiban.fake.request_count()) == (5, 1)
    assert (lookups.may_look_up(0.5), lookups.may_look_up(0.0)) == (False, False)


def test_a_reserve_leaves_part_of_the_window_to_others() -> None:
    clock = ManualClock(0.0)
    budget = Budget(RateLimit(11, 120.0), clock)
    assert [budget.try_acquire(reserve=6) for _ in range(6)] == [True] * 5 + [False]
    assert (budget.headroom(reserve=6), budget.headroom()) == (0, 6)
    assert [budget.try_acquire() for _ in range(7)] == [True] * 6 + [False]
    clock.advance(120)
    budget.block_for(10)
    assert (budget.headroom(), budget.try_acquire(reserve=6)) == (0, False)
    clock.advance(10)
    assert budget.headroom(reserve=6) == 5
