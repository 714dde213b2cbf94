"""Dynamic client registration (RFC 7591) against a real server, and the choice of token endpoint authentication."""

from __future__ import annotations

import json
from typing import Any

import pytest
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from bastion.domain.models import OAuthRegistration
from bastion.oauth.errors import RegistrationFailed
from bastion.oauth.metadata import AuthServerMetadata
from bastion.oauth.model import ClientAuth
from bastion.oauth.registration import (
    choose_auth_method,
    client_metadata,
    register_dynamic,
    uses_metadata_document,
)
from tests.mcp_support import serving
from tests.oauth.flow_support import LOOPBACK

pytestmark = pytest.mark.anyio


def _server(status: int, answer: Any, bodies: list[dict[str, Any]]) -> Starlette:
    async def register(request: Request) -> Response:
        bodies.append(await request.json())
        return JSONResponse(answer, status_code=status)

    return Starlette(routes=[Route("/register", register, methods=["POST"])])


def _meta(base: str, methods: list[str] | None) -> AuthServerMetadata:
    return AuthServerMetadata(
        base,
        f"{base}/authorize",
        f"{base}/token",
        registration_endpoint=f"{base}/register",
        token_endpoint_auth_methods_supported=tuple(methods) if methods is not None else None,
    )


async def _register(status: int, answer: Any, methods: list[str] | None) -> tuple[Any, list[dict[str, Any]]]:
    bodies: list[dict[str, Any]] = []
    async with serving(_server(status, answer, bodies)) as base, LOOPBACK.client() as http:
        try:
            found: Any = await register_dynamic(http, _meta(base, methods), public_url="https://b.example", scope="s")
        except RegistrationFailed as exc:
            found = exc
    return found, bodies


async def test_registration_sends_bastion_s_metadata_and_keeps_the_secret_out_of_repr() -> None:
    answer = {"client_id": "c1", "client_secret": "s3cret", "token_endpoint_auth_method": "client_secret_basic"}
    found, (body,) = await _register(201, answer, None)
    assert body == {**client_metadata("https://b.example", auth_method=ClientAuth.BASIC), "scope": "s"}
    assert body["redirect_uris"] == ["https://b.example/oauth/callback"]
    assert body["grant_types"] == ["authorization_code", "refresh_token"]
    assert (found.kind, found.client_id, found.auth_method, found.client_secret) == (
        OAuthRegistration.DYNAMIC,
        "c1",
        ClientAuth.BASIC,
        "s3cret",
    )
    assert "s3cret" not in repr(found)


async def test_a_public_client_drops_a_secret_it_was_given_anyway() -> None:
    found, (body,) = await _register(201, {"client_id": "c1", "client_secret": "unused"}, ["none"])
    assert body["token_endpoint_auth_method"] == "none"
    assert (found.auth_method, found.client_secret) == (ClientAuth.NONE, None)


@pytest.mark.parametrize(
    ("status", "answer", "reason"),
    [
        (400, {"error": "invalid_redirect_uri"}, "HTTP 400 \\(invalid_redirect_uri\\)"),
        (201, ["not", "an", "object"], "not a JSON object"),
        (201, {"client_secret": "x"}, "no client_id"),
        (201, {"client_id": "c", "token_endpoint_auth_method": "private_key_jwt"}, "private_key_jwt"),
        (201, {"client_id": "c", "token_endpoint_auth_method": "client_secret_post"}, "no client secret"),
    ],
)
async def test_a_refused_or_unusable_registration_says_why(status: int, answer: Any, reason: str) -> None:
    found, _bodies = await _register(status, answer, ["client_secret_post"])
    assert isinstance(found, RegistrationFailed)
    with pytest.raises(RegistrationFailed, match=reason):
        raise found


async def test_a_server_without_registration_asks_for_a_pre_registered_client() -> None:
    meta = AuthServerMetadata("https://as.example", "https://as.example/a", "https://as.example/t")
    async with LOOPBACK.client() as http:
        with pytest.raises(RegistrationFailed, match="no dynamic client registration"):
            await register_dynamic(http, meta, public_url="https://b.example")


def test_a_secret_goes_basic_then_post_and_no_secret_goes_none() -> None:
    assert choose_auth_method(None, has_secret=True) is ClientAuth.BASIC  # RFC 8414 default
    assert choose_auth_method(["client_secret_post", "client_secret_basic"], has_secret=True) is ClientAuth.BASIC
    assert choose_auth_method(["client_secret_post"], has_secret=True) is ClientAuth.POST
    assert choose_auth_method(["client_secret_basic"], has_secret=False) is ClientAuth.NONE
    with pytest.raises(RegistrationFailed):
        choose_auth_method(["private_key_jwt"], has_secret=True)


def test_a_metadata_document_needs_the_server_s_support_and_an_https_bastion() -> None:
    supported = AuthServerMetadata("h", "a", "t", client_id_metadata_document_supported=True)
    assert uses_metadata_document(supported, "https://b.example")
    assert not uses_metadata_document(supported, "http://127.0.0.1:8080")
    assert not uses_metadata_document(AuthServerMetadata("h", "a", "t"), "https://b.example")
    assert client_metadata("http://127.0.0.1:8080")["application_type"] == "native"
    assert json.dumps(client_metadata("https://b.example/"))  # serialisable, trailing slash tolerated
    assert client_metadata("https://b.example/")["redirect_uris"] == ["https://b.example/oauth/callback"]


def _picky_server(bodies: list[dict[str, Any]], *, refuse: str = "invalid_client_metadata") -> Starlette:
    """Refuses any registration that names a scope (RFC 7591 §3.2.2 allows it), registers the others."""

    async def register(request: Request) -> Response:
        body = await request.json()
        bodies.append(body)
        if "scope" in body:
            return JSONResponse({"error": refuse, "error_description": "unknown scope"}, status_code=400)
        return JSONResponse({"client_id": "c1", "token_endpoint_auth_method": "none"}, status_code=201)

    return Starlette(routes=[Route("/register", register, methods=["POST"])])


async def test_a_registration_refused_for_its_scope_is_asked_again_once_without_it() -> None:
    bodies: list[dict[str, Any]] = []
    async with serving(_picky_server(bodies)) as base, LOOPBACK.client() as http:
        found = await register_dynamic(http, _meta(base, ["none"]), public_url="https://b.example", scope="mcp:x")
    first, second = bodies
    assert first["scope"] == "mcp:x" and "scope" not in second
    assert {k: v for k, v in first.items() if k != "scope"} == second
    assert (found.client_id, found.auth_method) == ("c1", ClientAuth.NONE)


async def test_other_refusals_and_scopeless_requests_are_not_asked_again() -> None:
    bodies: list[dict[str, Any]] = []
    async with serving(_picky_server(bodies, refuse="invalid_redirect_uri")) as base, LOOPBACK.client() as http:
        with pytest.raises(RegistrationFailed, match="invalid_redirect_uri"):
            await register_dynamic(http, _meta(base, ["none"]), public_url="https://b.example", scope="mcp:x")
    assert len(bodies) == 1
    bodies.clear()
    async with serving(_server(400, {"error": "invalid_client_metadata"}, bodies)) as base, LOOPBACK.client() as http:
        with pytest.raises(RegistrationFailed, match="invalid_client_metadata"):
            await register_dynamic(http, _meta(base, ["none"]), public_url="https://b.example")
    assert len(bodies) == 1
