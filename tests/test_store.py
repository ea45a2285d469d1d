"""The shared store (PostgreSQL): ``store.url``, the schema it creates and migrates, the lease.

Against a real PostgreSQL: a throwaway cluster (tests/postgres.py), a fresh database per test.
"""

from __future__ import annotations

import asyncio
import logging
import uuid
from collections.abc import AsyncIterator
from pathlib import Path

import asyncpg
import pytest

from hepsub_apiban.core.config import ConfigError, Settings, StoreSettings, load_settings
from hepsub_apiban.core.logs import Redactor
from hepsub_apiban.store.database import LATEST, MIGRATIONS, Store, StoreError

from .conftest import assert_no_secret
from .postgres import PASSWORD, Cluster, free_port

URL = f"postgresql://hepsub:{PASSWORD}@db.example:5433/hepsub"


def test_the_store_is_off_by_default() -> None:
    settings = load_settings(None, {})
    assert settings.store.url == ""
    assert settings.store.shown == ""
    assert settings == Settings()


def test_store_url_is_a_secret_shown_redacted() -> None:
    settings = load_settings(None, {"HEPSUB_STORE_URL": URL})
    assert settings.store.url == URL
    assert settings.store.shown == "postgresql://hepsub:***@db.example:5433/hepsub"
    assert URL in settings.secrets()
    assert PASSWORD in settings.secrets()
    assert PASSWORD not in repr(settings)
    assert PASSWORD not in Redactor(settings.secrets())(f"connecting with {PASSWORD}")


def test_a_password_in_the_query_is_a_secret_and_never_shown() -> None:
    url = f"postgres://hepsub@[2001:db8::5]/hepsub?sslmode=require&password={PASSWORD}"
    settings = load_settings(None, {"HEPSUB_STORE_URL": url})
    assert PASSWORD in settings.secrets()
    assert settings.store.shown == "postgres://hepsub@[2001:db8::5]/hepsub"


