"""HOMER registration against the HOMER fake, with time moved by the test instead of waited for."""

from __future__ import annotations

import logging
import uuid
from collections.abc import Awaitable, Callable
from pathlib import Path

import pytest
from aiohttp.test_utils import TestServer

from hepsub_apiban.app import Clocks
from hepsub_apiban.core.config import load_settings
from hepsub_apiban.core.logs import Redactor
from hepsub_apiban.fakes.homer import FakeHomer
from hepsub_apiban.homer.registration import Registrar

from .conftest import HOMER_PASSWORD, HOMER_TOKEN, HOMER_USER, AgentFactory, ManualClock

ServerFactory = Callable[..., Awaitable[TestServer]]


async def start_homer(
    aiohttp_server: ServerFactory, clock: ManualClock, **options: object
) -> tuple[FakeHomer, str]:
    fake = FakeHomer(
        tokens=[HOMER_TOKEN],
        users={HOMER_USER: HOMER_PASSWORD},
        clock=clock,
        wall_clock=clock,
        **options,  # type: ignore[arg-type]
    )
    server = await aiohttp_server(fake.app())
    return fake, str(server.make_url("")).rstrip("/")


def homer_env(url: str, **extra: str) -> dict[str, str]:
    return {
        "HEPSUB_HOMER_URL": url,
        "HEPSUB_HOMER_TOKEN": HOMER_TOKEN,
        "HEPSUB_AGENT_HOST": "10.20.30.40",
        "HEPSUB_HOMER_TTL": "30",
        **extra,
    }


async def test_registers_at_start_and_refreshes_before_the_ttl_ends(
    agent: AgentFactory, aiohttp_server: ServerFactory
) -> None:
    clock = ManualClock()
    homer, url = await start_homer(aiohttp_server, clock)
    await agent(Clocks(wall=clock, sleep=clock.sleep), **homer_env(url))
    assert await clock.next_sleep() == pytest.approx(27.0)  # 0.9 x ttl
    first = homer.subscriptions[0]
    assert first.status == 201
    assert first.headers["Auth-Token"] == HOMER_TOKEN
    body = first.body
    assert body == {
        "uuid": body["uuid"],
        "gid": 10,
        "host": "10.20.30.40",
        "port": 18088,
        "protocol": "http",
        "path": "/get",
        "node": "apiban",
        "type": "cdr-download",  # agent.download (the default): HOMER's Download button reaches us
        "ttl": 30,
    }
    assert str(uuid.UUID(body["uuid"])) == body["uuid"]
    expires = homer.rows[body["uuid"]].expire_date
    assert expires == clock.now + 30

    clock.wake()
    assert await clock.next_sleep() == pytest.approx(27.0)
    second = homer.subscriptions[1]
    assert second.status == 201
    assert second.body == body
    assert second.at < expires  # refreshed while the first registration was still valid
    assert list(homer.rows) == [body["uuid"]]
    assert homer.rows[body["uuid"]].expire_date == second.at + 30


async def test_http_400_is_retried_with_growing_jittered_backoff_and_logged_once(
    agent: AgentFactory, aiohttp_server: ServerFactory, caplog: pytest.LogCaptureFixture
) -> None:
    clock = ManualClock()
    homer, url = await start_homer(aiohttp_server, clock)
    homer.fail_next = 4
    await agent(Clocks(wall=clock, sleep=clock.sleep), **homer_env(url))
    delays = []
    for _ in range(5):
        delays.append(await clock.next_sleep())
        clock.wake()
    await clock.next_sleep()
    for delay, ceiling in zip(delays, (1, 2, 4, 8), strict=False):
        assert ceiling / 2 <= delay <= ceiling
    assert delays[4] == pytest.approx(27.0)
    assert [s.status for s in homer.subscriptions[:5]] == [400, 400, 400, 400, 201]
    warnings = [
        r for r in caplog.records if r.name == "hepsub_apiban.registration" and r.levelno == logging.WARNING
    ]
    assert len(warnings) == 1
    assert homer.fail_message in warnings[0].getMessage()
    assert any("registered with HOMER" in r.getMessage() for r in caplog.records)


async def test_homer_message_is_shown_in_status_with_the_token_redacted(
    agent: AgentFactory, aiohttp_server: ServerFactory
) -> None:
    clock = ManualClock()
    homer, url = await start_homer(aiohttp_server, clock)
    homer.tokens.clear()  # homer-app echoes an unknown token in its error message
    client = await agent(Clocks(wall=clock, sleep=clock.sleep), **homer_env(url))
    await clock.next_sleep()
    status = await (await client.get("/api/v1/status")).json()
    registration = status["registration"]
    assert registration["state"] == "failing"
    assert registration["last_status"] == 400
    assert registration["last_message"] == "no auth_token found or it has been expired: [***]"
    assert HOMER_TOKEN not in str(status)


