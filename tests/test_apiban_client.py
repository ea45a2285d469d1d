"""The APIBAN client: classification from status and body, budget, timeouts, redaction."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import aiohttp
import pytest

from hepsub_apiban.apiban.client import (
    ApibanClient,
    BadAnswer,
    BadKey,
    BudgetSpent,
    CheckAnswer,
    Page,
    RateLimited,
    Transient,
    classify_banned,
    classify_check,
)
from hepsub_apiban.core.config import load_settings
from hepsub_apiban.core.logs import Redactor
from hepsub_apiban.core.ratelimit import Budget

from .conftest import APIBAN_KEY, ApibanPeer, ManualClock

# Status and body pairs as docs/peers/apiban.md#statuses documents them (and the quirks it lists).
CHECK_CASES = [
    (200, b'{"ipaddress":["1.2.3.4"],"ID":"987654321"}', CheckAnswer(True, "987654321")),
    (200, b'{"ipaddress":"1.2.3.4","ID":"987654321"}', CheckAnswer(True, "987654321")),
    (400, b'{"ipaddress":["not blocked"],"ID":"none"}', CheckAnswer(False)),
    (200, b'{"ipaddress":["not blocked"],"ID":"none"}', CheckAnswer(False)),
    (404, b'{"ipaddress":"not blocked","ID":"none"}', CheckAnswer(False)),
]
CHECK_ERRORS = [
    (403, b'{"ipaddress":"none","ID":"unauthorized"}', BadKey),
    (401, b'{"ipaddress":"none","ID":"unauthorized"}', BadKey),
    (429, b'{"ipaddress":"rate limit exceeded","ID":"unauthorized"}', RateLimited),
    (400, b'{"ipaddress":"rate limit exceeded","ID":"unauthorized"}', RateLimited),
    (503, b"Service Unavailable", Transient),
    (502, b'{"error":"bad gateway"}', Transient),
    (200, b'{"ipaddress":["1.2', BadAnswer),
    (200, b"{}", BadAnswer),
    (400, b"{}", BadAnswer),
    (200, b'{"ipaddress":["5.6.7.8"],"ID":"987654321"}', BadAnswer),
    (200, b"[]", BadAnswer),
]


@pytest.mark.parametrize(("status", "raw", "expected"), CHECK_CASES)
def test_classify_check(status: int, raw: bytes, expected: CheckAnswer) -> None:
    assert classify_check("1.2.3.4", status, raw) == expected


@pytest.mark.parametrize(("status", "raw", "error"), CHECK_ERRORS)
def test_classify_check_errors(status: int, raw: bytes, error: type[Exception]) -> None:
    with pytest.raises(error):
        classify_check("1.2.3.4", status, raw)


@pytest.mark.parametrize(
    ("status", "raw", "expected"),
    [
        (
            200,
            b'{"ipaddress":["1.2.3.4","1.2.3.5"],"ID":"9876543210"}',
            Page(("1.2.3.4", "1.2.3.5"), "9876543210", False),
        ),
        (400, b'{"ipaddress":["no new bans"],"ID":"none"}', Page((), None, True)),
        (400, b'{"ipaddress":"no new bans","ID":"none"}', Page((), None, True)),
        (200, b'{"ipaddress":["1.2.3.4"],"ID":"none"}', Page(("1.2.3.4",), None, True)),
    ],
)
def test_classify_banned(status: int, raw: bytes, expected: Page) -> None:
    assert classify_banned(status, raw) == expected


@pytest.mark.parametrize(
    ("status", "raw", "error"),
    [
        (403, b'{"ipaddress":"none","ID":"unauthorized"}', BadKey),
        (429, b'{"ipaddress":"rate limit exceeded","ID":"unauthorized"}', RateLimited),
        (503, b"", Transient),
        (200, b'{"ipaddress":[],"ID":""}', BadAnswer),
        (400, b"{}", BadAnswer),
    ],
)
def test_classify_banned_errors(status: int, raw: bytes, error: type[Exception]) -> None:
    with pytest.raises(error):
        classify_banned(status, raw)


class Harness:
    def __init__(self, session: aiohttp.ClientSession, apiban: ApibanPeer, **env: str) -> None:
        settings = load_settings(
            None, {"HEPSUB_APIBAN_URL": apiban.url, "HEPSUB_APIBAN_KEY": APIBAN_KEY, **env}
        ).apiban
        self.clock = ManualClock(0.0)
        self.budget = Budget(settings.rate_limit, self.clock)
        self.client = ApibanClient(session, settings, self.budget, Redactor([APIBAN_KEY]))


@pytest.fixture
async def session() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession() as session:
        yield session


async def test_check_and_banned_against_the_fake(session: aiohttp.ClientSession, apiban: ApibanPeer) -> None:
    apiban.fake.add_many([f"5.0.{i // 250}.{i % 250}" for i in range(300)])
    h = Harness(session, apiban)
    assert await h.client.check("5.0.0.7") == CheckAnswer(True, apiban.fake.listed("5.0.0.7"))
    assert await h.client.check("5.9.9.9") == CheckAnswer(False)
    first = await h.client.banned("100")
    assert len(first.ips) == 250
    assert not first.end
    second = await h.client.banned(first.next_id)
    assert len(second.ips) == 50
    end = await h.client.banned(second.next_id)
    assert end.end
    assert end.ips == ()
    assert h.client.requests_sent() == 5


async def test_not_blocked_as_200_and_string_no_new_bans(
    session: aiohttp.ClientSession, apiban: ApibanPeer
) -> None:
    apiban.fake.not_blocked_status = 200
    apiban.fake.ipaddress_as_string = True
    h = Harness(session, apiban)
    assert await h.client.check("5.9.9.9") == CheckAnswer(False)
    assert (await h.client.banned("100")).end


async def test_budget_spent_sends_nothing(session: aiohttp.ClientSession, apiban: ApibanPeer) -> None:
    h = Harness(session, apiban, HEPSUB_APIBAN_RATE_LIMIT="2/120")
    await h.client.check("5.9.9.1")
    await h.client.check("5.9.9.2")
    with pytest.raises(BudgetSpent, match="2/120"):
        await h.client.check("5.9.9.3")
    assert apiban.fake.request_count() == 2
    h.clock.advance(120)
    await h.client.check("5.9.9.3")
    assert apiban.fake.request_count() == 3


async def test_429_blocks_the_budget_for_a_whole_window(
    session: aiohttp.ClientSession, apiban: ApibanPeer
) -> None:
    apiban.fake.rate_limit = (0, 120.0)
    h = Harness(session, apiban)
    with pytest.raises(RateLimited):
        await h.client.check("5.9.9.1")
    with pytest.raises(BudgetSpent):
        await h.client.check("5.9.9.2")
    assert apiban.fake.request_count() == 1
    h.clock.advance(120)
    apiban.fake.rate_limit = None
    assert await h.client.check("5.9.9.2") == CheckAnswer(False)


async def test_timeout_is_transient_and_bounded(session: aiohttp.ClientSession, apiban: ApibanPeer) -> None:
    apiban.fake.hang = True
    h = Harness(session, apiban, HEPSUB_APIBAN_TIMEOUT="0.2")
    loop = asyncio.get_running_loop()
    started = loop.time()
    with pytest.raises(Transient, match=r"within 0\.2 s"):
        await h.client.check("5.9.9.1")
    assert loop.time() - started < 1.0
    assert h.client.last_error is not None


async def test_unreachable_apiban_message_carries_no_key(session: aiohttp.ClientSession) -> None:
    peer = ApibanPeer(fake=None, url="http://127.0.0.1:9")  # type: ignore[arg-type]
    h = Harness(session, peer)
    with pytest.raises(Transient) as caught:
        await h.client.check("5.9.9.1")
    assert APIBAN_KEY not in str(caught.value)
    assert h.client.last_error is not None
    assert APIBAN_KEY not in h.client.last_error.message


async def test_bad_key_is_reported_without_the_key(
    session: aiohttp.ClientSession, apiban: ApibanPeer
) -> None:
    apiban.fake.keys = {"other"}
    h = Harness(session, apiban)
    with pytest.raises(BadKey) as caught:
        await h.client.check("5.9.9.1")
    assert "apiban.key" in str(caught.value)
    assert APIBAN_KEY not in str(caught.value)


def test_redactor_masks_every_secret_longest_first() -> None:
    redact = Redactor(["abc", "abcdef", "abc-12345", "abc-12345-6789"])
    assert redact("GET /api/abcdef/check and /api/abc/check") == "GET /api/***/check and /api/***/check"
    assert redact("GET /api/abc-12345-6789/banned, abc-12345") == "GET /api/***/banned, ***"
