"""The docs say what the code does: the configuration table of docs/configuration.md is the code's
settings, README.md keeps the two commands where CI finds them and stays a short door to docs/, and
every relative link in the Markdown a reader starts from points at a file that exists."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

from hepsub_apiban.core.config import KEYS

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
CONFIGURATION = ROOT / "docs" / "configuration.md"
# README, the contributors' page and the operators' pages: what a newcomer reads first.
READ_FIRST = [
    README,
    ROOT / "CONTRIBUTING.md",
    ROOT / "ARCHITECTURE.md",
    *sorted((ROOT / "docs").rglob("*.md")),
]
# [text](target) and [text](target "title"); the target stops at a space or the closing bracket.
LINK = re.compile(r"\[[^\]]*\]\(<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\)")
FENCE = re.compile(r"^```.*?^```", re.MULTILINE | re.DOTALL)


def test_configuration_table_matches_the_code() -> None:
    table = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "config_table.py")],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.strip()
    doc = CONFIGURATION.read_text(encoding="utf-8")
    assert table in doc, "docs/configuration.md's table differs: paste `python scripts/config_table.py`"
    for key in KEYS:
        name = key.name
        if name.count(".") == 2:  # detect.RULE.*: one row per rule in the second table
            assert f"| `{name.split('.')[1]}` |" in table, name
        else:
            assert f"| `{name}` |" in table, name


def test_readme_has_the_two_commands_ci_runs() -> None:
    readme = README.read_text(encoding="utf-8")
    for marker, command in (
        ("<!-- demo-command -->", "hepsub-apiban demo"),
        ("<!-- test-command -->", "python -m pytest"),
    ):
        after = readme.split(marker, 1)[1].lstrip().splitlines()
        assert after[0] == "```sh"
        assert command in after[1]
        assert after[2] == "```"


def test_readme_is_short_and_leads_to_every_page() -> None:
    readme = README.read_text(encoding="utf-8")
    assert len(readme.splitlines()) <= 200, "README.md is the door: move the detail to a docs/ page"
    targets = set(links(readme))
    pages = {f"docs/{page.name}" for page in (ROOT / "docs").glob("*.md")}
    assert pages, "no docs/ pages"
    assert pages <= targets, f"README.md does not link {sorted(pages - targets)}"
    assert {"ARCHITECTURE.md", "CONTRIBUTING.md", "bench/README.md"} <= targets


def links(text: str) -> list[str]:
    """The link targets of Markdown text, code blocks left out (their brackets are not links)."""
    return LINK.findall(FENCE.sub("", text))


def anchors(text: str) -> set[str]:
    """GitHub's anchors of a Markdown file's headings: lower case, punctuation dropped, spaces to -."""
    found = set()
    for heading in re.findall(r"^#+ (.+)$", FENCE.sub("", text), re.MULTILINE):
        slug = re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")
        found.add(slug)
    return found


def resolves(page: Path, target: str) -> bool:
    """Whether a link of ``page`` reaches an existing file, and a heading of it when it names one."""
    if re.match(r"[a-z][a-z0-9+.-]*:", target):  # https:, mailto: ...: not a file of ours
        return True
    path, _, anchor = target.partition("#")
    file = (page.parent / path).resolve() if path else page
    if not file.exists():
        return False
    return not anchor or file.suffix != ".md" or anchor in anchors(file.read_text(encoding="utf-8"))


def broken_links(page: Path) -> list[str]:
    return [target for target in links(page.read_text(encoding="utf-8")) if not resolves(page, target)]


def test_every_relative_link_points_at_something_that_exists() -> None:
    assert all(page.exists() for page in READ_FIRST[:2])
    assert len(READ_FIRST) > 2
    broken = {page.relative_to(ROOT).as_posix(): broken_links(page) for page in READ_FIRST}
    assert {page: targets for page, targets in broken.items() if targets} == {}


def test_the_link_check_sees_a_broken_link(tmp_path: Path) -> None:
    page = tmp_path / "page.md"
    (tmp_path / "there.md").write_text("# A heading, here\n")
    page.write_text(
        "[ok](there.md) [ok](there.md#a-heading-here) [web](https://example.com/x)\n"
        "[gone](missing.md) [bad anchor](there.md#nowhere)\n"
        "```sh\n[not a link](missing-too.md)\n```\n"
    )
    assert broken_links(page) == ["missing.md", "there.md#nowhere"]
