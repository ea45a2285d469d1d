"""What a person reads in the HOMER tab: verdicts in words, times in UTC, no empty containers.

homer-app re-marshals the answer with Go's ``encoding/json``, which sorts every object's keys
bytewise, and the UI shows the tree fully expanded. Keys that must be read first therefore start
with a character that sorts before digits and letters: ``(1) verdict`` and ``(2) seen`` lead each
address's object (the machine-readable fields follow under their usual names), as ``(1) summary``
and ``(2) listed or detected`` lead the whole answer. Times a person reads are UTC text, never
epoch numbers; ``/api/v1/*`` keeps its unix seconds.
"""

from __future__ import annotations

import time
from typing import Any

from ..apiban.lookups import Verdict
from ..detection.book import Detection
from ..detection.detector import rule_name
from ..ingest.sightings import Sighting

VERDICT_KEY = "(1) verdict"
SEEN_KEY = "(2) seen"
SUMMARY_KEY = "(1) summary"
NOTABLE_KEY = "(2) listed or detected"
SHOWN_METHODS = 3  # actions named in the one-line "seen"


_UTC_TEXTS: dict[int, str] = {}  # minute -> its text: an answer's times repeat (one per APIBAN page)
MAX_UTC_TEXTS = 4096


def utc_text(seconds: float) -> str:
    minute = int(seconds) // 60
    text = _UTC_TEXTS.get(minute)
    if text is None:
        if len(_UTC_TEXTS) >= MAX_UTC_TEXTS:
            _UTC_TEXTS.clear()
        text = _UTC_TEXTS[minute] = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime(minute * 60))
    return text


def verdict_sentence(verdict: Verdict, detection: Detection | None = None) -> str:
    """The verdict in words: what APIBAN says, then what local detection says."""
    listed = _apiban_words(verdict)
    if detection is None:
        return listed
    local = detection_words(detection)
    return f"{listed}; {local}" if verdict.listed else f"{local}; {listed}"


def _apiban_words(verdict: Verdict) -> str:
    if verdict.listed:
        when = f", last reported {utc_text(verdict.last_reported)}" if verdict.last_reported else ""
        return f"listed by APIBAN{when}"
    if verdict.source == "private":
        return "private address, not looked up"
    if verdict.source == "allowlist":
        return "in allow.cidrs: never reported as listed"
    if verdict.listed is None:
        return f"unknown: {verdict.reason or 'APIBAN did not answer'}"
    return "not listed by APIBAN"


def detection_words(detection: Detection) -> str:
    rules = ", ".join(rule_name(rule) for rule in detection.rules)
    action = "blocked at the site" if detection.served else "flagged only"
    return f"detected here: {rules}, until {utc_text(detection.until)} ({action})"


def verdict_details(verdict: Verdict, sentence: str | None = None) -> dict[str, Any]:
    """The machine-readable verdict fields, with ``last_reported`` as UTC text, after the
    verdict in words."""
    body: dict[str, Any] = {
        VERDICT_KEY: sentence or verdict_sentence(verdict),
        "ip": verdict.ip,
        "listed": verdict.listed,
        "source": verdict.source,
    }
    if verdict.id is not None:
        body["ID"] = verdict.id
    if verdict.last_reported is not None:
        body["last_reported"] = utc_text(verdict.last_reported)
    if verdict.reason is not None:
        body["reason"] = verdict.reason
    return body


def seen_line(sighting: Sighting) -> str:
    """What the HEP capture saw of an address, in one line."""
    count = f"{sighting.packets:,} SIP packet" + ("" if sighting.packets == 1 else "s")
    actions = ", ".join(f"{action} x{n:,}" for action, n in sighting.methods.most_common(SHOWN_METHODS))
    more = len(sighting.methods) - SHOWN_METHODS
    if more > 0:
        actions += f" and {more} more"
    agents = f" from {', '.join(sighting.user_agents[:2])}" if sighting.user_agents else ""
    first, last = utc_text(sighting.first_seen), utc_text(sighting.last_seen)
    span = first if first == last else f"{first} to {last[11:] if first[:10] == last[:10] else last}"
    return f"{count} to or from it, {span}; it sent {actions or 'nothing'}{agents}"


def seen_details(sighting: Sighting) -> dict[str, Any]:
    body: dict[str, Any] = {
        "first_seen": utc_text(sighting.first_seen),
        "last_seen": utc_text(sighting.last_seen),
        "packets": sighting.packets,
    }
    if sighting.methods:
        body["methods"] = dict(sighting.methods)
    if sighting.user_agents:
        body["user_agents"] = list(sighting.user_agents)
    return body


def detection_details(detection: Detection) -> dict[str, Any]:
    """A detection as the HOMER tab shows it: rules, times in UTC, evidence in words."""
    body = detection.to_json()
    body["since"] = utc_text(detection.since)
    body["until"] = utc_text(detection.until)
    del body["ip"]
    body.pop("ID", None)  # the site API's serial: for blocklist clients, not for the person here
    if not body["repeats"]:
        del body["repeats"]
    return body
