"""One address seen in the captured SIP traffic: the ``Sighting`` and its bounded samples.

A ``Sighting`` is what the store (``ingest/sightings.py``) keeps per address, up to
``sightings.max`` of them, so it is kept lean: what the address sent is counted into a fixed set
of buckets (the SIP methods plus "other"; the status codes that matter, else their class), and
its user agents, users and Call-IDs are small samples of values cut to 128 bytes and cleaned of
control characters (``sampled``), the users and Call-IDs packed into one string. Forged input can
fill a sample, never grow one. Values many addresses share are kept once: a table of user
agents (``agents_sampled``, ``USER_AGENT_TABLE`` of them at most) and one unlisted verdict per
source.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable, Mapping
from typing import Any

from ..apiban.lookups import Verdict
from ..core.addresses import Addr, parse_ip
from ..core.logs import UNSAFE_CHARACTERS

CALL_ID_SAMPLE = 10
USER_AGENT_SAMPLE = 5
USER_SAMPLE = 10
SAMPLE_BYTES = 128  # per sampled value (UTF-8); formats/sip.py already cut it to 200 characters

# What an address did, counted into a fixed set of buckets so that forged input cannot grow it.
SIP_METHODS = (
    "INVITE", "ACK", "BYE", "CANCEL", "REGISTER", "OPTIONS", "PRACK",
    "SUBSCRIBE", "NOTIFY", "PUBLISH", "INFO", "REFER", "MESSAGE", "UPDATE",
)  # fmt: skip
OTHER_METHOD = "other"
# Status codes worth telling apart (what a scanner gets back, call progress, failures); any other
# valid code counts under its class ("4xx"), an invalid one under "?".
STATUS_CODES = frozenset(
    (100, 180, 181, 183, 200, 202, 401, 403, 404, 405, 407, 408, 480, 481, 483, 484, 486, 487, 488,
     500, 503, 603)
)  # fmt: skip
# Keyed by the optional SipInfo fields so the packet path needs no None test.
_METHOD_KEY: dict[str | None, str] = {method: method for method in SIP_METHODS}
_STATUS_KEY: dict[int | None, str] = {
    code: str(code) if code in STATUS_CODES else f"{code // 100}xx" for code in range(100, 700)
}

# Every action bucket by name: counts read back from a worker or the shared store keep the one
# string object of their bucket instead of a copy per address.
_ACTIONS: dict[str, str] = {name: name for name in (*SIP_METHODS, OTHER_METHOD, "?", *_STATUS_KEY.values())}
# User agents are a few models shared by many addresses: each distinct one is kept once (with its
# one-element sample) while the table has room; forged ones can only fill it, then are kept per address.
USER_AGENT_TABLE = 4096
_agents: dict[str, tuple[str]] = {}
# An unlisted answer says nothing about the address itself: one shared object per kind.
_unlisted: dict[str, Verdict] = {}
# The sampled users and Call-IDs of an address are one string (a tuple and a string per value
# cost about 120 bytes more for a phone): each user is enclosed in USERS, each Call-ID in CALLS,
# the users first, e.g. "\x1e100\x1e\x1fa@b\x1fc@d\x1f". A sampled value holds no control character
# (``sampled`` replaces them), so the enclosed value is found by one substring search.
USERS = "\x1e"
CALLS = "\x1f"
_NO_SEPARATORS = str.maketrans({USERS: "\ufffd", CALLS: "\ufffd"})
# Sighting._state bits (at most 15: a small int, shared by every sighting).
_CHECKED = 1
_FLAGGED = 2
_USERS_FULL = 4  # the users sample has USER_SAMPLE values: a packet need not look further
_CALLS_FULL = 8  # the highest bit: "_state < _CALLS_FULL" is the cheapest test on the packet path


class Sighting:
    """One address. Kept lean, as the store holds up to ``sightings.max`` of them: what it sent as
    a flat list ``[action, count, ...]`` (a Counter costs 200 bytes), shared strings for actions and
    user agents, one shared verdict per kind of unlisted answer, the users and Call-IDs in one
    string, two flags in one int (bench/sightings_memory.py)."""

    __slots__ = (
        "_samples",
        "_state",
        "actions",
        "first_seen",
        "ip",
        "last_seen",
        "order",
        "packets",
        "user_agents",
        "verdict",
    )  # fmt: skip

    def __init__(
        self,
        ip: str,
        address: Addr,  # the parsed ip: only its text is kept
        first_seen: float,
        last_seen: float,
        packets: int = 0,
        methods: Mapping[str, int] | None = None,
        user_agents: tuple[str, ...] = (),
        call_ids: tuple[str, ...] = (),
        users: tuple[str, ...] = (),
        verdict: Verdict | None = None,
    ) -> None:
        self.ip = ip  # canonical: address.text (the parsed form is made again when needed)
        self.first_seen = first_seen
        self.last_seen = last_seen
        self.packets = packets
        # What it sent: [action, count, action, count, ...] in first-seen order; None for nothing.
        self.actions: list[str | int] | None = None
        # Tuples: the empty one is shared, and the garbage collector stops tracking tuples of strings.
        self.user_agents = user_agents
        self.verdict = verdict
        # Check mode: an upstream lookup for this IP is under way or done (_CHECKED); found hostile
        # locally (_FLAGGED, the detection work sets it via Sightings.flag); full samples.
        self._state = 0
        self._samples = ""
        if users or call_ids:
            self._pack(users, call_ids)
        self.order = 0  # when last touched, in the store's own sequence (for most-recent-first listings)
        if methods:
            self.count(methods)

    @property
    def address(self) -> Addr:
        """The parsed address (not kept: 90 bytes per sighting for a parse done only off the packet path)."""
        address = parse_ip(self.ip)
        assert address is not None  # the store keeps only addresses it parsed
        return address

    def __repr__(self) -> str:
        return f"Sighting({self.ip!r}, packets={self.packets}, methods={dict(self.methods)!r})"

    @property
    def methods(self) -> Counter[str]:
        """What it sent, by action: a new Counter (changing it leaves the sighting alone)."""
        actions = self.actions
        if actions is None:
            return Counter()
        return Counter(dict(zip(actions[::2], actions[1::2], strict=True)))  # type: ignore[arg-type]

    def count(self, methods: Mapping[str, int]) -> None:
        """Add counts by action."""
        for action, n in methods.items():
            _count(self, _ACTIONS.get(action, action), n)

    @property
    def call_ids(self) -> tuple[str, ...]:
        return _unpacked(self._samples, CALLS)

    @call_ids.setter
    def call_ids(self, values: tuple[str, ...]) -> None:
        self._pack(self.users, values)

    @property
    def users(self) -> tuple[str, ...]:
        return _unpacked(self._samples, USERS)

    @users.setter
    def users(self, values: tuple[str, ...]) -> None:
        self._pack(values, self.call_ids)

    def _pack(self, users: tuple[str, ...], call_ids: tuple[str, ...]) -> None:
        self._samples = _packed(users, call_ids)
        full = (_USERS_FULL if len(users) >= USER_SAMPLE else 0) | (
            _CALLS_FULL if len(call_ids) >= CALL_ID_SAMPLE else 0
        )
        self._state = self._state & ~(_USERS_FULL | _CALLS_FULL) | full

    def sample(self, separator: str, full: int, limit: int, value: str | None) -> None:
        """``sampled`` for the samples string: ``value`` added to the users (``separator`` USERS,
        ``full`` _USERS_FULL, ``limit`` USER_SAMPLE) or the Call-IDs (CALLS, _CALLS_FULL,
        CALL_ID_SAMPLE) if there is room and it is not there yet."""
        if not value or self._state & full:
            return
        samples = self._samples
        held = samples.count(separator)  # values + 1, or 0 for none
        if len(value) > SAMPLE_BYTES or not (value.isascii() and value.isprintable()):
            value = _bounded(value)  # also replaces both separators (control characters)
        if held and f"{separator}{value}{separator}" in samples:
            return
        if held >= limit:  # this value fills the sample
            self._state |= full
        if separator == CALLS:
            self._samples = f"{samples}{value}{CALLS}" if held else f"{samples}{CALLS}{value}{CALLS}"
        elif held:
            end = samples.rfind(USERS) + 1
            self._samples = f"{samples[:end]}{value}{USERS}{samples[end:]}"
        else:
            self._samples = f"{USERS}{value}{USERS}{samples}"

    @property
    def checked(self) -> bool:
        return bool(self._state & _CHECKED)

    @checked.setter
    def checked(self, value: bool) -> None:
        self._state = self._state | _CHECKED if value else self._state & ~_CHECKED

    @property
    def flagged(self) -> bool:
        return bool(self._state & _FLAGGED)

    @flagged.setter
    def flagged(self, value: bool) -> None:
        self._state = self._state | _FLAGGED if value else self._state & ~_FLAGGED

    @property
    def listed(self) -> bool | None:
        return None if self.verdict is None else self.verdict.listed

    @property
    def protected(self) -> bool:
        """Kept while any unprotected sighting is left to forget."""
        return bool(self._state & _FLAGGED) or (self.verdict is not None and self.verdict.listed is True)

    def to_json(self) -> dict[str, Any]:
        body: dict[str, Any] = {
            "ip": self.ip,
            "first_seen": int(self.first_seen),
            "last_seen": int(self.last_seen),
            "packets": self.packets,
            "listed": self.listed,
            "methods": dict(self.methods),
            "user_agents": self.user_agents,
            "call_ids": self.call_ids,
            "users": self.users,
        }
        if self.verdict is not None:
            body["source"] = self.verdict.source
            if self.verdict.id is not None:
                body["ID"] = self.verdict.id
        return body

    def summary(self) -> dict[str, Any]:
        """What enrichment adds to an IP's verdict: how the capture saw it."""
        return {
            "seen": {
                "first_seen": int(self.first_seen),
                "last_seen": int(self.last_seen),
                "packets": self.packets,
                "methods": dict(self.methods),
                "user_agents": self.user_agents,
            }
        }


