"""Sealed identity rows as stored: a ciphertext moved to another row never opens, and no sealed column is forgotten."""

from __future__ import annotations

import os
from typing import Any

import anyio
import pytest
import sqlalchemy as sa

from bastion.db import schema
from bastion.db.store import Store
from bastion.domain.actor import Actor
from bastion.domain.identities import bearer_secret
from bastion.domain.models import Transport
from bastion.domain.specs import MemberSpec, ServerSpec
from bastion.services import identities, members, rotation, servers, vault_keys
from bastion.services.apikeys import KeyHasher
from bastion.settings import Settings
from bastion.vault.crypto import Keyring, UnknownKey, VaultError
from bastion.vault.sealer import Unbound, Vault
from bastion.web.app import create_app
from tests.mcp_support import serving

pytestmark = pytest.mark.anyio
T = schema.identities
ADA_SECRET = "ada-upstream-credential-0001"
BOB_SECRET = "bob-upstream-credential-0002"


async def _two_rows(store: Store, vault: Vault, hasher: KeyHasher, operator: Actor) -> tuple[str, str]:
    await servers.create(store, operator, ServerSpec("bq", Transport.STREAMABLE_HTTP, "https://bq.example.com/mcp"))
    ada = await members.create(store, operator, MemberSpec("ada@example.com", "Ada"))
    bob = await members.create(store, operator, MemberSpec("bob@example.com", "Bob"))
    first = await identities.create(
        store, vault, hasher, operator, server="bq", owner=ada.id, secret=bearer_secret(ADA_SECRET)
    )
    second = await identities.create(
        store, vault, hasher, operator, server="bq", owner=bob.id, secret=bearer_secret(BOB_SECRET)
    )
    return first.id, second.id


async def _swap(store: Store, first: str, second: str, columns: tuple[str, ...]) -> None:
    async with store.transaction() as conn:
        rows = {r.id: r for r in (await conn.execute(sa.select(T).where(T.c.id.in_((first, second))))).all()}
        for this, other in ((first, second), (second, first)):
            values = {column: getattr(rows[other], column) for column in columns}
            await conn.execute(T.update().where(T.c.id == this).values(values))


@pytest.mark.parametrize(
    "columns", [("secret_sealed",), ("dek_wrapped",), ("dek_wrapped", "secret_sealed")], ids=["secret", "dek", "both"]
)
async def test_ciphertexts_swapped_between_two_rows_open_in_neither(
    store: Store, vault: Vault, hasher: KeyHasher, operator: Actor, columns: tuple[str, ...]
) -> None:
    first, second = await _two_rows(store, vault, hasher, operator)
    assert (await identities.open_secret(store, vault, operator.workspace_id, first)).token == ADA_SECRET
    assert (await identities.open_secret(store, vault, operator.workspace_id, second)).token == BOB_SECRET
    await _swap(store, first, second, columns)
    for identity_id in (first, second):
        with pytest.raises(VaultError) as caught:
            await identities.open_secret(store, vault, operator.workspace_id, identity_id)
        assert ADA_SECRET not in str(caught.value) and BOB_SECRET not in str(caught.value)
    await _swap(store, first, second, columns)
    assert (await identities.open_secret(store, vault, operator.workspace_id, first)).token == ADA_SECRET


async def test_a_row_sealed_under_a_key_missing_from_the_keyring_names_that_key(
    store: Store, vault: Vault, hasher: KeyHasher, operator: Actor
) -> None:
    await servers.create(store, operator, ServerSpec("bq", Transport.STREAMABLE_HTTP, "https://bq.example.com/mcp"))
    elsewhere = Vault(Keyring({"retired-2019": os.urandom(32)}, "retired-2019"))
    sealed = await identities.create(
        store, elsewhere, hasher, operator, server="bq", shared=True, secret=bearer_secret(ADA_SECRET)
    )
    assert sealed.kek_id == "retired-2019"
    with pytest.raises(UnknownKey, match="retired-2019"):
        await identities.open_secret(store, vault, operator.workspace_id, sealed.id)
    assert (await identities.open_secret(store, elsewhere, operator.workspace_id, sealed.id)).token == ADA_SECRET


async def test_the_vault_keys_table_counts_every_seal(
    store: Store, vault: Vault, hasher: KeyHasher, operator: Actor
) -> None:
    first, _second = await _two_rows(store, vault, hasher, operator)
    primary = vault.keyring.primary_id
    async with store.transaction() as conn:
        assert (await vault_keys.seal_counts(conn)) == {primary: 2}
    await identities.update(store, vault, hasher, operator, first, label="relabelled only")
    await identities.update(store, vault, hasher, operator, first, secret=bearer_secret("replaced-credential-03"))
    async with store.transaction() as conn:
        assert (await vault_keys.seal_counts(conn)) == {primary: 3}
    (usage,) = await rotation.usage(store, vault)
    assert (usage.key_id, usage.rows, usage.seals, usage.primary) == (primary, 2, 3, True)


