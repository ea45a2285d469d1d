"""The detector and its book, fed parsed SIP as the collector feeds them (no sockets: the rules).

Each test writes the SIP a real peer would send (requests and our server's replies, with the
headers the rules read) and checks what the book holds. The traffic through real sockets, real
Kamailio and real attack tools is in tests/test_detection_agent.py and tests/test_detect_real_tools.py.
"""

from __future__ import annotations

import dataclasses
import itertools
import logging
from pathlib import Path

import pytest

from hepsub_apiban.core.config import DEFAULT_RULES, DetectSettings, RuleSettings, load_settings
from hepsub_apiban.detection.book import MAX_DURATION, Detections
from hepsub_apiban.detection.detector import Detector
from hepsub_apiban.formats.sip import SipInfo, parse_sip

ATTACKER = "5.6.7.8"
OFFICE = "5.6.7.9"
SERVER = "10.0.0.1"  # our registrar (non-routable: never a remote anyway)
PUBLIC_SERVER = "80.1.1.1"  # an SBC with a public address
UDP, TCP = 17, 6
T0 = 1_800_000_000.0


class Clock:
    def __init__(self) -> None:
        self.now = T0

    def __call__(self) -> float:
        return self.now


@dataclasses.dataclass
class Site:
    """A detector and its book on one clock; ``request``/``reply`` feed it one message each."""

    detector: Detector
    book: Detections
    clock: Clock
    serials: itertools.count[int]
    calls: itertools.count[int]

    def request(
        self,
        src: str,
        method: str = "OPTIONS",
        user: str = "100",
        *,
        dst: str = SERVER,
        ua: str = "Yealink SIP-T46S",
        call_id: str | None = None,
        cseq: int = 1,
        nonce: str | None = None,
        proto: int = UDP,
        at: float | None = None,
        branch: str | None = None,
    ) -> str:
        call_id = call_id or f"call-{next(self.calls)}"
        branch = branch or f"z9hG4bK{call_id}{cseq}"
        ruri = f"sip:{dst}" if method == "REGISTER" else f"sip:{user}@{dst}"
        credentials = (
            f'Authorization: Digest username="{user}", realm="site", nonce="{nonce}", response="0f"\r\n'
            if nonce is not None
            else ""
        )
        text = (
            f"{method} {ruri} SIP/2.0\r\nVia: SIP/2.0/UDP {src}:5060;branch={branch}\r\n"
            f"From: <sip:{user}@{dst}>;tag=1\r\nTo: <sip:{user}@{dst}>\r\nCall-ID: {call_id}\r\n"
            f"CSeq: {cseq} {method}\r\nUser-Agent: {ua}\r\n{credentials}Content-Length: 0\r\n\r\n"
        )
        self._feed(src, dst, text, proto, at)
        return call_id

    def reply(
        self,
        dst: str,
        status: int,
        method: str,
        call_id: str,
        *,
        src: str = SERVER,
        cseq: int = 1,
        nonce: str | None = None,
        at: float | None = None,
        branch: str | None = None,
    ) -> None:
        """Our server's reply: it carries the request's Via (and so its branch) back."""
        challenge = f'WWW-Authenticate: Digest realm="site", nonce="{nonce}"\r\n' if nonce else ""
        via = f"Via: SIP/2.0/UDP {dst}:5060;branch={branch or f'z9hG4bK{call_id}{cseq}'}\r\n"
        text = f"SIP/2.0 {status} Whatever\r\n{via}Call-ID: {call_id}\r\nCSeq: {cseq} {method}\r\n"
        text += f"{challenge}\r\n"
        self._feed(src, dst, text, UDP, at)

    def exchange(self, src: str, method: str, user: str, status: int, **request: object) -> str:
        call_id = self.request(src, method, user, **request)  # type: ignore[arg-type]
        self.reply(src, status, method, call_id)
        return call_id

    def _feed(self, src: str, dst: str, text: str, proto: int, at: float | None) -> None:
        info = parse_sip(text.encode())
        assert isinstance(info, SipInfo)
        self.detector.observe(src, dst, info, proto, self.clock.now if at is None else at)

    def detected(self, ip: str = ATTACKER) -> dict[str, object] | None:
        detection = self.book.get(ip, self.clock.now)
        return None if detection is None else detection.to_json()


