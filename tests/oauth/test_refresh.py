"""Single-flight refresh, rotation committed before use, invalid_grant handling and commit faults (both engines)."""

from __future__ import annotations

import secrets
from collections.abc import AsyncGenerator, AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

import anyio
import pytest
import sqlalchemy as sa
from sqlalchemy.ext.asyncio import AsyncConnection

from bastion.db import schema
from bastion.db.store import Store
from bastion.domain.actor import Actor
from bastion.domain.identities import IdentitySecret, IdentityStatus
from bastion.errors import Unavailable
from bastion.net.outbound import OutboundPolicy
from bastion.oauth.model import ClientAuth, TokenSet
from bastion.oauth.refresh import Live, NeedsReauth, Refresher, RefreshFailed
from bastion.services import identities, step_up, workspace
from bastion.services.apikeys import KeyHasher
from bastion.services.audit import AuditKeys
from bastion.upstream.refusals import generation
from bastion.vault.crypto import Keyring
from bastion.vault.sealer import Vault
from tests.fixtures.token_server import TokenServer
from tests.oauth.refresh_support import crm_with_token_server, oauth_identity

pytestmark = pytest.mark.anyio
RESOURCE = "https://crm.example.com/mcp"
E = schema.audit_events
T = schema.identities


@dataclass
class World:
    store: Store
    vault: Vault
    hasher: KeyHasher
    operator: Actor
    server: TokenServer
    issuer: str
    client_row: str

    def refresher(self, store: Store | None = None) -> Refresher:
        return Refresher(store or self.store, self.vault, self.hasher, OutboundPolicy(allow_loopback=True).client)

    async def identity(self, *, expires_in_s: float | None, refresh: bool = True) -> tuple[str, str, str]:
        """A member's OAuth identity holding a live grant: (identity id, access token, refresh token)."""
        access, refresh_token = self.server.grant(RESOURCE)
        expires_at = None if expires_in_s is None else datetime.now(UTC) + timedelta(seconds=expires_in_s)
        identity = await oauth_identity(
            self.store,
            self.vault,
            self.hasher,
            self.operator,
            server="crm",
            owner="ada@example.com",
            issuer=self.issuer,
            client_row=self.client_row,
            access_token=access,
            refresh_token=refresh_token if refresh else None,
            expires_at=expires_at,
            resource=RESOURCE,
        )
        return identity.id, access, refresh_token

    async def stored(self, identity_id: str) -> tuple[IdentitySecret, Any]:
        async with self.store.transaction() as conn:
            identity = await identities.find(conn, self.operator.workspace_id, identity_id)
        secret = await identities.open_secret(self.store, self.vault, self.operator.workspace_id, identity_id)
        return secret, identity

    async def audit(self, method: str) -> list[sa.Row[Any]]:
        async with self.store.engine.connect() as conn:
            return list((await conn.execute(sa.select(E).where(E.c.method == method))).all())


@asynccontextmanager
async def _world(store: Store, vault: Vault, hasher: KeyHasher, operator: Actor) -> AsyncGenerator[World]:
    async with crm_with_token_server(store, vault, operator, RESOURCE, ClientAuth.POST) as (server, url, row):
        yield World(store, vault, hasher, operator, server, url, row)


@pytest.fixture
async def world(store: Store, vault: Vault, hasher: KeyHasher, operator: Actor) -> AsyncIterator[World]:
    async with _world(store, vault, hasher, operator) as made:
        yield made


async def test_a_token_about_to_expire_is_refreshed_and_committed_before_it_is_handed_out(world: World) -> None:
    identity_id, old_access, old_refresh = await world.identity(expires_in_s=30)  # inside the 60 s skew
    before, before_row = await world.stored(identity_id)
    live = await world.refresher().live(world.operator.workspace_id, identity_id)
    (seen,) = world.server.refreshes
    assert seen.form["refresh_token"] == old_refresh
    assert seen.form["resource"] == RESOURCE
    assert seen.form["client_secret"] == "client-secret-value"  # the sealed client secret was opened
    assert live.secret.access_token != old_access
    assert live.secret.access_token in world.server.access_tokens
    stored, row = await world.stored(identity_id)
    assert (stored.access_token, stored.refresh_token) == (live.secret.access_token, live.secret.refresh_token)
    assert stored.refresh_token != old_refresh
    assert stored.refresh_token in world.server.refresh_tokens
    assert old_refresh not in world.server.refresh_tokens  # the server rotated it; we hold only the new one
    assert live.expires_at is not None
    assert row.details["expires_at"] == live.expires_at.isoformat()
    assert row.fingerprint != before_row.fingerprint
    assert row.status is IdentityStatus.ACTIVE
    assert before.access_token == old_access


