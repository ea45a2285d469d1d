"""What homer-app posts to ``{path}/{type}`` and the answer the HOMER UI renders best.

homer-app sends ``{"data": {"sid": [...], "source_ip": [...], ...}, "fromts": ms, "tots": ms}``
(keys from the operator's HEPSUB mapping). The UI then reads ``answer[callid].t_sec`` and shows
the whole object as a JSON tree, and it overwrites any top-level ``data`` key. So the answer
has one object per Call-ID, one verdict per IP, and never a ``data`` key. This module is pure:
no I/O, so every shape rule is testable without a server.

Anyone may post here, so the work per request is bounded and linear. The parser examines at
most ``enrichment.max_call_ids`` distinct Call-IDs and ``enrichment.max_addresses`` distinct
addresses (looking at no more than twice as many values) and only counts the rest, at C speed
(a set insertion each, never a parse); it examines at most 64 keys of ``data`` and refuses a
body of more than 10,000 lists and objects before decoding it. The answer stays within
``enrichment.max_answer_bytes``: only the first Call-ID carries the call's whole object, the
others point to it (so the answer never grows with Call-IDs times IPs), and what does not fit
is left out. Whatever was left out, and which limit did it, is said in a ``left_out`` object.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, NamedTuple

import orjson

from ..apiban.lookups import Verdict
from ..core.addresses import Addr, parse_ip
from ..core.config import EnrichmentSettings
from ..detection.book import Detection
from ..ingest.sightings import Sighting
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

# Mapping keys that carry Call-IDs: homer-app's default mapping uses "sid"; without
# source_fields it copies "callid".
CALL_ID_KEYS = ("callid", "sid")  # in homer-app's order (sorted)
RESERVED_KEYS = frozenset({"data"})
MAPPING_HINT = (
    'add "source_ip": "data_header.srcIp" (and "dst_ip": "data_header.dstIp") to source_fields '
    "of the HEPSUB mapping in HOMER Preferences"
)
NO_CALL_ID_NOTE = 'no Call-ID in the request ("sid" or "callid"); the HOMER tab needs one'

MAX_BRACKETS = 10_000  # lists and objects in a body, at most; see parse_request
MAX_DATA_KEYS = 64  # keys of "data" examined besides the Call-IDs (a mapping has a handful)
# Values looked at per Call-ID or address allowed (homer-app repeats an IP under source_ip and
# dst_ip); past that the rest is only counted, so junk cannot buy parsing time.
VALUES_PER_LIMIT = 2
MAX_CALL_ID_CHARS = 256  # a longer Call-ID is answered under its first 256 characters
MAX_ECHO_CHARS = 100  # mapping keys and ignored values are echoed cut to this length
MAX_FIELDS = 8  # mapping keys named per IP
IGNORED_KEYS = 10  # the ignored sample: mapping keys shown ...
IGNORED_PER_KEY = 5  # ... and values shown per key
SUMMARY_IPS = 10  # IPs named in the summary sentence, then "and N more"
# IPs each further Call-ID's object names in its listed and checked (the interface gives every
# Call-ID both lists); the first Call-ID's object has them whole.
POINTER_IPS = 10
DOWNLOAD_IPS = 10  # addresses named in a Call-ID's __hep__ for the Download button
SUMMARY_KEYS = 3  # mapping keys named in the summary sentence
SUMMARY_KEY_CHARS = 32
# 9999-12-31T23:59:59.999Z: a "fromts" past it is not a time (and would not fit orjson's int64).
LATEST_MS = 253_402_300_799_999
# A request with at most this many IPs plus Call-IDs is serialised in one go, and only redone
# piece by piece in the rare case it overshoots the size cap: the common request stays as fast
# as a plain orjson.dumps.
WHOLE_ANSWER_ITEMS = 64
# Bytes kept for the ``left_out`` member while the rest of the answer is fitted into the cap;
# its sentences are fixed text and numbers, far shorter (tests check the longest one fits).
LEFT_OUT_ROOM = 1536

DEFAULT_LIMITS = EnrichmentSettings()
_tuple_new = tuple.__new__


class BadEnrichmentRequest(ValueError):
    """The body is not what homer-app sends; the message tells the operator why."""


@dataclass(slots=True)
class EnrichmentRequest:
    limits: EnrichmentSettings = DEFAULT_LIMITS
    call_ids: list[str] = field(default_factory=list)  # distinct, in order, at most limits.max_call_ids
    addresses: list[Addr] = field(default_factory=list)  # unique, in order, at most limits.max_addresses
    fields: dict[str, list[str]] = field(default_factory=dict)  # canonical ip -> mapping keys
    ignored: dict[str, list[str]] = field(default_factory=dict)  # a sample: mapping key -> non-IP values
    ignored_count: int = 0  # every value that is not an IP address, shown in the sample or not
    from_ms: int | None = None
    call_ids_left_out: int = 0  # distinct Call-IDs past limits.max_call_ids
    values_left_out: int = 0  # distinct values past limits.max_addresses, not examined
    keys_left_out: int = 0  # keys of "data" past MAX_DATA_KEYS, not examined
    call_ids_cut: int = 0  # Call-IDs answered under their first MAX_CALL_ID_CHARS characters


def parse_request(raw: bytes, limits: EnrichmentSettings = DEFAULT_LIMITS) -> EnrichmentRequest:
    # Counted on the bytes, before decoding: 1 MiB holds 350,000 empty lists, and decoding that
    # many containers takes 20 to 90 ms (the garbage collector runs hundreds of times). A "[" or
    # "{" inside a string counts too: an upper bound is all this needs. A shorter body cannot
    # have that many, and homer-app's common one is a few hundred bytes: not counted.
    brackets = raw.count(b"[") + raw.count(b"{") if len(raw) > MAX_BRACKETS else 0
    if brackets > MAX_BRACKETS:
        raise BadEnrichmentRequest(
            f'request body has {brackets:,} "[" and "{{" characters, more than {MAX_BRACKETS:,}; '
            "homer-app sends one object and one list per mapping key"
        )
    try:
        body = orjson.loads(raw)
    except orjson.JSONDecodeError:
        raise BadEnrichmentRequest("request body is not JSON") from None
    return request_from_json(body, limits)


def request_from_json(body: object, limits: EnrichmentSettings = DEFAULT_LIMITS) -> EnrichmentRequest:
    """The request in an already decoded body; linear in its size, whatever it holds."""
    if not isinstance(body, dict):
        raise BadEnrichmentRequest('request body must be a JSON object with a "data" object')
    data = body.get("data")
    if not isinstance(data, dict):
        raise BadEnrichmentRequest(
            'request body has no "data" object; expected {"data": {"sid": [...], "source_ip": [...]}, '
            '"fromts": ms, "tots": ms} as homer-app sends it'
        )
    parser = _Parser(EnrichmentRequest(limits, from_ms=_millis(body.get("fromts"))))
    for key in CALL_ID_KEYS:
        if key in data:
            value = data[key]
            parser.add_call_ids(value if isinstance(value, list) else [value])
    examined = 0
    for key, value in data.items():  # homer-app sends the keys sorted (Go marshals maps sorted)
        if key in CALL_ID_KEYS:
            continue
        if examined == MAX_DATA_KEYS:
            parser.request.keys_left_out = len(data) - examined - sum(k in data for k in CALL_ID_KEYS)
            break
        examined += 1
        values = value if isinstance(value, list) else [value]
        parser.add_values(key if len(key) <= MAX_ECHO_CHARS else key[:MAX_ECHO_CHARS], values)
    return parser.finish()


def _millis(value: object) -> int | None:
    if isinstance(value, bool) or not isinstance(value, int | float) or not 0 <= value <= LATEST_MS:
        return None
    return int(value)


def _cut(text: str, limit: int) -> str:
    return text if len(text) <= limit else text[:limit]


class _Tally:
    """Distinct values left out, counted at C speed: a set update per list, no Python loop."""

    __slots__ = ("unhashable", "values")

    def __init__(self) -> None:
        self.values: set[object] | None = None  # made when a limit is reached: rarely
        self.unhashable = 0  # lists and objects: never an address or a Call-ID, each counted

    def add(self, values: list[object]) -> None:
        if self.values is None:
            self.values = set()
        try:
            self.values.update(values)
        except TypeError:
            # The fastest test there is (isinstance takes twice as long): 10,000 fit in a body.
            hashable = [v for v in values if v.__class__ is not list and v.__class__ is not dict]
            self.values.update(hashable)
            self.unhashable += len(values) - len(hashable)

    def count(self, *examined: Iterable[object]) -> int:
        if self.values is None:
            return self.unhashable
        self.values.difference_update(*examined)
        return len(self.values) + self.unhashable


class _Parser:
    """One pass over the body. Python-level work is bounded by the limits: each limit allows
    VALUES_PER_LIMIT times as many values to be looked at (repeats, values that are not IPs);
    past that, values are only counted, at C speed."""

    def __init__(self, request: EnrichmentRequest) -> None:
        self.request = request
        self._call_ids: dict[str, None] = {}
        self._call_id_room = VALUES_PER_LIMIT * request.limits.max_call_ids
        self._value_room = VALUES_PER_LIMIT * request.limits.max_addresses
        self._more_call_ids = _Tally()
        self._more_values = _Tally()

    def add_call_ids(self, values: list[object]) -> None:
        call_ids, limit, room = self._call_ids, self.request.limits.max_call_ids, self._call_id_room
        head = values if len(values) <= room else values[:room]
        self._call_id_room -= len(head)
        rest = iter(head)
        for value in rest:
            if not isinstance(value, str) or not value or value in RESERVED_KEYS:
                continue
            key = value if len(value) <= MAX_CALL_ID_CHARS else value[:MAX_CALL_ID_CHARS]
            if key in call_ids:
                continue
            if len(call_ids) >= limit:
                self._call_id_room = 0
                self._more_call_ids.add([key, *rest])
                break
            call_ids[key] = None
            if key is not value:
                self.request.call_ids_cut += 1
        if len(head) < len(values):
            self._more_call_ids.add(values[len(head) :])

    def add_values(self, key: str, values: list[object]) -> None:
        # The hot loop of every enrichment: locals only, one parse and one dict probe per value.
        request, room = self.request, self._value_room
        fields, addresses = request.fields, request.addresses
        free = request.limits.max_addresses - len(addresses)  # new addresses still allowed
        head = values if len(values) <= room else values[:room]
        self._value_room -= len(head)
        rest = iter(head)
        for value in rest:
            address = parse_ip(value)
            if address is None:
                self._ignore(key, value)
                continue
            text = address.text
            seen_in = fields.get(text)
            if seen_in is None:
                if not free:
                    self._value_room = 0
                    self._more_values.add([value, *rest])
                    break
                free -= 1
                addresses.append(address)
                fields[text] = [key]
            elif key not in seen_in and len(seen_in) < MAX_FIELDS:
                seen_in.append(key)
        if len(head) < len(values):
            self._more_values.add(values[len(head) :])

    def _ignore(self, key: str, value: object) -> None:
        request = self.request
        request.ignored_count += 1
        sample = request.ignored.get(key)
        if sample is None:
            if len(request.ignored) >= IGNORED_KEYS:
                return
            sample = request.ignored[key] = []
        if len(sample) < IGNORED_PER_KEY:
            sample.append(_echo(value))

    def finish(self) -> EnrichmentRequest:
        request = self.request
        request.call_ids = list(self._call_ids)
        # What came again after the limit was examined before; "" and "data" are no Call-IDs.
        request.call_ids_left_out = self._more_call_ids.count(self._call_ids, RESERVED_KEYS, ("",))
        request.values_left_out = self._more_values.count(request.fields)
        return request


def _echo(value: object) -> str:
    """A short text for a value that is not an address, without walking nested junk."""
    if isinstance(value, str):
        return _cut(value, MAX_ECHO_CHARS)
    if isinstance(value, list):
        return f"(a list of {len(value)} items)"
    if isinstance(value, dict):
        return f"(an object of {len(value)} keys)"
    return orjson.dumps(value).decode()  # null, true/false or a number: short


# --------------------------------------------------------------------------- the answer


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


def build_answer(
    request: EnrichmentRequest, verdicts: Sequence[Verdict], known: Known = NOTHING_KNOWN
) -> bytes:
    """The JSON answer for homer-app, at most ``request.limits.max_answer_bytes`` long.

    The summary and the listed or detected addresses first (for Go's sorted rendering), Call-ID
    keys, then one object per IP: its verdict in words, what the capture saw in one line, then
    the details. A small request is serialised whole; a large one piece by piece, and what does
    not fit is left out and said so.
    """
    call = _call(request, verdicts, known)
    if len(verdicts) + len(request.call_ids) <= WHOLE_ANSWER_ITEMS:
        raw = orjson.dumps(_whole_answer(request, verdicts, known, call))
        if len(raw) <= request.limits.max_answer_bytes:
            return raw
    return _fitted_answer(request, verdicts, known, call)


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


# --------------------------------------------------------------------------- fitted to the cap


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
