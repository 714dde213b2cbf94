"""The outbound URL policy (SSRF): what check_url refuses in every spelling, DNS pinning, and redirect hops."""

from __future__ import annotations

from collections.abc import Sequence
from ipaddress import IPv4Address, IPv4Network, ip_address, ip_network
from pathlib import Path

import anyio
import httpx2
import pytest
from hypothesis import given
from hypothesis import strategies as st

from bastion.errors import ConfigError, ValidationFailed
from bastion.net.outbound import IPAddress, OutboundPolicy, UrlRefused, fetch, system_resolver
from bastion.settings import Settings, load_settings
from tests.net.support import StubResolver, Tls, make_tls, serve

STRICT = OutboundPolicy()
LOOPBACK = OutboundPolicy(allow_loopback=True)

REFUSED: list[tuple[str, str]] = [
    ("javascript:alert(1)", "scheme"),
    ("JavaScript:alert(1)", "scheme"),
    ("file:///etc/passwd", "scheme"),
    ("data:text/html,<script>alert(1)</script>", "scheme"),
    ("ftp://example.com/", "scheme"),
    ("gopher://example.com:70/", "scheme"),
    ("ws://example.com/", "scheme"),
    ("//example.com/", "scheme"),
    ("http://example.com/", "scheme"),
    ("HTTP://example.com/", "scheme"),
    ("https://user:pass@example.com/", "userinfo"),
    ("https://user@example.com/", "userinfo"),
    ("https://example.com:0/", "port"),
    ("https://example.com:65536/", "port"),
    ("https://exa mple.com/", "syntax"),
    ("https://example.com\\@127.0.0.1/", "syntax"),
    ("https://example.com/\r\nX-Injected: 1", "syntax"),
    ("https:///path", "syntax"),
    ("https://a..b/", "syntax"),
    ("https://127%2e0%2e0%2e1/", "syntax"),
    ("https://[fe80::1%25eth0]/", "syntax"),
    ("https://1.2.3.4.5/", "syntax"),
    ("https://256.1.1.1/", "syntax"),
    ("https://0x100.1.1.1/", "syntax"),
    ("https://08.1.1.1/", "syntax"),
    ("https://0x.0x.0x.0x/", "unspecified"),  # "0x" alone is 0, as inet_aton and browsers read it
    ("https://127.0.0.1/", "loopback"),
    ("https://127.1/", "loopback"),
    ("https://127.0.1/", "loopback"),
    ("https://2130706433/", "loopback"),
    ("https://0x7f000001/", "loopback"),
    ("https://0X7F.1/", "loopback"),
    ("https://0x7f.0.0.1/", "loopback"),
    ("https://0177.0.0.01./", "loopback"),
    ("https://017700000001/", "loopback"),
    ("https://127.0.0.1./", "loopback"),
    ("https://127.255.255.254/", "loopback"),
    ("https://localhost/", "loopback"),
    ("https://LOCALHOST./", "loopback"),
    ("https://api.localhost/", "loopback"),
    ("https://[::1]/", "loopback"),
    ("https://[0:0:0:0:0:0:0:1]/", "loopback"),
    ("https://[::ffff:127.0.0.1]/", "loopback"),
    ("https://[::ffff:7f00:1]/", "loopback"),
    ("https://[::127.0.0.1]/", "loopback"),
    ("https://[::ffff:0:127.0.0.1]/", "loopback"),
    ("https://[64:ff9b::127.0.0.1]/", "loopback"),
    ("https://[2002:7f00:1::]/", "loopback"),
    ("https://0.0.0.0/", "unspecified"),
    ("https://0/", "unspecified"),
    ("https://[::]/", "unspecified"),
    ("https://10.0.0.1/", "private"),
    ("https://167772161/", "private"),
    ("https://172.16.0.1/", "private"),
    ("https://172.31.255.255/", "private"),
    ("https://192.168.1.1/", "private"),
    ("https://0xc0.0xa8.1.1/", "private"),
    ("https://[::ffff:192.168.1.1]/", "private"),
    ("https://[64:ff9b::a00:1]/", "private"),
    ("https://169.254.169.254/latest/meta-data/", "link-local"),
    ("https://2852039166/", "link-local"),
    ("https://0xa9fea9fe/", "link-local"),
    ("https://[::ffff:169.254.169.254]/", "link-local"),
    ("https://[fe80::1]/", "link-local"),
    ("https://100.64.0.1/", "shared"),
    ("https://100.127.255.254/", "shared"),
    ("https://[fc00::1]/", "unique-local"),
    ("https://[fd00:ec2::254]/", "unique-local"),
    ("https://[fec0::1]/", "site-local"),
    ("https://224.0.0.1/", "multicast"),
    ("https://239.255.255.250/", "multicast"),
    ("https://[ff02::1]/", "multicast"),
    ("https://240.0.0.1/", "reserved"),
    ("https://255.255.255.255/", "reserved"),
    ("https://192.0.2.1/", "documentation"),
    ("https://[2001:db8::1]/", "documentation"),
    ("https://192.0.0.8/", "special"),
    ("https://198.18.0.1/", "special"),
    ("https://[2001::1]/", "special"),
    ("https://[64:ff9b:1::1]/", "special"),
    ("https://[4000::1]/", "non-global"),  # unassigned: not routable either
    ("https://1.2.3.256./", "syntax"),
    ("https://1.16777216/", "syntax"),
    ("https://\uff11\uff12\uff17.\uff10.\uff10.\uff11/", "syntax"),  # fullwidth digits: refused by IDNA 2008
    ("https://127\u30020\u30020\u30021/", "loopback"),  # ideographic full stops are dots to IDNA
]

