"""One detection as the book holds it (``Detection``): what the site API, the HOMER tab and the store
read of it, and its saved form in the detection book's snapshot, read back checked whole or refused
(``SnapshotError``). Moved out of book.py, which decides what is detected and served (``Detections``)
and binds from here the record and the snapshot checks it uses.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

from ..core.addresses import parse_ip
from ..core.config import DetectSettings
from .counters import rule_name

MAX_DURATION = 7 * 86400.0
MAX_HISTORY = 8  # detection starts kept per address (more cannot lengthen the cap)
SERVE = "serve"
FLAG = "flag"


@dataclass(slots=True)
class Detection:
    ip: str
    since: float
    until: float
    rules: dict[str, str] = field(default_factory=dict)  # rule -> evidence, in the order they fired
    proof: str | None = None  # why it evidently talks to us
    served: bool = False
    serial: int | None = None  # its ID in the site API and the decision stream, once served
    held_back: str | None = None  # why a rule that serves only flagged it
    repeats: int = 0  # earlier detections within REPEAT_WINDOW
    announced_until: float = 0.0  # the end blocklist clients were told with the current serial
    agents: tuple[str, ...] = ()  # with store.url: the agents that detected it (HEPSUB UUIDs)

    @property
    def action(self) -> str:
        return SERVE if self.served else FLAG

    def to_json(self) -> dict[str, Any]:
        body: dict[str, Any] = {
            "ip": self.ip,
            "rules": [rule_name(rule) for rule in self.rules],
            "action": self.action,
            "since": int(self.since),
            "until": int(self.until),
            "evidence": [f"{rule_name(rule)}: {text}" for rule, text in self.rules.items()],
            "repeats": self.repeats,
        }
        if self.served:
            body["ID"] = str(self.serial)
            body["served_because"] = self.proof
        elif self.held_back:
            body["not_served_because"] = self.held_back
        if self.agents:
            body["agents"] = list(self.agents)
        return body


class SnapshotError(ValueError):
    pass


def _serial_of(detection: Detection) -> int:
    return detection.serial or 0


def _detection_json(detection: Detection) -> dict[str, Any]:
    return {
        "ip": detection.ip,
        "since": detection.since,
        "until": detection.until,
        "rules": detection.rules,
        "proof": detection.proof,
        "served": detection.served,
        "serial": detection.serial,
        "held_back": detection.held_back,
        "repeats": detection.repeats,
        "announced_until": detection.announced_until,
    }


def _list(value: object) -> list[Any]:
    if not isinstance(value, list):
        raise SnapshotError("a section is not a list")
    return value


def _time(value: object, now: float, ahead: float = 0.0) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise SnapshotError("a time is not a number")
    if not 0 <= value <= now + ahead:
        raise SnapshotError("a time is out of range")
    return float(value)


def _ip(value: object) -> str:
    address = parse_ip(value)
    if address is None or address.text != value:
        raise SnapshotError("an address is not in canonical form")
    return address.text


def _text(value: object, limit: int = 400) -> str | None:
    if value is None:
        return None
    if not isinstance(value, str) or len(value) > limit:
        raise SnapshotError("a text field is not a short string")
    return value


def _detection_from(item: object, settings: DetectSettings, now: float) -> Detection:
    if not isinstance(item, dict):
        raise SnapshotError("a detection is not an object")
    rules = item.get("rules")
    if not isinstance(rules, dict) or not rules or any(rule not in settings.rules for rule in rules):
        raise SnapshotError("a detection names no rule or an unknown one")
    serial = item.get("serial")
    served = item.get("served")
    if not isinstance(served, bool) or (served and (not isinstance(serial, int) or serial < 0)):
        raise SnapshotError("a served detection has no serial")
    repeats = item.get("repeats")
    if not isinstance(repeats, int) or not 0 <= repeats <= MAX_HISTORY:
        raise SnapshotError("repeats is not a small whole number")
    return Detection(
        ip=_ip(item.get("ip")),
        since=_time(item.get("since"), now),
        until=_time(item.get("until"), now, MAX_DURATION),
        rules={rule: _text(text) or "" for rule, text in rules.items()},
        proof=_text(item.get("proof")),
        served=served,
        serial=serial if served else None,
        held_back=_text(item.get("held_back")),
        repeats=repeats,
        announced_until=_time(item.get("announced_until", 0.0), now, MAX_DURATION),
    )


def _history_from(item: object, now: float) -> tuple[str, list[float]]:
    if not isinstance(item, list) or len(item) != 2 or not isinstance(item[1], list):
        raise SnapshotError("a history entry is not [ip, [times]]")
    return _ip(item[0]), [_time(t, now) for t in item[1][-MAX_HISTORY:]]


def _pair(item: object, now: float) -> tuple[str, float]:
    if not isinstance(item, list) or len(item) != 2:
        raise SnapshotError("an authenticated entry is not [ip, time]")
    return _ip(item[0]), _time(item[1], now)
