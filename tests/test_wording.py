"""The words and times a person reads in the HOMER tab."""

from __future__ import annotations

from collections import Counter

import pytest

from hepsub_apiban.apiban.lookups import Verdict
from hepsub_apiban.core.addresses import Addr
from hepsub_apiban.detection.book import Detection
from hepsub_apiban.homer.wording import seen_details, seen_line, utc_text, verdict_details, verdict_sentence
from hepsub_apiban.ingest.sightings import Sighting

NOON = 1_795_953_600
NOON_TEXT = "2026-11-29 12:00 UTC"


@pytest.mark.parametrize(
    ("verdict", "words"),
    [
        (
            Verdict("1.2.3.4", True, "mirror", "17", NOON),
            "listed by APIBAN, last reported 2026-11-29 12:00 UTC",
        ),
        (Verdict("1.2.3.4", True, "check", "17"), "listed by APIBAN"),
        (Verdict("8.8.8.8", False, "mirror"), "not listed by APIBAN"),
        (Verdict("10.0.0.1", False, "private"), "private address, not looked up"),
        (Verdict("9.9.9.9", False, "allowlist"), "in allow.cidrs: never reported as listed"),
        (
            Verdict("8.8.8.8", None, "unavailable", reason="APIBAN did not answer within 1 s"),
            "unknown: APIBAN did not answer within 1 s",
        ),
    ],
)
def test_each_verdict_in_words(verdict: Verdict, words: str) -> None:
    assert verdict_sentence(verdict) == words
    assert verdict_details(verdict)["(1) verdict"] == words


def test_a_detection_is_said_first_unless_apiban_lists_the_address_too() -> None:
    detection = Detection("5.6.7.8", NOON, NOON + 4 * 3600, {"auth_failure": "6 refusals"}, served=True)
    flagged = Detection("5.6.7.8", NOON, NOON + 3600, {"scanner_ua": "3 requests"})
    assert verdict_sentence(Verdict("5.6.7.8", False, "mirror"), detection) == (
        "detected here: auth-failure, until 2026-11-29 16:00 UTC (blocked at the site); not listed by APIBAN"
    )
    assert verdict_sentence(Verdict("5.6.7.8", True, "mirror", "1", NOON), flagged) == (
        "listed by APIBAN, last reported 2026-11-29 12:00 UTC; "
        "detected here: scanner-ua, until 2026-11-29 13:00 UTC (flagged only)"
    )


def test_what_the_capture_saw_in_one_line_and_in_utc() -> None:
    sighting = Sighting(
        "5.6.7.8",
        Addr("5.6.7.8", 4, 0),
        NOON + 5,
        NOON + 3 * 60 + 7,
        packets=40,
        methods=Counter({"OPTIONS": 20, "REGISTER": 3, "INVITE": 2, "404": 1}),
        user_agents=("friendly-scanner",),
    )
    assert seen_line(sighting) == (
        "40 SIP packets to or from it, 2026-11-29 12:00 UTC to 12:03 UTC; "
        "it sent OPTIONS x20, REGISTER x3, INVITE x2 and 1 more from friendly-scanner"
    )
    assert seen_details(sighting)["last_seen"] == "2026-11-29 12:03 UTC"
    quiet = Sighting("5.6.7.9", Addr("5.6.7.9", 4, 0), NOON, NOON, packets=1)
    assert seen_line(quiet) == "1 SIP packet to or from it, 2026-11-29 12:00 UTC; it sent nothing"
    assert seen_details(quiet) == {"first_seen": utc_text(NOON), "last_seen": utc_text(NOON), "packets": 1}