ALLOWED: list[str] = [
    "https://example.com/mcp",
    "https://EXAMPLE.com./mcp?x=1#frag",
    "https://mcp.example.com:8443/v1/mcp",
    "https://8.8.8.8/",
    "https://134744072/",  # 8.8.8.8 as one number: a public address in any spelling is still public
    "https://[2606:4700:4700::1111]/",
    "https://[::ffff:8.8.8.8]/",
    "https://[64:ff9b::8.8.8.8]/",
    "https://bücher.example/",
    "https://xn--bcher-kva.example/",
    "https://1.2.3.0x/",  # "0x" alone is 0: this spells 1.2.3.0, a public address
    "https://1.2.3.4a/",  # the last label is not a number: a (strange) hostname, resolved and checked on connect
]


@pytest.mark.parametrize(("url", "rule"), REFUSED)
def test_the_strict_policy_refuses_internal_and_malformed_urls_naming_the_rule(url: str, rule: str) -> None:
    with pytest.raises(UrlRefused) as refused:
        STRICT.check_url(url)
    assert refused.value.rule == rule
    assert refused.value.detail.startswith("refused by the outbound URL policy: ")


@pytest.mark.parametrize("url", ALLOWED)
def test_the_strict_policy_lets_public_https_urls_through_unchanged(url: str) -> None:
    assert STRICT.check_url(url) == url


def test_a_refusal_is_a_validation_error_that_says_how_to_opt_in() -> None:
    with pytest.raises(ValidationFailed) as refused:
        STRICT.check_url("https://127.0.0.1:8080/mcp")
    assert refused.value.code == "url_refused"
    assert refused.value.status == 422
    assert "127.0.0.1 is a loopback address" in refused.value.detail
    assert "BASTION_OUTBOUND_ALLOW_LOOPBACK" in refused.value.detail
    with pytest.raises(UrlRefused) as private:
        STRICT.check_url("https://10.1.2.3/")
    assert "BASTION_OUTBOUND_ALLOWED_NETWORKS" in private.value.detail
    with pytest.raises(UrlRefused) as metadata:
        STRICT.check_url("https://169.254.169.254/")
    assert "cloud metadata" in metadata.value.detail


def test_a_refusal_names_the_host_not_the_path_or_query() -> None:
    with pytest.raises(UrlRefused) as refused:
        STRICT.check_url("https://127.0.0.1/cb?code=secret-code-123")
    assert "secret-code-123" not in refused.value.detail


@pytest.mark.parametrize(
    "url",
    ["http://127.0.0.1:8080/mcp", "http://localhost:1/", "http://[::1]:3/", "https://127.0.0.1/", "http://127.1/"],
)
def test_the_loopback_opt_in_allows_http_and_https_to_loopback(url: str) -> None:
    assert LOOPBACK.check_url(url) == url


