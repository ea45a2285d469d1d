"""A run of failures is logged as state changes, on an injected clock: one line when it starts,
one "still failing" line every 5 minutes while it lasts, one line when it is over. The sync's own
run is in test_mirror.py, the registration's and the lookups' through a real serve in
test_serve_log.py."""

from __future__ import annotations

import logging

from hepsub_apiban.core.trouble import STILL_FAILING_EVERY, FailureRun


def test_a_failure_run_logs_only_its_changes() -> None:
    now = [0.0]
    logger = logging.getLogger("test.trouble")
    records: list[str] = []
    handler = logging.Handler()
    handler.emit = lambda record: records.append(record.getMessage())  # type: ignore[method-assign]
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    try:
        run = FailureRun("thing", logger, clock=lambda: now[0])
        assert not run.succeeded()  # nothing to recover from
        for _ in range(10):  # ten failures in 4.5 minutes: one line
            run.failed("down", "retrying")
            now[0] += 30
        assert records == ["thing failing: down; retrying"]
        now[0] = STILL_FAILING_EVERY
        assert run.failed("still down")
        assert not run.failed("still down")
        now[0] = 2 * STILL_FAILING_EVERY + 1
        assert run.failed("down again")
        assert run.succeeded()
        assert not run.succeeded()
        assert run.failed("new run")
    finally:
        logger.removeHandler(handler)
    assert records[1:] == [
        "thing still failing after 11 attempts over 5 min: still down",
        "thing still failing after 13 attempts over 10 min: down again",
        "thing recovered after 13 failed attempts over 10 min",
        "thing failing: new run",
    ]
