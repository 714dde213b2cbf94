"""The janitor: expired drafts, OAuth states and web sessions go on a schedule, with nobody passing by."""

from __future__ import annotations

import logging
from datetime import UTC, datetime, timedelta
from typing import Any

import anyio
import pytest
import sqlalchemy as sa
from pydantic import ValidationError

from bastion.db import schema
from bastion.db.store import Store
from bastion.domain.actor import Actor
from bastion.domain.identities import bearer_secret
from bastion.domain.ids import new_id
from bastion.domain.specs import MemberSpec
from bastion.oauth.revocation import Revoker
from bastion.services import enrollment, janitor, members, sessions
from bastion.services.apikeys import KeyHasher
from bastion.services.janitor import Swept
from bastion.services.sessions import Lifetimes, SignedIn
from bastion.settings import Settings, generate_secrets
from bastion.vault.sealer import Vault
from bastion.web.app import create_app
from tests.mcp_support import serving
from tests.web.ui.world import build_world, new_link

pytestmark = pytest.mark.anyio
D, DI, S, W = schema.enrollment_drafts, schema.draft_identities, schema.oauth_states, schema.web_sessions


async def _signed_in(store: Store, hasher: KeyHasher, operator: Actor, member_id: str) -> SignedIn:
    async with store.transaction() as conn:
        member = await members.find(conn, operator.workspace_id, member_id)
    _session, secret = await sessions.start(
        store, hasher, member, method="password", user_agent="", lifetimes=Lifetimes()
    )
    found = await sessions.resolve(store, hasher, secret, Lifetimes())
    assert found is not None
    return found


async def _drafts(store: Store, hasher: KeyHasher, operator: Actor, vault: Vault) -> tuple[SignedIn, str, str]:
    """Two drafts of Ada's (two browsers): the first, holding a sealed token, expired a minute ago; the second not."""
    owner = await build_world(store, operator, "http://127.0.0.1:9/mcp")
    secret = await new_link(store, hasher, owner)
    ada = await members.create(store, operator, MemberSpec("ada@example.com", "Ada"))
    who = await _signed_in(store, hasher, operator, ada.id)
    old = await enrollment.start(store, hasher, who, secret)
    await enrollment.set_token(store, vault, hasher, who, old.id, "crm", bearer_secret("ada-drafted-credential"))
    elsewhere = await _signed_in(store, hasher, operator, ada.id)  # one draft per link and browser
    new = await enrollment.start(store, hasher, elsewhere, secret)
    async with store.transaction() as conn:
        await conn.execute(
            D.update().where(D.c.id == old.id).values(expires_at=datetime.now(UTC) - timedelta(minutes=1))
        )
    return who, old.id, new.id


async def _state(store: Store, workspace_id: str, purpose: str, expired: timedelta) -> str:
    now = datetime.now(UTC)
    state_id = new_id()
    values: dict[str, Any] = {"id": state_id, "workspace_id": workspace_id, "digest": new_id().encode()[:32]}
    values |= {"purpose": purpose, "browser": "b", "issuer": "https://as.example", "redirect_uri": "https://r"}
    values |= {"code_verifier": "v", "context": {}, "created_at": now - expired - timedelta(minutes=10)}
    async with store.transaction() as conn:
        await conn.execute(S.insert().values(expires_at=now - expired, **values))
    return state_id


async def _ids(store: Store, table: sa.Table) -> set[str]:
    async with store.transaction() as conn:
        return {str(i) for i in (await conn.execute(sa.select(table.c.id))).scalars()}