def _registered_columns() -> set[tuple[str, str]]:
    out: set[tuple[str, str]] = set()
    for entry in rotation.REGISTRY:
        out.add((entry.table.name, entry.wrapped_column))
        out.update((entry.table.name, column) for column in entry.sealed_columns)
    return out


def test_every_binary_column_is_a_digest_or_registered_for_rotation() -> None:
    binary = {
        (table.name, column.name)
        for table in schema.metadata.sorted_tables
        for column in table.columns
        if isinstance(column.type, sa.LargeBinary)
    }
    unaccounted = {(t, c) for t, c in binary if c != "digest"} - _registered_columns()
    assert unaccounted == set(), f"sealed columns missing from rotation.REGISTRY: {sorted(unaccounted)}"
    registered = _registered_columns()
    assert ("identities", "secret_sealed") in registered and ("identities", "dek_wrapped") in registered
    assert registered <= binary, f"REGISTRY names columns that are not binary: {sorted(registered - binary)}"


def test_every_registered_table_has_the_key_id_column_rotation_reads() -> None:
    for entry in rotation.REGISTRY:
        columns: Any = entry.table.c
        assert entry.kek_column in columns and entry.wrapped_column in columns
        assert all(column in columns for column in entry.sealed_columns)


async def _repoint(store: Store, identity_id: str, **values: str | None) -> None:
    async with store.transaction() as conn:
        await conn.execute(T.update().where(T.c.id == identity_id).values(values))


async def test_a_row_re_pointed_to_another_member_or_server_does_not_open(
    store: Store, vault: Vault, hasher: KeyHasher, operator: Actor
) -> None:
    first, _second = await _two_rows(store, vault, hasher, operator)
    await servers.create(store, operator, ServerSpec("crm", Transport.STREAMABLE_HTTP, "https://crm.example.com/mcp"))
    async with store.transaction() as conn:
        row = (await conn.execute(sa.select(T).where(T.c.id == first))).one()
        bob_id = (await conn.execute(sa.select(T.c.owner_id).where(T.c.id == _second))).scalar_one()
        crm_id = (await servers.find(conn, operator.workspace_id, "crm")).id
    assert row.sealed_bound is True
    for change in ({"owner_id": bob_id}, {"owner_id": None}, {"server_id": crm_id}):
        await _repoint(store, first, **change)
        with pytest.raises(VaultError) as caught:
            await identities.open_secret(store, vault, operator.workspace_id, first)
        assert ADA_SECRET not in str(caught.value)
        await _repoint(store, first, owner_id=row.owner_id, server_id=row.server_id)
        assert (await identities.open_secret(store, vault, operator.workspace_id, first)).token == ADA_SECRET


async def _unbound(store: Store, vault: Vault, identity_id: str, secret: str) -> None:
    """Seal ``identity_id`` again as releases before 0010 did (bound to workspace and id only)."""
    async with store.transaction() as conn:
        row = (await conn.execute(sa.select(T).where(T.c.id == identity_id))).one()
        sealed = vault.seal(row.workspace_id, row.id, bearer_secret(secret))
        values = {"dek_wrapped": sealed.dek_wrapped, "secret_sealed": sealed.secret_sealed, "sealed_bound": False}
        await conn.execute(T.update().where(T.c.id == identity_id).values(values))


async def _bound_at(store: Store, operator: Actor) -> Any:
    async with store.transaction() as conn:
        query = sa.select(schema.workspaces.c.seals_bound_at).where(schema.workspaces.c.id == operator.workspace_id)
        return (await conn.execute(query)).scalar_one()


async def _as_before_0010(store: Store, vault: Vault, hasher: KeyHasher, operator: Actor) -> tuple[str, str]:
    """Two identities as migration 0010 finds them: sealed unbound, in a workspace not yet marked."""
    first, second = await _two_rows(store, vault, hasher, operator)
    async with store.transaction() as conn:
        await conn.execute(schema.workspaces.update().values(seals_bound_at=None))
    await _unbound(store, vault, first, ADA_SECRET)
    await _unbound(store, vault, second, BOB_SECRET)
    return first, second


async def test_a_new_workspace_refuses_unbound_seals_from_the_start(
    store: Store, vault: Vault, hasher: KeyHasher, operator: Actor
) -> None:
    first, _second = await _two_rows(store, vault, hasher, operator)
    assert await _bound_at(store, operator) is not None
    await _unbound(store, vault, first, ADA_SECRET)  # an old ciphertext restored: never sealed here unbound
    assert await rotation.unbound(store) == 0  # not pending: refused
    with pytest.raises(Unbound):
        await identities.open_secret(store, vault, operator.workspace_id, first)
    assert await rotation.rebind(store, vault, mark=True) == 0  # and never laundered into a bound seal
    with pytest.raises(Unbound):
        await identities.open_secret(store, vault, operator.workspace_id, first)