async def test_a_token_far_from_expiry_is_used_without_asking_the_server(world: World) -> None:
    identity_id, access, _refresh = await world.identity(expires_in_s=3600)
    live = await world.refresher().live(world.operator.workspace_id, identity_id)
    assert live.secret.access_token == access
    assert world.server.requests == []


async def test_a_token_an_upstream_refused_is_refreshed_once_and_a_stale_refusal_is_not(world: World) -> None:
    identity_id, access, _refresh = await world.identity(expires_in_s=3600)
    refresher = world.refresher()
    renewed = await refresher.live(world.operator.workspace_id, identity_id, rejected=generation(access))
    assert renewed.secret.access_token != access
    # A call that was refused with the old token learns the new one without a second refresh.
    again = await refresher.live(world.operator.workspace_id, identity_id, rejected=generation(access))
    assert again.secret.access_token == renewed.secret.access_token
    assert len(world.server.refreshes) == 1


async def test_concurrent_callers_in_one_process_share_one_refresh(world: World) -> None:
    identity_id, _access, _refresh = await world.identity(expires_in_s=-5)
    world.server.delay_s = 0.2  # every caller arrives while the one refresh is in flight
    refresher = world.refresher()
    got: list[Live] = []

    async def call() -> None:
        got.append(await refresher.live(world.operator.workspace_id, identity_id))

    async with anyio.create_task_group() as tg:
        for _ in range(50):
            tg.start_soon(call)
    assert len(world.server.refreshes) == 1
    assert len({live.secret.access_token for live in got}) == 1
    assert got[0].secret.access_token in world.server.access_tokens


async def test_of_calls_refused_with_one_token_only_the_one_that_refreshes_asks_the_retry_budget(world: World) -> None:
    identity_id, access, _refresh = await world.identity(expires_in_s=3600)
    world.server.delay_s = 0.2  # every caller arrives while the one refresh is in flight
    refresher = world.refresher()
    asked: list[str] = []

    def may_retry(server_id: str) -> bool:
        asked.append(server_id)
        return True

    got: list[Live] = []

    async def call() -> None:
        live = await refresher.live(
            world.operator.workspace_id, identity_id, rejected=generation(access), may_retry=may_retry
        )
        got.append(live)

    async with anyio.create_task_group() as tg:
        for _ in range(20):
            tg.start_soon(call)
    assert len(asked) == 1
    assert len(world.server.refreshes) == 1
    assert {live.secret.access_token for live in got} == {got[0].secret.access_token} != {access}


async def test_a_refusal_the_retry_budget_does_not_cover_leaves_the_token_unrefreshed(world: World) -> None:
    identity_id, access, _refresh = await world.identity(expires_in_s=3600)
    refresher = world.refresher()
    live = await refresher.live(
        world.operator.workspace_id, identity_id, rejected=generation(access), may_retry=lambda _server: False
    )
    assert live.secret.access_token == access
    assert world.server.refreshes == []
    # A token that is expiring is refreshed whatever the budget says: no call could use it otherwise.
    expiring_id, expiring, _refresh = await world.identity(expires_in_s=-5)
    live = await refresher.live(
        world.operator.workspace_id, expiring_id, rejected=generation(expiring), may_retry=lambda _server: False
    )
    assert live.secret.access_token != expiring
    assert len(world.server.refreshes) == 1


async def test_invalid_grant_marks_the_identity_needs_reauth_once_with_an_audit_event(world: World) -> None:
    identity_id, _access, refresh = await world.identity(expires_in_s=-5)
    world.server.refresh_tokens.discard(refresh)  # revoked at the server: the grant is gone
    refresher = world.refresher()
    with pytest.raises(NeedsReauth):
        await refresher.live(world.operator.workspace_id, identity_id)
    assert len(world.server.refreshes) == 1
    _stored, row = await world.stored(identity_id)
    assert row.status is IdentityStatus.NEEDS_REAUTH
    (event,) = await world.audit("identity.needs_reauth")
    assert event.target == f"identity:{identity_id}"
    assert refresh not in str(event.detail)
    # Stopped: later calls fail at once and the server is not asked again.
    for _ in range(3):
        with pytest.raises(NeedsReauth):
            await refresher.live(world.operator.workspace_id, identity_id)
    assert len(world.server.refreshes) == 1
    assert len(await world.audit("identity.needs_reauth")) == 1


