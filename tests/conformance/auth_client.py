"""The client the conformance suite's auth scenarios judge: Bastion enrolling a member at the suite's mock server.

``python -m tests.conformance.auth_client <mcp-url>`` (``scripts/conformance-client``; the suite appends the
URL and sets ``MCP_CONFORMANCE_SCENARIO`` and, for some scenarios, ``MCP_CONFORMANCE_CONTEXT``):

1. Bastion runs in this process on a free loopback port, on a fresh SQLite data directory, with
   ``outbound_allow_loopback`` (the mock listens on localhost). Its public URL is
   ``https://conformance-test.local``: the name the suite expects in a client ID metadata document; the
   callback is taken from the authorization server's redirect, never fetched.
2. The admin side: an owner, the mock as an OAuth server (with the pre-registered client the context names,
   if any), a gateway, a host and a member.
3. The member enrolls through Bastion's own code path: ``oauth_connect.begin`` → the authorization URL
   fetched without a browser (redirects followed until one points at Bastion's callback) → the callback's
   query to ``oauth_connect.complete`` → an OAuth identity and a connection with their own ``bst_`` token.
4. A tool is called through the gateway with the official MCP client and that token, so the mock sees the
   member's own access token. When the call fails the member reconnects (at most ``MAX_RECONNECTS`` times),
   asking for more scope when the upstream's last 403 challenge calls for it (``step_up.step_up_scope``).

Exit status 0 when the tool call succeeded, 1 when Bastion refused or the call kept failing.
"""

from __future__ import annotations

import faulthandler
import json
import logging
import os
import sys
import tempfile
from collections.abc import AsyncGenerator, Mapping
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final, cast
from urllib.parse import parse_qsl, urljoin, urlsplit

import anyio
import httpx2
from mcp import ClientSession
from mcp.client.streamable_http import streamable_http_client
from mcp.shared.exceptions import MCPError

from bastion import wiring
from bastion.db import migrate
from bastion.db.store import Store
from bastion.domain.actor import Actor
from bastion.domain.identities import IdentityKind, IdentityStatus
from bastion.domain.models import AuthKind, OAuthClientSettings, OAuthRegistration, Transport
from bastion.domain.specs import GatewayServerSpec, GatewaySpec, HostSpec, MemberSpec, ServerSpec
from bastion.errors import BastionError
from bastion.services import (
    connections,
    gateways,
    hosts,
    identities,
    members,
    oauth_clients,
    oauth_connect,
    servers,
    step_up,
)
from bastion.services import workspace as workspaces
from bastion.settings import Settings, generate_secrets
from bastion.vault.sealer import Vault
from bastion.web.app import create_app
from tests.mcp_support import serving

PUBLIC_URL: Final = "https://conformance-test.local"
BROWSER: Final = "conformance-client-browser"
MAX_RECONNECTS: Final = 2
MAX_AUTHORIZATION_HOPS: Final = 5
CALL_TIMEOUT_S: Final = 30.0
HANG_REPORT_AFTER_S: Final = 100.0
RECONNECT_CODES: Final = frozenset({"identity_needs_reauth", "identity_needs_scope"})

logger = logging.getLogger("conformance.client")


@dataclass
class Enrolled:
    """The member's side once enrolled: their identity at the upstream and their gateway token."""

    identity_id: str
    token: str


