"""The journey's OAuth peers behave as configured, driven by hand over HTTP (no browser, no Bastion).

The authorization server (npm's oidc-provider) must demand PKCE S256, register clients dynamically, put
``iss`` in the authorization response, issue JWT access tokens for the named resource and rotating refresh
tokens, and revoke; the protected upstream must challenge per RFC 9728 and accept only its own tokens.
If these fail, the browser journey's failures are about the peers, not about Bastion.
"""

from __future__ import annotations

import base64
import hashlib
import json
import secrets
from collections.abc import AsyncGenerator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any
from urllib.parse import parse_qs, urlsplit

import httpx2
import jwt
import pytest
from mcp import Client
from mcp.client.streamable_http import streamable_http_client

from tests.browser.peers import AS_USERS, Peer, authorization_server, protected_upstream, upstream_resource
from tests.fixtures.protected_upstream import fingerprint

pytestmark = [pytest.mark.anyio, pytest.mark.e2e]

REDIRECT_URI = "http://127.0.0.1:9/callback"  # never visited: the test reads the code from the Location header


@dataclass(frozen=True)
class Peers:
    issuer: str
    resource: str
    other_resource: str
    server: Peer
    upstream: Peer


@pytest.fixture(scope="module")
def peers() -> Any:
    port, resource = upstream_resource()
    other = "http://127.0.0.1:9/other/mcp"
    with authorization_server([resource, other]) as server:
        issuer: str = server.ready["issuer"]
        with protected_upstream(port, issuer) as upstream:
            assert upstream.ready["url"] == resource
            yield Peers(issuer, resource, other, server, upstream)


def _pkce() -> tuple[str, str]:
    verifier = secrets.token_urlsafe(48)
    challenge = base64.urlsafe_b64encode(hashlib.sha256(verifier.encode()).digest()).rstrip(b"=").decode()
    return verifier, challenge


async def _register(http: httpx2.AsyncClient, issuer: str) -> dict[str, Any]:
    discovery = (await http.get(f"{issuer}/.well-known/openid-configuration")).json()
    registered = await http.post(
        discovery["registration_endpoint"],
        json={
            "client_name": "peer self-test",
            "redirect_uris": [REDIRECT_URI],
            "grant_types": ["authorization_code", "refresh_token"],
            "response_types": ["code"],
            "token_endpoint_auth_method": "client_secret_basic",
            "scope": "mcp:tools",  # Bastion registers with the scope it will ask for
        },
    )
    assert registered.status_code == 201, registered.text
    client: dict[str, Any] = registered.json()
    return {**client, "discovery": discovery}


async def _follow(http: httpx2.AsyncClient, response: httpx2.Response) -> httpx2.Response:
    """Follow redirects within the authorization server; stop at the client's redirect URI."""
    while response.is_redirect:
        location = str(response.headers["location"])
        target = str(response.url.join(location))
        if target.startswith(REDIRECT_URI):
            return response
        response = await http.get(target)
    return response


def _redirect_query(response: httpx2.Response, state: str) -> dict[str, list[str]]:
    assert response.is_redirect and response.headers["location"].startswith(REDIRECT_URI), response.text
    query = parse_qs(urlsplit(str(response.headers["location"])).query)
    assert query["state"] == [state]
    return query


async def _authorize(
    http: httpx2.AsyncClient,
    peers: Peers,
    client: dict[str, Any],
    user: str,
    *,
    resource: str,
    challenge: str,
    signed_in: bool = False,
) -> dict[str, list[str]]:
    """Log ``user`` in and consent (unless ``signed_in`` and consented); the query of the redirect to the client."""
    state = secrets.token_urlsafe(16)
    page = await _follow(
        http,
        await http.get(
            client["discovery"]["authorization_endpoint"],
            params={
                "response_type": "code",
                "client_id": client["client_id"],
                "redirect_uri": REDIRECT_URI,
                "scope": "mcp:tools",
                "resource": resource,
                "state": state,
                "code_challenge": challenge,
                "code_challenge_method": "S256",
            },
        ),
    )
    if signed_in:
        return _redirect_query(page, state)
    assert page.status_code == 200 and "Sign in" in page.text, page.text
    uid = str(page.url).rsplit("/", 1)[-1]
    wrong = await http.post(f"{peers.issuer}/interaction/{uid}/login", data={"username": user, "password": "nope"})
    assert wrong.status_code == 401
    consent = await _follow(
        http,
        await http.post(f"{peers.issuer}/interaction/{uid}/login", data={"username": user, "password": AS_USERS[user]}),
    )
    assert consent.status_code == 200 and "Authorize access" in consent.text, consent.text
    assert resource in consent.text
    uid = str(consent.url).rsplit("/", 1)[-1]
    back = await _follow(http, await http.post(f"{peers.issuer}/interaction/{uid}/confirm"))
    return _redirect_query(back, state)