async def test_shutdown_unregisters_with_a_user_login(
    agent: AgentFactory, aiohttp_server: ServerFactory
) -> None:
    clock = ManualClock()
    homer, url = await start_homer(aiohttp_server, clock)
    env = homer_env(url, HEPSUB_HOMER_USER=HOMER_USER, HEPSUB_HOMER_PASSWORD=HOMER_PASSWORD)
    client = await agent(Clocks(wall=clock, sleep=clock.sleep), **env)
    await clock.next_sleep()
    agent_uuid = homer.subscriptions[0].body["uuid"]
    await client.close()
    assert homer.deletions == [(agent_uuid, 200)]
    assert homer.rows == {}


async def test_shutdown_unregisters_with_token_access(
    agent: AgentFactory, aiohttp_server: ServerFactory
) -> None:
    clock = ManualClock()
    homer, url = await start_homer(aiohttp_server, clock, token_access=True)
    client = await agent(
        Clocks(wall=clock, sleep=clock.sleep), **homer_env(url, HEPSUB_HOMER_TOKEN_ACCESS="true")
    )
    await clock.next_sleep()
    await client.close()
    assert [status for _, status in homer.deletions] == [200]
    assert homer.rows == {}


async def test_without_credentials_shutdown_leaves_the_row_and_says_so(
    agent: AgentFactory, aiohttp_server: ServerFactory, caplog: pytest.LogCaptureFixture
) -> None:
    clock = ManualClock()
    homer, url = await start_homer(aiohttp_server, clock)
    client = await agent(Clocks(wall=clock, sleep=clock.sleep), **homer_env(url))
    await clock.next_sleep()
    await client.close()
    assert homer.deletions == []
    assert len(homer.rows) == 1
    assert any("keeps this agent's registration" in r.getMessage() for r in caplog.records)


async def test_first_registration_purges_homers_seeded_expired_row(
    agent: AgentFactory, aiohttp_server: ServerFactory
) -> None:
    clock = ManualClock()
    homer, url = await start_homer(aiohttp_server, clock, seed_dummy=True)
    assert len(homer.rows) == 1  # the expired "rtpnode01" row that breaks homer-ui's fan-out
    await agent(Clocks(wall=clock, sleep=clock.sleep), **homer_env(url))
    await clock.next_sleep()
    assert [row.node for row in homer.rows.values()] == ["apiban"]


async def test_unreachable_homer_never_stops_the_agent(agent: AgentFactory, unused_tcp_port: int) -> None:
    clock = ManualClock()
    client = await agent(
        Clocks(wall=clock, sleep=clock.sleep), **homer_env(f"http://127.0.0.1:{unused_tcp_port}")
    )
    assert 0.5 <= await clock.next_sleep() <= 1.0
    assert (await client.get("/healthz")).status == 200
    registration = (await (await client.get("/api/v1/status")).json())["registration"]
    assert registration["state"] == "failing"
    assert registration["last_status"] is None
    assert "cannot reach homer-app" in registration["last_message"]


@pytest.mark.parametrize("failures", [1, 5, 10, 50])
def test_backoff_never_waits_past_the_refresh_interval(failures: int, tmp_path: Path) -> None:
    settings = load_settings(None, {**homer_env("http://homer:9080"), "HEPSUB_HOMER_TTL": "10"})
    registrar = Registrar(None, settings, str(uuid.uuid4()), Redactor(), jitter=lambda: 1.0)  # type: ignore[arg-type]
    registrar.status.failures = failures
    assert registrar.next_delay(False) == min(9.0, 60.0, 2.0 ** (failures - 1))
    assert registrar.next_delay(True) == 9.0


async def test_a_hostile_homer_message_is_escaped_and_cut_short(
    agent: AgentFactory, aiohttp_server: ServerFactory, caplog: pytest.LogCaptureFixture
) -> None:
    """Whatever answers at homer.url (a proxy, anything on the way) cannot forge log lines or
    fill the status page with its reason."""
    clock = ManualClock()
    homer, url = await start_homer(aiohttp_server, clock)
    homer.fail_next = 1
    homer.fail_message = "db down\n2026-11-29 ERROR forged line\x1b[2J" + "x" * 50_000
    client = await agent(Clocks(wall=clock, sleep=clock.sleep), **homer_env(url))
    await clock.next_sleep()
    registration = (await (await client.get("/api/v1/status")).json())["registration"]
    message = registration["last_message"]
    assert message.startswith("db down\\x0a2026-11-29 ERROR forged line\\x1b[2J")
    assert len(message) < 400
    logged = [r.getMessage() for r in caplog.records if r.name == "hepsub_apiban.registration"]
    assert logged
    assert all("\n" not in line and "\x1b" not in line and len(line) < 600 for line in logged)
