"""The lookup service in check mode: local answers, cache lifetimes, coalescing, deadlines."""

from __future__ import annotations

import asyncio
import ipaddress
from collections.abc import AsyncIterator

import aiohttp
import pytest

from hepsub_apiban.apiban.client import ApibanClient
from hepsub_apiban.apiban.lookups import CachePolicy, LookupService
from hepsub_apiban.core.addresses import Addr, NetworkSet, parse_ip
from hepsub_apiban.core.config import load_settings
from hepsub_apiban.core.logs import Redactor
from hepsub_apiban.core.ratelimit import Budget

from .conftest import APIBAN_KEY, ApibanPeer, ManualClock


def ip(text: str) -> Addr:
    address = parse_ip(text)
    assert address is not None
    return address


@pytest.fixture
async def service(apiban: ApibanPeer) -> AsyncIterator[tuple[LookupService, ManualClock]]:
    settings = load_settings(None, {"HEPSUB_APIBAN_URL": apiban.url, "HEPSUB_APIBAN_KEY": APIBAN_KEY}).apiban
    clock = ManualClock(0.0)
    async with aiohttp.ClientSession() as session:
        client = ApibanClient(session, settings, Budget(settings.rate_limit, clock), Redactor([APIBAN_KEY]))
        allow = NetworkSet([ipaddress.ip_network("9.9.0.0/16")])
        lookups = LookupService(
            client, allow, CachePolicy(100, listed_ttl=3600, unlisted_ttl=600), clock=clock, wall_clock=clock
        )
        yield lookups, clock
        await lookups.close()


async def test_local_answers_never_go_upstream(
    service: tuple[LookupService, ManualClock], apiban: ApibanPeer
) -> None:
    lookups, _ = service
    apiban.fake.add("9.9.1.1")
    verdicts = await lookups.lookup_many([ip("10.0.0.1"), ip("::1"), ip("9.9.1.1")], 1.0)
    assert [(v.listed, v.source) for v in verdicts] == [
        (False, "private"),
        (False, "private"),
        (False, "allowlist"),
    ]
    assert apiban.fake.request_count() == 0


async def test_clean_verdicts_expire_sooner_than_listed_ones(
    service: tuple[LookupService, ManualClock], apiban: ApibanPeer
) -> None:
    lookups, clock = service
    apiban.fake.add("1.2.3.4")
    first = await lookups.lookup_many([ip("1.2.3.4"), ip("8.8.8.8")], 1.0)
    assert [v.source for v in first] == ["check", "check"]
    clock.advance(599)
    assert [v.source for v in await lookups.lookup_many([ip("1.2.3.4"), ip("8.8.8.8")], 1.0)] == [
        "cache",
        "cache",
    ]
    clock.advance(2)
    again = await lookups.lookup_many([ip("1.2.3.4"), ip("8.8.8.8")], 1.0)
    assert [v.source for v in again] == ["cache", "check"]
    clock.advance(3000)
    assert (await lookups.lookup(ip("1.2.3.4"), 1.0)).source == "check"
    assert apiban.fake.request_count("check") == 4


async def test_concurrent_lookups_share_one_request(
    service: tuple[LookupService, ManualClock], apiban: ApibanPeer
) -> None:
    lookups, _ = service
    apiban.fake.delay = 0.1
    results = await asyncio.gather(*(lookups.lookup(ip("8.8.4.4"), 1.0) for _ in range(50)))
    assert {(v.listed, v.source) for v in results} == {(False, "check")}
    assert apiban.fake.request_count() == 1


async def test_late_answer_fills_the_cache_for_the_next_caller(
    service: tuple[LookupService, ManualClock], apiban: ApibanPeer
) -> None:
    lookups, _ = service
    apiban.fake.add("1.2.3.4")
    apiban.fake.delay = 0.3
    late = await lookups.lookup(ip("1.2.3.4"), 0.05)
    assert late.listed is None
    assert "did not answer within 0.05 s" in (late.reason or "")
    await lookups.settle()
    assert (await lookups.lookup(ip("1.2.3.4"), 0.05)).source == "cache"
    assert apiban.fake.request_count() == 1


async def test_ipv6_spellings_share_one_cache_entry(
    service: tuple[LookupService, ManualClock], apiban: ApibanPeer
) -> None:
    lookups, _ = service
    apiban.fake.add("2a01:4f8::5")
    first = await lookups.lookup(ip("2A01:04F8:0::5"), 1.0)
    second = await lookups.lookup(ip("2a01:4f8:0:0:0:0:0:5"), 1.0)
    assert (first.listed, second.source) == (True, "cache")
    assert apiban.fake.request_count() == 1
