"""ARCHITECTURE.md stays true: the names it cites exist, and imports point the way its wings say."""

from __future__ import annotations

import ast
import importlib
import re
from pathlib import Path
from types import ModuleType

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = ROOT / "hepsub_apiban"
DOC = (ROOT / "ARCHITECTURE.md").read_text(encoding="utf-8")
CITED = re.findall(r"`([^`\s]+)`", DOC)


def modules() -> list[str]:
    """The package's modules as paths without ``.py``: ``app``, ``ingest/collector``, ``formats/hep/stream``.

    Subpackages count file by file; the fakes are outside the wings (ARCHITECTURE.md says why).
    """
    paths = [p.relative_to(PACKAGE).with_suffix("") for p in PACKAGE.rglob("*.py")]
    return sorted(path.as_posix() for path in paths if path.parts[0] != "fakes")


def _module_of(parts: list[str]) -> str:
    """The module a dotted import names (a file, else a subpackage's ``__init__``), or ''."""
    for end in range(len(parts), 0, -1):
        joined = "/".join(parts[:end])
        if (PACKAGE / f"{joined}.py").exists():
            return joined
        if (PACKAGE / joined / "__init__.py").exists():
            return f"{joined}/__init__"
    return ""


def wings() -> list[tuple[str, str, list[str]]]:
    """(wing, its package or '' for the top level, the modules it lists) from the table after the
    ``wings`` marker, bottom wing first."""
    table = DOC.split("<!-- wings", 1)[1].split("\n\n", 1)[0]
    rows = [line.split("|") for line in table.splitlines() if line.startswith("| ") and "`" in line]
    return [
        (row[1].strip(), "".join(re.findall(r"`(\w+)/`", row[2])), re.findall(r"`([\w/]+)\.py`", row[3]))
        for row in rows
    ]


def wing_of(module: str) -> int:
    """The row of ``module``'s wing: the wing of its package, or the top-level wing that lists it.

    The package's own ``__init__`` (its version) sits with the top level.
    """
    head = module.split("/")[0] if "/" in module else ""
    found = [
        i
        for i, (_, package, members) in enumerate(wings())
        if package == head and (head or module in [*members, "__init__"])
    ]
    assert len(found) == 1, f"{module}.py: its package {head or '(top level)'} names no single wing"
    return found[0]


def imports(name: str) -> set[str]:
    """The package's modules that ``name`` imports, relative (``from ..core.config``) or absolute."""
    tree = ast.parse((PACKAGE / f"{name}.py").read_text(encoding="utf-8"))
    here = name.split("/")[:-1]  # the subpackage ``name`` sits in; [] at the top
    found: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.level:
            base = here[: len(here) - node.level + 1]
            if node.module:
                found.add(_module_of([*base, *node.module.split(".")]))
            else:
                found.update(_module_of([*base, alias.name]) for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and (node.module or "").startswith("hepsub_apiban."):
            found.add(_module_of((node.module or "").split(".")[1:]))
        elif isinstance(node, ast.Import):
            dotted = [a.name.split(".")[1:] for a in node.names if a.name.startswith("hepsub_apiban.")]
            found.update(_module_of(parts) for parts in dotted)
    return found & set(modules())


def test_every_module_is_in_exactly_one_wing() -> None:
    """Each module's wing is its package's; each row lists exactly the modules of its package."""
    rows = wings()
    assert len({package for _, package, _ in rows}) == len(rows), "one package per wing"
    for index, (wing, package, members) in enumerate(rows):
        held = [
            m for m in modules() if wing_of(m) == index and m != f"{package}/__init__" and m != "__init__"
        ]
        assert sorted(members) == held, f"the {wing} row lists its package's modules"


def test_imports_point_from_higher_wings_to_lower_ones() -> None:
    names = [wing for wing, _, _ in wings()]
    level = {module: wing_of(module) for module in modules()}
    wrong = [
        f"{module}.py ({names[level[module]]}) imports {target}.py ({names[level[target]]})"
        for module in level
        for target in imports(module)
        if level[target] > level[module]
    ]
    assert wrong == []


def test_nothing_but_the_factory_imports_web() -> None:
    """The web layer is ``web.py`` (the route table) and the ``web_*.py`` modules of its handlers:
    only the factory imports it, and only through ``web.py``."""
    layer = {m for m in modules() if m == "web" or m.startswith("web_")}
    assert len(layer) > 1
    assert [m for m in modules() if m not in layer and imports(m) & layer] == ["app"]
    assert imports("app") & layer == {"web"}


def test_every_file_cited_exists() -> None:
    files = [name for name in CITED if re.fullmatch(r"[\w/.-]+\.(py|toml)", name)]
    assert len(files) > 30  # the wings table alone cites every module
    missing = [f for f in files if not (PACKAGE / f).exists() and not (ROOT / f).exists()]
    assert missing == []


def _package() -> dict[str, ModuleType]:
    dotted = [m.removesuffix("/__init__").replace("/", ".") for m in modules() if m != "__main__"]
    return {name: importlib.import_module(f"hepsub_apiban.{name}") for name in dotted}


def _resolves(dotted: str, package: dict[str, ModuleType]) -> bool:
    head, *rest = dotted.split(".")
    # module.name..., else Class.method or function in any module of the package
    starts = [package[head]] if head in package else [m for m in package.values() if hasattr(m, head)]
    for start in starts:
        value: object = start if head in package else getattr(start, head)
        for part in rest:
            value = getattr(value, part, None)
        if value is not None:
            return True
    return False


def test_every_function_and_class_cited_exists() -> None:
    package = _package()
    calls = [name.removesuffix("()") for name in CITED if re.fullmatch(r"[\w.]+\(\)", name)]
    # module.Class (hep.HepPacket); lower-case dotted names are settings (hep.udp, store.url).
    classes = [n for n in CITED if re.fullmatch(r"\w+\.[A-Z]\w*", n) and n.split(".")[0] in package]
    assert len(calls) > 30
    assert [name for name in calls + classes if not _resolves(name, package)] == []


# "About 400": a module past this holds more than one concern; split it by concern, as ARCHITECTURE.md's
# wings were. The HOMER fake is the one exception: it is one peer's whole contract, quirks included.
MAX_MODULE_LINES = 420
LARGE_BY_DESIGN = {"fakes/homer.py"}


def test_no_module_is_over_about_400_lines() -> None:
    files = PACKAGE.rglob("*.py")
    sizes = {path.relative_to(PACKAGE).as_posix(): len(path.read_text().splitlines()) for path in files}
    assert len(sizes) > 80  # the whole package was read
    over = {name: n for name, n in sizes.items() if n > MAX_MODULE_LINES and name not in LARGE_BY_DESIGN}
    assert over == {}