class Harness:
    """Bastion's parts plus the admin objects one scenario needs."""

    def __init__(self, settings: Settings, store: Store, vault: Vault, upstream: str) -> None:
        self.settings = settings
        self.store = store
        self.vault = vault
        self.hasher = wiring.hasher_from(settings)
        self.upstream = upstream
        self.operator: Actor | None = None
        self.workspace_id = ""
        self.server_id = ""
        self.member_id = ""

    async def provision(self, context: Mapping[str, Any]) -> None:
        """Owner, upstream server (OAuth), gateway, host and member, as an admin would set them up."""
        workspace = await workspaces.ensure_workspace(self.store)
        self.workspace_id = workspace.id
        operator = Actor.local_operator(workspace.id)
        self.operator = operator
        await members.create(self.store, operator, MemberSpec("owner@example.com", "Owner", "owner"))
        client_id = context.get("client_id")
        if isinstance(client_id, str):
            issuer = context.get("issuer")
            options = OAuthClientSettings(
                OAuthRegistration.PRE_REGISTERED, client_id, authorization_server=str(issuer) if issuer else None
            )
        else:
            # The MCP specification's order: a client ID metadata document where supported, else registration.
            options = OAuthClientSettings(OAuthRegistration.CLIENT_METADATA_DOCUMENT)
        spec = ServerSpec(
            "upstream", Transport.STREAMABLE_HTTP, url=self.upstream, auth_kind=AuthKind.OAUTH, oauth=options
        )
        server = await servers.create(self.store, operator, spec)
        self.server_id = server.id
        secret = context.get("client_secret")
        if isinstance(client_id, str) and isinstance(secret, str):
            await oauth_clients.set_client_secret(self.store, self.vault, operator, server.id, secret)
        await gateways.create(
            self.store, operator, GatewaySpec("conformance", servers=(GatewayServerSpec("upstream", namespaced=False),))
        )
        await hosts.create(self.store, operator, HostSpec("agent"))
        member = await members.create(self.store, operator, MemberSpec("member@example.com", "Member"))
        self.member_id = member.id

    async def authorize(self, scope: str | None) -> oauth_connect.Connected:
        """One pass through the enrollment flow: begin, the authorization server, the callback, complete."""
        url = await oauth_connect.begin(
            self.store,
            self.vault,
            self.settings,
            workspace_id=self.workspace_id,
            member_id=self.member_id,
            server_id=self.server_id,
            browser=BROWSER,
            context={"via": "conformance"},
            scope=scope,
        )
        callback = await follow_to_callback(url)
        return await oauth_connect.complete(self.store, self.vault, self.settings, browser=BROWSER, params=callback)

    async def enroll(self) -> Enrolled:
        """A first connection: the identity, then the connection and its token."""
        assert self.operator is not None
        connected = await self.authorize(None)
        identity = await identities.create(
            self.store,
            self.vault,
            self.hasher,
            self.operator,
            server=self.server_id,
            secret=connected.secret,
            kind=IdentityKind.OAUTH,
            owner=self.member_id,
            label=connected.label,
            details=connected.details,
        )
        _c, _t, token = await connections.create(
            self.store, self.hasher, self.operator, host="agent", gateway="conformance", member=self.member_id
        )
        return Enrolled(identity.id, token)

    async def identity_state(self, enrolled: Enrolled) -> tuple[str | None, bool]:
        """What the member's identities page shows: the scope a reconnection should ask for, and whether the
        identity needs connecting again."""
        async with self.store.transaction() as conn:
            identity = await identities.find(conn, self.workspace_id, enrolled.identity_id)
        wanted = identity.details.get(step_up.STEP_UP_KEY)
        return (wanted if isinstance(wanted, str) else None), identity.status is IdentityStatus.NEEDS_REAUTH

    async def reconnect(self, enrolled: Enrolled, scope: str | None) -> None:
        """Connect again and put the new tokens in the same identity (its connection keeps working)."""
        assert self.operator is not None
        connected = await self.authorize(scope)
        await _replace(self, enrolled.identity_id, connected)


async def _replace(harness: Harness, identity_id: str, connected: oauth_connect.Connected) -> None:
    """Store a reconnection's tokens and details in the identity (the web page will do the same)."""
    import sqlalchemy as sa

    from bastion.db import schema

    assert harness.operator is not None
    await identities.update(
        harness.store, harness.vault, harness.hasher, harness.operator, identity_id, secret=connected.secret
    )
    async with harness.store.transaction() as conn:
        current = await identities.find(conn, harness.workspace_id, identity_id)
        details = {k: v for k, v in current.details.items() if k != step_up.STEP_UP_KEY}
        details.update(connected.details)
        await conn.execute(
            sa.update(schema.identities).where(schema.identities.c.id == identity_id).values(details=details)
        )


async def follow_to_callback(url: str) -> dict[str, str]:
    """GET the authorization URL as a browser would, stopping at the redirect to Bastion's callback."""
    callback = PUBLIC_URL + "/oauth/callback"
    async with httpx2.AsyncClient(follow_redirects=False, timeout=CALL_TIMEOUT_S) as browser:
        for _hop in range(MAX_AUTHORIZATION_HOPS):
            response = await browser.get(url)
            location = response.headers.get("location")
            if not response.is_redirect or location is None:
                raise RuntimeError(f"the authorization server answered {response.status_code} without redirecting")
            url = urljoin(url, location)
            if url.split("?", 1)[0] == callback:
                return dict(parse_qsl(urlsplit(url).query, keep_blank_values=True))
    raise RuntimeError("the authorization server never redirected to Bastion's callback")


