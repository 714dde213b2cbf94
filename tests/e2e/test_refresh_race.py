"""Keeping OAuth identities alive through the gateway: one refresh for many concurrent calls across two processes,
a refused token refreshed and the call retried once, invalid_grant ending in a reconnect link, revocation on delete."""

from __future__ import annotations

import logging
from collections.abc import AsyncGenerator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import anyio
import httpx2
import pytest
import sqlalchemy as sa
from mcp.shared.exceptions import MCPError

from bastion import wiring
from bastion.db import schema
from bastion.db.store import Store
from bastion.domain.actor import Actor
from bastion.domain.capabilities import OWNER_ROLE
from bastion.domain.identities import IdentityStatus
from bastion.domain.models import AuthKind, ProtocolEra, Provisioning, ProvisionMode, Transport
from bastion.domain.specs import GatewayServerSpec, GatewaySpec, HostSpec, MemberSpec, ServerSpec
from bastion.oauth.model import ClientAuth
from bastion.pipeline.errors import IDENTITY_NEEDS_REAUTH
from bastion.services import apikeys, connections, gateways, hosts, members, servers, workspace
from bastion.services.apikeys import KeyHasher
from bastion.settings import Settings, generate_secrets
from bastion.vault.sealer import Vault
from bastion.web.app import create_app
from tests.fixtures.token_server import TokenServer, require_bearer
from tests.mcp_support import Recorder, gateway_client, recording_upstream, serving
from tests.oauth.refresh_support import oauth_client, oauth_identity
from tests.processes import HEAVY_TIMEOUT_S, clean_env
from tests.processes import serving as serving_process

pytestmark = [pytest.mark.anyio, pytest.mark.e2e, pytest.mark.timeout(HEAVY_TIMEOUT_S)]
PUBLIC_URL = "https://bastion.example.com"
CALLS = 50
E = schema.audit_events
T = schema.identities


@dataclass
class World:
    """A gateway "sales" whose server "crm" is protected by ``server`` (the AS); Ada holds an OAuth identity."""

    store: Store
    server: TokenServer
    recorder: Recorder
    identity_id: str
    old_access: str
    old_refresh: str
    token: str  # Ada's Bastion access token

    def fresh_tokens(self) -> set[str]:
        return self.server.access_tokens - {self.old_access}

    async def status(self) -> IdentityStatus:
        async with self.store.engine.connect() as conn:
            return IdentityStatus(
                (await conn.execute(sa.select(T.c.status).where(T.c.id == self.identity_id))).one()[0]
            )

    async def audit(self, method: str) -> list[sa.Row[Any]]:
        async with self.store.engine.connect() as conn:
            return list((await conn.execute(sa.select(E).where(E.c.method == method))).all())


@asynccontextmanager
async def world(
    store: Store,
    vault: Vault,
    hasher: KeyHasher,
    *,
    expires_in_s: float,
    era: ProtocolEra = ProtocolEra.AUTO,
    revocation: bool = True,
) -> AsyncGenerator[World]:
    """The AS and the protected upstream running, and everything enrollment would have stored."""
    operator = Actor.local_operator((await workspace.ensure_workspace(store)).id)
    server = TokenServer(delay_s=0.2)  # a refresh takes a while: concurrent calls pile up behind it
    server.register("bastion-client", "client_secret_post", "client-secret-value")
    recorder = Recorder()
    async with serving(server.app()) as issuer, serving(require_bearer(recording_upstream(recorder), server)) as up:
        resource = f"{up}/mcp"
        spec = ServerSpec("crm", Transport.STREAMABLE_HTTP, url=resource, auth_kind=AuthKind.OAUTH, era=era)
        await servers.create(store, operator, spec)
        tools = Provisioning(ProvisionMode.ALLOW_SELECTED, frozenset({"whoami"}))
        await gateways.create(store, operator, GatewaySpec("sales", servers=(GatewayServerSpec("crm", tools=tools),)))
        await hosts.create(store, operator, HostSpec("agent"))
        await members.create(store, operator, MemberSpec("ada@example.com", "Ada", OWNER_ROLE))
        row = await oauth_client(
            store,
            vault,
            operator,
            server="crm",
            issuer=issuer,
            client_id="bastion-client",
            auth_method=ClientAuth.POST,
            secret="client-secret-value",
        )
        access, refresh = server.grant(resource)
        identity = await oauth_identity(
            store,
            vault,
            hasher,
            operator,
            server="crm",
            owner="ada@example.com",
            issuer=issuer,
            client_row=row,
            access_token=access,
            refresh_token=refresh,
            expires_at=datetime.now(UTC) + timedelta(seconds=expires_in_s),
            resource=resource,
            revocation=revocation,
        )
        _c, _t, token = await connections.create(
            store, hasher, operator, host="agent", gateway="sales", member="ada@example.com"
        )
        yield World(store, server, recorder, identity.id, access, refresh, token)


