"""Shared fixtures: the in-package APIBAN and HOMER fakes on real sockets, and the agent.

Every test runs with a secret-leak guard: all log records of the test are captured at DEBUG
and must not contain the APIBAN key or the HOMER token.
"""

from __future__ import annotations

import asyncio
import logging
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import asyncpg
import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer

from hepsub_apiban.app import Clocks, create_app
from hepsub_apiban.core.config import Settings, load_settings
from hepsub_apiban.fakes.apiban import FakeApiban
from hepsub_apiban.fakes.homer import FakeHomer

from . import postgres

APIBAN_KEY = "apiban-SECRET-key-7f3a9c01"
HOMER_TOKEN = "homer-SECRET-token-b41d5e77"
HOMER_USER, HOMER_PASSWORD = "admin", "homer-SECRET-password-2c9e"
SECRETS = (APIBAN_KEY, HOMER_TOKEN, HOMER_PASSWORD, postgres.PASSWORD)

# docs/peers/homer-app.md#request-fixtures: the exact body homer-app posts with the default mapping.
HOMER_BODY_1 = (
    b'{"data":{"sid":["a84b4c76e66710@pc33.example.com"],"source_ip":["192.168.1.10","203.0.113.7"]},'
    b'"fromts":1669986139000,"tots":1669987239000}'
)


class _Capture(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(self.format(record))


@pytest.fixture(autouse=True)
def no_secret_in_logs() -> Iterator[_Capture]:
    """Fails any test whose log output (any logger, any level) carries a secret."""
    capture = _Capture()
    capture.setFormatter(logging.Formatter("%(name)s %(levelname)s %(message)s"))
    root = logging.getLogger()
    previous = root.level
    root.addHandler(capture)
    root.setLevel(logging.DEBUG)
    yield capture
    root.removeHandler(capture)
    root.setLevel(previous)
    leaked = [line for line in capture.lines if any(secret in line for secret in SECRETS)]
    assert not leaked, f"secret in log output: {leaked[:3]}"


def assert_no_secret(text: str) -> None:
    for secret in SECRETS:
        assert secret not in text


@pytest.fixture
async def apiban(aiohttp_server: Callable[..., Awaitable[TestServer]]) -> AsyncIterator[ApibanPeer]:
    fake = FakeApiban(keys=[APIBAN_KEY])
    server = await aiohttp_server(fake.app())
    yield ApibanPeer(fake, str(server.make_url("")).rstrip("/"))
    fake.release()


@dataclass
class ApibanPeer:
    fake: FakeApiban
    url: str


@dataclass
class HomerPeer:
    fake: FakeHomer
    url: str


@pytest.fixture
async def homer(aiohttp_server: Callable[..., Awaitable[TestServer]]) -> HomerPeer:
    fake = FakeHomer(tokens=[HOMER_TOKEN], users={HOMER_USER: HOMER_PASSWORD})
    server = await aiohttp_server(fake.app())
    return HomerPeer(fake, str(server.make_url("")).rstrip("/"))


def agent_env(tmp_path: Path, apiban: ApibanPeer | None = None, **overrides: str) -> dict[str, str]:
    env = {
        "HEPSUB_APIBAN_KEY": APIBAN_KEY,
        "HEPSUB_APIBAN_MODE": "check",
        "HEPSUB_STATE_DIR": str(tmp_path / "state"),
        "HEPSUB_HEP_UDP": "",
        "HEPSUB_HEP_TCP": "",
    }
    if apiban is not None:
        env["HEPSUB_APIBAN_URL"] = apiban.url
    env.update(overrides)
    return env


@dataclass
class AgentFactory:
    tmp_path: Path
    make_client: Callable[[web.Application], Awaitable[TestClient[web.Request, web.Application]]]
    apiban: ApibanPeer
    clients: list[TestClient[web.Request, web.Application]] = field(default_factory=list)

    async def __call__(
        self, clocks: Clocks | None = None, **env: str
    ) -> TestClient[web.Request, web.Application]:
        settings = self.settings(**env)
        client = await self.make_client(create_app(settings, clocks=clocks or Clocks()))
        self.clients.append(client)
        return client

    def settings(self, **env: str) -> Settings:
        return load_settings(None, agent_env(self.tmp_path, self.apiban, **env))


@pytest.fixture
def agent(
    tmp_path: Path,
    apiban: ApibanPeer,
    aiohttp_client: Callable[[web.Application], Awaitable[TestClient[web.Request, web.Application]]],
) -> AgentFactory:
    """Builds the real application against the APIBAN fake and serves it on a real socket."""
    return AgentFactory(tmp_path, aiohttp_client, apiban)


class ManualClock:
    """Time that moves only when the test says so; ``sleep`` waits for the test to release it."""

    def __init__(self, start: float = 1_700_000_000.0) -> None:
        self.now = start
        self.sleeps: list[float] = []
        self._sleeper: asyncio.Future[None] | None = None
        self._asleep = asyncio.Event()

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds

    async def sleep(self, seconds: float) -> None:
        self.sleeps.append(seconds)
        self._sleeper = asyncio.get_running_loop().create_future()
        self._asleep.set()
        await self._sleeper

    async def next_sleep(self) -> float:
        """Wait until the code under test sleeps; return how long it asked to sleep."""
        async with asyncio.timeout(5.0):
            await self._asleep.wait()
        return self.sleeps[-1]

    def wake(self) -> None:
        """Let the sleeper continue, with time advanced by what it asked for."""
        assert self._sleeper is not None
        self._asleep.clear()
        self.advance(self.sleeps[-1])
        sleeper, self._sleeper = self._sleeper, None
        sleeper.set_result(None)


async def drive_agent_sync(clock: ManualClock, done: Callable[[], bool], max_steps: int = 100) -> None:
    """Let an agent's mirror sync, sleeping on ``clock``, run step by step until ``done()``."""
    for _ in range(max_steps):
        await clock.next_sleep()  # the sync finished a step and waits
        if done():
            return
        clock.wake()
    raise AssertionError("the agent's sync did not get there")


@pytest.fixture(scope="session")
def postgres_cluster() -> Iterator[postgres.Cluster]:
    """One throwaway PostgreSQL cluster for the whole run (tests/postgres.py), started on first use."""
    yield from postgres.throwaway_cluster()


@pytest.fixture
async def store_url(postgres_cluster: postgres.Cluster) -> AsyncIterator[str]:
    """The URL of a fresh, empty database of its own for this test, dropped afterwards."""
    name = f"test_{uuid.uuid4().hex[:12]}"
    admin = await asyncpg.connect(postgres_cluster.url())
    try:
        await admin.execute(f'CREATE DATABASE "{name}"')
        yield postgres_cluster.url(name)
        await admin.execute(f'DROP DATABASE "{name}" WITH (FORCE)')
    finally:
        await admin.close()
