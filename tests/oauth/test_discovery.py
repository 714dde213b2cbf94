"""Discovery against real HTTP servers: the probe, every well-known fallback, and each reason to refuse."""

from __future__ import annotations

import pytest
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from bastion.domain.models import Transport
from bastion.net.outbound import OutboundPolicy, UrlRefused
from bastion.oauth.discovery import discover, probe
from bastion.oauth.errors import DiscoveryFailed, IssuerMismatch, ResourceMismatch
from tests.mcp_support import serving
from tests.oauth.fake_upstream import FakeUpstream
from tests.oauth.flow_support import LOOPBACK, running

pytestmark = pytest.mark.anyio


async def test_the_challenge_names_the_metadata_and_the_issuer_metadata_is_read() -> None:
    async with (
        running(FakeUpstream(prm_path="/custom/prm.json", challenge_scope="a:b c")) as fake,
        LOOPBACK.client() as http,
    ):
        found = await discover(http, f"{fake.base}/mcp")
    assert found.challenge is not None and found.challenge.scope == "a:b c"
    assert found.protected_resource is not None and found.protected_resource.url == f"{fake.base}/custom/prm.json"
    assert found.resource == f"{fake.base}/mcp"
    assert found.authorization_server.issuer == fake.issuer()
    assert found.authorization_server.token_endpoint == f"{fake.issuer()}/token"
    assert [s.path for s in fake.seen] == [
        "/mcp",
        "/custom/prm.json",
        "/.well-known/oauth-authorization-server/as1",
    ]


async def test_without_a_header_the_path_inserted_metadata_is_found_before_the_root() -> None:
    async with running(FakeUpstream(prm_in_header=False)) as fake, LOOPBACK.client() as http:
        found = await discover(http, f"{fake.base}/mcp")
    assert found.protected_resource is not None
    assert fake.requested[:2] == ["/mcp", "/.well-known/oauth-protected-resource/mcp"]


async def test_root_metadata_is_the_last_resort_and_its_resource_may_be_the_origin() -> None:
    fake = FakeUpstream(prm_in_header=False, prm_path="/.well-known/oauth-protected-resource")
    async with running(fake):
        fake.prm_resource = fake.base
        async with LOOPBACK.client() as http:
            found = await discover(http, f"{fake.base}/mcp")
    assert found.resource == fake.base  # sent exactly as published, no slash added
    assert fake.requested[:3] == [
        "/mcp",
        "/.well-known/oauth-protected-resource/mcp",
        "/.well-known/oauth-protected-resource",
    ]


@pytest.mark.parametrize("style", ["oidc-inserted", "oidc-appended"])
async def test_openid_configuration_is_found_in_the_specification_order(style: str) -> None:
    async with running(FakeUpstream(metadata_style=style)) as fake, LOOPBACK.client() as http:
        found = await discover(http, f"{fake.base}/mcp")
    assert found.authorization_server.issuer == fake.issuer()
    tried = [path for path in fake.requested if "well-known/o" in path and "protected" not in path]
    order = [
        "/.well-known/oauth-authorization-server/as1",
        "/.well-known/openid-configuration/as1",
        "/as1/.well-known/openid-configuration",
    ]
    # Each location is tried in order until one answers; the root is never tried for an issuer with a path.
    assert tried == order[: order.index(fake.metadata_path("/as1")) + 1]


async def test_a_resource_for_another_server_is_refused_before_any_authorization_server_is_asked() -> None:
    async with running(FakeUpstream(prm_resource="https://evil.example.com/mcp")) as fake, LOOPBACK.client() as http:
        with pytest.raises(ResourceMismatch):
            await discover(http, f"{fake.base}/mcp")
    assert not [s for s in fake.seen if "authorization-server" in s.path]


async def test_metadata_claiming_another_issuer_is_refused() -> None:
    async with (
        running(FakeUpstream(metadata={"issuer": "https://attacker.example.com"})) as fake,
        LOOPBACK.client() as http,
    ):
        with pytest.raises(IssuerMismatch):
            await discover(http, f"{fake.base}/mcp")