async def _call_many(urls: list[str], token: str, mode: str, calls: int) -> list[str]:
    """``calls`` concurrent whoami calls spread over one client per URL; the credential each call reported."""
    seen: list[str] = []
    async with anyio.create_task_group() as tg:
        for index, url in enumerate(urls):
            share = calls // len(urls) + (1 if index < calls % len(urls) else 0)
            tg.start_soon(_calls_on, url, token, mode, share, seen)
    return seen


async def _calls_on(url: str, token: str, mode: str, calls: int, seen: list[str]) -> None:
    async with gateway_client(url, token, mode) as client:

        async def one() -> None:
            result = await client.call_tool("crm__whoami", {})
            assert not result.is_error, result
            seen.append(result.content[0].text)  # type: ignore[union-attr]

        async with anyio.create_task_group() as tg:
            for _ in range(calls):
                tg.start_soon(one)


# --- two `bastion serve` processes on one PostgreSQL ------------------------------------------------------------------


@pytest.fixture
def pg_url(pg_migrated_url: str) -> str:
    from tests.conftest import empty_all

    empty_all(pg_migrated_url)
    return pg_migrated_url


@pytest.fixture
def install(pg_url: str, tmp_path: Path) -> tuple[Settings, dict[str, str]]:
    """One install's settings, for this test process and (as environment) for its two server processes."""
    secrets = generate_secrets()
    settings = Settings(
        data_dir=tmp_path / "data",
        database_url=pg_url,
        outbound_allow_loopback=True,
        **secrets,  # type: ignore[arg-type]
    )
    env = clean_env(
        BASTION_DATA_DIR=str(tmp_path / "data"),
        BASTION_DATABASE_URL=pg_url,
        BASTION_PUBLIC_URL=PUBLIC_URL,
        **{f"BASTION_{k.upper()}": v for k, v in secrets.items()},
    )
    return settings, env


@pytest.mark.parametrize(
    "refused",
    [False, True],
    ids=["expired-by-its-expiry", "refused-by-the-upstream"],
)
async def test_fifty_calls_on_two_processes_with_an_expired_token_cause_exactly_one_refresh(
    install: tuple[Settings, dict[str, str]], tmp_path: Path, refused: bool
) -> None:
    settings, env = install
    store = wiring.store_from(settings)
    try:
        # Expired by its recorded expiry (refreshed before use), or still "valid" by it but refused by the upstream
        # (refreshed after a 401 and the call retried).
        async with world(
            store, wiring.vault_from(settings), wiring.hasher_from(settings), expires_in_s=3600 if refused else -60
        ) as w:
            w.server.expire(w.old_access)  # the upstream no longer takes it either way
            with serving_process(env, tmp_path) as first, serving_process(env, tmp_path) as second:
                urls = [f"{first.base_url}/g/sales/mcp", f"{second.base_url}/g/sales/mcp"]
                with anyio.fail_after(60):
                    seen = await _call_many(urls, w.token, "2026-07-28", CALLS)
            assert len(w.server.refreshes) == 1, [s.form.get("refresh_token") for s in w.server.refreshes]
            (new_access,) = w.fresh_tokens()
            assert seen == [f"Bearer {new_access}"] * CALLS
            assert {call.authorization for call in w.recorder.tool_calls} == {f"Bearer {new_access}"}
            assert len(w.recorder.tool_calls) == CALLS  # a refused call never reached the tool
            if not refused:
                assert f"Bearer {w.old_access}" not in w.recorder.authorizations  # refreshed before any use
            assert await w.status() is IdentityStatus.ACTIVE
    finally:
        await store.close()


