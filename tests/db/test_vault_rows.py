"""Sealed identity rows as stored: a ciphertext moved to another row never opens, and no sealed column is forgotten."""

from __future__ import annotations

import os
from typing import Any

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
from bastion.vault.crypto import Keyring, UnknownKey, VaultError
from bastion.vault.sealer import Vault

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