async def test_rebind_re_seals_an_upgraded_workspace_then_marking_refuses_unbound_rows(
    store: Store, vault: Vault, hasher: KeyHasher, operator: Actor
) -> None:
    first, second = await _as_before_0010(store, vault, hasher, operator)
    async with store.transaction() as conn:
        old = (await conn.execute(sa.select(T).where(T.c.id == second))).one()
    old_second = old.dek_wrapped
    assert await rotation.unbound(store) == 2
    # Until rebind has run, a row sealed the old way opens (an upgrade loses nothing).
    assert (await identities.open_secret(store, vault, operator.workspace_id, first)).token == ADA_SECRET
    batches: list[int] = []
    # What `serve` does at start: re-seal, not mark (a replica of the older release may still seal unbound).
    assert await rotation.rebind(store, vault, mark=False, batch=1, progress=batches.append) == 2
    assert batches == [1, 1] and await rotation.unbound(store) == 0 and await _bound_at(store, operator) is None
    assert (await identities.open_secret(store, vault, operator.workspace_id, first)).token == ADA_SECRET
    assert (await identities.open_secret(store, vault, operator.workspace_id, second)).token == BOB_SECRET
    async with store.transaction() as conn:
        rebound = (await conn.execute(sa.select(T).where(T.c.id == second))).one()
        rebound_events = sa.select(schema.audit_events).where(schema.audit_events.c.method == "vault.rebound")
        events = (await conn.execute(rebound_events)).all()
    assert rebound.sealed_bound is True and rebound.dek_wrapped != old_second
    assert sum(e.detail["rows"] for e in events) == 2
    # What `vault rebind` does once every replica is upgraded: nothing left to re-seal, so the workspace is marked.
    assert await rotation.rebind(store, vault, mark=True) == 0
    assert await _bound_at(store, operator) is not None
    # An old ciphertext restored over the row (and flagged unbound again) no longer opens, nor is it re-sealed.
    restore = {"dek_wrapped": old.dek_wrapped, "secret_sealed": old.secret_sealed, "sealed_bound": False}
    async with store.transaction() as conn:
        await conn.execute(T.update().where(T.c.id == second).values(restore))
    with pytest.raises(Unbound):
        await identities.open_secret(store, vault, operator.workspace_id, second)
    assert await rotation.rebind(store, vault, mark=True) == 0


async def test_a_seal_that_does_not_open_is_left_and_keeps_its_workspace_unmarked(
    store: Store, vault: Vault, hasher: KeyHasher, operator: Actor
) -> None:
    first, second = await _as_before_0010(store, vault, hasher, operator)
    await _swap(store, first, second, ("secret_sealed",))  # neither opens now
    assert await rotation.rebind(store, vault, mark=True) == 0
    assert await rotation.unbound(store) == 2 and await _bound_at(store, operator) is None
    await _swap(store, first, second, ("secret_sealed",))
    assert await rotation.rebind(store, vault, mark=True) == 2
    assert await _bound_at(store, operator) is not None


async def test_rotation_rewraps_bound_seals_and_they_still_open(
    store: Store, vault: Vault, hasher: KeyHasher, operator: Actor
) -> None:
    first, _second = await _two_rows(store, vault, hasher, operator)
    after = Vault(Keyring({**vault.keyring.keys(), "k2": os.urandom(32)}, "k2"))
    assert await rotation.rewrap(store, after, operator) == 2
    assert (await identities.open_secret(store, after, operator.workspace_id, first)).token == ADA_SECRET


async def test_serving_re_seals_old_rows_bound_at_start_and_leaves_marking_to_the_operator(
    store: Store,
    vault: Vault,
    hasher: KeyHasher,
    operator: Actor,
    settings: Settings,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    _first, second = await _as_before_0010(store, vault, hasher, operator)
    real, ran = rotation.rebind, anyio.Event()
    marks: list[bool] = []

    async def watched(target: Store, with_vault: Vault, *, mark: bool) -> int:
        marks.append(mark)
        done = await real(target, with_vault, mark=mark)  # the real re-seal, observed: says when it has run
        ran.set()
        return done

    monkeypatch.setattr(rotation, "rebind", watched)
    async with serving(create_app(settings, store)):
        with anyio.fail_after(10):  # a bound on waiting, not a timing: the re-seal runs in the background
            await ran.wait()
    assert marks == [False] and await rotation.unbound(store) == 0
    assert (await identities.open_secret(store, vault, operator.workspace_id, second)).token == BOB_SECRET
    assert await _bound_at(store, operator) is None