@dataclass(frozen=True)
class Outcome:
    """How a tool call through the gateway went: ``code`` is Bastion's error code when it failed with one."""

    ok: bool
    said: str
    code: str | None = None


async def call_tool(gateway_url: str, token: str) -> Outcome:
    """List the gateway's tools and call the first one with the member's token."""
    headers = {"Authorization": f"Bearer {token}"}
    async with (
        httpx2.AsyncClient(headers=headers, timeout=CALL_TIMEOUT_S) as http,
        streamable_http_client(gateway_url, http_client=http) as (read, write, *_rest),
        ClientSession(read, write) as session,
    ):
        await session.initialize()
        try:
            listed = await session.list_tools()
            if not listed.tools:
                return Outcome(False, "the gateway lists no tool")
            result = await session.call_tool(listed.tools[0].name, {})
        except MCPError as exc:
            data: object = exc.data
            code = cast("dict[str, Any]", data).get("code") if isinstance(data, dict) else None
            return Outcome(False, f"error {exc.code}: {exc}", code if isinstance(code, str) else None)
        text = " ".join(getattr(c, "text", "") for c in result.content)
        return Outcome(not result.is_error, text)


@asynccontextmanager
async def bastion(upstream: str) -> AsyncGenerator[tuple[Harness, str]]:
    """Bastion on a fresh data directory, served on loopback; yields the harness and the gateway's URL."""
    with tempfile.TemporaryDirectory(prefix="bastion-conformance-") as tmp:
        database = Path(tmp) / "bastion.db"
        migrate.upgrade(f"sqlite:///{database}")
        settings = Settings(
            data_dir=Path(tmp),
            database_url=f"sqlite+aiosqlite:///{database}",
            public_url=PUBLIC_URL,
            outbound_allow_loopback=True,
            **generate_secrets(),  # type: ignore[arg-type]
        )
        store = wiring.store_from(settings)
        try:
            harness = Harness(settings, store, wiring.vault_from(settings), upstream)
            async with serving(create_app(settings, store)) as base:
                yield harness, f"{base}/g/conformance/mcp"
        finally:
            await store.close()


async def run(upstream: str, context: Mapping[str, Any]) -> int:
    async with bastion(upstream) as (harness, gateway_url):
        await harness.provision(context)
        try:
            enrolled = await harness.enroll()
        except BastionError as exc:
            print(f"enrollment refused: {exc.code}: {exc}", file=sys.stderr)  # noqa: T201
            return 1
        for attempt in range(MAX_RECONNECTS + 1):
            outcome = await call_tool(gateway_url, enrolled.token)
            print(f"tool call {attempt + 1}: {outcome}", file=sys.stderr)  # noqa: T201
            if outcome.ok:
                return 0
            # The member reconnects only when Bastion says it can help (in the error, or on their identities
            # page: an empty listing hides why): a dead grant, or a scope to add.
            scope, needs_reauth = await harness.identity_state(enrolled)
            wanted = outcome.code in RECONNECT_CODES or needs_reauth or scope is not None
            if attempt == MAX_RECONNECTS or not wanted:
                break
            try:
                await harness.reconnect(enrolled, scope)
            except BastionError as exc:
                print(f"reconnection refused: {exc.code}: {exc}", file=sys.stderr)  # noqa: T201
                return 1
    return 1


def main() -> None:
    logging.basicConfig(level=logging.WARNING, stream=sys.stderr)
    # A client that hangs is a failure the suite reports as a timeout; the stacks say where it hung.
    faulthandler.dump_traceback_later(HANG_REPORT_AFTER_S, exit=True)
    upstream = sys.argv[-1]
    raw = os.environ.get("MCP_CONFORMANCE_CONTEXT")
    context: dict[str, Any] = json.loads(raw) if raw else {}
    code = anyio.run(run, upstream, context)
    sys.stdout.flush()
    sys.stderr.flush()
    # Everything is closed by now (server, store, data directory); interpreter teardown is skipped because,
    # with dozens of these processes at once, it sometimes stalled in C code after the work was done.
    os._exit(code)


if __name__ == "__main__":
    main()
