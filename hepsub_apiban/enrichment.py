"""What homer-app posts to ``{path}/{type}`` and the answer the HOMER UI renders best.

homer-app sends ``{"data": {"sid": [...], "source_ip": [...], ...}, "fromts": ms, "tots": ms}``
(keys from the operator's HEPSUB mapping). The UI then reads ``answer[callid].t_sec`` and shows
the whole object as a JSON tree, and it overwrites any top-level ``data`` key. So the answer
has one object per Call-ID, one verdict per IP, and never a ``data`` key. This module is pure:
no I/O, so every shape rule is testable without a server.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import orjson

from .addresses import Addr, parse_ip
from .lookups import Verdict

# Mapping keys that carry Call-IDs: homer-app's default mapping uses "sid"; without
# source_fields it copies "callid".
CALL_ID_KEYS = ("sid", "callid")
RESERVED_KEYS = frozenset({"data"})
MAPPING_HINT = (
    'add "source_ip": "data_header.srcIp" (and "dst_ip": "data_header.dstIp") to source_fields '
    "of the HEPSUB mapping in HOMER Preferences"
)


class BadEnrichmentRequest(ValueError):
    """The body is not what homer-app sends; the message tells the operator why."""


@dataclass(slots=True)
class EnrichmentRequest:
    call_ids: list[str] = field(default_factory=list)
    addresses: list[Addr] = field(default_factory=list)  # unique, in order of appearance
    fields: dict[str, list[str]] = field(default_factory=dict)  # canonical ip -> mapping keys
    ignored: dict[str, list[str]] = field(default_factory=dict)  # mapping key -> values not IPs
    from_ms: int | None = None


def parse_request(raw: bytes) -> EnrichmentRequest:
    try:
        body = orjson.loads(raw)
    except orjson.JSONDecodeError:
        raise BadEnrichmentRequest("request body is not JSON") from None
    if not isinstance(body, dict):
        raise BadEnrichmentRequest('request body must be a JSON object with a "data" object')
    data = body.get("data")
    if not isinstance(data, dict):
        raise BadEnrichmentRequest(
            'request body has no "data" object; expected {"data": {"sid": [...], "source_ip": [...]}, '
            '"fromts": ms, "tots": ms} as homer-app sends it'
        )
    request = EnrichmentRequest(from_ms=_millis(body.get("fromts")))
    for key, value in data.items():  # homer-app sends the keys sorted (Go marshals maps sorted)
        values = value if isinstance(value, list) else [value]
        if key in CALL_ID_KEYS:
            _add_call_ids(request, values)
        else:
            _add_addresses(request, key, values)
    return request


def _millis(value: object) -> int | None:
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    return int(value)


def _add_call_ids(request: EnrichmentRequest, values: list[Any]) -> None:
    for value in values:
        if isinstance(value, str) and value and value not in RESERVED_KEYS and value not in request.call_ids:
            request.call_ids.append(value)


def _add_addresses(request: EnrichmentRequest, key: str, values: list[Any]) -> None:
    fields, addresses = request.fields, request.addresses
    for value in values:
        address = parse_ip(value)
        if address is None:
            request.ignored.setdefault(key, []).append(str(value)[:100])
            continue
        seen_in = fields.get(address.text)
        if seen_in is None:
            addresses.append(address)
            fields[address.text] = [key]
        elif key not in seen_in:
            seen_in.append(key)


def build_answer(
    request: EnrichmentRequest,
    verdicts: Sequence[Verdict],
    extra: Mapping[str, Mapping[str, Any]] | None = None,
) -> dict[str, Any]:
    """The JSON object returned to homer-app: Call-ID keys, then one verdict per IP.

    ``extra`` adds what else is known of an IP (HEP sightings) to its verdict object.
    """
    checked = [v.ip for v in verdicts]
    listed = [v.ip for v in verdicts if v.listed]
    unknown = [v.ip for v in verdicts if v.listed is None]
    call: dict[str, Any] = {
        "t_sec": request.from_ms // 1000 if request.from_ms is not None else None,
        "listed": listed,
        "checked": checked,
        "summary": _summary(request, checked, listed, unknown),
    }
    if unknown:
        call["unknown"] = unknown
    if request.ignored:
        call["ignored"] = request.ignored
    if not checked and not request.ignored:
        call["hint"] = MAPPING_HINT
    answer: dict[str, Any] = {}
    for verdict in verdicts:
        entry = verdict.to_json()
        entry["fields"] = request.fields.get(verdict.ip, [])
        if extra and verdict.ip in extra:
            entry.update(extra[verdict.ip])
        answer[verdict.ip] = entry
    # Call-IDs last so that a Call-ID that looks like an IP keeps the object the UI reads.
    for call_id in request.call_ids:
        answer[call_id] = call
    if not request.call_ids:
        answer["summary"] = call["summary"]
        answer["note"] = 'no Call-ID in the request ("sid" or "callid"); the HOMER tab needs one'
    return answer


def _summary(request: EnrichmentRequest, checked: list[str], listed: list[str], unknown: list[str]) -> str:
    if not checked:
        if request.ignored:
            return "no IP address found in " + ", ".join(sorted(request.ignored))
        return "no IP addresses in the request; " + MAPPING_HINT
    total = f"{len(checked)} address" + ("es" if len(checked) != 1 else "")
    if listed:
        text = f"APIBAN lists {len(listed)} of {total}: {', '.join(listed)}"
    else:
        text = f"APIBAN lists none of {total}"
    if unknown:
        text += f"; {len(unknown)} unknown (APIBAN unavailable): {', '.join(unknown)}"
    return text