def make_site(**env: str) -> Site:
    settings = load_settings(None, {"HEPSUB_APIBAN_KEY": "k", **env})
    clock = Clock()
    serials = itertools.count(1000)
    book = Detections(settings.detect, lambda _now: next(serials), clock=clock)
    detector = Detector(settings.detect, book.report)
    return Site(detector, book, clock, serials, itertools.count(1))


def with_rule(settings: DetectSettings, name: str, **changes: object) -> DetectSettings:
    rules = dict(settings.rules)
    rules[name] = dataclasses.replace(rules[name], **changes)  # type: ignore[arg-type]
    return dataclasses.replace(settings, rules=rules)


# --------------------------------------------------------------------------- scanner-ua


def test_scanner_ua_fires_at_the_third_request_within_a_minute_and_is_flagged_alone() -> None:
    site = make_site()
    site.request(ATTACKER, ua="friendly-scanner")
    site.clock.now += 30
    site.request(ATTACKER, ua="friendly-scanner")
    assert site.detected() is None
    site.clock.now += 29
    site.request(ATTACKER, ua="friendly-scanner")
    detection = site.detected()
    assert detection is not None
    assert detection["rules"] == ["scanner-ua"]
    assert detection["action"] == "flag"  # one rule over UDP: no sign it really talks to us
    assert "no sign yet" in str(detection["not_served_because"])
    assert detection["until"] == int(T0 + 59 + 3600)


def test_scanner_requests_spread_beyond_the_window_do_not_fire() -> None:
    site = make_site()
    for _ in range(5):
        site.request(ATTACKER, ua="sipvicious")
        site.clock.now += 31  # two in any 60 s, never three
    assert site.detected() is None


def test_retransmissions_count_once() -> None:
    site = make_site()
    for _ in range(10):  # RFC 3261 timer A: the same request again and again
        site.request(ATTACKER, "INVITE", ua="friendly-scanner", call_id="same", cseq=1)
    assert site.detected() is None
    assert site.detector.stats.retransmissions == 9


@pytest.mark.parametrize(
    "headers",
    [
        {"ua": "Friendly-Scanner"},
        {"ua": "sipcli/v1.8"},
        {"ua": "VaxSIPUserAgent/3.1"},
        {"ua": "pplsip"},
        {"ua": "sundayddr"},
        {"ua": "SIPScan 2"},
        {"ua": "smap 0.6"},
        {"user": "sipsak"},
    ],
)
def test_each_scanner_signature(headers: dict[str, str]) -> None:
    site = make_site()
    for _ in range(3):
        site.request(ATTACKER, **headers)  # type: ignore[arg-type]
    assert site.detected() is not None


@pytest.mark.parametrize(
    "ua", ["Zoiper rv2.10", "eyeBeam release 1011d", "Asterisk PBX 18", "Ozeki VoIP SIP SDK"]
)
def test_softphones_some_lists_call_scanners_are_left_alone(ua: str) -> None:
    site = make_site()
    for _ in range(10):
        site.request(ATTACKER, ua=ua)
    assert site.detected() is None


# --------------------------------------------------------------------------- auth failures


def register_with_credentials(site: Site, src: str, user: str, status: int, *, echo: bool = True) -> None:
    """A phone's REGISTER: challenged without credentials, then again with them (answered ``status``)."""
    call_id = site.request(src, "REGISTER", user, cseq=1)
    nonce = f"nonce-{call_id}"
    site.reply(src, 401, "REGISTER", call_id, nonce=nonce, src=PUBLIC_SERVER)
    site.request(src, "REGISTER", user, call_id=call_id, cseq=2, nonce=nonce if echo else "someone-elses")
    site.reply(src, status, "REGISTER", call_id, cseq=2, src=PUBLIC_SERVER, nonce=f"again-{call_id}")


def test_200_phones_behind_one_address_with_good_credentials_are_not_detected() -> None:
    site = make_site()
    for user in range(1000, 1200):
        register_with_credentials(site, OFFICE, str(user), 200)
        site.clock.now += 0.05
    assert site.detected(OFFICE) is None
    assert len(site.book) == 0