@pytest.mark.parametrize(
    ("url", "rule"),
    [
        ("http://example.com/", "scheme"),
        ("http://8.8.8.8/", "scheme"),
        ("http://10.0.0.1/", "private"),
        ("https://169.254.169.254/", "link-local"),
        ("http://[::ffff:10.0.0.1]/", "private"),
        ("file:///etc/passwd", "scheme"),
        ("http://u:p@127.0.0.1/", "userinfo"),
    ],
)
def test_the_loopback_opt_in_allows_nothing_else(url: str, rule: str) -> None:
    with pytest.raises(UrlRefused) as refused:
        LOOPBACK.check_url(url)
    assert refused.value.rule == rule


def test_allowed_networks_let_an_admin_reach_internal_https_upstreams_and_nothing_more() -> None:
    policy = OutboundPolicy(allowed_networks=(ip_network("10.0.0.0/8"), ip_network("fd00::/8")))
    for url in ("https://10.1.2.3/mcp", "https://167838211/", "https://[::ffff:10.1.2.3]/", "https://[fd00::5]/"):
        assert policy.check_url(url) == url
    for url, rule in (
        ("https://192.168.1.1/", "private"),
        ("https://127.0.0.1/", "loopback"),
        ("http://10.1.2.3/", "scheme"),  # an internal upstream still speaks https
        ("https://[fc00::1]/", "unique-local"),
    ):
        with pytest.raises(UrlRefused) as refused:
            policy.check_url(url)
        assert refused.value.rule == rule


# --- every spelling of an address -------------------------------------------------------------------------------

REFUSED_V4_NETWORKS = [
    IPv4Network(n)
    for n in (
        "127.0.0.0/8",
        "10.0.0.0/8",
        "172.16.0.0/12",
        "192.168.0.0/16",
        "169.254.0.0/16",
        "100.64.0.0/10",
        "0.0.0.0/8",
        "224.0.0.0/4",
        "240.0.0.0/4",
    )
]
PUBLIC_V4_NETWORKS = [IPv4Network(n) for n in ("8.0.0.0/8", "1.0.0.0/8", "93.184.0.0/16", "151.101.0.0/16")]


def _part(value: int, style: str) -> str:
    if style == "hex":
        return f"0x{value:x}"
    if style == "HEX":
        return f"0X{value:X}"
    if style == "octal":
        return f"0{value:o}"
    return str(value)


@st.composite
def ipv4_spellings(draw: st.DrawFn, networks: Sequence[IPv4Network]) -> tuple[IPv4Address, str]:
    """An address from ``networks`` and one of its inet_aton spellings: 1-4 parts, each decimal, hex or octal."""
    network = draw(st.sampled_from(networks))
    address = IPv4Address(int(network.network_address) + draw(st.integers(0, network.num_addresses - 1)))
    value = int(address)
    count = draw(st.integers(1, 4))
    head = [(value >> (8 * (3 - i))) & 0xFF for i in range(count - 1)]
    tail = value & ((1 << (8 * (5 - count))) - 1)
    styles = st.sampled_from(["dec", "hex", "HEX", "octal"])
    text = ".".join(_part(p, draw(styles)) for p in [*head, tail])
    if draw(st.booleans()):
        text += "."
    return address, text


def _ipv6_spellings(address: IPv4Address) -> list[str]:
    a, b = int(address) >> 16, int(address) & 0xFFFF
    spellings = [
        f"[::ffff:{address}]",
        f"[::ffff:{a:x}:{b:x}]",
        f"[::FFFF:{a:X}:{b:X}]",
        f"[0:0:0:0:0:ffff:{address}]",
        f"[::ffff:0:{address}]",
        f"[64:ff9b::{address}]",
        f"[2002:{a:x}:{b:x}::1]",
    ]
    if int(address) > 1:  # "::" and "::1" are not IPv4-compatible addresses
        spellings.append(f"[::{address}]")
    return spellings


def _httpx2_refuses(text: str) -> bool:
    """httpx2 itself refuses an all-digit dotted quad with a leading zero ("Invalid IPv4 address")."""
    parts = text.split(".")
    return len(parts) == 4 and all(p.isdigit() for p in parts) and any(len(p) > 1 and p[0] == "0" for p in parts)


@given(ipv4_spellings(REFUSED_V4_NETWORKS))
def test_internal_ipv4_addresses_are_refused_in_every_inet_aton_spelling(spelled: tuple[IPv4Address, str]) -> None:
    address, text = spelled
    with pytest.raises(UrlRefused) as refused:
        STRICT.check_url(f"https://{text}/")
    if not _httpx2_refuses(text):
        # Decoded to the very address: a policy trusting exactly that address lets the same spelling through.
        assert str(address) in refused.value.detail
        assert OutboundPolicy(allowed_networks=(ip_network(f"{address}/32"),)).check_url(f"https://{text}/")


