"""Allow-lists, refusal counting with a log that a flood cannot fill, and log-safe network text."""

from __future__ import annotations

import ipaddress
import logging

import pytest

from hepsub_apiban.core.access import MAX_LINES_PER_INTERVAL, Refusals, SourceFilter
from hepsub_apiban.core.addresses import parse_ip
from hepsub_apiban.core.logs import safe_text


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_an_empty_filter_allows_everyone_and_a_set_one_only_its_networks() -> None:
    assert SourceFilter().allows("203.0.113.9")
    allow = SourceFilter((ipaddress.ip_network("10.0.0.0/24"), ipaddress.ip_network("2001:db8::/64")))
    assert allow.allows("10.0.0.7")
    assert allow.allows("::ffff:10.0.0.8")  # a dual-stack socket's spelling of an IPv4 sender
    assert allow.allows("2001:db8::1")
    assert not allow.allows("10.0.1.7")
    assert not allow.allows("2001:db8:1::1")
    assert not allow.allows("not an address")
    assert not allow.allows("10.0.0.7\x00")


def test_a_filter_stays_bounded_under_many_senders() -> None:
    allow = SourceFilter((ipaddress.ip_network("10.0.0.0/8"),))
    for n in range(20_000):
        allow.allows(f"11.{n >> 8 & 255}.{n & 255}.1")
    assert len(allow._known) <= 4096


def test_refusals_count_every_one_and_log_one_line_per_sender_per_interval(
    caplog: pytest.LogCaptureFixture,
) -> None:
    clock = Clock()
    refusals = Refusals(log_every=60.0, clock=clock)
    with caplog.at_level(logging.WARNING, logger="hepsub_apiban.access"):
        for _ in range(5):
            refusals.refuse("hep_udp", "sender not in hep.allow_from", "198.51.100.7")
        clock.now += 61
        refusals.refuse("hep_udp", "sender not in hep.allow_from", "198.51.100.7")
    assert refusals.counts[("hep_udp", "sender not in hep.allow_from")] == 6
    assert len(caplog.records) == 2
    assert "198.51.100.7" in caplog.records[0].getMessage()
    assert "4 other refusals not logged" in caplog.records[1].getMessage()
    assert refusals.to_json() == {"hep_udp": {"sender not in hep.allow_from": 6}}


def test_a_flood_of_senders_writes_a_bounded_number_of_lines(caplog: pytest.LogCaptureFixture) -> None:
    clock = Clock()
    refusals = Refusals(log_every=60.0, clock=clock)
    with caplog.at_level(logging.WARNING, logger="hepsub_apiban.access"):
        for n in range(100_000):
            refusals.refuse("hep_udp", "bad auth key", f"1.{n >> 16 & 255}.{n >> 8 & 255}.{n & 255}")
    assert len(caplog.records) == MAX_LINES_PER_INTERVAL
    assert refusals.total("hep_udp") == 100_000
    assert refusals.total("http") == 0


def test_safe_text_escapes_control_characters_and_bounds_length() -> None:
    assert safe_text("/get/x%00\n2026 ERROR forged") == "/get/x%00\\x0a2026 ERROR forged"
    assert safe_text("a\x00b\rc\x1b[2Jd\u2028e\x85") == "a\\x00b\\x0dc\\x1b[2Jd\\u2028e\\x85"
    assert safe_text("ü-ok") == "ü-ok"
    assert safe_text("x" * 500, 10) == "x" * 10 + "...(490 more)"
    assert safe_text(b"UA\xff\n") == "UA\\xff\\x0a"


@pytest.mark.parametrize("text", ["1.2.3.4\x00", "\x00", "::1\x00", "2001:db8::1\x00x", "²", "1" * 5000])
def test_parse_ip_refuses_nul_and_odd_text_without_raising(text: str) -> None:
    assert parse_ip(text) is None
