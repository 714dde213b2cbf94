"""OAuth discovery for an upstream MCP server, as the MCP authorization specification orders it.

1. Probe: an MCP request without credentials; a 401 (or 403) carries a ``Bearer`` challenge.
2. RFC 9728 protected resource metadata: the challenge's ``resource_metadata`` URL, else the well-known URLs
   (path-inserted, then root). Its ``resource`` must stand for the server's URL, or Bastion refuses.
3. RFC 8414 / OIDC metadata of the authorization server the resource names; its ``issuer`` must be the one
   looked up. Without protected resource metadata (2025-03-26 servers): metadata at the server's origin,
   else the default endpoints ``/authorize``, ``/token`` and ``/register`` there.

Every request goes through the caller's HTTP client, which is expected to come from the outbound policy
(``OutboundPolicy.client()``): each URL and each resolved address is checked, and redirects are not followed.
"""

from __future__ import annotations

import contextlib
import json
import logging
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Final

import httpx2

from bastion.domain.models import Transport
from bastion.oauth.challenge import Challenge, bearer_challenge
from bastion.oauth.errors import DiscoveryFailed, ResourceMismatch
from bastion.oauth.metadata import (
    OAUTH_WELL_KNOWN,
    AuthServerMetadata,
    ProtectedResource,
    as_metadata_urls,
    canonical_resource,
    first_of,
    legacy_metadata,
    origin_of,
    parse_as_metadata,
    parse_protected_resource,
    prm_urls,
    resource_covers,
)

__all__ = [
    "MAX_METADATA_BYTES",
    "Discovery",
    "discover",
    "fetch_as_metadata",
    "fetch_protected_resource",
    "probe",
    "read_bounded",
]

logger = logging.getLogger("bastion.oauth")

MAX_METADATA_BYTES: Final = 256 * 1024
PROBE_PROTOCOL_VERSION: Final = "2025-11-25"
_CHALLENGE_STATUSES: Final = (401, 403)
_JSON_HEADERS: Final = {"Accept": "application/json"}
_MCP_HEADERS: Final = {"Accept": "application/json, text/event-stream", "Content-Type": "application/json"}


@dataclass(frozen=True, slots=True)
class Discovery:
    """Everything an authorization request to one upstream needs to know about it.

    ``resource`` is what goes in the RFC 8707 ``resource`` parameter: the protected resource metadata's
    identifier exactly as published, or the server's canonical URI when it publishes none.
    """

    server_url: str
    resource: str
    challenge: Challenge | None
    protected_resource: ProtectedResource | None
    authorization_server: AuthServerMetadata


async def discover(
    http: httpx2.AsyncClient,
    server_url: str,
    *,
    transport: Transport = Transport.STREAMABLE_HTTP,
    issuer_hint: str | None = None,
) -> Discovery:
    """Find how to authorize at ``server_url``.

    Args:
        issuer_hint: the admin's choice of authorization server: preferred among several, used when the server
            publishes no protected resource metadata.

    Raises:
        ResourceMismatch: the protected resource metadata speaks for another resource.
        IssuerMismatch: authorization server metadata that names another issuer.
        DiscoveryFailed: the server cannot be reached, or metadata is missing or malformed.
    """
    challenge = await probe(http, server_url, transport)
    prm = await fetch_protected_resource(http, server_url, challenge.resource_metadata if challenge else None)
    if prm is not None:
        if not resource_covers(prm.resource, server_url):
            raise ResourceMismatch(
                f"the server's protected resource metadata is for {prm.resource!r}, not for {server_url!r}; "
                "refusing to authorize"
            )
        issuer = first_of(prm.authorization_servers, issuer_hint) or issuer_hint
        if issuer is None:
            raise DiscoveryFailed("the server's protected resource metadata names no authorization server")
        found = await fetch_as_metadata(http, issuer)
        if found is None:
            raise DiscoveryFailed(f"no authorization server metadata found for {issuer}")
        return Discovery(server_url, prm.resource, challenge, prm, found)
    resource = canonical_resource(server_url)
    if issuer_hint is not None:
        found = await fetch_as_metadata(http, issuer_hint)
        if found is None:
            raise DiscoveryFailed(f"no authorization server metadata found for {issuer_hint}")
        return Discovery(server_url, resource, challenge, None, found)
    # 2025-03-26: the authorization server lives at the MCP server's origin, with or without metadata.
    origin = origin_of(server_url)
    doc = await _get_json(http, f"{origin}{OAUTH_WELL_KNOWN}")
    legacy = parse_as_metadata(doc, origin) if doc is not None else legacy_metadata(server_url)
    return Discovery(server_url, resource, challenge, None, legacy)


