"""Token endpoint and revocation calls against a real local authorization server."""

from __future__ import annotations

import base64
import json
from collections.abc import AsyncIterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any
from urllib.parse import unquote_plus

import httpx2
import pytest
from hypothesis import given
from hypothesis import strategies as st

from bastion.net.outbound import OutboundPolicy, UrlRefused
from bastion.oauth import tokens
from bastion.oauth.model import ClientAuth, ClientCredentials, OAuthError
from tests.fixtures.token_server import TokenServer
from tests.mcp_support import serving
from tests.processes import free_port

pytestmark = pytest.mark.anyio
RESOURCE = "https://mcp.example.com/mcp"
REDIRECT = "https://bastion.example.com/oauth/callback"
# Characters RFC 6749 §2.3.1 says must be form-urlencoded before the Basic header is built.
ODD_ID = "client:id with space+plus"
ODD_SECRET = "s3cr:t/=+ é%20"


@dataclass
class AS:
    server: TokenServer
    url: str
    http: httpx2.AsyncClient


@pytest.fixture
async def auth_server() -> AsyncIterator[AS]:
    server = TokenServer()
    server.register(ODD_ID, "client_secret_basic", ODD_SECRET)
    server.register("posting", "client_secret_post", "post-secret")
    server.register("public", "none")
    async with serving(server.app()) as url, OutboundPolicy(allow_loopback=True).client() as http:
        yield AS(server, url, http)


BASIC = ClientCredentials(ODD_ID, ClientAuth.BASIC, ODD_SECRET)
POST = ClientCredentials("posting", ClientAuth.POST, "post-secret")
PUBLIC = ClientCredentials("public", ClientAuth.NONE)


async def test_a_code_is_exchanged_with_basic_auth_encoded_as_rfc_6749_says(auth_server: AS) -> None:
    code = auth_server.server.code(verifier="v" * 43, redirect_uri=REDIRECT, resource=RESOURCE)
    before = datetime.now(UTC)
    got = await tokens.exchange_code(
        auth_server.http,
        f"{auth_server.url}/token",
        BASIC,
        code=code,
        redirect_uri=REDIRECT,
        code_verifier="v" * 43,
        resource=RESOURCE,
    )
    after = datetime.now(UTC)
    assert got.access_token in auth_server.server.access_tokens
    assert got.refresh_token in auth_server.server.refresh_tokens
    assert got.token_type == "Bearer"
    assert got.expires_at is not None
    assert before + timedelta(seconds=3600) <= got.expires_at <= after + timedelta(seconds=3600)
    (seen,) = auth_server.server.to("/token")
    assert seen.client_id == ODD_ID
    assert seen.form == {
        "grant_type": "authorization_code",
        "code": code,
        "redirect_uri": REDIRECT,
        "code_verifier": "v" * 43,
        "resource": RESOURCE,
    }
    # The credentials travel only in the header, each part form-urlencoded.
    raw = base64.b64decode(seen.headers["authorization"].removeprefix("Basic ")).decode()
    assert raw.count(":") == 1
    assert seen.headers["accept"] == "application/json"
    assert got.access_token not in repr(got)
    assert got.refresh_token not in repr(got)


@pytest.mark.parametrize(("client", "form_auth"), [(POST, {"client_id", "client_secret"}), (PUBLIC, {"client_id"})])
async def test_post_and_public_clients_authenticate_in_the_body(
    auth_server: AS, client: ClientCredentials, form_auth: set[str]
) -> None:
    _access, refresh = auth_server.server.grant(RESOURCE)
    got = await tokens.refresh(
        auth_server.http, f"{auth_server.url}/token", client, refresh_token=refresh, resource=RESOURCE
    )
    assert got.refresh_token is not None
    assert got.refresh_token != refresh  # rotated
    (seen,) = auth_server.server.refreshes
    assert seen.client_id == client.client_id
    assert "authorization" not in seen.headers
    assert set(seen.form) == {"grant_type", "refresh_token", "resource"} | form_auth