async def _token(http: httpx2.AsyncClient, client: dict[str, Any], **form: str) -> httpx2.Response:
    return await http.post(
        client["discovery"]["token_endpoint"], data=form, auth=(client["client_id"], client["client_secret"])
    )


@asynccontextmanager
async def _mcp(url: str, token: str) -> AsyncGenerator[Client]:
    async with (
        httpx2.AsyncClient(headers={"Authorization": f"Bearer {token}"}, timeout=30) as http,
        Client(streamable_http_client(url, http_client=http), mode="legacy", cache=None) as client,  # type: ignore[arg-type]
    ):
        yield client


async def test_a_member_signs_in_at_the_authorization_server_and_the_upstream_sees_their_own_token(
    peers: Peers,
) -> None:
    async with httpx2.AsyncClient(timeout=30) as http:
        client = await _register(http, peers.issuer)
        assert client["discovery"]["code_challenge_methods_supported"] == ["S256"]
        assert client["discovery"]["authorization_response_iss_parameter_supported"] is True
        verifier, challenge = _pkce()
        query = await _authorize(http, peers, client, "ada", resource=peers.resource, challenge=challenge)
        assert query["iss"] == [peers.issuer]  # RFC 9207

        # The code is bound to the PKCE verifier.
        bad = await _token(
            http, client, grant_type="authorization_code", code=query["code"][0], redirect_uri=REDIRECT_URI,
            code_verifier=_pkce()[0], resource=peers.resource,
        )  # fmt: skip
        assert bad.status_code == 400 and bad.json()["error"] == "invalid_grant"
        query = await _authorize(
            http, peers, client, "ada", resource=peers.resource, challenge=challenge, signed_in=True
        )
        tokens = await _token(
            http, client, grant_type="authorization_code", code=query["code"][0], redirect_uri=REDIRECT_URI,
            code_verifier=verifier, resource=peers.resource,
        )  # fmt: skip
        assert tokens.status_code == 200, tokens.text
        body = tokens.json()
        access, refresh = body["access_token"], body["refresh_token"]
        assert jwt.get_unverified_header(access)["typ"] == "at+jwt"
        claims = jwt.decode(access, options={"verify_signature": False})
        assert (claims["sub"], claims["aud"], claims["iss"]) == ("ada", peers.resource, peers.issuer)
        assert claims["scope"] == "mcp:tools"

    async with _mcp(peers.resource, access) as mcp:
        result = await mcp.call_tool("whoami", {})
    seen = json.loads(result.content[0].text)  # type: ignore[union-attr]
    assert seen["sub"] == "ada"
    assert seen["client_id"] == client["client_id"]
    assert seen["access_token_sha256"] == fingerprint(access)
    issued = [e for e in peers.server.events() if e.get("access_token_sha256") == fingerprint(access)]
    assert [(e["sub"], e["client_id"], e["resource"]) for e in issued] == [("ada", client["client_id"], peers.resource)]
    calls = [e for e in peers.upstream.events() if e["event"] == "call"]
    assert calls[-1]["access_token_sha256"] == fingerprint(access)

    async with httpx2.AsyncClient(timeout=30) as http:
        # Refresh tokens rotate: the new one works, the old one is spent.
        rotated = await _token(http, client, grant_type="refresh_token", refresh_token=refresh, resource=peers.resource)
        assert rotated.status_code == 200, rotated.text
        new_refresh = rotated.json()["refresh_token"]
        assert new_refresh != refresh
        assert jwt.decode(rotated.json()["access_token"], options={"verify_signature": False})["sub"] == "ada"
        spent = await _token(http, client, grant_type="refresh_token", refresh_token=refresh)
        assert spent.status_code == 400 and spent.json()["error"] == "invalid_grant"
        # Revocation (RFC 7009) ends the refresh token.
        revoked = await http.post(
            client["discovery"]["revocation_endpoint"],
            data={"token": new_refresh, "token_type_hint": "refresh_token"},
            auth=(client["client_id"], client["client_secret"]),
        )
        assert revoked.status_code == 200
        after = await _token(http, client, grant_type="refresh_token", refresh_token=new_refresh)
        assert after.status_code == 400 and after.json()["error"] == "invalid_grant"


