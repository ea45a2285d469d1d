"""The state directory: atomic writes and the persistent registration uuid."""

from __future__ import annotations

import os
import uuid
from pathlib import Path

import pytest

from hepsub_apiban.core.config import ConfigError
from hepsub_apiban.core.state import atomic_write, ensure_state_dir, load_or_create_uuid


def test_a_failed_write_leaves_the_old_file_and_no_temp_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    target = tmp_path / "mirror.json"
    atomic_write(target, b"old")

    def crash(*_: object) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "replace", crash)
    with pytest.raises(OSError, match="No space"):
        atomic_write(target, b"new")
    assert target.read_bytes() == b"old"
    assert [p.name for p in tmp_path.iterdir()] == ["mirror.json"]


def test_uuid_is_created_once_and_kept(tmp_path: Path) -> None:
    first = load_or_create_uuid(tmp_path)
    assert str(uuid.UUID(first)) == first
    assert load_or_create_uuid(tmp_path) == first


def test_a_damaged_uuid_file_is_replaced(tmp_path: Path) -> None:
    (tmp_path / "uuid").write_text("garbage\n")
    value = load_or_create_uuid(tmp_path)
    assert str(uuid.UUID(value)) == value
    assert (tmp_path / "uuid").read_text().strip() == value


def test_unwritable_state_dir_names_the_setting(tmp_path: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("x")
    with pytest.raises(ConfigError, match=r"^state\.dir:"):
        ensure_state_dir(blocker / "state")