@pytest.mark.parametrize("fresh_expiry", [True, False], ids=["reconnected-fresh", "reconnected-expired"])
async def test_invalid_grant_after_a_reconnect_meanwhile_uses_the_new_tokens(world: World, fresh_expiry: bool) -> None:
    identity_id, _access, refresh = await world.identity(expires_in_s=-5)
    world.server.refresh_tokens.discard(refresh)
    new_access, new_refresh = world.server.grant(RESOURCE)

    async def reconnect() -> None:  # the member reconnects while Bastion's refresh is at the server
        world.server.during = None
        secret = IdentitySecret(access_token=new_access, refresh_token=new_refresh)
        await identities.update(world.store, world.vault, world.hasher, world.operator, identity_id, secret=secret)
        if fresh_expiry:
            _stored, row = await world.stored(identity_id)
            details = {**row.details, "expires_at": (datetime.now(UTC) + timedelta(hours=1)).isoformat()}
            async with world.store.transaction() as conn:
                await conn.execute(T.update().where(T.c.id == identity_id).values(details=details))

    world.server.during = reconnect
    live = await world.refresher().live(world.operator.workspace_id, identity_id)
    if fresh_expiry:  # the reconnected tokens are good as they are
        assert (live.secret.access_token, live.secret.refresh_token) == (new_access, new_refresh)
        assert len(world.server.refreshes) == 1
    else:  # they are due too: refreshed once more, with the new refresh token
        assert [seen.form["refresh_token"] for seen in world.server.refreshes] == [refresh, new_refresh]
        assert live.secret.access_token in world.server.access_tokens
    _stored, row = await world.stored(identity_id)
    assert row.status is IdentityStatus.ACTIVE
    assert await world.audit("identity.needs_reauth") == []


async def test_a_server_error_leaves_the_identity_active_for_the_next_try(world: World) -> None:
    identity_id, _access, _refresh = await world.identity(expires_in_s=-5)
    world.server.scripted.append((503, {"error": "temporarily_unavailable"}))
    refresher = world.refresher()
    with pytest.raises(RefreshFailed):
        await refresher.live(world.operator.workspace_id, identity_id)
    _stored, row = await world.stored(identity_id)
    assert row.status is IdentityStatus.ACTIVE
    live = await refresher.live(world.operator.workspace_id, identity_id)  # the server is back
    assert live.secret.access_token in world.server.access_tokens
    assert len(world.server.refreshes) == 2


async def test_an_expired_token_without_a_refresh_token_needs_reauth(world: World) -> None:
    identity_id, _access, _refresh = await world.identity(expires_in_s=-5, refresh=False)
    with pytest.raises(NeedsReauth):
        await world.refresher().live(world.operator.workspace_id, identity_id)
    assert world.server.requests == []
    (event,) = await world.audit("identity.needs_reauth")
    assert event.detail["reason"] == "no_refresh_token"


class FailingCommit(Refresher):
    """A refresher whose first commit fails after the server answered (the database went away)."""

    failures = 1

    async def _commit(self, *args: Any) -> Live:  # type: ignore[override]
        if self.failures:
            self.failures -= 1
            raise Unavailable("the database is unreachable; try again shortly")
        return await super()._commit(*args)  # pyright: ignore[reportPrivateUsage]


def _failing(world: World) -> FailingCommit:
    return FailingCommit(world.store, world.vault, world.hasher, OutboundPolicy(allow_loopback=True).client)


async def test_a_failed_commit_is_recovered_by_the_same_process_without_a_second_refresh(world: World) -> None:
    identity_id, _access, old_refresh = await world.identity(expires_in_s=-5)
    refresher = _failing(world)
    with pytest.raises(Unavailable):
        await refresher.live(world.operator.workspace_id, identity_id)
    stored, _row = await world.stored(identity_id)
    assert stored.refresh_token == old_refresh  # nothing was committed, so nothing was handed out
    live = await refresher.live(world.operator.workspace_id, identity_id)
    assert len(world.server.refreshes) == 1  # the kept answer was committed; the spent token was not presented
    stored, _row = await world.stored(identity_id)
    assert stored.access_token == live.secret.access_token
    assert stored.refresh_token in world.server.refresh_tokens


async def test_a_failed_commit_in_a_lost_process_ends_in_needs_reauth_after_one_more_attempt(world: World) -> None:
    identity_id, _access, _refresh = await world.identity(expires_in_s=-5)
    with pytest.raises(Unavailable):
        await _failing(world).live(world.operator.workspace_id, identity_id)
    survivor = world.refresher()  # another process: the answer died with the first one
    with pytest.raises(NeedsReauth):
        await survivor.live(world.operator.workspace_id, identity_id)
    with pytest.raises(NeedsReauth):
        await survivor.live(world.operator.workspace_id, identity_id)
    assert len(world.server.refreshes) == 2  # the stale refresh token was presented once, never in a loop
    _stored, row = await world.stored(identity_id)
    assert row.status is IdentityStatus.NEEDS_REAUTH