def test_a_first_401_to_requests_without_credentials_counts_for_nothing() -> None:
    site = make_site()
    for user in range(50):
        site.exchange(OFFICE, "REGISTER", str(user % 3), 401)  # the first challenge, many times
    assert site.detected(OFFICE) is None


def test_password_guessing_on_our_nonce_is_detected_and_served() -> None:
    site = make_site()
    for _ in range(5):
        register_with_credentials(site, ATTACKER, "1000", 401, echo=True)
    assert site.detected() is None  # "more than 5 in 10 s"
    register_with_credentials(site, ATTACKER, "1000", 401, echo=True)
    detection = site.detected()
    assert detection is not None
    assert detection["rules"] == ["auth-failure"]
    assert detection["action"] == "serve"
    assert detection["served_because"] == "sent credentials computed on our challenge"
    assert detection["until"] == int(T0 + 4 * 3600)


def test_guessing_with_a_nonce_we_never_issued_is_only_flagged() -> None:
    site = make_site()
    for _ in range(6):
        register_with_credentials(site, ATTACKER, "1000", 403, echo=False)
    detection = site.detected()
    assert detection is not None
    assert detection["action"] == "flag"


def test_the_slow_trigger_catches_guessing_spread_over_minutes() -> None:
    site = make_site()
    for _ in range(20):
        register_with_credentials(site, ATTACKER, "1000", 401)
        site.clock.now += 25  # never 6 in 10 s
    assert site.detected() is None
    register_with_credentials(site, ATTACKER, "1000", 401)
    assert site.detected() is not None  # the 21st within 10 minutes


def test_an_address_that_authenticated_is_exempt_except_from_scanner_ua() -> None:
    site = make_site()
    register_with_credentials(site, OFFICE, "1000", 200)
    for _ in range(10):
        register_with_credentials(site, OFFICE, "1001", 401)  # a phone with a stale password
    assert site.detected(OFFICE) is None
    assert site.detector.stats.exempted >= 1
    for _ in range(3):
        site.request(OFFICE, ua="friendly-scanner")
    detection = site.detected(OFFICE)
    assert detection is not None
    assert detection["rules"] == ["scanner-ua"]
    site.clock.now += 86400
    assert site.detector.authenticated()  # remembered a day, then the exemption ends
    for _ in range(6):
        register_with_credentials(site, OFFICE, "1001", 401, echo=False)
    assert "auth-failure" in site.detected(OFFICE)["rules"]  # type: ignore[index,operator]


# --------------------------------------------------------------------------- scans and enumeration


def test_svwar_style_enumeration_is_detected_by_two_rules_and_served() -> None:
    site = make_site()
    for extension in range(100, 125):
        site.exchange(ATTACKER, "REGISTER", str(extension), 404, ua="friendly-scanner")
    detection = site.detected()
    assert detection is not None
    assert set(detection["rules"]) == {"scanner-ua", "user-enumeration", "extension-scan"}  # type: ignore[arg-type]
    assert detection["action"] == "serve"
    assert detection["served_because"] == "two different rules fired"


def test_enumeration_with_a_quiet_user_agent_is_still_seen() -> None:
    site = make_site()
    for extension in range(200, 205):
        site.exchange(ATTACKER, "INVITE", str(extension), 404, ua="Linphone")
    detection = site.detected()
    assert detection is not None
    assert detection["rules"] == ["user-enumeration"]


def test_scanning_five_of_our_addresses_in_a_minute() -> None:
    site = make_site()
    for host in range(1, 6):
        site.request(ATTACKER, "OPTIONS", "100", dst=f"10.0.0.{host}", ua="Linphone")
    detection = site.detected()
    assert detection is not None
    assert detection["rules"] == ["extension-scan"]
    assert "5 of our addresses" in str(detection["evidence"])


def test_a_scan_over_tcp_is_served_by_one_rule() -> None:
    site = make_site()
    for extension in range(20):
        site.request(ATTACKER, "OPTIONS", str(extension), ua="Linphone", proto=TCP)
    detection = site.detected()
    assert detection is not None
    assert detection["action"] == "serve"
    assert detection["served_because"] == "used TCP/TLS"


