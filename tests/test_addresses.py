"""IP parsing once, canonical forms, non-routable detection and the allow-list."""

from __future__ import annotations

import ipaddress

import pytest
from hypothesis import given
from hypothesis import strategies as st

from hepsub_apiban.core.addresses import NetworkSet, canonical, is_non_routable, parse_ip


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("1.2.3.4", "1.2.3.4"),
        (" 1.2.3.4 ", "1.2.3.4"),
        ("2A01:04F8:0000::0005", "2a01:4f8::5"),
        ("[2a01:4f8::5]", "2a01:4f8::5"),
        ("::ffff:1.2.3.4", "1.2.3.4"),
        ("1.2.3.256", None),
        ("example.com", None),
        ("", None),
        ("fe80::1%eth0", None),
        (12345, None),
        (None, None),
    ],
)
def test_canonical(text: object, expected: str | None) -> None:
    assert canonical(text) == expected


@pytest.mark.parametrize(
    ("text", "local"),
    [
        ("10.1.2.3", True),
        ("192.168.1.10", True),
        ("127.0.0.1", True),
        ("169.254.1.1", True),
        ("100.64.0.1", True),
        ("224.0.0.5", True),
        ("240.0.0.1", True),
        ("0.0.0.0", True),
        ("203.0.113.7", True),
        ("::1", True),
        ("fe80::1", True),
        ("fc00::1", True),
        ("1.2.3.4", False),
        ("8.8.8.8", False),
        ("2a01:4f8::5", False),
    ],
)
def test_non_routable(text: str, local: bool) -> None:
    address = parse_ip(text)
    assert address is not None
    assert is_non_routable(address) is local


def test_allow_list_merges_ranges_per_family() -> None:
    allow = NetworkSet(
        [ipaddress.ip_network(n) for n in ("1.2.3.0/24", "1.2.4.0/24", "5.5.5.5/32", "2a01:4f8::/32")]
    )
    for inside in ("1.2.3.0", "1.2.4.255", "5.5.5.5", "2a01:4f8:ffff::1"):
        assert parse_ip(inside) in allow
    for outside in ("1.2.2.255", "1.2.5.0", "5.5.5.4", "2a01:4f9::1", "::1.2.3.4"):
        assert parse_ip(outside) not in allow


@given(
    networks=st.lists(st.tuples(st.integers(0, 2**32 - 1), st.integers(8, 32)), max_size=20),
    probe=st.integers(0, 2**32 - 1),
)
def test_allow_list_agrees_with_ipaddress(networks: list[tuple[int, int]], probe: int) -> None:
    nets = [ipaddress.IPv4Network((addr, prefix), strict=False) for addr, prefix in networks]
    address = ipaddress.IPv4Address(probe)
    parsed = parse_ip(str(address))
    assert parsed is not None
    assert (parsed in NetworkSet(nets)) == any(address in net for net in nets)


def python_says_non_routable(address: ipaddress.IPv4Address | ipaddress.IPv6Address) -> bool:
    return not address.is_global or address.is_multicast or address.is_reserved


# 192.0.0.0/24 is taken whole on purpose (Python 3.11 patch releases disagree inside it), and
# deprecated IPv6 site-local fec0::/10 (RFC 3879) is not routable although Python calls it global.
DEVIATIONS = [ipaddress.ip_network("192.0.0.0/24"), ipaddress.ip_network("fec0::/10")]
V6_PREFIXES = [
    0xFEC0 << 112,
    0x2002 << 112,
    0x64FF9B << 104,
    0x2001 << 112,
    0x2001_0DB8 << 96,
    0x2A01 << 112,
    0xFE80 << 112,
    0xFC00 << 112,
    0xFF02 << 112,
    0,
]


@given(value=st.integers(0, 2**32 - 1))
def test_ipv4_table_agrees_with_python(value: int) -> None:
    address = ipaddress.IPv4Address(value)
    if any(address in net for net in DEVIATIONS):
        return
    parsed = parse_ip(str(address))
    assert parsed is not None
    assert is_non_routable(parsed) is python_says_non_routable(address)


@given(prefix=st.sampled_from(V6_PREFIXES), low=st.integers(0, 2**100), anywhere=st.integers(0, 2**128 - 1))
def test_ipv6_table_agrees_with_python(prefix: int, low: int, anywhere: int) -> None:
    for value in (prefix | low, anywhere):
        address = ipaddress.IPv6Address(value)
        if address.ipv4_mapped is not None or any(address in net for net in DEVIATIONS):
            continue
        parsed = parse_ip(str(address))
        assert parsed is not None
        assert is_non_routable(parsed) is python_says_non_routable(address), address


@given(value=st.integers(0, 2**32 - 1))
def test_fast_ipv4_parse_matches_ipaddress(value: int) -> None:
    text = str(ipaddress.IPv4Address(value))
    assert parse_ip(text) == (text, 4, value)
    assert parse_ip(f"::ffff:{text}") == (text, 4, value)