@given(ipv4_spellings(REFUSED_V4_NETWORKS), st.data())
def test_internal_ipv4_addresses_are_refused_inside_every_ipv6_form(
    spelled: tuple[IPv4Address, str], data: st.DataObject
) -> None:
    address, _ = spelled
    host = data.draw(st.sampled_from(_ipv6_spellings(address)))
    with pytest.raises(UrlRefused) as refused:
        STRICT.check_url(f"https://{host}/")
    assert str(address) in refused.value.detail


@given(ipv4_spellings(PUBLIC_V4_NETWORKS), st.data())
def test_public_ipv4_addresses_pass_in_the_spellings_httpx2_accepts(
    spelled: tuple[IPv4Address, str], data: st.DataObject
) -> None:
    address, text = spelled
    host = data.draw(st.sampled_from([text, *_ipv6_spellings(address)]))
    if _httpx2_refuses(host):
        with pytest.raises(UrlRefused):
            STRICT.check_url(f"https://{host}/")
    else:
        assert STRICT.check_url(f"https://{host}/") == f"https://{host}/"


@given(st.sampled_from(["127.0.0.1", "localhost", "10.0.0.1", "[::1]"]), st.sampled_from(["", ".", ":443"]))
def test_case_and_trailing_dots_do_not_hide_an_internal_host(host: str, suffix: str) -> None:
    mixed = "".join(c.upper() if i % 2 else c for i, c in enumerate(host))
    with pytest.raises(UrlRefused):
        STRICT.check_url(f"HtTpS://{mixed}{suffix if not host.startswith('[') or suffix != '.' else ''}/")


# --- settings -----------------------------------------------------------------------------------------------------


def test_the_policy_comes_from_the_settings() -> None:
    settings = Settings(outbound_allow_loopback=True, outbound_allowed_networks=["10.0.0.0/8", " fd00::/8 "])
    policy = OutboundPolicy.from_settings(settings)
    assert policy.allow_loopback
    assert policy.allowed_networks == (ip_network("10.0.0.0/8"), ip_network("fd00::/8"))
    assert OutboundPolicy.from_settings(Settings()) == STRICT  # strict unless told otherwise


