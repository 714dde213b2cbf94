"""Discovery URLs in the MCP specification's order, resource matching, and strict reading of metadata documents."""

from __future__ import annotations

from typing import Any

import pytest

from bastion.oauth.errors import DiscoveryFailed, IssuerMismatch
from bastion.oauth.metadata import (
    as_metadata_urls,
    canonical_resource,
    issuers_match,
    legacy_metadata,
    parse_as_metadata,
    parse_protected_resource,
    prm_urls,
    resource_covers,
)


def test_protected_resource_metadata_is_looked_for_at_the_header_url_then_path_inserted_then_root() -> None:
    assert prm_urls("https://h.example/a/mcp", "https://h.example/custom.json") == [
        "https://h.example/custom.json",
        "https://h.example/.well-known/oauth-protected-resource/a/mcp",
        "https://h.example/.well-known/oauth-protected-resource",
    ]
    assert prm_urls("https://h.example:8443/", None) == ["https://h.example:8443/.well-known/oauth-protected-resource"]


def test_issuer_metadata_urls_follow_the_specification_order() -> None:
    assert as_metadata_urls("https://as.example/tenant1") == [
        "https://as.example/.well-known/oauth-authorization-server/tenant1",
        "https://as.example/.well-known/openid-configuration/tenant1",
        "https://as.example/tenant1/.well-known/openid-configuration",
    ]
    assert as_metadata_urls("https://as.example") == [
        "https://as.example/.well-known/oauth-authorization-server",
        "https://as.example/.well-known/openid-configuration",
    ]


@pytest.mark.parametrize(
    ("resource", "server", "covered"),
    [
        ("https://h.example/mcp", "https://h.example/mcp", True),
        ("https://h.example", "https://h.example/mcp", True),
        ("https://H.EXAMPLE:443/", "https://h.example/mcp/", True),
        ("https://h.example/mc", "https://h.example/mcp", False),
        ("https://h.example/mcp/v2", "https://h.example/mcp", False),
        ("https://evil.example/mcp", "https://h.example/mcp", False),
        ("http://h.example/mcp", "https://h.example/mcp", False),
        ("https://h.example:8443/mcp", "https://h.example/mcp", False),
        ("https://h.example/mcp#x", "https://h.example/mcp", False),
        ("not a url", "https://h.example/mcp", False),
    ],
)
def test_a_resource_covers_its_own_url_and_the_urls_below_it_only(resource: str, server: str, covered: bool) -> None:
    assert resource_covers(resource, server) is covered


def test_the_canonical_uri_drops_the_fragment_and_trailing_slash_and_lowers_the_host() -> None:
    assert canonical_resource("HTTPS://H.Example/MCP/#frag") == "https://h.example/MCP"
    assert canonical_resource("https://h.example/") == "https://h.example"


def _doc(**overrides: Any) -> dict[str, Any]:
    doc: dict[str, Any] = {
        "issuer": "https://as.example/t",
        "authorization_endpoint": "https://as.example/t/authorize",
        "token_endpoint": "https://as.example/t/token",
        "code_challenge_methods_supported": ["S256"],
    }
    doc.update(overrides)
    return {k: v for k, v in doc.items() if v is not None}


def test_metadata_is_read_with_its_optional_fields() -> None:
    meta = parse_as_metadata(
        _doc(
            authorization_response_iss_parameter_supported=True,
            client_id_metadata_document_supported=True,
            scopes_supported=["a", "offline_access"],
            registration_endpoint="https://as.example/t/register",
        ),
        "https://as.example/t",
    )
    assert meta.supports_s256 and meta.iss_parameter_supported and meta.client_id_metadata_document_supported
    assert meta.scopes_supported == ("a", "offline_access")
    assert meta.registration_endpoint == "https://as.example/t/register"
    assert not meta.legacy


def test_metadata_naming_another_issuer_is_refused() -> None:
    with pytest.raises(IssuerMismatch):
        parse_as_metadata(_doc(issuer="https://attacker.example"), "https://as.example/t")
    with pytest.raises(IssuerMismatch):
        parse_as_metadata(_doc(issuer="https://as.example/t/"), "https://as.example/t")


def test_a_bare_origin_matches_itself_with_or_without_its_slash_and_nothing_else_does() -> None:
    assert issuers_match("https://as.example", "https://as.example/")
    assert not issuers_match("https://as.example/t", "https://as.example/t/")
    assert not issuers_match("https://AS.example", "https://as.example")


@pytest.mark.parametrize(
    "doc",
    [
        [],
        _doc(authorization_endpoint=None),
        _doc(token_endpoint="javascript:alert(1)"),
        _doc(scopes_supported="a b"),
        _doc(code_challenge_methods_supported=[1]),
    ],
)
def test_malformed_metadata_is_refused(doc: Any) -> None:
    with pytest.raises(DiscoveryFailed):
        parse_as_metadata(doc, "https://as.example/t")


def test_protected_resource_metadata_needs_a_resource() -> None:
    prm = parse_protected_resource(
        {"resource": "https://h.example/mcp", "authorization_servers": ["https://as.example"]}, "u"
    )
    assert prm.authorization_servers == ("https://as.example",) and prm.scopes_supported is None
    for bad in ({}, {"resource": ""}, {"resource": "x", "authorization_servers": "https://as"}, "x"):
        with pytest.raises(DiscoveryFailed):
            parse_protected_resource(bad, "u")


def test_legacy_servers_get_the_default_endpoints_at_their_origin() -> None:
    meta = legacy_metadata("http://127.0.0.1:9/some/mcp")
    assert (meta.issuer, meta.authorization_endpoint, meta.token_endpoint, meta.registration_endpoint) == (
        "http://127.0.0.1:9",
        "http://127.0.0.1:9/authorize",
        "http://127.0.0.1:9/token",
        "http://127.0.0.1:9/register",
    )
    assert meta.legacy
