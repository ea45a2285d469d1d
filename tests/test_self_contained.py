"""The repository explains itself: no file points at a folder beside it, every page it cites exists.

Code, tests, benchmarks, scripts, config and docs cite the facts they rely on as pages under ``docs/``
(with a section anchor) or as upstream URLs. A citation of a notes folder outside the repository, or
of a page that is not here, leaves a reader of a fresh clone with nothing to open.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCANNED = ("hepsub_apiban", "tests", "bench", "scripts", "config", "docs", "README.md")
TEXT_SUFFIXES = {".py", ".md", ".toml", ".cfg", ".txt", ".service", ".yml", ".yaml", ".json", ".sh", ".ini"}

# Written in pieces so that this file does not match its own patterns.
OUTSIDE = re.compile("|".join((r"\.\./" + "shared", r"\bshared" + "/", r"\bspec" + r"/[\w-]+\.md")))
# A section sign cites a numbered section; only RFCs are cited that way, on the same line.
SECTION_SIGN = re.compile(r"^(?:(?!RFC).)*?" + "\u00a7" + r"\S*", re.MULTILINE)
# Pages that once lived outside the repository, cited by bare name.
BARE_PAGE = re.compile(r"(?<![\w/.-])(homer|apiban|hep|detection|peers|interface)\.md\b")
DOCS_PATH = re.compile(r"(?<![\w/.-])((?:docs/|ARCHITECTURE|CONTRIBUTING)[\w/.-]*\.md)(?!\w)(#[\w-]+)?")
MD_LINK = re.compile(r"\[[^\]]*\]\(([^)\s]+)\)")
URL = re.compile(r"https?://\S+")
HEADING = re.compile(r"^#{1,6}\s+(.+?)\s*#*\s*$")


def scanned_files() -> list[Path]:
    files: list[Path] = []
    for name in SCANNED:
        path = ROOT / name
        if path.is_file():
            files.append(path)
        elif path.is_dir():
            files.extend(
                p
                for p in sorted(path.rglob("*"))
                if p.is_file() and p.suffix in TEXT_SUFFIXES and "__pycache__" not in p.parts
            )
    return files


def slug(heading: str) -> str:
    """GitHub's anchor for a heading: lower case, punctuation dropped, spaces to hyphens."""
    text = re.sub(r"[`*_]|\[([^\]]*)\]\([^)]*\)", r"\1", heading).strip().lower()
    return re.sub(r"[^\w\- ]", "", text).replace(" ", "-")


def anchors(page: Path) -> set[str]:
    found: set[str] = set()
    fenced = False
    for line in page.read_text(encoding="utf-8").splitlines():
        if line.lstrip().startswith("```"):
            fenced = not fenced
        elif not fenced and (match := HEADING.match(line)):
            found.add(slug(match.group(1)))
    return found


def broken_target(base: Path, target: str) -> str | None:
    """Why ``target`` (a path, maybe with ``#anchor``, relative to ``base``) does not resolve, or None."""
    path, _, anchor = target.partition("#")
    page = (base / path).resolve() if path else None
    if page is not None and not page.exists():
        return f"{target}: no such file"
    if page is not None and not page.is_relative_to(ROOT):
        return f"{target}: outside the repository"
    if anchor and page is not None and page.suffix == ".md" and anchor not in anchors(page):
        return f"{target}: no section #{anchor}"
    return None


def problems_in(path: Path, text: str | None = None) -> list[str]:
    """What is wrong with the citations in ``path`` (or in ``text``, as if it were that file)."""
    if text is None:
        text = path.read_text(encoding="utf-8", errors="replace")
    rel = path.relative_to(ROOT)
    found = [f"{rel}: points outside the repository: {m.group(0)!r}" for m in OUTSIDE.finditer(text)]
    found += [f"{rel}: cites a section number of a page: {m.group(0)!r}" for m in SECTION_SIGN.finditer(text)]
    if path.suffix == ".md":
        for link in MD_LINK.finditer(text):
            target = link.group(1)
            if target.startswith("#"):
                if target[1:] not in anchors(path):
                    found.append(f"{rel}: no section {target}")
            elif not URL.match(target) and (why := broken_target(path.parent, target)) is not None:
                found.append(f"{rel}: {why}")
    bare = URL.sub(" ", MD_LINK.sub(" ", text))  # links were checked above
    for match in DOCS_PATH.finditer(bare):
        if (why := broken_target(ROOT, match.group(1) + (match.group(2) or ""))) is not None:
            found.append(f"{rel}: {why}")
    for match in BARE_PAGE.finditer(bare):
        if not (path.parent / match.group(0)).exists():
            found.append(f"{rel}: cites {match.group(0)!r}, which is not beside it (cite its docs/ page)")
    return found


def test_no_file_points_outside_the_repository_and_every_cited_page_exists() -> None:
    problems = [problem for path in scanned_files() for problem in problems_in(path)]
    assert not problems, "\n".join(problems)


@pytest.mark.parametrize(
    ("line", "complaint"),
    [
        ("# see ../sha" + "red/notes.txt", "outside"),
        ("# apiban" + ".md \u00a72: batches of 250", "section number"),
        ("# the \u00a76 edge-case rules", "section number"),
        ('"""faithful to ``spec' + "/hom" + 'er.md``."""', "outside"),
        ("# homer" + ".md, fixture 1", "not beside it"),
        ("# docs/peers/" + "nothere.md#x", "no such file"),
        ("# docs/peers/" + "he" + "p.md#no-such-section", "no section"),
    ],
)
def test_each_kind_of_bad_citation_is_caught(line: str, complaint: str) -> None:
    problems = problems_in(ROOT / "tests" / "probe.py", line + "\n")
    assert any(complaint in problem for problem in problems), problems


def test_a_good_citation_passes() -> None:
    path = ROOT / "docs/peers/hep.md"
    assert "edge-cases" in anchors(path)
    assert broken_target(ROOT, "docs/peers/hep.md#edge-cases") is None
    assert broken_target(ROOT, "docs/peers/homer-app.md#request-fixtures") is None