# --------------------------------------------------------------------------- flood, toll fraud, unanswered


def test_request_flood_and_unanswered_invites_only_flag() -> None:
    site = make_site()
    for _ in range(101):
        site.exchange(ATTACKER, "INVITE", "4930123", 486)  # busy, never ringing
        site.clock.now += 0.1
    detection = site.detected()
    assert detection is not None
    assert set(detection["rules"]) == {"request-flood", "unanswered-invites"}  # type: ignore[arg-type]
    # Two rules fired, but both only flag: nothing is served.
    assert detection["action"] == "flag"


def test_calls_that_ring_or_connect_are_neither_unanswered_nor_a_scan() -> None:
    site = make_site()
    for n in range(40):  # an unauthenticated peer calling 40 numbers within two minutes
        call_id = site.request(ATTACKER, "INVITE", f"49{n}")
        if n % 2:
            site.reply(ATTACKER, 180, "INVITE", call_id)
            site.reply(ATTACKER, 486, "INVITE", call_id)
        else:
            site.reply(ATTACKER, 200, "INVITE", call_id)
    assert site.detected() is None


def test_toll_fraud_is_off_until_prefixes_are_named() -> None:
    quiet = make_site()
    for _ in range(5):
        quiet.exchange(ATTACKER, "INVITE", "+8823456", 403)
    assert quiet.detected() is None
    site = make_site(HEPSUB_DETECT_TOLL_FRAUD_PREFIXES="+882")
    for _ in range(2):
        site.exchange(ATTACKER, "INVITE", "008823456", 403)
    assert site.detected() is None
    site.exchange(ATTACKER, "INVITE", "+8823456", 404)
    detection = site.detected()
    assert detection is not None
    assert detection["rules"] == ["toll-fraud"]
    assert detection["until"] == int(site.clock.now + 86400)


# --------------------------------------------------------------------------- never detected


@pytest.mark.parametrize(
    ("source", "env"),
    [
        ("192.168.1.20", {}),
        ("127.0.0.9", {}),
        (ATTACKER, {"HEPSUB_ALLOW_CIDRS": "5.6.7.0/24"}),
        (ATTACKER, {"HEPSUB_DETECT_OWN": "5.6.0.0/16"}),
    ],
)
def test_non_routable_allowed_and_own_addresses_are_never_detected(source: str, env: dict[str, str]) -> None:
    site = make_site(**env)
    if "HEPSUB_ALLOW_CIDRS" in env:
        allow = load_settings(None, {"HEPSUB_APIBAN_KEY": "k", **env}).allow.cidrs
        site.detector = Detector(site.detector._settings, site.book.report, allow=_networks(allow))
    for extension in range(30):
        site.exchange(source, "REGISTER", str(extension), 404, ua="friendly-scanner")
    assert len(site.book) == 0
    assert site.detector.tracked() == 0


def _networks(cidrs: tuple[object, ...]) -> object:
    from hepsub_apiban.core.addresses import NetworkSet

    return NetworkSet(cidrs)  # type: ignore[arg-type]


def test_hep_senders_and_servers_that_challenge_are_never_detected() -> None:
    site = make_site()
    site.detector.hep_sender(ATTACKER)
    for _ in range(5):
        site.request(ATTACKER, ua="friendly-scanner")
    # A public SBC challenges a phone's REGISTER: only servers challenge, so it is ours from then on.
    call_id = site.request(OFFICE, "REGISTER", "1000")
    site.reply(OFFICE, 401, "REGISTER", call_id, src=PUBLIC_SERVER, nonce="n")
    for extension in range(30):  # the SBC now sends requests of its own
        site.exchange(PUBLIC_SERVER, "OPTIONS", str(extension), 404, ua="friendly-scanner")
    assert len(site.book) == 0
    assert site.detector.is_local(PUBLIC_SERVER)


# --------------------------------------------------------------------------- the book