async def test_a_sweep_deletes_what_expired_and_keeps_what_still_counts(
    store: Store, hasher: KeyHasher, operator: Actor, vault: Vault
) -> None:
    who, old, new = await _drafts(store, hasher, operator, vault)
    ws = operator.workspace_id
    gone_upstream = await _state(store, ws, "upstream", timedelta(hours=2))
    late_upstream = await _state(store, ws, "upstream", timedelta(minutes=5))  # a late callback hears "expired"
    gone_sign_in = await _state(store, ws, "sign_in", timedelta(minutes=1))
    live_sign_in = await _state(store, ws, "sign_in", -timedelta(minutes=5))
    ended = await _signed_in(store, hasher, operator, who.member.id)
    await sessions.end(store, ended)

    swept = await janitor.sweep(store, Lifetimes())

    assert swept == Swept(drafts=1, oauth_states=1, sign_in_states=1, sessions=1)
    assert await _ids(store, D) == {new}
    assert await _ids(store, DI) == set()  # the expired draft's sealed token went with it
    assert old not in await _ids(store, D)
    assert await _ids(store, S) == {late_upstream, live_sign_in}
    assert gone_upstream not in await _ids(store, S) and gone_sign_in not in await _ids(store, S)
    assert ended.session.id not in await _ids(store, W) and who.session.id in await _ids(store, W)
    assert len(await _ids(store, W)) == 2
    assert await janitor.sweep(store, Lifetimes()) == Swept(0, 0, 0, 0)


async def test_a_part_that_fails_is_logged_without_its_message_and_the_others_still_run(
    store: Store, hasher: KeyHasher, operator: Actor, vault: Vault, monkeypatch: pytest.MonkeyPatch, caplog: Any
) -> None:
    who, _old, new = await _drafts(store, hasher, operator, vault)
    ended = await _signed_in(store, hasher, operator, who.member.id)
    await sessions.end(store, ended)

    async def broken(_store: Store, _revoker: Revoker | None = None, _lifetimes: Lifetimes | None = None) -> int:
        raise RuntimeError("bsl_secret-that-must-not-be-logged")

    monkeypatch.setattr(enrollment, "sweep", broken)
    with caplog.at_level(logging.WARNING, logger="bastion.janitor"):
        swept = await janitor.sweep(store, Lifetimes())
    assert swept.drafts is None and swept.sessions == 1
    (record,) = caplog.records
    assert "enrollment drafts" in record.getMessage() and "RuntimeError" in record.getMessage()
    assert "bsl_secret" not in caplog.text and record.exc_info is None
    assert new in await _ids(store, D)


async def test_the_loop_keeps_sweeping_after_a_failure_until_cancelled(
    store: Store, monkeypatch: pytest.MonkeyPatch
) -> None:
    calls: list[int] = []
    done = anyio.Event()

    async def flaky(_store: Store, _revoker: Revoker | None = None, _lifetimes: Lifetimes | None = None) -> int:
        calls.append(1)
        if len(calls) == 1:
            raise OSError("the database went away")
        if len(calls) == 3:
            done.set()
        return 0

    monkeypatch.setattr(enrollment, "sweep", flaky)
    with anyio.fail_after(10):
        async with anyio.create_task_group() as tg:
            tg.start_soon(lambda: janitor.run(store, Lifetimes(), interval_s=0.01))
            await done.wait()
            tg.cancel_scope.cancel()
    assert len(calls) == 3


async def test_the_app_deletes_an_expired_draft_with_nobody_touching_it(
    store: Store, hasher: KeyHasher, operator: Actor, vault: Vault, settings: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    _who, old, new = await _drafts(store, hasher, operator, vault)
    real, deleted = enrollment.sweep, anyio.Event()

    async def watched(target: Store, revoker: Revoker | None = None, lifetimes: Lifetimes | None = None) -> int:
        count = await real(target, revoker, lifetimes)  # the real sweep, observed: says when it deleted something
        if count:
            deleted.set()
        return count

    monkeypatch.setattr(enrollment, "sweep", watched)
    app = create_app(settings.model_copy(update={"janitor_interval_s": 0.05}), store)
    async with serving(app):
        with anyio.fail_after(10):  # a bound on waiting, not on the interval: any number of sweeps may pass
            await deleted.wait()
    assert old not in await _ids(store, D)
    assert await _ids(store, D) == {new}
    assert await _ids(store, DI) == set()


def test_the_interval_is_a_setting_with_five_minutes_by_default(settings: Settings) -> None:
    assert Settings.model_fields["janitor_interval_s"].default == janitor.DEFAULT_INTERVAL_S == 300.0
    with pytest.raises(ValidationError, match="janitor_interval_s"):
        Settings(data_dir=settings.data_dir, janitor_interval_s=0, **generate_secrets())  # type: ignore[arg-type]