@pytest.mark.parametrize(
    "url",
    [
        f"http://hepsub:{PASSWORD}@db.example/hepsub",
        f"postgresql://hepsub:{PASSWORD}@/hepsub",
        f"postgresql://hepsub:{PASSWORD}@db.example:99999/hepsub",
        f"mysql://hepsub:{PASSWORD}@db.example/hepsub",
    ],
)
def test_a_bad_store_url_names_the_setting_without_the_password(url: str, tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as error:
        load_settings(None, {"HEPSUB_STORE_URL": url})
    assert error.value.key == "store.url"
    assert "HEPSUB_STORE_URL" in str(error.value)
    assert_no_secret(str(error.value))
    path = tmp_path / "c.toml"
    path.write_text(f'[store]\nurl = "{url}"\n')
    with pytest.raises(ConfigError, match=r"^store\.url: ") as error:
        load_settings(path, {})
    assert_no_secret(str(error.value))


@pytest.fixture
async def store(store_url: str) -> AsyncIterator[Store]:
    opened = await Store.connect(StoreSettings(store_url))
    yield opened
    await opened.close()


async def tables(store_url: str) -> set[str]:
    connection = await asyncpg.connect(store_url)
    try:
        rows = await connection.fetch(
            "SELECT table_name FROM information_schema.tables WHERE table_schema = 'hepsub'"
        )
        return {row["table_name"] for row in rows}
    finally:
        await connection.close()


async def test_migrate_creates_the_schema_from_empty_and_again_does_nothing(
    store: Store, store_url: str
) -> None:
    assert await tables(store_url) == set()
    assert await store.migrate() == LATEST
    assert await store.schema_version() == LATEST
    assert await tables(store_url) == {
        "schema_version",
        "apiban_sources",
        "apiban_entries",
        "leases",
        "detection_counter",
        "detections",
        "sightings",
        "apiban_budget",
        "apiban_budget_agents",
    }
    connection = await asyncpg.connect(store_url)
    try:
        applied = await connection.fetch("SELECT version, applied_at FROM hepsub.schema_version")
        assert await store.migrate() == LATEST
        assert await connection.fetch("SELECT version, applied_at FROM hepsub.schema_version") == applied
    finally:
        await connection.close()


async def test_two_agents_migrating_at_once_make_one_schema(store_url: str) -> None:
    first = await Store.connect(StoreSettings(store_url))
    second = await Store.connect(StoreSettings(store_url))
    try:
        versions = await asyncio.gather(first.migrate(), second.migrate())
        assert versions == [LATEST, LATEST]
        connection = await asyncpg.connect(store_url)
        try:
            rows = await connection.fetch("SELECT version FROM hepsub.schema_version ORDER BY version")
        finally:
            await connection.close()
        assert [row["version"] for row in rows] == [step.version for step in MIGRATIONS]
    finally:
        await first.close()
        await second.close()


async def test_a_schema_newer_than_the_agent_is_left_alone(store: Store, store_url: str) -> None:
    await store.migrate()
    connection = await asyncpg.connect(store_url)
    try:
        await connection.execute(
            "INSERT INTO hepsub.schema_version (version, description) VALUES ($1, 'from the future')",
            LATEST + 1,
        )
    finally:
        await connection.close()
    with pytest.raises(StoreError, match="newer than this agent"):
        await store.migrate()
    assert await store.schema_version() == LATEST + 1


async def test_one_of_two_holders_gets_the_lease(store: Store) -> None:
    await store.migrate()
    results = await asyncio.gather(*(store.try_acquire("puller", holder, 30) for holder in ("a", "b")))
    winners = [lease for lease in results if lease is not None]
    assert len(winners) == 1
    loser = "b" if winners[0].holder == "a" else "a"
    assert await store.try_acquire("puller", loser, 30) is None
    assert await store.renew("puller", loser, 30) is None
    assert not await store.release("puller", loser)
    # The holder asking again keeps it, epoch unchanged.
    again = await store.try_acquire("puller", winners[0].holder, 30)
    assert again is not None
    assert again.epoch == winners[0].epoch


async def test_an_expired_lease_passes_to_the_next_holder_with_a_new_epoch(store: Store) -> None:
    await store.migrate()
    first = await store.try_acquire("puller", "a", 1.0)
    assert first is not None
    assert await store.try_acquire("puller", "b", 30) is None
    await asyncio.sleep(1.2)  # the database's clock decides; it cannot be injected
    second = await store.try_acquire("puller", "b", 30)
    assert second is not None
    assert second.epoch == first.epoch + 1
    assert await store.renew("puller", "a", 30) is None  # "a" lost it


async def test_renew_keeps_the_lease_and_release_frees_it(store: Store) -> None:
    await store.migrate()
    first = await store.try_acquire("puller", "a", 1.0)
    assert first is not None
    renewed = await store.renew("puller", "a", 30)
    assert renewed is not None
    assert renewed.expires_at > first.expires_at
    assert renewed.epoch == first.epoch
    await asyncio.sleep(1.2)  # past the first ttl: only the renewal keeps "b" out
    assert await store.try_acquire("puller", "b", 30) is None
    assert await store.release("puller", "a")
    assert not await store.release("puller", "a")
    taken = await store.try_acquire("puller", "b", 30)
    assert taken is not None
    assert taken.epoch == first.epoch + 1


async def test_leases_are_per_name(store: Store) -> None:
    await store.migrate()
    assert await store.try_acquire("puller:one", "a", 30) is not None
    assert await store.try_acquire("puller:two", "b", 30) is not None


async def test_a_wrong_password_is_a_clear_error_without_the_password(postgres_cluster: Cluster) -> None:
    wrong = f"{PASSWORD}-wrong"
    settings = StoreSettings(postgres_cluster.url(password=wrong))
    with pytest.raises(StoreError) as error:
        await Store.connect(settings)
    message = str(error.value)
    assert "password authentication failed" in message
    assert f"postgresql://postgres:***@127.0.0.1:{postgres_cluster.port}/postgres" in message
    assert wrong not in message
    assert_no_secret(message)
    assert error.value.__cause__ is None
    assert error.value.__suppress_context__


async def test_a_refused_connection_is_a_clear_error_without_the_password() -> None:
    port = free_port()  # nothing listens there
    settings = StoreSettings(f"postgresql://hepsub:{PASSWORD}@127.0.0.1:{port}/hepsub")
    with pytest.raises(StoreError) as error:
        await Store.connect(settings)
    message = str(error.value)
    assert f"cannot connect to the store postgresql://hepsub:***@127.0.0.1:{port}/hepsub" in message
    assert_no_secret(message)
    logging.getLogger("test").error("store: %s", message)  # what the agent will log: the guard checks it


async def test_a_missing_database_is_created_once_by_agents_starting_together(
    postgres_cluster: Cluster,
) -> None:
    name = f"new_{uuid.uuid4().hex[:10]}"
    settings = StoreSettings(postgres_cluster.url(name))
    admin = await asyncpg.connect(postgres_cluster.url())
    try:
        stores = await asyncio.gather(Store.connect(settings), Store.connect(settings))
        try:
            assert [await store.migrate() for store in stores] == [LATEST, LATEST]
        finally:
            for store in stores:
                await store.close()
        assert await admin.fetchval("SELECT count(*) FROM pg_database WHERE datname = $1", name) == 1
    finally:
        await admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        await admin.close()


async def test_a_missing_database_the_user_may_not_create_says_what_to_run(
    postgres_cluster: Cluster,
) -> None:
    role = f"agent_{uuid.uuid4().hex[:8]}"
    password = f"{PASSWORD}-{role}"
    admin = await asyncpg.connect(postgres_cluster.url())
    await admin.execute(f"CREATE ROLE {role} LOGIN NOCREATEDB PASSWORD '{password}'")
    try:
        url = f"postgresql://{role}:{password}@127.0.0.1:{postgres_cluster.port}/hepsub_{role}"
        with pytest.raises(StoreError) as error:
            await Store.connect(StoreSettings(url))
        message = str(error.value)
        assert f"the database hepsub_{role} does not exist" in message
        assert f"CREATE DATABASE hepsub_{role} OWNER {role}" in message
        assert password not in message
        assert error.value.__cause__ is None
    finally:
        await admin.execute(f"DROP ROLE {role}")
        await admin.close()
