"""The enrichment answer the HOMER UI renders best, built from the parsed request and the verdicts.

The UI reads ``answer[callid].t_sec`` and shows the whole object as a JSON tree, and it
overwrites any top-level ``data`` key. So the answer has one object per Call-ID, one verdict per
IP, and never a ``data`` key: only the first Call-ID carries the call's whole object, the others
point to it (so the answer never grows with Call-IDs times IPs), and whatever the parser left out,
and which limit did it, is said in a ``left_out`` object. This module builds those members and the
whole answer of a common request; ``homer/fitting.py`` fits a large one into its byte cap. Pure.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, NamedTuple

from ..apiban.lookups import Verdict
from ..detection.book import Detection
from ..ingest.sightings import Sighting
from .request import MAX_CALL_ID_CHARS, MAX_DATA_KEYS, EnrichmentRequest, _cut
from .wording import (
    NOTABLE_KEY,
    SEEN_KEY,
    SUMMARY_KEY,
    detection_details,
    seen_details,
    seen_line,
    verdict_details,
    verdict_sentence,
)

MAPPING_HINT = (
    'add "source_ip": "data_header.srcIp" (and "dst_ip": "data_header.dstIp") to source_fields '
    "of the HEPSUB mapping in HOMER Preferences"
)
NO_CALL_ID_NOTE = 'no Call-ID in the request ("sid" or "callid"); the HOMER tab needs one'
SUMMARY_IPS = 10  # IPs named in the summary sentence, then "and N more"
# IPs each further Call-ID's object names in its listed and checked (the interface gives every
# Call-ID both lists); the first Call-ID's object has them whole.
POINTER_IPS = 10
DOWNLOAD_IPS = 10  # addresses named in a Call-ID's __hep__ for the Download button
SUMMARY_KEYS = 3  # mapping keys named in the summary sentence
SUMMARY_KEY_CHARS = 32

_tuple_new = tuple.__new__


@dataclass(frozen=True, slots=True)
class Known:
    """What the agent knows of the call's addresses besides their verdicts, and how old it is."""

    seen: Mapping[str, Sighting] = field(default_factory=dict)  # what the HEP capture saw
    detected: Mapping[str, Detection] = field(default_factory=dict)  # active local detections
    t_sec: int | None = None  # when the data behind the answer last changed (unix seconds)
    download: bool = False  # the agent answers HOMER's Download PCAP button (agent.download)


NOTHING_KNOWN = Known()


class _Call(NamedTuple):
    """What every way of building the answer shares: the verdict lists and the call's text."""

    t_sec: int | None
    checked: list[str]
    listed: list[str]
    unknown: list[str]
    summary: str
    detected: list[str]  # detected here by the agent's own rules (local detection)
    notable: dict[str, str]  # listed or detected address -> its verdict sentence
    download: dict[str, Any] | None  # the Call-ID object's pcap and __hep__, for the Download button


def _call(request: EnrichmentRequest, verdicts: Sequence[Verdict], known: Known = NOTHING_KNOWN) -> _Call:
    checked = [v.ip for v in verdicts]
    listed = [v.ip for v in verdicts if v.listed]
    unknown = [v.ip for v in verdicts if v.listed is None]
    detected = known.detected
    local = [ip for ip in checked if ip in detected] if detected else []
    notable = {
        v.ip: verdict_sentence(v, detected.get(v.ip)) for v in verdicts if v.listed or v.ip in detected
    }
    t_sec = known.t_sec
    if t_sec is None and request.from_ms is not None:
        t_sec = request.from_ms // 1000
    summary = _summary(request, checked, listed, unknown, local)
    download = _download(notable) if known.download else None
    # (see addresses._tuple_new)
    return _tuple_new(_Call, (t_sec, checked, listed, unknown, summary, local, notable, download))


def _download(notable: dict[str, str]) -> dict[str, Any]:
    """What the tab's header box and Download PCAP button read: ``pcap`` is shown as the "Agent
    file path"; the UI posts ``__hep__`` back when the button is clicked, and homer-app forwards it
    to ``{path}/download``, which answers the SIP packets kept of these addresses."""
    ips = list(notable)[:DOWNLOAD_IPS]
    if not ips:
        return {"pcap": "no listed or detected address in this call: Download PCAP gives an empty capture"}
    more = f" (the first {DOWNLOAD_IPS})" if len(notable) > DOWNLOAD_IPS else ""
    return {
        "pcap": f"Download PCAP: the SIP packets kept of {', '.join(ips)}{more}",
        "__hep__": {"type": "download", "ips": ips},
    }


def _whole_answer(
    request: EnrichmentRequest,
    verdicts: Sequence[Verdict],
    known: Known,
    call: _Call,
) -> dict[str, Any]:
    answer: dict[str, Any] = {SUMMARY_KEY: call.summary}
    if call.notable:
        answer[NOTABLE_KEY] = call.notable
    for verdict in verdicts:
        answer[verdict.ip] = _entry(request, verdict, known, call)
    left_out = _parse_notes(request)
    # Call-IDs last so that a Call-ID that looks like an IP keeps the object the UI reads.
    call_ids = request.call_ids
    if call_ids:
        first = call_ids[0]
        answer[first] = _first_call(request, call, left_out)
        if len(call_ids) > 1:
            pointer = _pointer(request, call)
            for call_id in call_ids[1:]:
                answer[call_id] = pointer
    else:
        answer.update(_no_call_id(call, left_out))
    return answer