async def test_a_failed_commit_in_a_lost_process_recovers_where_the_server_allows_reuse(world: World) -> None:
    world.server.grace_uses = 1
    identity_id, _access, _refresh = await world.identity(expires_in_s=-5)
    with pytest.raises(Unavailable):
        await _failing(world).live(world.operator.workspace_id, identity_id)
    live = await world.refresher().live(world.operator.workspace_id, identity_id)
    assert live.secret.access_token in world.server.access_tokens
    _stored, row = await world.stored(identity_id)
    assert row.status is IdentityStatus.ACTIVE
    assert len(world.server.refreshes) == 2


async def test_an_unrotated_answer_keeps_the_refresh_token(world: World) -> None:
    world.server.rotate = False
    identity_id, _access, refresh = await world.identity(expires_in_s=-5)
    live = await world.refresher().live(world.operator.workspace_id, identity_id)
    assert live.secret.refresh_token == refresh
    stored, _row = await world.stored(identity_id)
    assert stored.refresh_token == refresh


async def test_refreshers_on_two_connection_pools_refresh_once(pg_store: Store, pg_migrated_url: str) -> None:
    """Two processes in all but name: separate engines, separate locks, one PostgreSQL database."""
    operator = Actor.local_operator((await workspace.default_workspace(pg_store)).id)
    vault = Vault(Keyring({"k1": secrets.token_bytes(32)}, "k1"))
    hasher = KeyHasher(secrets.token_bytes(32))
    other = Store.from_url(pg_migrated_url, audit=AuditKeys.from_secret(secrets.token_bytes(32)).chain_keys())
    try:
        async with _world(pg_store, vault, hasher, operator) as world:
            identity_id, _access, _refresh = await world.identity(expires_in_s=-5)
            world.server.delay_s = 0.2
            refreshers = (world.refresher(), world.refresher(other))
            got: list[str | None] = []

            async def call(refresher: Refresher) -> None:
                got.append((await refresher.live(operator.workspace_id, identity_id)).secret.access_token)

            async with anyio.create_task_group() as tg:
                for index in range(40):
                    tg.start_soon(call, refreshers[index % 2])
            assert len(world.server.refreshes) == 1
            assert len(set(got)) == 1
    finally:
        await other.close()


class StepUpMeanwhile(Refresher):
    """A refresher during whose commit, after it read the identity and before it wrote it, an upstream's 403 has
    a step-up scope noted on that identity (a call on another replica, committed first)."""

    armed = True
    server: TokenServer

    async def _read_in(self, conn: AsyncConnection, workspace_id: str, identity_id: str) -> Any:
        state = await super()._read_in(conn, workspace_id, identity_id)  # pyright: ignore[reportPrivateUsage]
        if self.armed and self.server.refreshes:  # the server answered: this is the commit's read
            self.armed = False
            challenge = ['Bearer error="insufficient_scope", scope="admin"']
            with pytest.raises(step_up.IdentityNeedsScope):
                await step_up.needs_scope(self._store, workspace_id, identity_id, challenge, reconnect="r")
        return state


async def test_a_step_up_scope_noted_while_a_refresh_commits_is_kept(pg_store: Store) -> None:
    """Neither writer puts back details it read before the other's write (a PostgreSQL race: SQLite runs
    transactions one at a time)."""
    operator = Actor.local_operator((await workspace.default_workspace(pg_store)).id)
    vault = Vault(Keyring({"k1": secrets.token_bytes(32)}, "k1"))
    hasher = KeyHasher(secrets.token_bytes(32))
    async with _world(pg_store, vault, hasher, operator) as world:
        identity_id, _access, _refresh = await world.identity(expires_in_s=-5)
        refresher = StepUpMeanwhile(pg_store, vault, hasher, OutboundPolicy(allow_loopback=True).client)
        refresher.server = world.server
        live = await refresher.live(operator.workspace_id, identity_id)
        assert not refresher.armed  # the step-up came between the commit's read and its write
        stored, row = await world.stored(identity_id)
    assert row.details[step_up.STEP_UP_KEY] == "tools admin"
    assert live.expires_at is not None and row.details["expires_at"] == live.expires_at.isoformat()
    assert stored.access_token == live.secret.access_token and len(world.server.refreshes) == 1


def test_tokensets_never_print_their_tokens() -> None:
    answer = TokenSet(access_token="at-visible?", refresh_token="rt-visible?")
    live = Live(IdentitySecret(access_token="at-visible?"), None)
    assert "visible" not in repr(answer) + repr(live)
