"""The book of local detections: what each rule found, for how long, and whether it is served.

A rule's finding becomes a detection of its address. What is *served* (listed by the site API and
the CrowdSec decision stream, so firewalls block it) needs more than one rule's counters, because
over UDP anyone can forge a SIP source (docs/peers/detection-tools.md#traps): the address must evidently talk
to us (it used TCP/TLS, or sent credentials computed on a nonce our server gave it), or two different
rules must have fired for it. Without that it is flagged: shown in HOMER, the sightings, metrics
and logs, never handed to a firewall. A circuit breaker caps newly served addresses per minute,
so that a flood of findings (an attack on the detector itself) cannot list half the internet.

Repeats escalate: a detection that starts within ``REPEAT_WINDOW`` of earlier ones lasts
``REPEAT_FACTOR`` times longer per earlier one, capped at ``MAX_DURATION`` (APIBAN's own active
window). Active detections and their repeat history are saved in the state dir, atomically, and
come back after a restart with their remaining time.
"""

from __future__ import annotations

import logging
import time
from collections import Counter, OrderedDict, deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import orjson

from ..core.config import DetectSettings
from ..core.jsonutil import loads_object
from ..core.logs import safe_text
from ..core.state import atomic_write
from .detector import Finding, rule_name
from .record import (
    MAX_DURATION,
    MAX_HISTORY,
    SERVE,
    Detection,
    SnapshotError,
    _detection_from,
    _detection_json,
    _history_from,
    _list,
    _pair,
    _serial_of,
)

__all__ = [
    "MAX_DURATION",
    "REANNOUNCE_AFTER",
    "Detection",
    "Detections",
    "SnapshotError",
]

# Its name before the wings: operators' log filters use it.
log = logging.getLogger("hepsub_apiban.detections")
REPEAT_WINDOW = 7 * 86400.0
REPEAT_FACTOR = 4
REANNOUNCE_AFTER = 600.0  # a served detection extended by this much is handed out again
LOG_EVERY = 3600.0  # one log line per address and rule per hour
BREAKER_WINDOW = 60.0
MAX_TOMBSTONES = 100_000  # ended served detections remembered for decision-stream "deleted"
SNAPSHOT_FORMAT = "hepsub-apiban/detections"
SNAPSHOT_VERSION = 1
MAX_SNAPSHOT_BYTES = 64 << 20
TWO_RULES = "two different rules fired"
NO_PROOF = "no sign yet that it really talks to us (TCP/TLS, our nonce, or a second rule)"


@dataclass(slots=True)
class DetectionStats:
    findings: Counter[tuple[str, str]] = field(default_factory=Counter)  # (rule, outcome) -> count
    breaker_trips: int = 0
    full: int = 0  # findings dropped because the book held max_tracked detections


Listener = Callable[[str, bool], object]  # (ip, detected now)
# (served detection, when it ended or None): served, extended or renumbered by a finding, or ended.
SharedListener = Callable[[Detection, float | None], object]