async def test_no_metadata_for_the_issuer_is_a_discovery_failure() -> None:
    fake = FakeUpstream()
    async with running(fake):
        fake.issuers = ("/nowhere",)  # the resource names an issuer whose metadata is served nowhere
        async with LOOPBACK.client() as http:
            with pytest.raises(DiscoveryFailed, match="no authorization server metadata"):
                await discover(http, f"{fake.base}/mcp")


def _legacy_app(with_metadata: bool) -> Starlette:
    """A 2025-03-26 server: 401 without resource metadata; maybe authorization server metadata at its origin."""

    async def mcp(_request: Request) -> Response:
        return JSONResponse({}, status_code=401, headers={"WWW-Authenticate": "Bearer"})

    async def metadata(request: Request) -> Response:
        base = str(request.base_url).rstrip("/")
        return JSONResponse(
            {
                "issuer": base,
                "authorization_endpoint": f"{base}/oauth/authorize",
                "token_endpoint": f"{base}/oauth/token",
                "code_challenge_methods_supported": ["S256"],
            }
        )

    routes = [Route("/mcp", mcp, methods=["POST"])]
    if with_metadata:
        routes.append(Route("/.well-known/oauth-authorization-server", metadata))
    return Starlette(routes=routes)


async def test_a_2025_03_26_server_has_its_metadata_at_its_origin() -> None:
    async with serving(_legacy_app(with_metadata=True)) as base, LOOPBACK.client() as http:
        found = await discover(http, f"{base}/mcp")
    assert found.protected_resource is None
    assert found.resource == f"{base}/mcp"
    assert (found.authorization_server.authorization_endpoint, found.authorization_server.legacy) == (
        f"{base}/oauth/authorize",
        False,
    )


async def test_a_2025_03_26_server_without_metadata_gets_the_default_endpoints() -> None:
    async with serving(_legacy_app(with_metadata=False)) as base, LOOPBACK.client() as http:
        found = await discover(http, f"{base}/mcp")
    meta = found.authorization_server
    assert meta.legacy and meta.issuer == base
    assert (meta.authorization_endpoint, meta.token_endpoint) == (f"{base}/authorize", f"{base}/token")


def _lets_initialize_through() -> Starlette:
    """A server that answers ``initialize`` to anyone (in a session) and protects the rest."""
    seen: list[tuple[str, str | None]] = []

    async def mcp(request: Request) -> Response:
        if request.method == "DELETE":
            seen.append(("DELETE", request.headers.get("mcp-session-id")))
            return Response(status_code=204)
        body = await request.json()
        seen.append((body["method"], request.headers.get("mcp-session-id")))
        if body["method"] == "initialize":
            return JSONResponse({"jsonrpc": "2.0", "id": 1, "result": {}}, headers={"Mcp-Session-Id": "s1"})
        return JSONResponse({}, status_code=401, headers={"WWW-Authenticate": 'Bearer scope="mcp:basic"'})

    app = Starlette(routes=[Route("/mcp", mcp, methods=["POST", "DELETE"])])
    app.state.seen = seen
    return app


async def test_a_server_that_lets_initialize_through_is_asked_for_its_tools_in_the_session_it_opened() -> None:
    app = _lets_initialize_through()
    async with serving(app) as base, LOOPBACK.client() as http:
        challenge = await probe(http, f"{base}/mcp", Transport.STREAMABLE_HTTP)
    assert challenge is not None and challenge.scope == "mcp:basic"
    assert app.state.seen == [("initialize", None), ("tools/list", "s1"), ("DELETE", "s1")]


async def test_an_unreachable_server_is_a_discovery_failure() -> None:
    async with LOOPBACK.client() as http:
        with pytest.raises(DiscoveryFailed, match="could not be reached"):
            await discover(http, "http://127.0.0.1:9/mcp")


async def test_the_outbound_policy_decides_what_discovery_may_reach() -> None:
    async with running(FakeUpstream()) as fake, OutboundPolicy().client() as strict:
        with pytest.raises(UrlRefused):
            await discover(strict, f"{fake.base}/mcp")
    assert fake.seen == []
