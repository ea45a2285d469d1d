"""IP parsing once, canonical forms, non-routable detection and the allow-list."""

from __future__ import annotations

import ipaddress

import pytest
from hypothesis import given
from hypothesis import strategies as st

from hepsub_apiban.addresses import AllowList, canonical, is_non_routable, parse_ip


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
    allow = AllowList(
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
    assert (address in AllowList(nets)) == any(address in net for net in nets)
