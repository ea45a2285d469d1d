"""Who may talk to the agent, and a count of everyone refused.

Anyone may send the agent HTTP requests and HEP packets. ``SourceFilter`` answers "may this
address send here?" from an allow-list of CIDRs (empty: anyone), cheaply enough for every HEP
datagram. ``Refusals`` counts what was turned away by channel and reason (for ``/metrics`` and
``/api/v1/status``) and logs it without letting a flood write the log: one line per sender per
interval, and a fixed number of lines per interval in all, the rest counted in the next line.
"""

from __future__ import annotations

import logging
import time
from collections import Counter
from typing import Any

from cachetools import TTLCache

from .addresses import NetworkSet, parse_ip
from .config import IPNetwork
from .logs import safe_text
from .timing import Clock

# Its name before the wings: operators' log filters use it.
log = logging.getLogger("hepsub_apiban.access")
# Senders whose last refusal was logged, remembered for one interval each.
MAX_LOGGED_SENDERS = 10_000
# Refusal lines per interval across all senders: a spoofed flood has a million "senders".
MAX_LINES_PER_INTERVAL = 20
_FILTER_CACHE = 4096


class SourceFilter:
    """An allow-list of networks; an empty one allows every address."""

    def __init__(self, networks: tuple[IPNetwork, ...] = ()) -> None:
        self.networks = networks
        self.active = bool(networks)
        self._set = NetworkSet(networks)
        # A HEP feed comes from a handful of senders: remember their answers, bounded.
        self._known: dict[str, bool] = {}

    def allows(self, ip: str) -> bool:
        if not self.active:
            return True
        known = self._known.get(ip)
        if known is None:
            address = parse_ip(ip)
            known = address is not None and address in self._set
            if len(self._known) >= _FILTER_CACHE:
                self._known.clear()
            self._known[ip] = known
        return known


class Refusals:
    """Refused input by (channel, reason); channels are "hep_udp", "hep_tcp", "http", "site"."""

    def __init__(self, *, log_every: float = 60.0, clock: Clock = time.monotonic) -> None:
        self.counts: Counter[tuple[str, str]] = Counter()
        self._log_every = log_every
        self._clock = clock
        self._logged: TTLCache[str, bool] = TTLCache(MAX_LOGGED_SENDERS, log_every, timer=clock)
        self._window_start = clock()
        self._lines = 0
        self._unlogged = 0

    def refuse(self, channel: str, reason: str, sender: str) -> None:
        self.counts[(channel, reason)] += 1
        if sender in self._logged or not self._may_log():
            self._unlogged += 1
            return
        self._logged[sender] = True
        unlogged, self._unlogged = self._unlogged, 0
        more = f"; {unlogged:,} other refusals not logged" if unlogged else ""
        log.warning(
            "refused %s from %s: %s (this sender's refusals are counted, not logged, for %.0f s%s)",
            channel,
            safe_text(sender, 64),
            reason,
            self._log_every,
            more,
        )

    def _may_log(self) -> bool:
        now = self._clock()
        if now - self._window_start >= self._log_every:
            self._window_start, self._lines = now, 0
        if self._lines >= MAX_LINES_PER_INTERVAL:
            return False
        self._lines += 1
        return True

    def total(self, channel: str | None = None) -> int:
        return sum(n for (ch, _), n in self.counts.items() if channel is None or ch == channel)

    def to_json(self) -> dict[str, Any]:
        """``{channel: {reason: count}}`` for the status page."""
        body: dict[str, dict[str, int]] = {}
        for (channel, reason), count in sorted(self.counts.items()):
            body.setdefault(channel, {})[reason] = count
        return body
