"""The metadata documents of OAuth discovery, read strictly, and the URLs they are looked for at.

- RFC 9728 protected resource metadata: where an MCP server says which authorization servers it trusts.
- RFC 8414 authorization server metadata (and OpenID Connect discovery, which carries the same fields).

Pure: no I/O here. ``discovery`` fetches; this module says what to fetch and what a document means.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Final, cast
from urllib.parse import urlsplit, urlunsplit

from bastion.oauth.errors import DiscoveryFailed, IssuerMismatch

__all__ = [
    "AuthServerMetadata",
    "ProtectedResource",
    "as_metadata_urls",
    "canonical_resource",
    "first_of",
    "issuers_match",
    "legacy_metadata",
    "origin_of",
    "parse_as_metadata",
    "parse_protected_resource",
    "prm_urls",
    "resource_covers",
]

PRM_WELL_KNOWN: Final = "/.well-known/oauth-protected-resource"
OAUTH_WELL_KNOWN: Final = "/.well-known/oauth-authorization-server"
OIDC_WELL_KNOWN: Final = "/.well-known/openid-configuration"
_DEFAULT_PORTS: Final = {"http": 80, "https": 443}


@dataclass(frozen=True, slots=True)
class ProtectedResource:
    """An MCP server's protected resource metadata (RFC 9728 §2)."""

    resource: str
    authorization_servers: tuple[str, ...]
    scopes_supported: tuple[str, ...] | None
    url: str


@dataclass(frozen=True, slots=True)
class AuthServerMetadata:
    """What Bastion uses of an authorization server's metadata. ``legacy``: 2025-03-26 defaults, no document."""

    issuer: str
    authorization_endpoint: str
    token_endpoint: str
    registration_endpoint: str | None = None
    revocation_endpoint: str | None = None
    scopes_supported: tuple[str, ...] | None = None
    code_challenge_methods_supported: tuple[str, ...] = ()
    token_endpoint_auth_methods_supported: tuple[str, ...] | None = None
    iss_parameter_supported: bool = False
    client_id_metadata_document_supported: bool = False
    legacy: bool = False

    @property
    def supports_s256(self) -> bool:
        return "S256" in self.code_challenge_methods_supported


def origin_of(url: str) -> str:
    """``scheme://host[:port]`` of a URL, as written (no trailing slash)."""
    parts = urlsplit(url)
    return urlunsplit((parts.scheme, parts.netloc, "", "", ""))


def prm_urls(server_url: str, from_header: str | None) -> list[str]:
    """Where to look for protected resource metadata, in the MCP specification's order.

    The ``resource_metadata`` URL of the challenge first, then the path-inserted well-known URL
    (``/.well-known/oauth-protected-resource/<path>``), then the root one.
    """
    parts = urlsplit(server_url)
    origin = origin_of(server_url)
    urls = [from_header] if from_header else []
    path = parts.path.rstrip("/")
    if path:
        urls.append(f"{origin}{PRM_WELL_KNOWN}{path}")
    urls.append(f"{origin}{PRM_WELL_KNOWN}")
    return list(dict.fromkeys(urls))


def as_metadata_urls(issuer: str) -> list[str]:
    """Where to look for an issuer's metadata, in the MCP specification's order (2025-11-25).

    With a path: RFC 8414 path-inserted, OIDC path-inserted, OIDC path-appended. Without: RFC 8414, then OIDC.
    """
    origin = origin_of(issuer)
    path = urlsplit(issuer).path.rstrip("/")
    if path:
        return [
            f"{origin}{OAUTH_WELL_KNOWN}{path}",
            f"{origin}{OIDC_WELL_KNOWN}{path}",
            f"{origin}{path}{OIDC_WELL_KNOWN}",
        ]
    return [f"{origin}{OAUTH_WELL_KNOWN}", f"{origin}{OIDC_WELL_KNOWN}"]


def _authority(url: str) -> tuple[str, str, int | None, str]:
    """(scheme, host, port, path) compared case-insensitively where URLs are, default ports made explicit."""
    parts = urlsplit(url)
    scheme = parts.scheme.lower()
    try:
        port = parts.port
    except ValueError:
        port = -1
    return scheme, (parts.hostname or "").lower(), port or _DEFAULT_PORTS.get(scheme), parts.path


def resource_covers(resource: str, server_url: str) -> bool:
    """Whether a protected resource identifier stands for ``server_url``: same origin, and its path is the
    server's path or a parent of it on a segment boundary (``https://h`` covers ``https://h/mcp``)."""
    r_scheme, r_host, r_port, r_path = _authority(resource)
    s_scheme, s_host, s_port, s_path = _authority(server_url)
    if not r_host or (r_scheme, r_host, r_port) != (s_scheme, s_host, s_port) or "#" in resource:
        return False
    base = r_path.rstrip("/")
    target = s_path.rstrip("/")
    return target == base or target.startswith(base + "/")


