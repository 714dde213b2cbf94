"""IP addresses for the outbound policy: every spelling of an IPv4 host, and which addresses are internal.

Pure functions, no I/O: ``bastion.net.outbound`` applies them to URLs and to what names resolve to.
"""

from __future__ import annotations

from collections.abc import Iterable
from ipaddress import IPv4Address, IPv4Network, IPv6Address, IPv6Network, ip_network
from typing import Final

IPAddress = IPv4Address | IPv6Address
IPNetwork = IPv4Network | IPv6Network

LOOPBACK: Final = "loopback"

# Special-purpose blocks (IANA registries) as (network, rule, what it is). Checked before the ``ipaddress`` flags,
# which differ between Python patch releases. Loopback is the one rule ``allow_loopback`` lifts.
_SPECIAL: Final[tuple[tuple[IPNetwork, str, str], ...]] = tuple(
    (ip_network(cidr), rule, what)
    for cidr, rule, what in (
        ("0.0.0.0/8", "unspecified", "the unspecified 'this network' block"),
        ("10.0.0.0/8", "private", "a private address"),
        ("100.64.0.0/10", "shared", "a shared (CGNAT) address"),
        ("127.0.0.0/8", "loopback", "a loopback address"),
        ("169.254.0.0/16", "link-local", "a link-local address (where cloud metadata services live)"),
        ("172.16.0.0/12", "private", "a private address"),
        ("192.0.0.0/24", "special", "an IETF protocol assignment"),
        ("192.0.2.0/24", "documentation", "a documentation address"),
        ("192.88.99.0/24", "special", "a 6to4 relay address"),
        ("192.168.0.0/16", "private", "a private address"),
        ("198.18.0.0/15", "special", "a benchmarking address"),
        ("198.51.100.0/24", "documentation", "a documentation address"),
        ("203.0.113.0/24", "documentation", "a documentation address"),
        ("224.0.0.0/4", "multicast", "a multicast address"),
        ("240.0.0.0/4", "reserved", "a reserved address"),
        ("::/128", "unspecified", "the unspecified address"),
        ("::1/128", "loopback", "a loopback address"),
        ("64:ff9b:1::/48", "special", "a local-use NAT64 address"),
        ("100::/64", "special", "a discard-only address"),
        ("2001::/23", "special", "an IETF protocol assignment (such as Teredo)"),
        ("2001:db8::/32", "documentation", "a documentation address"),
        ("3fff::/20", "documentation", "a documentation address"),
        ("5f00::/16", "special", "a segment-routing address"),
        ("fc00::/7", "unique-local", "a unique-local (private) address"),
        ("fe80::/10", "link-local", "a link-local address"),
        ("fec0::/10", "site-local", "a site-local address"),
        ("ff00::/8", "multicast", "a multicast address"),
    )
)
# IPv6 forms that carry an IPv4 address in their last 32 bits (6to4, bits 16-48, is read by ipaddress itself).
_MAPPED: Final = ip_network("::ffff:0:0/96")
_TRANSLATED: Final = ip_network("::ffff:0:0:0/96")
_COMPATIBLE: Final = ip_network("::/96")
_NAT64: Final = ip_network("64:ff9b::/96")
_HEX_DIGITS: Final = frozenset("0123456789abcdef")


def refusal(address: IPAddress, *, allow_loopback: bool, allowed: Iterable[IPNetwork]) -> tuple[str, str] | None:
    """(rule, what the address is) when ``address`` is refused, None when it is allowed.

    Args:
        allow_loopback: loopback addresses are allowed (tests and development).
        allowed: networks an admin trusts; an address in one is allowed whatever it is.
    """
    allowed = tuple(allowed)
    if any(address in network for network in allowed if network.version == address.version):
        return None
    if isinstance(address, IPv6Address):
        embedded = embedded_ipv4(address)
        if embedded is not None:
            inner = refusal(embedded, allow_loopback=allow_loopback, allowed=allowed)
            return None if inner is None else (inner[0], f"{inner[1]} ({embedded}) inside an IPv6 address")
    for network, rule, what in _SPECIAL:
        if address.version == network.version and address in network:
            return None if rule == LOOPBACK and allow_loopback else (rule, what)
    if not address.is_global or address.is_multicast or address.is_reserved:
        return "non-global", "not a globally routable address"
    return None


def is_loopback(address: IPAddress) -> bool:
    """A loopback address, or an IPv6 form carrying one."""
    embedded = embedded_ipv4(address) if isinstance(address, IPv6Address) else None
    return (embedded or address).is_loopback


def is_loopback_name(host: str) -> bool:
    """``localhost`` and its subdomains, which resolve to loopback (RFC 6761)."""
    name = host.rstrip(".")
    return name == "localhost" or name.endswith(".localhost")


def embedded_ipv4(address: IPv6Address) -> IPv4Address | None:
    """The IPv4 address an IPv4-mapped, -translated, -compatible, NAT64 or 6to4 IPv6 address carries."""
    if address.sixtofour is not None:
        return address.sixtofour
    low32 = IPv4Address(int(address) & 0xFFFFFFFF)
    if address in _MAPPED or address in _TRANSLATED or address in _NAT64:
        return low32
    if address in _COMPATIBLE and int(address) > 1:  # "::" and "::1" are themselves, not IPv4 addresses
        return low32
    return None


def _ipv4_number(part: str) -> int | None:
    """One part of an IPv4 host as inet_aton and the WHATWG URL parser read it: decimal, 0x hex or 0 octal."""
    if part[:2] in ("0x", "0X"):
        digits = part[2:].lower()
        if not digits:
            return 0
        return int(digits, 16) if set(digits) <= _HEX_DIGITS else None
    if not part.isascii() or not part.isdigit():
        return None
    if len(part) > 1 and part.startswith("0"):
        return int(part, 8) if set(part) <= set("01234567") else None
    return int(part)


def ipv4_literal(name: str) -> IPv4Address | None:
    """The IPv4 address ``name`` spells in any inet_aton form, None for a hostname.

    A name whose last label is a number is an IPv4 address to browsers and to getaddrinfo; if it is not a
    valid one it is refused rather than passed to a resolver that might read it differently.

    Raises:
        ValueError: a numeric host that is not a valid IPv4 address.
    """
    parts = name.split(".")
    last = parts[-1]
    if not last or (_ipv4_number(last) is None and not (last.isascii() and last.isdigit())):
        return None
    numbers = [_ipv4_number(part) if part else None for part in parts]
    valid = [n for n in numbers if n is not None]
    if len(parts) > 4 or len(valid) != len(parts) or any(n > 255 for n in valid[:-1]):
        raise ValueError(f"{name!r} is not a valid IPv4 address")
    if valid[-1] >= 256 ** (5 - len(valid)):
        raise ValueError(f"{name!r} is not a valid IPv4 address")
    value = valid[-1]
    for index, number in enumerate(valid[:-1]):
        value += number << (8 * (3 - index))
    return IPv4Address(value)