def _packed(users: Iterable[str], call_ids: Iterable[str]) -> str:
    """The samples string of ``users`` and ``call_ids``; a separator in a value (only a value
    sampled elsewhere can hold one) is replaced as ``sampled`` replaces control characters."""
    users = [value.translate(_NO_SEPARATORS) for value in users]
    call_ids = [value.translate(_NO_SEPARATORS) for value in call_ids]
    return (
        (f"{USERS}{USERS.join(users)}{USERS}" if users else "")
        + (f"{CALLS}{CALLS.join(call_ids)}{CALLS}" if call_ids else "")
    )  # fmt: skip


def _unpacked(samples: str, separator: str) -> tuple[str, ...]:
    start = samples.find(separator)
    if start < 0:
        return ()
    return tuple(samples[start + 1 : samples.rfind(separator)].split(separator))


def _count(sighting: Sighting, action: str, n: int) -> None:
    actions = sighting.actions
    if actions is None:
        sighting.actions = [action, n]
        return
    try:
        at = actions.index(action) + 1  # counts are ints: only an action's own place matches
    except ValueError:
        sighting.actions = actions + [action, n]  # noqa: RUF005  (exact size, where [*a, b] over-allocates)
    else:
        actions[at] += n  # type: ignore[operator]


def agents_sampled(items: tuple[str, ...], value: str | None) -> tuple[str, ...]:
    """``sampled`` for user agents, each distinct one kept once while the table has room."""
    added = sampled(items, value, USER_AGENT_SAMPLE)
    if added is items:
        return items
    agent = added[-1]
    shared = _agents.get(agent)
    if shared is None:
        if len(_agents) >= USER_AGENT_TABLE:
            return added
        shared = _agents[agent] = (agent,)
    return shared if not items else (*items, shared[0])


