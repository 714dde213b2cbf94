"""The address rules on their own: IPv4 spellings as inet_aton reads them, IPv4 inside IPv6, internal blocks."""

from __future__ import annotations

from ipaddress import IPv4Address, IPv6Address, ip_address, ip_network

import pytest
from hypothesis import given
from hypothesis import strategies as st

from bastion.net.addresses import embedded_ipv4, ipv4_literal, refusal


@pytest.mark.parametrize(
    ("name", "address"),
    [
        ("127.0.0.1", "127.0.0.1"),
        ("127.1", "127.0.0.1"),
        ("127.0.1", "127.0.0.1"),
        ("2130706433", "127.0.0.1"),
        ("0x7f000001", "127.0.0.1"),
        ("0X7F.0X1", "127.0.0.1"),
        ("0177.0.0.1", "127.0.0.1"),
        ("017700000001", "127.0.0.1"),
        ("0x", "0.0.0.0"),  # noqa: S104  an expected value, nothing binds
        ("0", "0.0.0.0"),  # noqa: S104  an expected value, nothing binds
        ("10.0x10000", "10.1.0.0"),
        ("192.168.0x1.01", "192.168.1.1"),
    ],
)
def test_every_inet_aton_spelling_reads_as_its_address(name: str, address: str) -> None:
    assert ipv4_literal(name) == IPv4Address(address)


@pytest.mark.parametrize("name", ["example.com", "1.2.3.4a", "0x.example", "mcp", "xn--bcher-kva.example"])
def test_names_are_not_addresses(name: str) -> None:
    assert ipv4_literal(name) is None


@pytest.mark.parametrize(
    "name", ["1.2.3.4.5", "256.0.0.1", "1.2.3.256", "08.0.0.1", "0xg.1", "example.123", "1.0x100.1"]
)
def test_a_number_that_is_no_valid_address_is_an_error_not_a_name(name: str) -> None:
    with pytest.raises(ValueError, match="not a valid IPv4 address"):
        ipv4_literal(name)


@given(st.integers(0, 2**32 - 1))
def test_dotted_decimal_agrees_with_ipaddress(value: int) -> None:
    address = IPv4Address(value)
    assert ipv4_literal(str(address)) == address
    assert ipv4_literal(str(value)) == address


@pytest.mark.parametrize(
    ("v6", "v4"),
    [
        ("::ffff:10.0.0.1", "10.0.0.1"),
        ("::ffff:0:10.0.0.1", "10.0.0.1"),
        ("::10.0.0.1", "10.0.0.1"),
        ("64:ff9b::10.0.0.1", "10.0.0.1"),
        ("2002:a00:1::", "10.0.0.1"),
    ],
)
def test_ipv4_inside_ipv6_is_found_in_every_form(v6: str, v4: str) -> None:
    assert embedded_ipv4(IPv6Address(v6)) == IPv4Address(v4)


@pytest.mark.parametrize("v6", ["::", "::1", "2606:4700::1", "fd00::1", "64:ff9b:1::a00:1"])
def test_other_ipv6_addresses_carry_no_ipv4(v6: str) -> None:
    assert embedded_ipv4(IPv6Address(v6)) is None


def test_loopback_is_the_one_rule_the_opt_in_lifts_and_allowed_networks_trump_the_rest() -> None:
    loopback, private = ip_address("127.0.0.1"), ip_address("10.0.0.1")
    assert refusal(loopback, allow_loopback=False, allowed=()) is not None
    assert refusal(loopback, allow_loopback=True, allowed=()) is None
    assert refusal(private, allow_loopback=True, allowed=()) == ("private", "a private address")
    assert refusal(private, allow_loopback=False, allowed=[ip_network("10.0.0.0/8")]) is None
    assert refusal(ip_address("8.8.8.8"), allow_loopback=False, allowed=()) is None
