"""Print the README's configuration table from ``hepsub_apiban.config.KEYS``.

Usage: ``.venv/bin/python scripts/config_table.py``, then paste the output into README.md,
so the table cannot drift from the settings the code actually reads.
"""

from __future__ import annotations

from pathlib import Path

from hepsub_apiban.config import KEYS, LEGACY_ENV, Settings

# What an empty default means, or where it differs; shown after the value.
DEFAULT_NOTES = {
    "agent.host": "(required to register)",
    "agent.uuid": "(generated once, kept in state.dir)",
    "homer.url": "(none: no registration)",
    "state.dir": "(container: `/var/lib/hepsub-apiban`)",
}
# Legacy names handled outside LEGACY_ENV (two variables make one URL).
EXTRA_LEGACY = {"homer.url": "`HOMER_IP` + `HOMER_PORT`"}


def default_of(name: str, settings: Settings) -> object:
    section, attr = name.split(".")
    return getattr(getattr(settings, section), attr)


def show(value: object) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, Path):
        return str(value) if value.is_absolute() else f"./{value}"
    if isinstance(value, tuple):
        return ",".join(str(item) for item in value)
    if value is None:
        return ""
    return str(value)


def cell(text: str) -> str:
    """Markdown table cell text: keep pipes and angle brackets literal."""
    return text.replace("|", "\\|").replace("<", "&lt;").replace(">", "&gt;")


def env_names(name: str, env: str) -> str:
    legacy = [f"`{old}`" for old, key in LEGACY_ENV.items() if key == name]
    if name in EXTRA_LEGACY:
        legacy.append(EXTRA_LEGACY[name])
    return " or ".join([f"`{env}`", *legacy])


def table(settings: Settings) -> list[str]:
    lines = ["| key | env | default | meaning |", "|---|---|---|---|"]
    for key in KEYS:
        value = show(default_of(key.name, settings))
        shown = " ".join(
            part for part in (f"`{value}`" if value else "", DEFAULT_NOTES.get(key.name, "")) if part
        )
        lines.append(f"| `{key.name}` | {env_names(key.name, key.env)} | {shown} | {cell(key.help)} |")
    return lines


def main() -> None:
    print("\n".join(table(Settings())))


if __name__ == "__main__":
    main()
