"""The README's configuration table is the code's settings, and its two commands are where CI finds them."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from hepsub_apiban.config import KEYS

ROOT = Path(__file__).resolve().parents[1]


def test_readme_configuration_table_matches_the_code() -> None:
    table = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "config_table.py")],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.strip()
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    assert table in readme, "README's configuration table differs: paste `python scripts/config_table.py`"
    for key in KEYS:
        name = key.name
        if name.count(".") == 2:  # detect.RULE.*: one row per rule in the second table
            assert f"| `{name.split('.')[1]}` |" in table, name
        else:
            assert f"| `{name}` |" in table, name


def test_readme_has_the_two_commands_ci_runs() -> None:
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    for marker, command in (
        ("<!-- demo-command -->", "hepsub-apiban demo"),
        ("<!-- test-command -->", "python -m pytest"),
    ):
        after = readme.split(marker, 1)[1].lstrip().splitlines()
        assert after[0] == "```sh"
        assert command in after[1]
        assert after[2] == "```"
