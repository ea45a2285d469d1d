"""``parse_sip`` (one compiled pattern reads every field) returns exactly what ``parse_sip_general``
(every line split and walked in Python, the reference) returns.

On the HEP fixtures and every truncation of them, on the SIP messages the other tests and the
ingest bench build, on every pair of awkward header lines in both orders (a capture the pattern
abandoned must not show through a later one), and on varied messages hypothesis builds (compact
forms, odd case and spacing, duplicates, folding, mixed line ends, truncation, junk):
``SIP_EXAMPLES=20000`` runs more of those than the 300 of an ordinary run.
"""

from __future__ import annotations

import os
import re
import sys
from pathlib import Path

import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from hepsub_apiban.formats.hep import HepPacket, decode
from hepsub_apiban.formats.sip import parse_sip
from hepsub_apiban.formats.sip_reference import _USER, parse_sip_general

from .test_collector import sip_packet
from .test_detection import make_site
from .test_sip import FIXTURES
from .test_workers import registers

BENCH = Path(__file__).resolve().parents[1] / "bench"
EXAMPLES = int(os.environ.get("SIP_EXAMPLES", "300"))


def assert_same(payload: bytes) -> None:
    assert parse_sip(payload) == parse_sip_general(payload), payload


def hep_payload(datagram: bytes) -> bytes:
    packet = decode(datagram, 0.0)
    assert isinstance(packet, HepPacket)
    return packet.payload


@pytest.mark.parametrize(
    "name",
    [
        "heplify-server-decoder-test-hep3.hex",
        "heplify-server-decoder-test-hepv1.hex",
        "spec-rev37-example.hex",
    ],
)
def test_hep_fixtures(name: str) -> None:
    path = FIXTURES / name
    payload = hep_payload(bytes.fromhex(path.read_text()))
    assert parse_sip(payload) is not None
    assert_same(payload)
    for cut in range(len(payload) + 1):  # every truncation a capture can produce
        assert_same(payload[:cut])


def test_messages_the_other_tests_build() -> None:
    payloads = [hep_payload(datagram) for datagram in registers(0, 50)]
    for method in ("REGISTER", "INVITE", "OPTIONS"):
        for src in ("45.33.2.1", "2001:db8::7"):
            payloads.append(sip_packet(src, method=method, ua="sipvicious", call_id="c-1").payload)
    site = make_site()
    texts: list[str] = []
    site._feed = lambda src, dst, text, proto, at: texts.append(text)  # type: ignore[method-assign]
    site.request("45.33.2.1", "REGISTER", "1000", nonce="abc")
    site.request("45.33.2.1", "INVITE", "100", ua="friendly-scanner")
    site.reply("45.33.2.1", 401, "REGISTER", "call-9", nonce="Zq1")
    site.reply("45.33.2.1", 200, "INVITE", "call-9")
    payloads += [text.encode() for text in texts]
    assert len(texts) == 4
    for payload in payloads:
        assert parse_sip(payload) is not None
        assert_same(payload)


def test_registrar_traffic_of_the_ingest_bench() -> None:
    sys.path.insert(0, str(BENCH))
    try:
        from ingest import site_traffic
    finally:
        sys.path.remove(str(BENCH))
    phones = [f"45.1.{n // 250}.{n % 250 + 1}" for n in range(40)]
    packets = site_traffic(phones, ["185.2.0.1", "185.2.0.2"])
    assert len(packets) > 400
    for datagram in packets:
        assert_same(hep_payload(datagram))


# Lines on which a sub-pattern starts and then fails (no user before the ">", a quote never
# closed, a CSeq with a third word, a parameter without a value, ...), beside lines that fill the
# same fields. The regex engine keeps a group set on an abandoned path once a higher-numbered
# group is set, so each pair is tried in both orders.
AWKWARD = [
    "From: <sip:192.168.1.1:5060>;tag=x",
    'From: "unclosed <sip:a@b>',
    "From: Bob",
    'f: "A" <sip:a@b>;tag=1',
    "From: Carol <tel:+4930>",
    "To: <sip:host:5060;transport=udp>",
    "To: tel:",
    "t: <sip:b@c>",
    "CSeq: 1 INVITE2",
    "CSeq: 12345678901 INVITE",
    "CSeq: 1a INVITE",
    "CSeq: 2 REGISTER",
    "Via: SIP/2.0/UDP h;received=;rport=;branch=",
    "Via: SIP/2.0/UDP h;received=1.1.1.1;received= ;rport=5;rport",
    "v: SIP/2.0/UDP h;branch=a;branch=b;rport=70000",
    "Via: SIP/2.0/UDP 1.2.3.4;branch=z;rport=1;received=3.3.3.3",
    "Via: SIP/2.0/UDP h, SIP/2.0/UDP g;received=2.2.2.2",
    "Call-ID:   ",
    "i: c1",
    "User-Agent:",
    "User-Agent: ua 1.0 ",
    "Authorization: Digest nonce=",
    'Authorization: Digest username="a", nonce="n1"',
    'WWW-Authenticate: Digest nonce=""',
    "Proxy-Authenticate: Digest nonce=p",
    "Proxy-Authorization: nonce=q",
    "Contact: <sip:c@d>",
]