async def test_a_refresh_carries_scope_when_asked_and_keeps_the_token_when_not_rotated(auth_server: AS) -> None:
    auth_server.server.rotate = False
    auth_server.server.expires_in = None
    _access, refresh = auth_server.server.grant(None)
    got = await tokens.refresh(
        auth_server.http, f"{auth_server.url}/token", PUBLIC, refresh_token=refresh, resource=None, scope="read write"
    )
    assert got.refresh_token is None  # the caller keeps the one it has
    assert got.expires_at is None
    (seen,) = auth_server.server.refreshes
    assert seen.form["scope"] == "read write"
    assert "resource" not in seen.form


async def test_invalid_grant_is_the_servers_error_and_never_shows_the_token(auth_server: AS) -> None:
    secret_rt = "rt-the-secret-refresh-token-value"
    auth_server.server.scripted.append(
        (400, {"error": "invalid_grant", "error_description": f"refresh token {secret_rt} was revoked"})
    )
    with pytest.raises(OAuthError) as raised:
        await tokens.refresh(
            auth_server.http, f"{auth_server.url}/token", POST, refresh_token=secret_rt, resource=RESOURCE
        )
    assert raised.value.error == "invalid_grant"
    assert raised.value.status == 400
    assert raised.value.description == "refresh token [redacted] was revoked"
    assert secret_rt not in str(raised.value)
    assert "post-secret" not in str(raised.value)


async def test_wrong_client_credentials_are_invalid_client(auth_server: AS) -> None:
    _access, refresh = auth_server.server.grant(RESOURCE)
    wrong = ClientCredentials("posting", ClientAuth.POST, "not-the-secret")
    with pytest.raises(OAuthError) as raised:
        await tokens.refresh(auth_server.http, f"{auth_server.url}/token", wrong, refresh_token=refresh, resource=None)
    assert (raised.value.error, raised.value.status) == ("invalid_client", 401)


BAD_ANSWERS: list[tuple[int, Any]] = [
    (500, b"<html>internal error</html>"),  # not JSON
    (400, {"error": 'bad "quoted" code'}),  # not an RFC 6749 error code
    (302, {}),  # a redirect is not followed
    (200, b"not json"),
    (200, [1, 2]),
    (200, {"token_type": "Bearer"}),  # no access_token
    (200, {"access_token": "", "token_type": "Bearer"}),
    (200, {"access_token": "a", "token_type": "mac"}),  # not a bearer token
    (200, {"access_token": "a"}),  # token_type is required
    (200, {"access_token": "a", "token_type": "Bearer", "expires_in": -5}),
    (200, {"access_token": "a", "token_type": "Bearer", "expires_in": True}),
    (200, {"access_token": "a", "token_type": "Bearer", "expires_in": "soon"}),
    (200, {"access_token": "a", "token_type": "Bearer", "refresh_token": 7}),
    (200, {"access_token": "a", "token_type": "Bearer", "scope": ["read"]}),
    (200, {"access_token": "a", "token_type": "Bearer", "id_token": 5}),
    (200, b"x" * (tokens.MAX_RESPONSE_BYTES + 1)),  # oversized
]


@pytest.mark.parametrize(("status", "body"), BAD_ANSWERS)
async def test_anything_but_a_token_response_is_invalid_response(auth_server: AS, status: int, body: Any) -> None:
    auth_server.server.scripted.append((status, body))
    _access, refresh = auth_server.server.grant(None)
    with pytest.raises(OAuthError) as raised:
        await tokens.refresh(auth_server.http, f"{auth_server.url}/token", PUBLIC, refresh_token=refresh, resource=None)
    assert raised.value.error == tokens.INVALID_RESPONSE
    assert raised.value.status == status


async def test_token_type_is_case_insensitive_and_numeric_strings_are_seconds(auth_server: AS) -> None:
    answer = {"access_token": "a", "token_type": "BEARER", "expires_in": "120", "scope": "read", "id_token": "x.y.z"}
    auth_server.server.scripted.append((200, answer))
    got = await tokens.refresh(auth_server.http, f"{auth_server.url}/token", PUBLIC, refresh_token="r", resource=None)
    assert (got.token_type, got.scope, got.id_token) == ("Bearer", "read", "x.y.z")
    assert "x.y.z" not in repr(got)
    assert got.expires_at is not None
    assert got.expires_at - datetime.now(UTC) <= timedelta(seconds=120)