async def probe(http: httpx2.AsyncClient, server_url: str, transport: Transport) -> Challenge | None:
    """The ``Bearer`` challenge the server answers an unauthenticated MCP request with, if it sends one.

    Some servers let ``initialize`` through and protect what follows, so a server that answers it is asked
    for ``tools/list`` too (in the session it opened, if any).

    Raises:
        DiscoveryFailed: the server could not be reached.
    """
    if transport is Transport.SSE:
        return await _challenge_of(http, "GET", server_url, headers={"Accept": "text/event-stream"})
    initialize = {
        "jsonrpc": "2.0",
        "id": 1,
        "method": "initialize",
        "params": {
            "protocolVersion": PROBE_PROTOCOL_VERSION,
            "capabilities": {},
            "clientInfo": {"name": "bastion-gateway", "version": "1"},
        },
    }
    session: dict[str, str] = {}
    found = await _challenge_of(http, "POST", server_url, headers=_MCP_HEADERS, json=initialize, session=session)
    if found is not None:
        return found
    listing: dict[str, Any] = {"jsonrpc": "2.0", "id": 2, "method": "tools/list", "params": {}}
    headers = {**_MCP_HEADERS, "MCP-Protocol-Version": PROBE_PROTOCOL_VERSION, **session}
    found = await _challenge_of(http, "POST", server_url, headers=headers, json=listing)
    if session:
        # End the session the probe opened; a server that cannot is no concern of discovery.
        with contextlib.suppress(httpx2.HTTPError):
            await http.delete(server_url, headers={**session, "MCP-Protocol-Version": PROBE_PROTOCOL_VERSION})
    return found


async def _challenge_of(
    http: httpx2.AsyncClient,
    method: str,
    url: str,
    *,
    headers: Mapping[str, str],
    json: Any = None,
    session: dict[str, str] | None = None,
) -> Challenge | None:
    """The Bearer challenge of one request's answer (its body is not read); records a session id if given."""
    try:
        async with http.stream(method, url, headers=dict(headers), json=json) as response:
            if session is not None and (sid := response.headers.get("mcp-session-id")):
                session["Mcp-Session-Id"] = sid
            if response.status_code not in _CHALLENGE_STATUSES:
                return None
            values = response.headers.get_list("www-authenticate")
    except httpx2.HTTPError as exc:
        raise DiscoveryFailed(f"the server at {url} could not be reached ({type(exc).__name__})") from None
    return bearer_challenge(values) or Challenge("bearer")


async def fetch_protected_resource(
    http: httpx2.AsyncClient, server_url: str, from_header: str | None
) -> ProtectedResource | None:
    """The first protected resource metadata document found, or None when the server publishes none.

    Raises:
        DiscoveryFailed: a document was found but is malformed.
    """
    for url in prm_urls(server_url, from_header):
        doc = await _get_json(http, url)
        if doc is not None:
            return parse_protected_resource(doc, url)
    return None


async def fetch_as_metadata(http: httpx2.AsyncClient, issuer: str) -> AuthServerMetadata | None:
    """The issuer's metadata from the first well-known URL that has it, or None.

    Raises:
        IssuerMismatch: the document found names another issuer.
        DiscoveryFailed: the document found is malformed.
    """
    for url in as_metadata_urls(issuer):
        doc = await _get_json(http, url)
        if doc is not None:
            return parse_as_metadata(doc, issuer)
    return None


async def _get_json(http: httpx2.AsyncClient, url: str) -> object | None:
    """A 200 JSON answer to GET ``url``; None for any other status, an unreachable host or a body not JSON."""
    try:
        async with http.stream("GET", url, headers=_JSON_HEADERS) as response:
            if response.status_code != 200:
                return None
            body = await read_bounded(response)
    except httpx2.HTTPError as exc:
        logger.info("metadata not reachable", extra={"url": url, "reason": type(exc).__name__})
        return None
    if body is None:
        raise DiscoveryFailed(f"the metadata at {url} is larger than {MAX_METADATA_BYTES} bytes")
    try:
        return json.loads(body.decode("utf-8"))
    except (ValueError, RecursionError):
        return None


async def read_bounded(response: httpx2.Response, limit: int = MAX_METADATA_BYTES) -> bytes | None:
    """The body, or None if it is larger than ``limit`` bytes (reading stops there)."""
    chunks: list[bytes] = []
    size = 0
    async for chunk in response.aiter_bytes():
        size += len(chunk)
        if size > limit:
            return None
        chunks.append(chunk)
    return b"".join(chunks)
