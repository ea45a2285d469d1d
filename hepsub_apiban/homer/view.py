"""The answer as the HOMER tab lays it out: what a person sees, line by line.

homer-app relays the agent's answer through Go's ``encoding/json``, which writes every object's
keys sorted bytewise; the UI then adds its own ``data`` key pointing at the answer itself, and
ngx-json-viewer shows the tree with every level expanded, one ``key : value`` per line, children
indented, list items under their index. The demo prints this, and the tests read its first lines
as a person would, so the answer's design can be judged where it is read.
"""

from __future__ import annotations

from typing import Any

import orjson

INDENT = "  "
SELF_REFERENCE = '{"$ref": "$"}'  # what ngx-json-viewer shows for the UI's data = answer


def go_order(items: dict[str, Any]) -> list[tuple[str, Any]]:
    """An object's members in the order Go's encoding/json writes map keys: by their UTF-8 bytes."""
    return sorted(items.items(), key=lambda item: item[0].encode("utf-8", "surrogatepass"))


def tab_lines(answer: dict[str, Any]) -> list[str]:
    """Every line of the tab's tree for ``answer``, with the UI's ``data`` self-reference."""
    lines: list[str] = []
    members = [*answer.items(), ("data", _SelfReference())]
    _members(go_order(dict(members)), 0, lines)
    return lines


class _SelfReference:
    pass


def _members(members: list[tuple[str, Any]], depth: int, lines: list[str]) -> None:
    for key, value in members:
        prefix = INDENT * depth + f"{key} :"
        if isinstance(value, dict) and value:
            lines.append(prefix)
            _members(go_order(value), depth + 1, lines)
        elif isinstance(value, list | tuple) and value:
            lines.append(prefix)
            _members([(str(index), item) for index, item in enumerate(value)], depth + 1, lines)
        else:
            lines.append(f"{prefix} {_scalar(value)}")


def _scalar(value: Any) -> str:
    if isinstance(value, _SelfReference):
        return SELF_REFERENCE
    if isinstance(value, dict):
        return "Object"  # ngx-json-viewer's text for an empty object
    if isinstance(value, list | tuple):
        return "Array[0]"
    return orjson.dumps(value).decode()