async def test_the_authorization_server_requires_pkce_and_a_known_resource(peers: Peers) -> None:
    async with httpx2.AsyncClient(timeout=30) as http:
        client = await _register(http, peers.issuer)
        common = {
            "response_type": "code",
            "client_id": client["client_id"],
            "redirect_uri": REDIRECT_URI,
            "scope": "mcp:tools",
            "state": "s",
        }
        endpoint = client["discovery"]["authorization_endpoint"]
        no_pkce = await http.get(endpoint, params={**common, "resource": peers.resource})
        assert parse_qs(urlsplit(no_pkce.headers["location"]).query)["error"] == ["invalid_request"]
        _v, challenge = _pkce()
        plain = await http.get(
            endpoint,
            params={
                **common,
                "resource": peers.resource,
                "code_challenge": challenge,
                "code_challenge_method": "plain",
            },
        )
        assert parse_qs(urlsplit(plain.headers["location"]).query)["error"] == ["invalid_request"]
        unknown = await http.get(
            endpoint,
            params={
                **common,
                "resource": "http://127.0.0.1:9/elsewhere",
                "code_challenge": challenge,
                "code_challenge_method": "S256",
            },
        )
        assert parse_qs(urlsplit(unknown.headers["location"]).query)["error"] == ["invalid_target"]


async def test_the_upstream_challenges_and_refuses_tokens_not_issued_for_it(peers: Peers) -> None:
    async with httpx2.AsyncClient(timeout=30) as http:
        body: dict[str, Any] = {"jsonrpc": "2.0", "id": 1, "method": "tools/list", "params": {}}
        headers = {"Accept": "application/json, text/event-stream"}
        anonymous = await http.post(peers.resource, json=body, headers=headers)
        assert anonymous.status_code == 401
        challenge = anonymous.headers["www-authenticate"]
        metadata_url = f"{peers.resource.removesuffix('/mcp')}/.well-known/oauth-protected-resource/mcp"
        assert challenge.startswith("Bearer ") and f'resource_metadata="{metadata_url}"' in challenge
        metadata = (await http.get(metadata_url)).json()
        assert metadata["resource"] == peers.resource
        assert metadata["authorization_servers"] == [peers.issuer]
        assert metadata["scopes_supported"] == ["mcp:tools"]

        # A real token of the same authorization server, for another resource: refused.
        client = await _register(http, peers.issuer)
        verifier, challenge_value = _pkce()
        query = await _authorize(http, peers, client, "grace", resource=peers.other_resource, challenge=challenge_value)
        tokens = await _token(
            http, client, grant_type="authorization_code", code=query["code"][0], redirect_uri=REDIRECT_URI,
            code_verifier=verifier, resource=peers.other_resource,
        )  # fmt: skip
        foreign = tokens.json()["access_token"]
        assert jwt.decode(foreign, options={"verify_signature": False})["aud"] == peers.other_resource
        refused = await http.post(peers.resource, json=body, headers={**headers, "Authorization": f"Bearer {foreign}"})
        assert refused.status_code == 401
        assert 'error="invalid_token"' in refused.headers["www-authenticate"]
        garbage = await http.post(peers.resource, json=body, headers={**headers, "Authorization": "Bearer bst_abc"})
        assert garbage.status_code == 401
    reasons = [e["reason"] for e in peers.upstream.events() if e["event"] == "refused"]
    assert "token refused: InvalidAudienceError" in reasons