async def test_an_unreachable_server_is_reported_without_the_token() -> None:
    async with OutboundPolicy(allow_loopback=True).client() as http:
        with pytest.raises(OAuthError) as raised:
            await tokens.refresh(
                http, f"http://127.0.0.1:{free_port()}/token", POST, refresh_token="rt-hidden", resource=None
            )
    assert raised.value.error == tokens.UNREACHABLE
    assert "rt-hidden" not in str(raised.value)


async def test_a_secret_client_without_its_secret_is_refused_before_any_request(auth_server: AS) -> None:
    for method in (ClientAuth.BASIC, ClientAuth.POST):
        with pytest.raises(OAuthError, match="invalid_client"):
            await tokens.refresh(
                auth_server.http,
                f"{auth_server.url}/token",
                ClientCredentials("x", method),
                refresh_token="r",
                resource=None,
            )
    assert auth_server.server.requests == []


async def test_revocation_sends_the_token_with_its_type_hint(auth_server: AS) -> None:
    _access, refresh = auth_server.server.grant(RESOURCE)
    await tokens.revoke(auth_server.http, f"{auth_server.url}/revoke", BASIC, token=refresh, hint="refresh_token")
    assert auth_server.server.revoked == [(refresh, "refresh_token")]
    assert refresh not in auth_server.server.refresh_tokens
    (seen,) = auth_server.server.to("/revoke")
    assert seen.client_id == ODD_ID


async def test_a_revocation_endpoint_that_is_not_there_is_an_error(auth_server: AS) -> None:
    auth_server.server.revocation = False
    with pytest.raises(OAuthError) as raised:
        await tokens.revoke(auth_server.http, f"{auth_server.url}/revoke", PUBLIC, token="t", hint="access_token")
    assert (raised.value.error, raised.value.status) == (tokens.INVALID_RESPONSE, 404)


async def test_the_outbound_policy_refuses_a_loopback_token_endpoint_by_default(auth_server: AS) -> None:
    async with OutboundPolicy().client() as strict:
        with pytest.raises(UrlRefused) as raised:
            await tokens.refresh(strict, f"{auth_server.url}/token", PUBLIC, refresh_token="rt-hidden", resource=None)
    assert raised.value.rule == "loopback"
    assert "rt-hidden" not in str(raised.value)
    assert auth_server.server.requests == []


@given(client_id=st.text(min_size=1), secret=st.text(min_size=1))
def test_basic_credentials_round_trip_through_form_encoding(client_id: str, secret: str) -> None:
    headers = tokens._authenticate(ClientCredentials(client_id, ClientAuth.BASIC, secret), form := {})  # pyright: ignore[reportPrivateUsage]
    assert form == {}
    raw = base64.b64decode(headers["Authorization"].removeprefix("Basic ")).decode("utf-8")
    got_id, _, got_secret = raw.partition(":")
    assert (unquote_plus(got_id), unquote_plus(got_secret)) == (client_id, secret)


JSON = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(),
    lambda inner: st.lists(inner) | st.dictionaries(st.text(), inner),
)


@given(
    doc=st.fixed_dictionaries(
        {},
        optional={
            "access_token": JSON,
            "token_type": st.sampled_from(["Bearer", "bearer", "DPoP"]) | JSON,
            "expires_in": JSON,
            "refresh_token": JSON,
            "scope": JSON,
        },
    )
)
def test_a_token_response_parses_or_fails_only_as_invalid_response(doc: dict[str, Any]) -> None:
    try:
        got = tokens._token_set((json.loads(json.dumps(doc)), datetime.now(UTC)))  # pyright: ignore[reportPrivateUsage]
    except OAuthError as exc:
        assert exc.error == tokens.INVALID_RESPONSE
    else:
        assert got.access_token == doc["access_token"]
        assert isinstance(got.access_token, str)
        assert doc["token_type"].lower() == "bearer"
