"""The detector's per-remote counters and its memo of scanner signatures, against plain models.

``Events`` is a ring in a list (a ``deque(maxlen=...)`` costs 760 bytes per counter, and a spoofed
flood fills ``detect.max_tracked`` remotes with two or three counters each): whatever the sequence
of times, windows and clears, it must answer exactly as "the last ``size`` times, all within the
window" computed from the whole history. ``Distinct`` is checked the same way. The signature memo
must answer as the regular expression does, also after it was emptied for being full.
"""

from __future__ import annotations

from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from hepsub_apiban.core.config import DetectSettings
from hepsub_apiban.detection.detector import (
    MAX_SIGNATURE_ANSWERS,
    SCANNER_SIGNATURE,
    Detector,
    Distinct,
    Events,
)
from hepsub_apiban.formats.sip import SipInfo

# Whole seconds and halves, so that events land exactly on a window's edge.
DELTAS = st.integers(-4, 60).map(lambda halves: halves / 2)
# Steps: a time increment (clocks may also step back a little) with a window, or None: clear.
STEPS = st.lists(st.one_of(st.none(), st.tuples(DELTAS, st.sampled_from([1.0, 5.0, 30.0]))), max_size=200)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(size=st.integers(1, 12), steps=STEPS)
@example(size=2, steps=[(0.0, 5.0), (5.0, 5.0)])  # filling up exactly a window after the first
@example(size=2, steps=[(0.0, 5.0), (1.0, 5.0), (4.0, 5.0), None, (0.0, 5.0), (4.5, 5.0), (4.5, 5.0)])
def test_events_answers_as_the_last_size_times_within_the_window(
    size: int, steps: list[tuple[float, float] | None]
) -> None:
    events, history, now = Events(size), list[float](), 1000.0
    for step in steps:
        if step is None:
            events.clear()
            history = []
            continue
        delta, window = step
        now += delta
        history.append(now)
        last = history[-size:]
        expected = len(last) == size and now - last[0] < window
        assert events.add(now, window) == expected


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    size=st.integers(1, 8),
    steps=st.lists(
        st.tuples(st.sampled_from("abcdefghij"), st.integers(0, 40).map(lambda h: h / 2)), max_size=200
    ),
)
def test_distinct_counts_the_values_seen_within_the_window(size: int, steps: list[tuple[str, float]]) -> None:
    counter, last_seen, now, window = Distinct(size), dict[str, float](), 1000.0, 30.0
    for value, delta in steps:
        now += delta
        last_seen.pop(value, None)
        last_seen[value] = now
        recent = [v for v, at in last_seen.items() if at > now - window][-size:]
        for stale in [v for v in last_seen if v not in recent]:
            del last_seen[stale]
        assert counter.add(value, now, window) == len(recent)
        assert counter.values() == recent


def test_the_signature_memo_answers_as_the_expression_also_once_emptied() -> None:
    detector = Detector(DetectSettings(), lambda finding: None)
    agents = ["friendly-scanner", "Yealink SIP-T46U", "sipvicious 0.3.4", "Zoiper rv2.10"]
    agents += [f"phone firmware {n}" for n in range(MAX_SIGNATURE_ANSWERS + 10)]
    agents += ["friendly-scanner", "Yealink SIP-T46U", "SIPScan", "pplsip"]
    for agent in agents:
        sip = SipInfo(method="OPTIONS", user_agent=agent)
        assert detector._scanner(sip) == (SCANNER_SIGNATURE.search(agent) is not None), agent
    assert len(detector._signatures) <= MAX_SIGNATURE_ANSWERS