def canonical_resource(server_url: str) -> str:
    """The server's canonical URI (MCP spec): scheme and host lower case, no fragment, no trailing slash."""
    parts = urlsplit(server_url)
    path = parts.path.rstrip("/") if parts.path != "/" else ""
    return urlunsplit((parts.scheme.lower(), parts.netloc.lower(), path, parts.query, ""))


def _strings(doc: Mapping[str, Any], name: str) -> tuple[str, ...] | None:
    value = doc.get(name)
    if value is None:
        return None
    if not isinstance(value, list) or not all(isinstance(v, str) for v in cast("list[Any]", value)):
        raise DiscoveryFailed(f"the metadata's {name} is not a list of strings")
    return tuple(cast("list[str]", value))


def _url(doc: Mapping[str, Any], name: str, *, required: bool) -> str | None:
    value = doc.get(name)
    if value is None and not required:
        return None
    if not isinstance(value, str) or urlsplit(value).scheme not in ("https", "http") or not urlsplit(value).netloc:
        raise DiscoveryFailed(f"the metadata's {name} is {'missing or ' if required else ''}not an http(s) URL")
    return value


def parse_protected_resource(doc: object, url: str) -> ProtectedResource:
    """Read an RFC 9728 document fetched from ``url``.

    Raises:
        DiscoveryFailed: not an object, no ``resource``, or malformed fields.
    """
    if not isinstance(doc, dict):
        raise DiscoveryFailed("the protected resource metadata is not a JSON object")
    fields = cast("dict[str, Any]", doc)
    resource = fields.get("resource")
    if not isinstance(resource, str) or not resource:
        raise DiscoveryFailed("the protected resource metadata names no resource")
    servers = _strings(fields, "authorization_servers") or ()
    return ProtectedResource(resource, servers, _strings(fields, "scopes_supported"), url)


def issuers_match(found: str, expected: str) -> bool:
    """RFC 8414 §3.3: identical. One spelling is forgiven: a bare origin with and without its trailing slash
    (URL libraries add it), since both name the same well-known URL."""
    if found == expected:
        return True
    bare = {found.rstrip("/"), expected.rstrip("/")}
    return len(bare) == 1 and urlsplit(found).path in ("", "/") and urlsplit(expected).path in ("", "/")


def parse_as_metadata(doc: object, issuer: str) -> AuthServerMetadata:
    """Read RFC 8414 / OIDC discovery metadata looked up for ``issuer``.

    Raises:
        IssuerMismatch: the document names another issuer (a mix-up or poisoning attempt).
        DiscoveryFailed: not an object, or malformed fields.
    """
    if not isinstance(doc, dict):
        raise DiscoveryFailed("the authorization server metadata is not a JSON object")
    fields = cast("dict[str, Any]", doc)
    found = fields.get("issuer")
    if not isinstance(found, str) or not issuers_match(found, issuer):
        raise IssuerMismatch(
            f"the authorization server metadata for {issuer} claims to be from another issuer; refusing to use it"
        )
    authorization = _url(fields, "authorization_endpoint", required=True)
    token = _url(fields, "token_endpoint", required=True)
    assert authorization is not None and token is not None  # noqa: S101  required=True returned a URL
    return AuthServerMetadata(
        issuer=found,
        authorization_endpoint=authorization,
        token_endpoint=token,
        registration_endpoint=_url(fields, "registration_endpoint", required=False),
        revocation_endpoint=_url(fields, "revocation_endpoint", required=False),
        scopes_supported=_strings(fields, "scopes_supported"),
        code_challenge_methods_supported=_strings(fields, "code_challenge_methods_supported") or (),
        token_endpoint_auth_methods_supported=_strings(fields, "token_endpoint_auth_methods_supported"),
        iss_parameter_supported=fields.get("authorization_response_iss_parameter_supported") is True,
        client_id_metadata_document_supported=fields.get("client_id_metadata_document_supported") is True,
    )


def legacy_metadata(server_url: str) -> AuthServerMetadata:
    """2025-03-26 servers without metadata: the default endpoints at the MCP server's origin."""
    origin = origin_of(server_url)
    return AuthServerMetadata(
        issuer=origin,
        authorization_endpoint=f"{origin}/authorize",
        token_endpoint=f"{origin}/token",
        registration_endpoint=f"{origin}/register",
        code_challenge_methods_supported=("S256",),
        legacy=True,
    )


def first_of(values: Sequence[str], preferred: str | None) -> str | None:
    """``preferred`` if listed, else the first value, else None."""
    if preferred is not None and preferred in values:
        return preferred
    return values[0] if values else None