# --- one process, both engines --------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("mode", "fast_path"),
    [("legacy", False), ("2026-07-28", False), ("2026-07-28", True)],
    ids=["legacy", "modern", "modern-fast-path"],
)
async def test_a_refused_token_is_refreshed_and_the_call_retried_once(
    settings: Settings, store: Store, vault: Vault, hasher: KeyHasher, mode: str, fast_path: bool
) -> None:
    era = ProtocolEra.MODERN if fast_path else ProtocolEra.AUTO
    async with world(store, vault, hasher, expires_in_s=3600, era=era) as w:
        app = create_app(settings.model_copy(update={"fast_path": fast_path}), store)
        async with serving(app) as bastion, gateway_client(f"{bastion}/g/sales/mcp", w.token, mode) as client:
            first = await client.call_tool("crm__whoami", {})
            assert first.content[0].text == f"Bearer {w.old_access}"  # type: ignore[union-attr]
            w.server.expire(w.old_access)  # revoked at the AS while the session is open
            second = await client.call_tool("crm__whoami", {})
            (new_access,) = w.fresh_tokens()
            assert second.content[0].text == f"Bearer {new_access}"  # type: ignore[union-attr]
            third = await client.call_tool("crm__whoami", {})
            assert third.content[0].text == f"Bearer {new_access}"  # type: ignore[union-attr]
        assert len(w.server.refreshes) == 1
        assert [c.authorization for c in w.recorder.tool_calls] == [f"Bearer {w.old_access}"] + [
            f"Bearer {new_access}"
        ] * 2


async def test_invalid_grant_at_the_gateway_answers_with_the_reconnect_link_and_stops_refreshing(
    settings: Settings, store: Store, vault: Vault, hasher: KeyHasher
) -> None:
    async with world(store, vault, hasher, expires_in_s=-60) as w:
        w.server.refresh_tokens.discard(w.old_refresh)  # the grant was revoked at the AS
        app = create_app(settings.model_copy(update={"public_url": PUBLIC_URL}), store)
        link = f"{PUBLIC_URL}/me/identities/{w.identity_id}/reconnect"
        async with serving(app) as bastion, gateway_client(f"{bastion}/g/sales/mcp", w.token, "legacy") as client:
            for _ in range(3):
                with pytest.raises(MCPError) as caught:
                    await client.call_tool("crm__whoami", {})
                assert caught.value.code == IDENTITY_NEEDS_REAUTH
                assert link in caught.value.error.message
                assert caught.value.error.data == {"code": "identity_needs_reauth", "reconnect": link}
        assert len(w.server.refreshes) == 1  # exactly one attempt, then no more
        assert await w.status() is IdentityStatus.NEEDS_REAUTH
        (event,) = await w.audit("identity.needs_reauth")
        assert event.detail["reason"] == "invalid_grant"
        assert w.recorder.tool_calls == []


@pytest.mark.parametrize("revocation", [True, False], ids=["with-revocation-endpoint", "without"])
async def test_deleting_an_identity_through_the_api_revokes_then_shreds_it(
    settings: Settings,
    store: Store,
    vault: Vault,
    hasher: KeyHasher,
    revocation: bool,
    caplog: pytest.LogCaptureFixture,
) -> None:
    async with world(store, vault, hasher, expires_in_s=3600, revocation=revocation) as w:
        ws = await workspace.default_workspace(store)
        _key, api_key = await apikeys.create(
            store, hasher, Actor.local_operator(ws.id), name="ada", member="ada@example.com"
        )
        app = create_app(settings, store)
        async with httpx2.AsyncClient(transport=httpx2.ASGITransport(app=app), base_url="http://bastion.test") as api:
            with caplog.at_level(logging.WARNING, logger="bastion.oauth"):
                response = await api.delete(
                    f"/api/v1/identities/{w.identity_id}", headers={"Authorization": f"Bearer {api_key}"}
                )
        assert response.status_code == 204, response.text
        if revocation:
            assert w.server.revoked == [(w.old_refresh, "refresh_token"), (w.old_access, "access_token")]
        else:
            assert w.server.revoked == []
            assert any("no revocation endpoint" in r.getMessage() for r in caplog.records)
        async with store.engine.connect() as conn:
            assert (await conn.execute(sa.select(T).where(T.c.id == w.identity_id))).first() is None