def _entry(request: EnrichmentRequest, verdict: Verdict, known: Known, call: _Call) -> dict[str, Any]:
    ip = verdict.ip
    sentence = call.notable.get(ip)
    entry = verdict_details(verdict, sentence)
    fields = request.fields.get(ip)
    if fields:
        entry["fields"] = fields
    sighting = known.seen.get(ip)
    if sighting is not None:
        entry[SEEN_KEY] = seen_line(sighting)
        entry["seen"] = seen_details(sighting)
    if sentence is not None:
        detection = known.detected.get(ip)
        if detection is not None:
            entry["detected"] = detection_details(detection)
    return entry


def _first_call(request: EnrichmentRequest, call: _Call, left_out: dict[str, str]) -> dict[str, Any]:
    body = _call_core(request, call)
    if call.listed:
        body["listed"] = call.listed
    if call.checked:
        body["checked"] = call.checked
    if call.detected:
        body["detected"] = call.detected
    if call.unknown:
        body["unknown"] = call.unknown
    if request.ignored:
        body["ignored"] = request.ignored
    if left_out:
        body["left_out"] = left_out
    return body


def _call_core(request: EnrichmentRequest, call: _Call) -> dict[str, Any]:
    body: dict[str, Any] = {"t_sec": call.t_sec, "summary": call.summary}
    if call.download:
        body.update(call.download)
    if not call.checked and not request.ignored:
        body["hint"] = MAPPING_HINT
    return body


def _pointer(request: EnrichmentRequest, call: _Call) -> dict[str, Any]:
    """Every further Call-ID's object: what the HOMER tab reads, the lists' first POINTER_IPS
    addresses, and where the whole object is. Its size does not grow with the addresses, so the
    answer grows by a small object per Call-ID, never by Call-IDs times addresses."""
    pointer: dict[str, Any] = {
        "t_sec": call.t_sec,
        "summary": _summary(request, call.checked, call.listed, call.unknown, call.detected, names=0),
    }
    if call.listed:
        pointer["listed"] = call.listed[:POINTER_IPS]
    if call.checked:
        pointer["checked"] = call.checked[:POINTER_IPS]
    if call.download:
        pointer.update(call.download)  # the row a person clicks may be any of the call's legs
    pointer["details"] = f"see {request.call_ids[0]}"
    return pointer


def _no_call_id(call: _Call, left_out: dict[str, str]) -> dict[str, Any]:
    top: dict[str, Any] = {"note": NO_CALL_ID_NOTE}  # the summary leads every answer already
    if left_out:
        top["left_out"] = left_out
    return top


def _parse_notes(request: EnrichmentRequest) -> dict[str, str]:
    """What the parser left out, one sentence per cause, naming the limit."""
    if not (
        request.call_ids_left_out
        or request.values_left_out
        or request.keys_left_out
        or request.call_ids_cut
        or request.ignored
    ):
        return {}
    limits, notes = request.limits, {}
    if request.call_ids_left_out:
        notes["call_ids"] = (
            f"{request.call_ids_left_out:,} further values of sid/callid not examined "
            f"(enrichment.max_call_ids = {limits.max_call_ids:,})"
        )
    if request.values_left_out:
        notes["addresses"] = (
            f"{request.values_left_out:,} further values not examined "
            f"(enrichment.max_addresses = {limits.max_addresses:,})"
        )
    if request.keys_left_out:
        notes["keys"] = (
            f"{request.keys_left_out:,} further keys of data not examined (at most {MAX_DATA_KEYS} are)"
        )
    if request.call_ids_cut:
        notes["long_call_ids"] = (
            f"{request.call_ids_cut:,} Call-IDs longer than {MAX_CALL_ID_CHARS} characters "
            f"answered under their first {MAX_CALL_ID_CHARS}"
        )
    shown = sum(len(values) for values in request.ignored.values())
    if request.ignored_count > shown:
        notes["ignored"] = (
            f"{request.ignored_count:,} values are not IP addresses; {shown} of them shown in ignored"
        )
    return notes


def _summary(
    request: EnrichmentRequest,
    checked: list[str],
    listed: list[str],
    unknown: list[str],
    detected: list[str],
    names: int = SUMMARY_IPS,
) -> str:
    """One line for the HOMER user, naming at most ``names`` listed and unknown IPs."""
    if not checked:
        if request.ignored:
            return "no IP address found in " + _some(
                [_cut(key, SUMMARY_KEY_CHARS) for key in sorted(request.ignored)], SUMMARY_KEYS
            )
        return "no IP addresses in the request" + (f"; {MAPPING_HINT}" if names else "")
    total = f"{len(checked)} address" + ("es" if len(checked) != 1 else "")
    if listed:
        text = f"APIBAN lists {len(listed)} of {total}"
        text += f": {_some(listed, names)}" if names else ""
    else:
        text = f"APIBAN lists none of {total}"
    if detected:
        text += f"; detected here: {len(detected)}"
        text += f" ({_some(detected, names)})" if names else ""
    if unknown:
        text += f"; {len(unknown)} unknown (APIBAN unavailable)"
        text += f": {_some(unknown, names)}" if names else ""
    if request.values_left_out or request.keys_left_out:
        text += "; not every value was examined (see left_out)"
    return text


def _some(items: list[str], limit: int) -> str:
    if len(items) <= limit:
        return ", ".join(items)
    return f"{', '.join(items[:limit])} and {len(items) - limit:,} more"
