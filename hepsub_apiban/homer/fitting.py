"""A large enrichment answer fitted into ``enrichment.max_answer_bytes``, in order of importance.

When the whole answer of ``homer/answer.py`` would overshoot the cap (or the request is too large
to try), the answer is assembled from separately serialised members: the first Call-ID's core
(what the HOMER tab reads) and room for ``left_out`` first, then the other Call-IDs, the verdict
lists, and each IP's details, listed IPs first. Each member is serialised once, so the work stays
linear; what would overshoot the cap is left out, counted, and said in ``left_out``. Pure.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import orjson

from ..apiban.lookups import Verdict
from .answer import Known, _Call, _call_core, _entry, _no_call_id, _parse_notes, _pointer
from .request import EnrichmentRequest
from .wording import NOTABLE_KEY, SUMMARY_KEY

# Bytes kept for the ``left_out`` member while the rest of the answer is fitted into the cap;
# its sentences are fixed text and numbers, far shorter (tests check the longest one fits).
LEFT_OUT_ROOM = 1536


class _Budget:
    def __init__(self, size: int) -> None:
        self.left = size

    def take(self, size: int) -> bool:
        if size > self.left:
            return False
        self.left -= size
        return True


def _fitted_answer(
    request: EnrichmentRequest,
    verdicts: Sequence[Verdict],
    known: Known,
    call: _Call,
) -> bytes:
    """The answer assembled from separately serialised members, in order of importance.

    The first Call-ID's core (what the tab reads) and room for ``left_out`` come first; then
    the other Call-IDs (the UI fails on a clicked Call-ID without an object); then the verdict
    lists; then each IP's details, listed IPs first. Each member is serialised once, and what
    would overshoot the cap is left out and counted.
    """
    max_bytes = request.limits.max_answer_bytes
    budget = _Budget(max_bytes - 2 - LEFT_OUT_ROOM)  # the braces, and the left_out member
    cuts: list[str] = []
    if request.call_ids:
        first = request.call_ids[0]
        core = _call_core(request, call)
        budget.take(len(_member(first, core)))  # bounded by construction; fits any allowed cap
        parts = _fit_call_ids(request.call_ids[1:], _pointer(request, call), budget, cuts)
        core.update(_fit_lists(request, call, budget, cuts))
    else:
        core = _no_call_id(call, {})
        parts = [_member(key, value) for key, value in core.items()]
        budget.take(sum(len(part) + 1 for part in parts))
    parts += _fit_notable(call, budget, cuts)
    parts += _fit_entries(request, verdicts, known, call, budget, cuts)
    left_out = _parse_notes(request)
    if cuts:
        left_out["answer_size"] = (
            f"to stay within enrichment.max_answer_bytes = {max_bytes:,}, left out: " + "; ".join(cuts)
        )
    if request.call_ids:
        if left_out:
            core["left_out"] = left_out
        parts.insert(0, _member(request.call_ids[0], core))
    elif left_out:
        parts.append(_member("left_out", left_out))
    return b"{" + b",".join(parts) + b"}"


def _member(key: str, value: Any) -> bytes:
    """``"key":value`` as it appears inside an object."""
    return orjson.dumps({key: value})[1:-1]


def _fit_call_ids(
    others: list[str], pointer: dict[str, Any], budget: _Budget, cuts: list[str]
) -> list[bytes]:
    parts = []
    for index, call_id in enumerate(others):
        part = _member(call_id, pointer)
        if not budget.take(len(part) + 1):
            cuts.append(f"{len(others) - index:,} of {len(others) + 1:,} Call-IDs (not answered)")
            break
        parts.append(part)
    return parts


def _fit_lists(request: EnrichmentRequest, call: _Call, budget: _Budget, cuts: list[str]) -> dict[str, Any]:
    """The first Call-ID's lists, shortened to what fits; ``listed`` has the first claim."""
    members: dict[str, Any] = {}
    lists = [("listed", call.listed), ("unknown", call.unknown), ("checked", call.checked)]
    for name, items in lists:
        if not items:
            continue
        shown = _fit_list(name, items, budget)
        if shown is not None:
            members[name] = shown
        if shown is None or len(shown) < len(items):
            cuts.append(f"{len(items) - len(shown or ()):,} of {len(items):,} addresses in {name}")
    if request.ignored:
        ignored = orjson.dumps(request.ignored)
        if budget.take(len(ignored) + len('"ignored":') + 1):
            members["ignored"] = request.ignored
        else:
            cuts.append("the ignored sample")
    return members


def _fit_notable(call: _Call, budget: _Budget, cuts: list[str]) -> list[bytes]:
    """The summary, then as many listed or detected addresses' sentences as fit."""
    parts = [_member(SUMMARY_KEY, call.summary)]
    budget.take(len(parts[0]) + 1)  # the summary is bounded: it names at most SUMMARY_IPS addresses
    shown: dict[str, str] = {}
    room = len(NOTABLE_KEY) + 5
    for ip, sentence in call.notable.items():
        size = len(_member(ip, sentence)) + 1
        if not budget.take(room + size):
            left = len(call.notable) - len(shown)
            cuts.append(f"{left:,} of {len(call.notable):,} verdicts in {NOTABLE_KEY}")
            break
        room = 0
        shown[ip] = sentence
    if shown:
        parts.append(_member(NOTABLE_KEY, shown))
    return parts


def _fit_list(name: str, ips: list[str], budget: _Budget) -> list[str] | None:
    # ``,"name":[]`` then ``"ip",`` per address (IP text is ASCII: no escapes); one comma less.
    if not budget.take(len(name) + 6):
        return None
    shown = 0
    for ip in ips:
        if not budget.take(len(ip) + 3 - (shown == 0)):
            break
        shown += 1
    return ips[:shown]


def _fit_entries(
    request: EnrichmentRequest,
    verdicts: Sequence[Verdict],
    known: Known,
    call: _Call,
    budget: _Budget,
    cuts: list[str],
) -> list[bytes]:
    call_ids = set(request.call_ids)  # a Call-ID that looks like an IP keeps the call's object
    chosen = [v for v in verdicts if v.ip not in call_ids]
    ordered = [v for v in chosen if v.listed] + [v for v in chosen if not v.listed]
    parts = []
    for verdict in ordered:
        part = _member(verdict.ip, _entry(request, verdict, known, call))
        if not budget.take(len(part) + 1):
            break
        parts.append(part)
    if len(parts) < len(ordered):
        cuts.append(f"the details of {len(ordered) - len(parts):,} of {len(ordered):,} addresses")
    return parts