class Detections:
    """The detection book: what the rules found, for how long, and whether it is served to firewalls.

    Owns the active detections, their repeat history, the circuit breaker and the tombstones of ended
    ones, and saves them in the state dir. Told by the ``Detector`` (``report``), read by the site
    blocklist, the decision stream, enrichment, the HOMER tab and the metrics; tells the sightings
    (``on_change``, or ``tell``) and ``SharedDetections`` (``share_with``) what changed.

    Never serves an address on one rule's counters alone (it needs proof or two rules), never more
    than the breaker allows per minute, and never for longer than ``MAX_DURATION``.
    """

    def __init__(
        self,
        settings: DetectSettings,
        new_serial: Callable[[float], int],
        *,
        clock: Callable[[], float] = time.time,
        on_change: Listener | None = None,
    ) -> None:
        self._settings = settings
        self._new_serial = new_serial
        self._clock = clock
        self._on_change = on_change
        self._active: dict[str, Detection] = {}
        self._history: OrderedDict[str, list[float]] = OrderedDict()
        self._served_at: deque[float] = deque()  # when detections were newly served (breaker)
        self._logged: OrderedDict[tuple[str, str], float] = OrderedDict()
        # (when it ended, detection): ended served detections, newest last, for the decision stream.
        self.ended: deque[tuple[float, Detection]] = deque(maxlen=MAX_TOMBSTONES)
        self.stats = DetectionStats()
        self.dirty = False
        self.on_shared: SharedListener | None = None  # with store.url: share_with (store/detections.py)

    def tell(self, listener: Listener) -> None:
        """From now on, tell ``listener`` of every address detected or no longer detected.

        For the sightings, which the book cannot be built with: the book is built before the
        routes (the site API serves it), the sightings at startup (they need the lookups), and
        they ask the book in turn (``holds``). Restored detections were told to no one: the
        sightings ask ``holds`` for each address as they first see it."""
        self._on_change = listener

    def share_with(self, listener: SharedListener) -> None:
        """From now on, tell ``listener`` of every detection served, extended, renumbered or
        ended: ``SharedDetections``, which is built with this book and so after it."""
        self.on_shared = listener

    # ---------------------------------------------------------------- findings

    def report(self, finding: Finding) -> None:
        """A rule fired (``Detector``'s report callback)."""
        rule = self._settings.rules[finding.rule]
        if rule.simulate:
            self.stats.findings[(finding.rule, "simulated")] += 1
            self._log(finding, f"simulated (detect.{finding.rule}.simulate): not acted on")
            return
        now = finding.at
        detection = self._current(finding.ip, now)
        if detection is None:
            if len(self._active) >= self._settings.max_tracked:
                self.stats.full += 1
                return
            detection = self._start(finding.ip, now)
        duration = self._duration(rule.duration, detection.repeats)
        detection.until = max(detection.until, now + duration)
        if detection.served and detection.until - detection.announced_until >= REANNOUNCE_AFTER:
            # Clients that take a duration (CrowdSec bouncers, ipset timeouts) would unblock at
            # the end they were told: a new serial hands them the detection again.
            detection.serial = self._new_serial(now)
            detection.announced_until = detection.until
        detection.rules.pop(finding.rule, None)
        detection.rules[finding.rule] = finding.evidence
        if finding.proof is not None:
            detection.proof = finding.proof
        elif detection.proof is None and len(detection.rules) >= 2:
            detection.proof = TWO_RULES
        if not detection.served and self._wants_serving(detection):
            self._serve(detection, now)
        outcome = detection.action
        if detection.served and self.on_shared is not None:
            self.on_shared(detection, None)
        self.stats.findings[(finding.rule, outcome)] += 1
        self.dirty = True
        self._log(finding, self._describe(detection))

    def _current(self, ip: str, now: float) -> Detection | None:
        detection = self._active.get(ip)
        if detection is not None and detection.until <= now:
            self._end(detection, now)
            return None
        return detection

    def _start(self, ip: str, now: float) -> Detection:
        starts = [t for t in self._history.pop(ip, []) if now - t < REPEAT_WINDOW]
        detection = Detection(ip, now, now, repeats=len(starts))
        self._history[ip] = [*starts, now][-MAX_HISTORY:]
        if len(self._history) > self._settings.max_tracked:
            self._history.popitem(last=False)
        self._active[ip] = detection
        if self._on_change is not None:
            self._on_change(ip, True)
        return detection

    @staticmethod
    def _duration(first: float, repeats: int) -> float:
        return min(first * float(REPEAT_FACTOR ** min(repeats, 16)), MAX_DURATION)

    def _wants_serving(self, detection: Detection) -> bool:
        rules = self._settings.rules
        if not any(rules[rule].action == SERVE for rule in detection.rules):
            detection.held_back = "its rules only flag (detect.RULE.action)"
            return False
        if detection.proof is None:
            detection.held_back = NO_PROOF
            return False
        return True

    def _serve(self, detection: Detection, now: float) -> None:
        served_at = self._served_at
        while served_at and served_at[0] <= now - BREAKER_WINDOW:
            served_at.popleft()
        if len(served_at) >= self._settings.max_new_served:
            self.stats.breaker_trips += 1
            detection.held_back = (
                f"circuit breaker: {len(served_at)} addresses newly served in the last minute "
                "(detect.max_new_served)"
            )
            log.warning(
                "Detection circuit breaker open: %s flagged, not served (%d newly served in the last minute)",
                detection.ip,
                len(served_at),
            )
            return
        served_at.append(now)
        detection.served = True
        detection.held_back = None
        detection.serial = self._new_serial(now)
        detection.announced_until = detection.until

    def _describe(self, detection: Detection) -> str:
        until = time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(detection.until))
        if detection.served:
            return f"served until {until} ({detection.proof})"
        return f"flagged until {until}, not served: {detection.held_back}"

    def _log(self, finding: Finding, outcome: str) -> None:
        key = (finding.ip, finding.rule)
        last = self._logged.get(key)
        if last is not None and finding.at - last < LOG_EVERY:
            return
        self._logged.pop(key, None)
        self._logged[key] = finding.at
        if len(self._logged) > self._settings.max_tracked:
            self._logged.popitem(last=False)
        log.warning(
            "Detected %s: %s (%s); %s",
            finding.ip,
            rule_name(finding.rule),
            safe_text(finding.evidence, 200),
            outcome,
        )

    # ---------------------------------------------------------------- ending

    def _end(self, detection: Detection, now: float, *, share: bool = True) -> None:
        del self._active[detection.ip]
        if detection.served:
            self.ended.append((now, detection))
            if share and self.on_shared is not None:
                self.on_shared(detection, now)
        self.dirty = True
        if self._on_change is not None:
            self._on_change(detection.ip, False)

    def expire(self, now: float | None = None) -> int:
        """End every detection whose time is up; how many ended."""
        now = self._clock() if now is None else now
        ended = [d for d in self._active.values() if d.until <= now]
        for detection in sorted(ended, key=lambda d: d.until):
            self._end(detection, detection.until)
        return len(ended)

    # ---------------------------------------------------------------- shared (store.url)

    def adopt(self, shared: Detection, now: float) -> Detection | None:
        """A served detection as the store holds it (store/detections.py), this agent's or another's:
        served here under the store's ID and end, merged with what this book holds of the address (a
        flagged detection of it is served from now on: another agent had the proof). The breaker is
        the detecting agent's; the book's bound is this one's. None if the book is full or it is over."""
        shared.rules = {rule: text for rule, text in shared.rules.items() if rule in self._settings.rules}
        shared.until = min(shared.until, now + MAX_DURATION)  # no agent may list an address for good
        detection = self._current(shared.ip, now)
        if shared.until <= now:
            return None
        if detection is None:
            if not shared.rules:  # none this agent knows: nothing to name it by (scenario, tab)
                return None
            if len(self._active) >= self._settings.max_tracked:
                self.stats.full += 1
                return None
            shared.served, shared.held_back = True, None
            self._active[shared.ip] = detection = shared
            if self._on_change is not None:
                self._on_change(shared.ip, True)
        else:
            # The store's order first (the first rule names the CrowdSec scenario on every agent).
            detection.rules = {**shared.rules, **detection.rules}
            detection.until = max(detection.until, shared.until)
            detection.serial, detection.announced_until = shared.serial, shared.announced_until
            detection.served, detection.held_back = True, None
            detection.proof = detection.proof or shared.proof
            detection.repeats = max(detection.repeats, shared.repeats)
            detection.since = min(detection.since, shared.since)
            detection.agents = shared.agents
        self.dirty = True
        return detection

    def end_shared(self, ip: str, serial: int, at: float) -> bool:
        """An agent ended the served detection ``serial`` of ``ip`` (its end came by its clock before
        this one's): it ends here too, unless this book has renumbered it since."""
        detection = self._active.get(ip)
        if detection is None or detection.serial != serial or detection.until > at:
            return False
        self._end(detection, at, share=False)
        return True

    # ---------------------------------------------------------------- reading

    def get(self, ip: str, now: float | None = None) -> Detection | None:
        detection = self._active.get(ip)
        now = self._clock() if now is None else now
        return detection if detection is not None and detection.until > now else None

    def holds(self, ip: str) -> bool:
        return ip in self._active

    def active(self, now: float | None = None) -> Iterator[Detection]:
        now = self._clock() if now is None else now
        return (d for d in self._active.values() if d.until > now)

    def served(self, now: float | None = None) -> list[Detection]:
        """Active served detections in serial order."""
        return sorted((d for d in self.active(now) if d.served), key=_serial_of)

    def counts(self, now: float | None = None) -> Counter[str]:
        return Counter(d.action for d in self.active(now))

    def __len__(self) -> int:
        return len(self._active)

    # ---------------------------------------------------------------- state

    def to_snapshot(self, now: float, authenticated: dict[str, float]) -> bytes:
        return orjson.dumps(
            {
                "format": SNAPSHOT_FORMAT,
                "version": SNAPSHOT_VERSION,
                "saved_at": now,
                "active": [_detection_json(d) for d in self.active(now)],
                "history": [[ip, starts] for ip, starts in self._history.items()],
                "authenticated": [[ip, at] for ip, at in authenticated.items()],
            }
        )

    def save(self, path: Path, authenticated: dict[str, float]) -> None:
        atomic_write(path, self.to_snapshot(self._clock(), authenticated))
        self.dirty = False

    def load(self, path: Path) -> list[tuple[str, float]]:
        """Restore a saved book (whole or not at all); the authenticated addresses it held."""
        try:
            raw = path.read_bytes()
        except FileNotFoundError:
            return []
        except OSError as exc:
            log.warning("Detections not restored: cannot read %s: %s", path, exc.strerror)
            return []
        try:
            return self._restore(raw, self._clock())
        except SnapshotError as exc:
            log.warning("Detections not restored: %s is not usable (%s); starting with none", path, exc)
            return []

    def _restore(self, raw: bytes, now: float) -> list[tuple[str, float]]:
        if len(raw) > MAX_SNAPSHOT_BYTES:
            raise SnapshotError("too large")
        document = loads_object(raw)
        if document is None or document.get("format") != SNAPSHOT_FORMAT:
            raise SnapshotError("not a detections snapshot")
        if document.get("version") != SNAPSHOT_VERSION:
            raise SnapshotError("unknown version")
        active = [_detection_from(item, self._settings, now) for item in _list(document.get("active"))]
        history = [_history_from(item, now) for item in _list(document.get("history"))]
        authenticated = [_pair(item, now) for item in _list(document.get("authenticated"))]
        for detection in active:
            if detection.until > now:
                self._active[detection.ip] = detection
                if self._on_change is not None:
                    self._on_change(detection.ip, True)
        for ip, starts in history:
            self._history[ip] = starts
        return authenticated