def _shared_verdict(verdict: Verdict) -> Verdict:
    """The verdict to keep: an unlisted one without details is one shared object per source."""
    if verdict.listed is not False or verdict.id is not None or verdict.last_reported is not None:
        return verdict
    if verdict.reason is not None:
        return verdict
    shared = _unlisted.get(verdict.source)
    if shared is None:
        shared = _unlisted[verdict.source] = verdict._replace(ip="")
    return shared


def sampled(items: tuple[str, ...], value: str | None, limit: int) -> tuple[str, ...]:
    """``items`` with ``value`` added if the sample has room and does not hold it yet."""
    if not value or len(items) >= limit or value in items:
        return items
    if len(value) > SAMPLE_BYTES or not (value.isascii() and value.isprintable()):
        value = _bounded(value)
        if value in items:  # a long or dirty value is stored cleaned: compare that
            return items
    return (*items, value)


def _bounded(value: str) -> str:
    """``value`` with control characters replaced and at most SAMPLE_BYTES of UTF-8."""
    if value.isascii() and value.isprintable():
        return value[:SAMPLE_BYTES]
    # Kept out of samples: they would only forge lines where a sample is shown, and each costs
    # six bytes of JSON.
    value = UNSAFE_CHARACTERS.sub("\ufffd", value)
    raw = value.encode("utf-8", "replace")
    return value if len(raw) <= SAMPLE_BYTES else raw[:SAMPLE_BYTES].decode("utf-8", "ignore")