def test_repeats_escalate_fourfold_and_stop_at_seven_days() -> None:
    site = make_site(HEPSUB_DETECT_SCANNER_UA_ACTION="flag")
    durations = []
    for _ in range(5):
        for _ in range(3):
            site.request(ATTACKER, ua="friendly-scanner")
        detection = site.book.get(ATTACKER, site.clock.now)
        assert detection is not None
        durations.append(detection.until - detection.since)
        site.clock.now = detection.until + 1
        site.book.expire(site.clock.now)
    assert durations == [3600, 4 * 3600, 16 * 3600, 64 * 3600, MAX_DURATION]


def test_simulate_counts_and_logs_but_does_not_act(caplog: pytest.LogCaptureFixture) -> None:
    site = make_site(HEPSUB_DETECT_SCANNER_UA_SIMULATE="true")
    with caplog.at_level(logging.WARNING):
        for _ in range(9):
            site.request(ATTACKER, ua="friendly-scanner")
    assert site.detected() is None
    assert site.book.stats.findings[("scanner_ua", "simulated")] == 3
    assert len([r for r in caplog.records if "simulated" in r.getMessage()]) == 1  # once per hour


def test_the_circuit_breaker_caps_newly_served_addresses_per_minute(caplog: pytest.LogCaptureFixture) -> None:
    site = make_site(HEPSUB_DETECT_MAX_NEW_SERVED="2")
    attackers = ["5.6.7.10", "5.6.7.11", "5.6.7.12"]
    with caplog.at_level(logging.WARNING):
        for ip in attackers:
            for extension in range(20):
                site.request(ip, "OPTIONS", str(extension), ua="Linphone", proto=TCP)
    actions = [site.detected(ip)["action"] for ip in attackers]  # type: ignore[index]
    assert actions == ["serve", "serve", "flag"]
    assert site.book.stats.breaker_trips == 1
    assert "circuit breaker" in site.detected(attackers[2])["not_served_because"]  # type: ignore[index,operator]
    assert any("circuit breaker open" in r.getMessage() for r in caplog.records)
    site.clock.now += 61  # the next finding for it, a minute later, is served
    for extension in range(20, 40):
        site.request(attackers[2], "OPTIONS", str(extension), ua="Linphone", proto=TCP)
    assert site.detected(attackers[2])["action"] == "serve"  # type: ignore[index]


def test_one_log_line_per_address_and_rule_per_hour(caplog: pytest.LogCaptureFixture) -> None:
    site = make_site()
    with caplog.at_level(logging.WARNING):
        for _ in range(30):
            site.request(ATTACKER, ua="friendly-scanner")
        site.clock.now += 3600
        for _ in range(3):
            site.request(ATTACKER, ua="friendly-scanner")
    lines = [
        r.getMessage() for r in caplog.records if r.getMessage().startswith("Detected 5.6.7.8: scanner-ua")
    ]
    assert len(lines) == 2


def test_tracked_addresses_are_bounded_and_an_active_detection_outlives_eviction() -> None:
    settings = dataclasses.replace(DetectSettings(), max_tracked=100)
    clock = Clock()
    book = Detections(settings, lambda _now: 1, clock=clock)
    detector = Detector(settings, book.report)
    site = Site(detector, book, clock, itertools.count(), itertools.count(1))
    for _ in range(3):
        site.request(ATTACKER, ua="friendly-scanner")
    for n in range(1000):
        site.request(f"7.0.{n // 250}.{n % 250}", ua="Linphone")
    assert detector.tracked() == 100
    assert detector.stats.tracked_evicted >= 900
    assert site.detected() is not None


def test_idle_counters_are_forgotten_after_five_minutes() -> None:
    site = make_site()
    for _ in range(2):
        site.request(ATTACKER, ua="friendly-scanner")
    site.clock.now += 301
    site.detector.forget_idle(site.clock.now)
    assert site.detector.tracked() == 0