@pytest.mark.parametrize("start", ["REGISTER sip:r@x SIP/2.0", "SIP/2.0 401 Unauthorized"])
def test_every_pair_of_awkward_lines(start: str) -> None:
    for first in AWKWARD:
        for second in AWKWARD:
            assert_same(f"{start}\r\n{first}\r\n{second}\r\n\r\n".encode())
    whole = "\r\n".join(AWKWARD)
    assert_same(f"{start}\r\n{whole}\r\n\r\n".encode())
    assert_same(f"{start}\r\n{chr(10).join(reversed(AWKWARD))}\n\n".encode())


# ------------------------------------------------------------------ built by hypothesis

# How the URI user was found until it was made linear: the leftmost match of this search.
SEARCHED_USER = re.compile(rb"sips?:([^@;>\s]+)@|tel:([^;>\s]+)", re.IGNORECASE)
URI_PIECES = [b"sip:", b"sips:", b"SIP:", b"sIpS:", b"tel:", b"TEL:", b"@", b";", b">", b"<", b" ", b"\t"]
URI_PIECES += [b"\r", b"\x0b", b"a", b"1", b"s", b"S", b"t", b"ip", b"el", b":", b'"', b"\xff"]


@settings(max_examples=EXAMPLES, deadline=None)
@given(st.lists(st.sampled_from(URI_PIECES), max_size=40).map(b"".join))
@example(b"sip:sip:tel:x")
@example(b"<sip:1.2.3.4:5060>;tag=tel:9@x")
@example(b"sips:a sip:b@c")
def test_user_found_in_linear_time_is_the_one_the_search_found(value: bytes) -> None:
    found, searched = _USER.match(value), SEARCHED_USER.search(value)
    assert (found and found.groups()) == (searched and searched.groups()), value


NAMES = [
    "Via", "via", "VIA", "v", "V", "vIa", "Vias", "v ia", "From", "FROM", "f", "F", "Fromage", "To", "to",
    "t", "T", "Tox", "Call-ID", "call-id", "CALL-ID", "i", "I", "Call-Info", "CSeq", "cseq", "CSEQ",
    "User-Agent", "user-agent", "USER-AGENT", "Authorization", "authorization", "Proxy-Authorization",
    "proxy-authorization", "WWW-Authenticate", "www-authenticate", "Proxy-Authenticate",
    "Contact", "m", "Content-Length", "l", "Max-Forwards", "Server", "Allow", "a", "p", "u", "c", "w",
]  # fmt: skip
SEPARATORS = [":", ": ", " :", ":  ", "\t:", "\x0b:", "\r:", "\x0c :", " ", "", "::"]
VALUES = [
    "SIP/2.0/UDP 10.0.0.9:5060;branch=z9hG4bK1;rport=61000;received=203.0.113.99",
    "SIP/2.0/UDP 1.2.3.4;branch=z9hG4bK-a, SIP/2.0/TCP 5.6.7.8:5062;rport=40000;received=9.9.9.9",
    "SIP/2.0/UDP 1.2.3.4 ; BRANCH = z9hG4bKx ; Received=4.4.4.4;RPORT=70000",
    "SIP/2.0/UDP 1.2.3.4;rport",
    '"sipvicious" <sip:100@198.51.100.1>;tag=x',
    "Alice <sips:alice@example.com>",
    "<tel:+4930123;phone-context=x>",
    "<sip:192.168.1.1:5060>",
    "sip:bob@host",
    "1 REGISTER",
    "99999999999 OPTIONS",
    "7 register",
    "12 INVITE extra",
    "abc INVITE",
    'Digest username="1000", realm="x", nonce="Zq1+/ab", response="f"',
    "Digest realm=x, NONCE = abc123,algorithm=MD5",
    "friendly-scanner",
    "scan-1@host",
    "",
    "  spaced  ",
    "a" * 250,
    "caf\u00e9 \u00fc",
]
START_LINES = [
    "REGISTER sip:198.51.100.1 SIP/2.0",
    "INVITE sip:100@198.51.100.1;user=phone SIP/2.0",
    "OPTIONS tel:+123 SIP/2.0",
    "INVITE sip:bob",
    "BYE",
    "invite sip:a@b SIP/2.0",
    "SIP/2.0 200 OK",
    "SIP/2.0 401 Unauthorized",
    "sip/2.0 407 Proxy Authentication Required",
    "SIP/2.0 20 OK",
    "SIP/2.0 abc",
    "  SIP/2.0  100 Trying",
    "HTTP/1.1 200 OK",
    "GET / HTTP/1.1",
    "",
]
VIA = tuple(VALUES[:4])
URI = tuple(VALUES[4:9])
DIGEST = tuple(VALUES[14:16])
CSEQ = (*VALUES[9:14], "2 INVITE", "314159 ACK", "1\tBYE")
AUTH = ("authorization", "proxy-authorization", "www-authenticate", "proxy-authenticate")
TYPED = {  # values that fit the header (lower-cased name), so most drawn messages carry fields
    **dict.fromkeys(["via", "v"], VIA),
    **dict.fromkeys(["from", "f", "to", "t"], URI),
    "cseq": CSEQ,
    **dict.fromkeys(AUTH, DIGEST),
    **dict.fromkeys(["call-id", "i", "user-agent"], tuple(VALUES[16:18])),
}
LINE_ENDS = ["\r\n", "\r\n", "\r\n", "\n", "\r", "\r\r\n", "\n\r\n"]


