"""SIP field extraction from captured payloads, including the shapes scanners and senders produce."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from hepsub_apiban.formats.sip import MAX_FIELD, SipInfo, parse_sip

from . import HEP_FIXTURES

FIXTURES = HEP_FIXTURES


def fixture_payload(name: str, offset: int) -> bytes:
    path = FIXTURES / name
    return bytes.fromhex(path.read_text())[offset:]


def test_heplify_hep3_fixture_response() -> None:
    info = parse_sip(fixture_payload("heplify-server-decoder-test-hep3.hex", 105))
    assert info == SipInfo(
        method="OPTIONS",
        status=200,
        call_id="BC099884@6dfcffe8",
        from_user=None,
        to_user=None,
        user_agent=None,
        cseq=215834489,
        branch="z9hG4bK+21f113e7e3d04c846148a9ad7607aefa1+6dfcffe8+1",
    )


def test_heplify_v1_fixture_rport_and_user_agent() -> None:
    info = parse_sip(fixture_payload("heplify-server-decoder-test-hepv1.hex", 16))
    assert info is not None
    assert (info.status, info.method, info.user_agent, info.via_rport) == (
        200,
        "OPTIONS",
        "SpeedTouch 780",
        5060,
    )
    assert info.call_id == "c707ab22-6e16-11ec-bc82-2725289e8dc3_80f4955c-5cc17bbb-13c4-dd998-2104df6e-dd998"
    assert info.from_user == "mod_sofia"


def test_truncated_request_still_names_its_method() -> None:
    assert parse_sip(fixture_payload("spec-rev37-example.hex", 99)) == SipInfo(method="INVITE")


def test_scanner_register_with_compact_headers_and_bottom_via() -> None:
    payload = (
        b"REGISTER sip:198.51.100.1 SIP/2.0\n"
        b"v: SIP/2.0/UDP 10.0.0.9:5060;branch=z9hG4bK1;rport=61000;received=203.0.113.99\r\n"
        b"Via: SIP/2.0/UDP 172.16.0.1:5060;branch=z9hG4bK2, SIP/2.0/UDP 192.168.1.2:5062;rport=40000;\r\n"
        b" received=1.2.3.4\r\n"
        b'f: "100" <sip:100@198.51.100.1>;tag=x\r\n'
        b"t: <tel:+4930123>\r\n"
        b"i: scan-1\r\nCSeq: 1 REGISTER\r\nUser-Agent: friendly-scanner\r\n\r\nbody: ignored\r\n"
    )
    assert parse_sip(payload) == SipInfo(
        method="REGISTER",
        call_id="scan-1",
        from_user="100",
        to_user="+4930123",
        user_agent="friendly-scanner",
        via_received="1.2.3.4",
        via_rport=40000,
        cseq=1,
        from_name="100",
        branch="z9hG4bK1",  # the top Via (compact "v"), where the bottom one gave received/rport
    )


def test_response_takes_its_method_from_cseq() -> None:
    info = parse_sip(b"SIP/2.0 401 Unauthorized\r\nCSeq: 7 register\r\nCall-ID: a\r\n\r\n")
    assert info == SipInfo(method="REGISTER", status=401, call_id="a", cseq=7)
    assert not info.is_request


def test_host_only_uri_has_no_user_and_long_fields_are_capped() -> None:
    info = parse_sip(
        b"OPTIONS sip:x SIP/2.0\r\nFrom: <sip:192.168.1.1:5060>\r\nUser-Agent: " + b"A" * 5000 + b"\r\n"
    )
    assert info is not None
    assert info.from_user is None
    assert info.user_agent == "A" * MAX_FIELD


@pytest.mark.parametrize("payload", [b"", b"\x00\x01\x02", b"hello world", b'{"json": 1}', b"SIP/2.0"])
def test_not_sip(payload: bytes) -> None:
    assert parse_sip(payload) is None


@given(st.binary(max_size=400))
def test_never_raises(payload: bytes) -> None:
    parse_sip(payload)
    parse_sip(b"INVITE sip:a SIP/2.0\r\n" + payload)


def test_credentials_and_their_nonce_and_the_challenge_nonce() -> None:
    request = parse_sip(
        b"REGISTER sip:1000@198.51.100.1 SIP/2.0\r\n"
        b'From: "sipvicious" <sip:1000@198.51.100.1>;tag=1\r\n'
        b"CSeq: 12 REGISTER\r\n"
        b'Proxy-Authorization: Digest username="1000", realm="x", nonce="Zq1+/ab", response="f"\r\n\r\n'
    )
    assert request is not None
    assert (request.request_user, request.from_name, request.credentials, request.nonce) == (
        "1000",
        "sipvicious",
        True,
        "Zq1+/ab",
    )
    challenge = parse_sip(
        b"SIP/2.0 401 Unauthorized\r\nCSeq: 12 REGISTER\r\n"
        b'WWW-Authenticate: Digest realm="x", nonce="Zq1+/ab", algorithm=MD5\r\n\r\n'
    )
    assert challenge is not None
    assert (challenge.credentials, challenge.nonce, challenge.request_user) == (False, "Zq1+/ab", None)
    plain = parse_sip(
        b"OPTIONS sip:100@x SIP/2.0\r\nFrom: <sip:sipsak@x>\r\nCSeq: 99999999999 OPTIONS\r\n\r\n"
    )
    assert plain is not None
    assert (plain.credentials, plain.nonce, plain.from_name, plain.cseq) == (False, None, None, None)


def test_folded_lines_join_into_the_value_they_continue() -> None:
    # The bottom Via is the last Via value; each fold joins its own value, a header met again
    # starts a new one, another header's folds in between change nothing.
    payload = (
        b"INVITE sip:100@pbx SIP/2.0\r\n"
        b"Via: SIP/2.0/UDP 10.0.0.1\r\n"
        b"  ;branch=z9hG4bKtop\r\n"
        b"From: <sip:200@pbx>\r\n"
        b"\t;tag=1\r\n"
        b"Via: SIP/2.0/UDP 10.0.0.2\r\n"
        b" ;received=198.51.100.7\r\n"
        b"\t;rport=5070\r\n"
        b"User-Agent: folded\r\n"
        b" phone 1.0\r\n"
        b"\r\n"
    )
    info = parse_sip(payload)
    assert info is not None
    assert (info.branch, info.via_received, info.via_rport) == ("z9hG4bKtop", "198.51.100.7", 5070)
    assert (info.from_user, info.user_agent) == ("200", "folded phone 1.0")


def test_a_long_run_of_folds_keeps_every_part() -> None:
    # 5,000 folds, then the parameter the agent reads: found only if every part was joined.
    folds = b"".join(b" ;p%d=v\r\n" % n for n in range(5000))
    payload = b"OPTIONS sip:x@y SIP/2.0\r\nVia: SIP/2.0/UDP 10.0.0.3\r\n" + folds + b" ;rport=5099\r\n\r\n"
    info = parse_sip(payload)
    assert info is not None
    assert info.via_rport == 5099