def test_the_networks_setting_is_read_from_the_environment_as_a_json_list(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("BASTION_OUTBOUND_ALLOWED_NETWORKS", '["192.168.10.0/24"]')
    monkeypatch.setenv("BASTION_OUTBOUND_ALLOW_LOOPBACK", "true")
    settings = load_settings()
    assert settings.outbound_allowed_networks == ["192.168.10.0/24"]
    assert settings.outbound_allow_loopback


@pytest.mark.parametrize("bad", ["10.0.0.1/8", "10.0.0.0/33", "not-a-network", ""])
def test_a_malformed_network_setting_is_refused_with_a_clear_message(bad: str) -> None:
    with pytest.raises(ConfigError) as refused:
        load_settings(outbound_allowed_networks=[bad])
    assert "BASTION_OUTBOUND_ALLOWED_NETWORKS" in refused.value.detail
    assert "CIDR form like 10.0.0.0/8" in refused.value.detail


# --- DNS pinning --------------------------------------------------------------------------------------------------


@pytest.fixture
def tls() -> Tls:
    return make_tls("pinned.test", "evil.test")


def _pinned(resolver: StubResolver) -> OutboundPolicy:
    """Strict, except that 127.0.0.2 stands in for a public address (it is all loopback on this machine)."""
    return OutboundPolicy(allowed_networks=(ip_network("127.0.0.2/32"),), resolver=resolver)


def _route(path: str) -> tuple[int, dict[str, str]]:
    return 200, {}


@pytest.mark.anyio
async def test_a_connection_goes_to_the_checked_address_with_the_hostname_kept_for_tls_and_host(
    tls: Tls, tmp_path: Path
) -> None:
    resolver = StubResolver(pinned_test=[["127.0.0.2"]])
    async with (
        serve("127.0.0.2", _route, tls=tls, tmp=str(tmp_path)) as server,
        _pinned(resolver).client(ssl_context=tls.client_context()) as http,
    ):
        response = await http.get(f"https://pinned.test:{server.port}/hello")
    assert response.status_code == 200
    # The system resolver has never heard of pinned.test: the socket went to the stub's checked answer.
    assert resolver.lookups == ["pinned.test"]
    # The certificate names pinned.test only (no IP): verification used the hostname, and so did SNI and Host.
    assert server.seen[0].sni == "pinned.test"
    assert server.seen[0].host_header == f"pinned.test:{server.port}"


@pytest.mark.anyio
async def test_a_certificate_for_another_name_is_still_refused(tmp_path: Path) -> None:
    other = make_tls("someone-else.test")
    resolver = StubResolver(pinned_test=[["127.0.0.2"]])
    async with (
        serve("127.0.0.2", _route, tls=other, tmp=str(tmp_path)) as server,
        _pinned(resolver).client(ssl_context=other.client_context()) as http,
    ):
        with pytest.raises(httpx2.ConnectError, match=r"CERTIFICATE_VERIFY_FAILED|hostname"):
            await http.get(f"https://pinned.test:{server.port}/")


@pytest.mark.anyio
async def test_a_rebinding_name_is_refused_on_the_connection_after_it_was_checked(tls: Tls, tmp_path: Path) -> None:
    # First answer allowed, every later one 127.0.0.1: the second connection must not reach 127.0.0.1.
    resolver = StubResolver(pinned_test=[["127.0.0.2"], ["127.0.0.1"]])
    policy = _pinned(resolver)
    async with (
        serve("127.0.0.1", _route, tls=tls, tmp=str(tmp_path)) as guard,
        serve("127.0.0.2", _route, tls=tls, tmp=str(tmp_path), port=guard.port) as server,
    ):
        url = f"https://pinned.test:{server.port}/"
        async with policy.client(ssl_context=tls.client_context()) as http:
            assert (await http.get(url)).status_code == 200
        async with policy.client(ssl_context=tls.client_context()) as http:
            with pytest.raises(UrlRefused) as refused:
                await http.get(url)
    assert refused.value.rule == "loopback"
    assert "host 'pinned.test' resolves to 127.0.0.1" in refused.value.detail
    assert len(server.seen) == 1
    assert guard.seen == []


@pytest.mark.anyio
async def test_a_name_checked_early_is_checked_again_when_the_connection_is_made() -> None:
    # A truly public first answer, then 127.0.0.1: the early check passes, the connection is refused before
    # any socket is opened (no request leaves this machine).
    resolver = StubResolver(rebind_test=[["93.184.216.34"], ["127.0.0.1"]])
    policy = OutboundPolicy(resolver=resolver)
    assert await policy.resolve_url("https://rebind.test/mcp") == [ip_address("93.184.216.34")]
    async with policy.client() as http:
        with pytest.raises(UrlRefused) as refused:
            await http.get("https://rebind.test/mcp")
    assert refused.value.rule == "loopback"
    assert resolver.lookups == ["rebind.test", "rebind.test"]


@pytest.mark.anyio
async def test_one_internal_answer_among_public_ones_refuses_the_name() -> None:
    policy = OutboundPolicy(resolver=StubResolver(mixed_test=[["93.184.216.34", "169.254.169.254"]]))
    with pytest.raises(UrlRefused) as refused:
        await policy.resolve_url("https://mixed.test/")
    assert refused.value.rule == "link-local"
    async with policy.client() as http:
        with pytest.raises(UrlRefused):
            await http.get("https://mixed.test/")


@pytest.mark.anyio
async def test_ipv6_answers_with_an_embedded_internal_address_are_refused() -> None:
    for answer in ("::ffff:127.0.0.1", "64:ff9b::a9fe:a9fe", "::1", "fd00::1"):
        policy = OutboundPolicy(resolver=StubResolver(v6_test=[[answer]]))
        with pytest.raises(UrlRefused):
            await policy.resolve_url("https://v6.test/")


@pytest.mark.anyio
async def test_the_system_resolver_looks_names_up_and_its_loopback_answers_are_refused() -> None:
    addresses = await system_resolver("localhost", 443)
    assert addresses and all(a.is_loopback for a in addresses)
    for address in addresses:
        with pytest.raises(UrlRefused) as refused:
            STRICT.check_address(address, host="db.internal")
        assert refused.value.rule == "loopback"
        assert f"host 'db.internal' resolves to {address}" in refused.value.detail
    assert await LOOPBACK.resolve("localhost", 443) == addresses
    with pytest.raises(OSError):
        await system_resolver("no-such-host.invalid", 443)
    with pytest.raises(OSError):
        await system_resolver("a\u200d.test", 443)  # a name IDNA 2008 refuses (a joiner out of context)


@pytest.mark.anyio
async def test_names_that_do_not_resolve_fail_as_connection_errors() -> None:
    policy = OutboundPolicy(resolver=StubResolver(empty_test=[[]]))
    with pytest.raises(OSError, match="no address"):
        await policy.resolve("empty.test", 443)
    with pytest.raises(UrlRefused) as refused:
        await policy.resolve("1::2::3", 443)
    assert refused.value.rule == "syntax"
    async with policy.client() as http:
        with pytest.raises(httpx2.ConnectError, match="no such host"):
            await http.get("https://unknown.test/")
        with pytest.raises(httpx2.ConnectError, match="no address"):
            await http.get("https://empty.test/")


@pytest.mark.anyio
async def test_a_resolver_that_hangs_ends_in_a_connect_timeout() -> None:
    async def hanging(host: str, port: int) -> list[IPAddress]:
        await anyio.sleep_forever()
        raise AssertionError("unreachable")

    async with OutboundPolicy(resolver=hanging).client(timeout=httpx2.Timeout(5.0, connect=0.05)) as http:
        with pytest.raises(httpx2.ConnectTimeout):
            await http.get("https://slow.test/")


@pytest.mark.anyio
async def test_each_checked_address_is_tried_in_turn(tls: Tls, tmp_path: Path) -> None:
    # 127.0.0.3 has no listener on the port: the connection moves on to 127.0.0.2, never to an unchecked one.
    resolver = StubResolver(pinned_test=[["127.0.0.3", "127.0.0.2"]], dead_test=[["127.0.0.3"]])
    policy = OutboundPolicy(allowed_networks=(ip_network("127.0.0.2/31"),), resolver=resolver)
    async with (
        serve("127.0.0.2", _route, tls=tls, tmp=str(tmp_path)) as server,
        policy.client(ssl_context=tls.client_context()) as http,
    ):
        assert (await http.get(f"https://pinned.test:{server.port}/")).status_code == 200
        with pytest.raises(httpx2.ConnectError):
            await http.get(f"https://dead.test:{server.port}/")
    assert len(server.seen) == 1


@pytest.mark.anyio
async def test_environment_proxies_are_ignored(tls: Tls, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # A proxy would connect to a host the policy never saw: the client connects directly, pinned, or not at all.
    monkeypatch.setenv("HTTPS_PROXY", "http://127.0.0.1:9")
    monkeypatch.setenv("ALL_PROXY", "http://127.0.0.1:9")
    resolver = StubResolver(pinned_test=[["127.0.0.2"]])
    async with (
        serve("127.0.0.2", _route, tls=tls, tmp=str(tmp_path)) as server,
        _pinned(resolver).client(ssl_context=tls.client_context()) as http,
    ):
        assert (await http.get(f"https://pinned.test:{server.port}/")).status_code == 200
    assert len(server.seen) == 1


# --- redirects ----------------------------------------------------------------------------------------------------


def _redirects(port: int) -> dict[str, str]:
    return {
        "/hop": "/ok",
        "/twice": "/hop",
        "/to-loopback": f"https://127.0.0.1:{port}/ok",
        "/to-rebound": f"https://evil.test:{port}/ok",
        "/to-http": f"http://pinned.test:{port}/ok",
        "/to-file": "file:///etc/passwd",
        "/to-javascript": "javascript:alert(1)",
        "/to-metadata": "https://169.254.169.254/latest/meta-data/",
        "/to-decimal": f"https://2130706433:{port}/ok",
        "/cross": f"https://evil.test:{port}/ok",
        "/broken": "//[::1",
    }


@pytest.mark.anyio
@pytest.mark.parametrize(
    ("path", "rule"),
    [
        ("/to-loopback", "loopback"),
        ("/to-rebound", "loopback"),
        ("/to-http", "scheme"),
        ("/to-file", "scheme"),
        ("/to-javascript", "scheme"),
        ("/to-metadata", "link-local"),
        ("/to-decimal", "loopback"),
        ("/broken", "redirect"),
    ],
)
async def test_fetch_checks_every_redirect_hop(path: str, rule: str, tls: Tls, tmp_path: Path) -> None:
    resolver = StubResolver(pinned_test=[["127.0.0.2"]], evil_test=[["127.0.0.1"]])
    policy = _pinned(resolver)
    ports: dict[str, int] = {}

    def route(requested: str) -> tuple[int, dict[str, str]]:
        target = _redirects(ports["port"]).get(requested)
        return (302, {"Location": target}) if target else (200, {})

    async with serve("127.0.0.1", _route, tls=tls, tmp=str(tmp_path)) as guard:
        ports["port"] = guard.port
        async with (
            serve("127.0.0.2", route, tls=tls, tmp=str(tmp_path), port=guard.port) as server,
            policy.client(ssl_context=tls.client_context()) as http,
        ):
            with pytest.raises(UrlRefused) as refused:
                await fetch(http, policy, "GET", f"https://pinned.test:{server.port}{path}", max_redirects=5)
    assert refused.value.rule == rule
    assert [s.path for s in server.seen] == [path]
    assert guard.seen == []  # the refused hop never reached the internal address


@pytest.mark.anyio
async def test_fetch_follows_allowed_hops_up_to_the_limit(tls: Tls, tmp_path: Path) -> None:
    resolver = StubResolver(pinned_test=[["127.0.0.2"]])
    policy = _pinned(resolver)
    ports: dict[str, int] = {}

    def route(requested: str) -> tuple[int, dict[str, str]]:
        target = _redirects(ports["port"]).get(requested)
        return (302, {"Location": target}) if target else (200, {})

    async with serve("127.0.0.2", route, tls=tls, tmp=str(tmp_path)) as server:
        ports["port"] = server.port
        base = f"https://pinned.test:{server.port}"
        async with policy.client(ssl_context=tls.client_context()) as http:
            assert (await fetch(http, policy, "GET", f"{base}/twice", max_redirects=2)).status_code == 200
            with pytest.raises(UrlRefused) as too_many:
                await fetch(http, policy, "GET", f"{base}/twice", max_redirects=1)
            with pytest.raises(UrlRefused) as none_allowed:
                await fetch(http, policy, "GET", f"{base}/hop")
            direct = await fetch(http, policy, "GET", f"{base}/ok")
    assert too_many.value.rule == none_allowed.value.rule == "redirect"
    assert direct.text == "ok"
    assert [s.path for s in server.seen] == ["/twice", "/hop", "/ok", "/twice", "/hop", "/hop", "/ok"]


@pytest.mark.anyio
async def test_with_the_loopback_opt_in_a_redirect_to_another_internal_address_is_still_refused() -> None:
    def route(requested: str) -> tuple[int, dict[str, str]]:
        if requested == "/start":
            return 302, {"Location": "http://10.0.0.1/admin"}
        if requested == "/meta":
            return 307, {"Location": "http://169.254.169.254/latest/meta-data/"}
        return 200, {}

    async with serve("127.0.0.1", route) as server, LOOPBACK.client() as http:
        base = f"http://127.0.0.1:{server.port}"
        with pytest.raises(UrlRefused) as private:
            await fetch(http, LOOPBACK, "GET", f"{base}/start", max_redirects=3)
        with pytest.raises(UrlRefused) as metadata:
            await fetch(http, LOOPBACK, "POST", f"{base}/meta", max_redirects=3, json={"a": 1})
        assert (await fetch(http, LOOPBACK, "GET", f"{base}/fine")).status_code == 200
    assert private.value.rule == "private"
    assert metadata.value.rule == "link-local"
    assert [s.path for s in server.seen] == ["/start", "/meta", "/fine"]


@pytest.mark.anyio
async def test_a_request_to_a_refused_url_is_never_sent_even_through_the_bare_client() -> None:
    async with serve("127.0.0.1", _route) as server, STRICT.client() as http:
        with pytest.raises(UrlRefused) as refused:
            await http.get(f"http://127.0.0.1:{server.port}/")
    assert refused.value.rule == "loopback"
    assert server.seen == []


@pytest.mark.anyio
async def test_fetch_sends_credentials_to_the_first_origin_only(tls: Tls, tmp_path: Path) -> None:
    # evil.test stands for another public host here (same allowed address, another origin).
    resolver = StubResolver(pinned_test=[["127.0.0.2"]], evil_test=[["127.0.0.2"]])
    policy = _pinned(resolver)
    ports: dict[str, int] = {}

    def route(requested: str) -> tuple[int, dict[str, str]]:
        target = _redirects(ports["port"]).get(requested)
        return (302, {"Location": target}) if target else (200, {})

    async with serve("127.0.0.2", route, tls=tls, tmp=str(tmp_path)) as server:
        ports["port"] = server.port
        base = f"https://pinned.test:{server.port}"
        async with policy.client(ssl_context=tls.client_context()) as http:
            auth = httpx2.BasicAuth("client-id", "client-secret")
            same = await fetch(http, policy, "GET", f"{base}/hop", max_redirects=1, auth=auth)
            cross = await fetch(http, policy, "GET", f"{base}/cross", max_redirects=1, auth=auth)
    assert same.status_code == cross.status_code == 200
    sent = [(s.host_header.split(":")[0], s.path, s.authorization is not None) for s in server.seen]
    assert sent == [
        ("pinned.test", "/hop", True),
        ("pinned.test", "/ok", True),
        ("pinned.test", "/cross", True),
        ("evil.test", "/ok", False),
    ]


class _SseOrigin:
    """A plain HTTP/1.1 origin answering every POST with a chunked SSE body in two parts, counting connections.

    The body's end comes ``end_after`` seconds after its event (never, when None), as a server closing a
    request's stream once it has answered."""

    def __init__(self, end_after: float | None, *, cut: bool = False) -> None:
        self.end_after = end_after
        self.cut = cut  # drop the connection instead of ending the body
        self.connections = 0

    async def handle(self, stream: anyio.abc.SocketStream) -> None:
        self.connections += 1
        buffer = b""
        async with stream:
            while True:
                while b"\r\n\r\n" not in buffer:
                    try:
                        buffer += await stream.receive()
                    except (anyio.EndOfStream, anyio.BrokenResourceError):
                        return
                head, buffer = buffer.split(b"\r\n\r\n", 1)
                length = int(
                    next(
                        line.split(b":")[1]
                        for line in head.split(b"\r\n")
                        if line.lower().startswith(b"content-length")
                    )
                )
                while len(buffer) < length:
                    buffer += await stream.receive()
                buffer = buffer[length:]
                event = b"event: message\r\ndata: {}\r\n\r\n"
                await stream.send(
                    b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\ntransfer-encoding: chunked\r\n\r\n"
                    + b"%x\r\n%s\r\n" % (len(event), event)
                )
                end_after = self.end_after
                if end_after is None:
                    await anyio.sleep_forever()
                    return
                await anyio.sleep(end_after)
                if self.cut:
                    return
                await stream.send(b"0\r\n\r\n")


async def _first_events(origin: _SseOrigin, requests: int) -> None:
    policy = OutboundPolicy(allow_loopback=True)
    async with await anyio.create_tcp_listener(local_host="127.0.0.1") as listener, anyio.create_task_group() as tg:
        tg.start_soon(listener.serve, origin.handle)
        port = listener.extra(anyio.abc.SocketAttribute.local_port)  # noqa: S610  anyio typed attribute, not Django
        async with policy.client() as client:
            for _ in range(requests):
                with anyio.fail_after(10):  # a guard against hanging, not a measure of speed
                    async with client.stream("POST", f"http://127.0.0.1:{port}/mcp", content=b"{}") as response:
                        async for line in response.aiter_lines():
                            if line.startswith("data:"):
                                break  # as an MCP client does once its response has arrived
        tg.cancel_scope.cancel()


@pytest.mark.anyio
async def test_an_answer_closed_just_before_its_end_is_read_to_it_and_its_connection_reused() -> None:
    origin = _SseOrigin(end_after=0.001)
    await _first_events(origin, 3)
    assert origin.connections == 1


@pytest.mark.anyio
async def test_an_answer_that_does_not_end_is_closed_with_its_connection_after_a_short_wait() -> None:
    origin = _SseOrigin(end_after=None)
    await _first_events(origin, 2)
    assert origin.connections == 2


@pytest.mark.anyio
async def test_an_answer_cut_off_while_being_read_to_its_end_closes_quietly() -> None:
    # The caller is done with the body: a broken end is not its error (an MCP client would take it for a
    # lost stream and answer a call that was already answered).
    origin = _SseOrigin(end_after=0.001, cut=True)
    await _first_events(origin, 2)
    assert origin.connections == 2