@st.composite
def headers(draw: st.DrawFn) -> str:
    name = draw(st.sampled_from(NAMES) | st.text("aAvViIfFtT-: \t", max_size=6))
    typed = TYPED.get(name.lower())
    if typed and draw(st.booleans()):
        line = name + draw(st.sampled_from(SEPARATORS[:4])) + draw(st.sampled_from(typed))
    else:
        value = draw(st.sampled_from(VALUES) | st.text(max_size=30))
        line = name + draw(st.sampled_from(SEPARATORS)) + value
    for _ in range(draw(st.integers(0, 2))):  # folded continuation lines
        line += draw(st.sampled_from(LINE_ENDS)) + draw(st.sampled_from([" ", "\t", "  "]))
        line += draw(st.sampled_from(VALUES) | st.text(max_size=10))
    return line


@st.composite
def sip_messages(draw: st.DrawFn) -> bytes:
    text = draw(st.sampled_from(START_LINES) if draw(st.integers(0, 4)) else st.text(max_size=20))
    for header in draw(st.lists(headers(), max_size=12)):
        text += draw(st.sampled_from(LINE_ENDS)) + header
    text += draw(st.sampled_from(["\r\n\r\n", "\n\n", "\r\n", "", "\r\n\n"]))
    text += draw(st.sampled_from(["", "v=0\r\nVia: SIP/2.0/UDP 6.6.6.6;branch=body\r\nFrom: <sip:body@x>"]))
    payload = text.encode("utf-8", "surrogatepass")
    if not draw(st.integers(0, 3)):
        payload = payload[: draw(st.integers(0, len(payload)))]
    if not draw(st.integers(0, 3)):
        at = draw(st.integers(0, len(payload)))
        payload = payload[:at] + draw(st.binary(max_size=8)) + payload[at:]
    return payload


@settings(max_examples=EXAMPLES, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.one_of(sip_messages(), sip_messages(), sip_messages(), st.binary(max_size=300)))
@example(b"REGISTER sip:x SIP/2.0\r\nVia: a;branch=1;rport=1\r\nv: b;received=2.2.2.2;rport=2\r\n\r\n")
@example(b"INVITE sip:a SIP/2.0\nv ia: SIP/2.0/UDP 1.2.3.4;branch=x\n")
@example(b"SIP/2.0 200 OK\r\nVia: a;branch=1\r\nv: b;received=2.2.2.2\r\n \r\nCSeq: 1 X\r\n\n")
@example(
    b"REGISTER sip:x SIP/2.0\r\ni\r: c1\r\nCall-ID: c2\r\n"
    b"Proxy-Authorization: nonce=p\r\nAuthorization: x\r\n"
)
def test_fast_equals_general(payload: bytes) -> None:
    assert_same(payload)
    assert_same(b"INVITE sip:a SIP/2.0\r\n" + payload)
