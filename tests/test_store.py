"""The shared store (issue 12): ``store.url``, the schema it creates and migrates, the lease.

Against a real PostgreSQL: a throwaway cluster (tests/postgres.py), a fresh database per test.
"""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from hepsub_apiban.config import ConfigError, Settings, load_settings
from hepsub_apiban.logs import Redactor

from .conftest import assert_no_secret
from .postgres import PASSWORD

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


async def test_the_cluster_runs(store_url: str) -> None:
    import asyncpg

    connection = await asyncpg.connect(store_url)
    try:
        assert await connection.fetchval("SELECT 1") == 1
    finally:
        await connection.close()
    await asyncio.sleep(0)