def test_the_book_comes_back_after_a_restart_with_its_remaining_time(tmp_path: Path) -> None:
    site = make_site()
    for extension in range(25):
        site.exchange(ATTACKER, "REGISTER", str(extension), 404, ua="friendly-scanner")
    register_with_credentials(site, OFFICE, "1000", 200)
    before = site.detected()
    assert before is not None
    path = tmp_path / "detections.json"
    site.book.save(path, site.detector.authenticated())
    later = Clock()
    later.now = site.clock.now + 600
    restored = Detections(site.book._settings, lambda _now: 1, clock=later)
    authenticated = restored.load(path)
    assert [ip for ip, _ in authenticated] == [OFFICE]
    after = restored.get(ATTACKER)
    assert after is not None
    assert after.to_json() == before
    # The repeat history came back too: the next detection after this one lasts 4 x longer.
    later.now = after.until + 1
    restored.expire()
    assert restored.get(ATTACKER) is None
    detector = Detector(restored._settings, restored.report)
    resumed = Site(detector, restored, later, itertools.count(), itertools.count(1))
    for _ in range(3):
        resumed.request(ATTACKER, ua="friendly-scanner")
    again = restored.get(ATTACKER)
    assert again is not None
    assert again.until - again.since == 4 * 3600


@pytest.mark.parametrize(
    "content",
    [
        b"",
        b"[]",
        b'{"format": "hepsub-apiban/detections", "version": 1, "active": [{"ip": "5.6.7.8\\u0000"}]}',
    ],
)
def test_a_damaged_book_is_ignored_with_a_warning(
    tmp_path: Path, content: bytes, caplog: pytest.LogCaptureFixture
) -> None:
    path = tmp_path / "detections.json"
    path.write_bytes(content)
    book = Detections(DetectSettings(), lambda _now: 1, clock=Clock())
    with caplog.at_level(logging.WARNING):
        assert book.load(path) == []
    assert len(book) == 0
    assert any("Detections not restored" in r.getMessage() for r in caplog.records)


def test_default_rules_are_the_documented_numbers() -> None:
    assert DEFAULT_RULES["scanner_ua"] == RuleSettings("serve", False, 3600, 3, 60)
    assert DEFAULT_RULES["auth_failure"].threshold == 6  # "> 5 in 10 s"
    assert DEFAULT_RULES["request_flood"].action == "flag"
    assert (
        load_settings(None, {"HEPSUB_DETECT_AUTH_FAILURE_ACTION": "flag"}).detect.rules["auth_failure"].action
        == "flag"
    )


def test_a_served_detection_extended_by_ten_minutes_gets_a_new_id() -> None:
    site = make_site()
    for extension in range(25):
        site.exchange(ATTACKER, "REGISTER", str(extension), 404, ua="friendly-scanner")
    first = site.book.get(ATTACKER)
    assert first is not None
    serial, until = first.serial, first.until
    site.clock.now += 300  # the scan goes on: extended by 5 minutes, same ID
    for extension in range(25, 30):
        site.exchange(ATTACKER, "REGISTER", str(extension), 404, ua="friendly-scanner")
    assert (first.serial, first.until) == (serial, until + 300)
    site.clock.now += 300  # 10 minutes past the end clients were told: handed out again
    for extension in range(30, 35):
        site.exchange(ATTACKER, "REGISTER", str(extension), 404, ua="friendly-scanner")
    assert first.serial is not None
    assert serial is not None
    assert first.serial > serial
    assert first.until == until + 600


def test_svcrack_guesses_share_call_id_and_cseq_and_each_counts() -> None:
    site = make_site()
    call_id = site.request(ATTACKER, "REGISTER", "1000", ua="Linphone")
    site.reply(ATTACKER, 401, "REGISTER", call_id, nonce="kamailio-nonce")
    for guess in range(6):  # svcrack: the same Call-ID and "CSeq: 2 REGISTER", a new branch per guess
        branch = f"z9hG4bK-guess-{guess}"
        for _ in range(2):  # each guess retransmitted once: still one guess
            site.request(
                ATTACKER,
                "REGISTER",
                "1000",
                ua="Linphone",
                call_id=call_id,
                cseq=2,
                nonce="kamailio-nonce",
                branch=branch,
            )
        site.reply(ATTACKER, 401, "REGISTER", call_id, cseq=2, nonce="kamailio-nonce", branch=branch)
    detection = site.detected()
    assert detection is not None
    assert detection["rules"] == ["auth-failure"]
    assert detection["served_because"] == "sent credentials computed on our challenge"
    assert site.detector.stats.retransmissions == 6
