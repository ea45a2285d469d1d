"""What the detection rules keep and tell: their limits and names, the per-remote counters (``Events``,
``Distinct``) and transactions (``Pending``, ``Remote``), and the ``Finding`` a rule reports to the book.
Moved out of detector.py, which runs the rules (``Detector``) and binds from here what its packet path
uses; the limits and the rules they follow are docs/peers/detection-tools.md#rules.
"""

from __future__ import annotations

import re
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field

from ..core.addresses import Addr

IDLE_AFTER = 300.0  # docs/peers/detection-tools.md#rules: idle counters are forgotten after 5 minutes
MAX_PENDING = 64  # requests per remote waiting for their final reply
TRANSACTION_TIMEOUT = 32.0  # RFC 3261 Timer B: an INVITE with no final reply by then never got one
MAX_NONCES = 4  # challenges remembered per remote, to recognise credentials computed on ours
MAX_LOCAL = 4096  # learned servers and HEP senders
MAX_EXEMPT = 100_000  # addresses that authenticated in the last day
AUTH_EXEMPTION = 86400.0
SWEEP_EVERY = 1024  # packets between sweeps of idle remotes
MAX_SIGNATURE_ANSWERS = 4096  # User-Agents and display names whose signature test is remembered

SCANNER_SIGNATURE = re.compile(
    r"friendly-scanner|sipvicious|sipcli|pplsip|vaxsipuseragent|sundayddr|sipscan|\bsmap\b", re.IGNORECASE
)
SCANNER_FROM_USERS = frozenset({"sipsak"})
CHALLENGES = frozenset({401, 407})
AUTH_REFUSALS = frozenset({401, 403, 407})
NO_SUCH_USER = frozenset({403, 404, 484, 485, 604})
TOLL_REFUSALS = frozenset({401, 403, 404})
SCANNED_METHODS = frozenset({"OPTIONS", "INVITE", "REGISTER"})
FLOOD_METHODS = frozenset({"INVITE", "REGISTER"})
TCP_PROTOCOLS = frozenset({6, 22})  # HEP ip_proto: TCP; Kamailio writes 22 for TLS/WS

UNANSWERED = "INVITEs that never rang or connected"

SCANNER_UA = "scanner_ua"
AUTH_FAILURE = "auth_failure"
USER_ENUMERATION = "user_enumeration"
EXTENSION_SCAN = "extension_scan"
REQUEST_FLOOD = "request_flood"
TOLL_FRAUD = "toll_fraud"
UNANSWERED_INVITES = "unanswered_invites"

PROOF_TCP = "used TCP/TLS"
PROOF_NONCE = "sent credentials computed on our challenge"


def rule_name(rule: str) -> str:
    """The name people and other tools see: ``scanner-ua`` for the setting ``scanner_ua``."""
    return rule.replace("_", "-")


class Events:
    """The times of the last ``size`` events: the threshold-th within the window fires.

    A ring in a list, not a ``deque(maxlen=size)``: a deque takes 760 bytes however few events it
    holds, and every tracked remote has two or three of these (a spoofed flood fills
    ``detect.max_tracked`` remotes with one event each)."""

    __slots__ = ("_next", "_size", "_times")

    def __init__(self, size: int) -> None:
        self._times: list[float] = []
        self._size = size
        self._next = 0  # once full: where the oldest time is, and the next one goes

    def add(self, now: float, window: float) -> bool:
        times = self._times
        if len(times) < self._size:
            times.append(now)
            return len(times) == self._size and now - times[0] < window
        position = self._next
        times[position] = now
        position += 1
        if position == self._size:
            position = 0
        self._next = position
        return now - times[position] < window

    def clear(self) -> None:
        self._times = []
        self._next = 0


class Distinct:
    """Distinct values seen within a window (each with the time it was last seen), at most ``size``."""

    __slots__ = ("_seen", "_size")

    def __init__(self, size: int) -> None:
        self._seen: OrderedDict[str, float] = OrderedDict()
        self._size = size

    def add(self, value: str, now: float, window: float) -> int:
        seen = self._seen
        seen.pop(value, None)
        seen[value] = now
        if len(seen) > self._size:
            seen.popitem(last=False)
        horizon = now - window
        while seen and next(iter(seen.values())) <= horizon:
            seen.popitem(last=False)
        return len(seen)

    def discard(self, value: str) -> None:
        self._seen.pop(value, None)

    def values(self) -> list[str]:
        return list(self._seen)

    def clear(self) -> None:
        self._seen.clear()


@dataclass(slots=True)
class Pending:
    """A request of a remote waiting for its final reply."""

    at: float
    method: str
    user: str | None  # the user it was for: REGISTER's To user, else the request-URI's
    credentials: bool
    progress: bool = False  # an INVITE that got 18x


# Call-ID, CSeq number, method, top Via branch: svcrack sends every password guess with the same
# Call-ID and CSeq, so only the branch tells a new guess from a retransmission.
Transaction = tuple[str | None, int | None, str, str | None]


@dataclass(slots=True)
class Remote:
    address: Addr
    last: float
    pending: OrderedDict[Transaction, Pending] = field(default_factory=OrderedDict)
    counters: dict[str, Events | Distinct] = field(default_factory=dict)
    nonces: tuple[str, ...] = ()  # challenges our servers sent it
    proof: str | None = None  # why it evidently talks to us (PROOF_TCP, PROOF_NONCE)
    user_agent: str | None = None  # the last scanner signature it sent

    def events(self, key: str, size: int) -> Events:
        counter = self.counters.get(key)
        if not isinstance(counter, Events):
            counter = self.counters[key] = Events(size)
        return counter

    def distinct(self, key: str, size: int) -> Distinct:
        counter = self.counters.get(key)
        if not isinstance(counter, Distinct):
            counter = self.counters[key] = Distinct(size)
        return counter


@dataclass(frozen=True, slots=True)
class Finding:
    """A rule fired for a remote: what the book is told."""

    ip: str
    rule: str  # the setting's name (scanner_ua)
    evidence: str  # a few words a person reads
    proof: str | None  # PROOF_TCP / PROOF_NONCE when the address evidently talks to us
    at: float


Report = Callable[[Finding], None]


@dataclass(slots=True)
class DetectorStats:
    packets: int = 0
    tracked_evicted: int = 0
    idle_forgotten: int = 0
    retransmissions: int = 0
    exempted: int = 0  # findings dropped because the address authenticated recently


def _prefixes(prefixes: tuple[str, ...]) -> tuple[str, ...]:
    """Each prefix as written, and an international one both ways (``+882`` and ``00882``)."""
    spelled: list[str] = []
    for prefix in prefixes:
        spelled.append(prefix)
        if prefix.startswith(("+", "00")):
            digits = prefix[1:] if prefix.startswith("+") else prefix[2:]
            spelled += ["+" + digits, "00" + digits]
    return tuple(dict.fromkeys(spelled))


def _some(counter: Distinct) -> str:
    values = counter.values()
    shown = ", ".join(v[:32] for v in values[:5])
    return shown + (", ..." if len(values) > 5 else "")
