"""homer-app's enrichment request, parsed: the call's Call-IDs and addresses, bounded.

homer-app sends ``{"data": {"sid": [...], "source_ip": [...], ...}, "fromts": ms, "tots": ms}``
(keys from the operator's HEPSUB mapping). Anyone may post here, so the work per request is
bounded and linear: the parser examines at most ``enrichment.max_call_ids`` distinct Call-IDs and
``enrichment.max_addresses`` distinct addresses (looking at no more than twice as many values) and
only counts the rest, at C speed (a set insertion each, never a parse); it examines at most 64 keys
of ``data`` and refuses a body of more than 10,000 lists and objects before decoding it. What it
left out is counted in the ``EnrichmentRequest`` for the answer to say. Pure: no I/O.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field

import orjson

from ..core.addresses import Addr, parse_ip
from ..core.config import EnrichmentSettings

# Mapping keys that carry Call-IDs: homer-app's default mapping uses "sid"; without
# source_fields it copies "callid".
CALL_ID_KEYS = ("callid", "sid")  # in homer-app's order (sorted)
RESERVED_KEYS = frozenset({"data"})

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
# 9999-12-31T23:59:59.999Z: a "fromts" past it is not a time (and would not fit orjson's int64).
LATEST_MS = 253_402_300_799_999

DEFAULT_LIMITS = EnrichmentSettings()


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
