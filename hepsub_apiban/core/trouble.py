"""Runs of failures logged as state changes: one line when a thing starts failing, one
"still failing" line every ``STILL_FAILING_EVERY`` seconds while it goes on, one line when it
recovers. A failure per attempt would drown the log (a retry every few seconds), and only the
first one would hide that the trouble lasts, or that it is over.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable

STILL_FAILING_EVERY = 300.0  # seconds: the README's "every 5 minutes"


def duration(seconds: float) -> str:
    """A span as an operator reads it: 45 s, 12 min, 3.5 h."""
    if seconds < 120:
        return f"{seconds:.0f} s"
    if seconds < 7200:
        return f"{seconds / 60:.0f} min"
    return f"{seconds / 3600:.1f} h"


class FailureRun:
    """The failures in a row of one activity (``what``: "APIBAN list sync", "HOMER registration").

    ``clock`` is injected (any seconds counter): tests move it instead of waiting five minutes.
    """

    def __init__(
        self,
        what: str,
        logger: logging.Logger,
        *,
        clock: Callable[[], float] = time.monotonic,
        every: float = STILL_FAILING_EVERY,
    ) -> None:
        self.what = what
        self._log = logger
        self._clock = clock
        self._every = every
        self.failures = 0  # in this run; 0 while all is well
        self.since: float | None = None  # when this run began
        self._last_line = 0.0

    @property
    def failing(self) -> bool:
        return self.failures > 0

    def failed(self, reason: str, then: str = "") -> bool:
        """Count one failure; log a line if the run starts now or the last line is ``every`` old.

        ``then``: what happens next ("retrying with backoff"), appended to the first line.
        Returns whether a line was logged.
        """
        now = self._clock()
        self.failures += 1
        if self.since is None:
            self.since, self._last_line = now, now
            self._log.warning("%s failing: %s%s", self.what, reason, f"; {then}" if then else "")
            return True
        if now - self._last_line < self._every:
            return False
        self._last_line = now
        self._log.warning(
            "%s still failing after %d attempts over %s: %s",
            self.what,
            self.failures,
            duration(now - self.since),
            reason,
        )
        return True

    def succeeded(self, then: str = "") -> bool:
        """End the run, if one is under way, with a "recovered" line; returns whether it logged."""
        if self.since is None:
            return False
        self._log.info(
            "%s recovered after %d failed attempts over %s%s",
            self.what,
            self.failures,
            duration(self._clock() - self.since),
            f"; {then}" if then else "",
        )
        self.failures, self.since = 0, None
        return True
