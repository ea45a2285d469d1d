"""Print the configuration table of docs/configuration.md from ``hepsub_apiban.core.config.KEYS``.

Usage: ``.venv/bin/python scripts/config_table.py``, then paste the output into
docs/configuration.md (tests/test_docs.py checks it is there), so the table cannot drift from the
settings the code actually reads.
"""

from __future__ import annotations

from pathlib import Path

from hepsub_apiban.core.config import KEYS, LEGACY_ENV, RULES, Settings

# What an empty default means, or where it differs; shown after the value.
DEFAULT_NOTES = {
    "agent.host": "(required to register)",
    "agent.uuid": "(generated once, kept in state.dir)",
    "homer.url": "(none: no registration)",
    "state.dir": "(container: `/var/lib/hepsub-apiban`)",
    "store.url": "(none: no database)",
}
# Legacy names handled outside LEGACY_ENV (two variables make one URL).
EXTRA_LEGACY = {"homer.url": "`HOMER_IP` + `HOMER_PORT`"}


def default_of(name: str, settings: Settings) -> object:
    section, attr = name.split(".", 1)
    if section == "detect" and "." in attr:
        rule, attr = attr.split(".")
        return getattr(settings.detect.rules[rule], attr)
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
        if key.name.count(".") == 2:  # detect.RULE.*: the rule table below
            if key.name.endswith(".action") and key.name.startswith(f"detect.{RULES[0]}."):
                lines.append(RULE_ROW)
            continue
        value = show(default_of(key.name, settings))
        shown = " ".join(
            part for part in (f"`{value}`" if value else "", DEFAULT_NOTES.get(key.name, "")) if part
        )
        meaning = key.help + (f" (range: {key.value_range()})" if key.value_range() else "")
        lines.append(f"| `{key.name}` | {env_names(key.name, key.env)} | {shown} | {cell(meaning)} |")
    return lines


def _rule_range(setting: str) -> str:
    """The range of one setting of every rule (the first rule that has it; they share them)."""
    keys = {key.name: key for key in KEYS}
    found = next(keys[f"detect.{rule}.{setting}"] for rule in RULES if f"detect.{rule}.{setting}" in keys)
    return f"{setting} {found.value_range()}"


RULE_ROW = (
    "| `detect.RULE.action`, `.simulate`, `.duration`, `.threshold`, `.window` "
    "(`.slow_threshold`, `.slow_window`; `detect.toll_fraud.prefixes`) "
    "| `HEPSUB_DETECT_RULE_ACTION`, ... | see below | each detection rule: flag or serve, "
    "simulate (log and count only), first duration in seconds, when it fires (ranges: "
    + ", ".join(
        _rule_range(setting)
        for setting in ("duration", "threshold", "window", "slow_threshold", "slow_window")
    )
    + ") |"
)


def rule_table(settings: Settings) -> list[str]:
    lines = [
        "| RULE | action | simulate | duration (s) | threshold / window (s) "
        "| slow_threshold / slow_window (s) |",
        "|---|---|---|---|---|---|",
    ]
    for name in RULES:
        rule = settings.detect.rules[name]
        slow = f"{rule.slow_threshold} / {rule.slow_window:g}" if rule.slow_threshold else ""
        lines.append(
            f"| `{name}` | `{rule.action}` | `{show(rule.simulate)}` | {rule.duration:g} "
            f"| {rule.threshold} / {rule.window:g} | {slow} |"
        )
    return lines


def main() -> None:
    settings = Settings()
    print("\n".join([*table(settings), "", *rule_table(settings)]))


if __name__ == "__main__":
    main()
