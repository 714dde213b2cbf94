"""Online key rotation: re-wrap every sealed data key under the primary key, in resumable batches.

Only the wrapped data keys change; sealed fields keep their data key, so a batch is cheap and readers
holding either key keep working throughout.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Final

import sqlalchemy as sa

from bastion.db import schema
from bastion.db.store import Store, emit
from bastion.domain.actor import Actor
from bastion.domain.capabilities import Capability
from bastion.errors import Conflict
from bastion.events.bus import Changed, Subject
from bastion.services import vault_keys
from bastion.services.actions import action
from bastion.types import JSONObject
from bastion.vault.sealer import Vault

DEFAULT_BATCH: Final = 200


@dataclass(frozen=True, slots=True)
class SealedColumns:
    """One table holding sealed values: where its key id, wrapped data key and row identity live."""

    table: sa.Table
    kek_column: str
    wrapped_column: str
    sealed_columns: tuple[str, ...]
    subject: Subject


# Every table with sealed values must be listed here (a test checks every LargeBinary column is accounted for).
# A row whose key id is NULL holds nothing sealed (a draft identity reusing an existing one, a public OAuth client).
REGISTRY: Final = (
    SealedColumns(schema.identities, "kek_id", "dek_wrapped", ("secret_sealed",), Subject.IDENTITY_INFO),
    # Draft rows are sealed under their future identity's id, which is also their own id.
    SealedColumns(schema.draft_identities, "kek_id", "dek_wrapped", ("secret_sealed",), Subject.IDENTITY_INFO),
    # OAuth client secrets, sealed under their oauth_clients row id; nothing caches them.
    SealedColumns(schema.oauth_clients, "kek_id", "dek_wrapped", ("secret_sealed",), Subject.SERVER_INFO),
    # Webhooks: signing secrets, the token or claim code an event carries until delivered, the token behind a claim.
    SealedColumns(schema.webhook_secrets, "kek_id", "dek_wrapped", ("secret_sealed",), Subject.WEBHOOK),
    SealedColumns(schema.webhook_outbox, "kek_id", "dek_wrapped", ("secret_sealed",), Subject.WEBHOOK),
    SealedColumns(schema.claim_codes, "kek_id", "dek_wrapped", ("secret_sealed",), Subject.WEBHOOK),
)


@dataclass(frozen=True, slots=True)
class KeyUsage:
    key_id: str
    rows: int
    seals: int
    primary: bool
    in_keyring: bool


async def usage(store: Store, vault: Vault) -> list[KeyUsage]:
    """Rows per key id across the registry, with seal counts: what `vault status` shows."""
    rows: dict[str, int] = {}
    async with store.transaction() as conn:
        for entry in REGISTRY:
            column = entry.table.c[entry.kek_column]
            counts = sa.select(column, sa.func.count()).where(column.is_not(None)).group_by(column)
            for key_id, count in (await conn.execute(counts)).all():
                rows[key_id] = rows.get(key_id, 0) + int(count)
        seals = await vault_keys.seal_counts(conn)
    key_ids = sorted(set(rows) | set(seals) | set(vault.keyring.key_ids))
    return [
        KeyUsage(k, rows.get(k, 0), seals.get(k, 0), k == vault.keyring.primary_id, k in vault.keyring.key_ids)
        for k in key_ids
    ]


async def remaining(store: Store, vault: Vault) -> int:
    async with store.transaction() as conn:
        total = 0
        for entry in REGISTRY:
            column = entry.table.c[entry.kek_column]
            query = sa.select(sa.func.count()).select_from(entry.table).where(column != vault.keyring.primary_id)
            total += int((await conn.execute(query)).scalar_one())
    return total


async def rewrap(
    store: Store,
    vault: Vault,
    actor: Actor,
    *,
    batch: int = DEFAULT_BATCH,
    progress: Callable[[int], None] | None = None,
) -> int:
    """Re-wrap everything not under the primary key; returns how many rows moved. Safe to stop and run again."""
    actor.require(Capability.IDENTITIES_MANAGE)
    primary = vault.keyring.primary_id
    moved = 0
    for entry in REGISTRY:
        table = entry.table
        kek = table.c[entry.kek_column]
        wrapped = table.c[entry.wrapped_column]
        while True:
            async with store.transaction() as conn:
                found = (
                    await conn.execute(
                        sa.select(table.c.id, table.c.workspace_id, kek, wrapped)
                        .where(kek != primary)
                        .order_by(table.c.id)
                        .limit(batch)
                    )
                ).all()
                if not found:
                    break
                done = 0
                for row in found:
                    new_kek, new_wrapped = vault.rewrap(row.workspace_id, row.id, row[3])
                    # Only if nobody re-sealed the row meanwhile (a concurrent update seals under the primary).
                    result = await conn.execute(
                        table.update()
                        .where(table.c.id == row.id, kek == row[2], wrapped == row[3])
                        .values({entry.kek_column: new_kek, entry.wrapped_column: new_wrapped})
                    )
                    done += result.rowcount
                    emit(conn, Changed(entry.subject, row.id))
                await vault_keys.record_seal(conn, primary, len(found))
                # A batch commits on its own (the run is resumable), so each batch that moved rows records itself.
                if done:
                    detail: JSONObject = {"table": table.name, "key_id": primary, "rows": done}
                    action(conn, actor, "vault.rewrapped", f"vault_key:{primary}", detail)
            moved += done
            if progress is not None:
                progress(len(found))
    return moved


async def retire(store: Store, vault: Vault, actor: Actor, key_id: str) -> None:
    """Mark a key retired; refused while any row still uses it or while it is the primary."""
    actor.require(Capability.IDENTITIES_MANAGE)
    if key_id == vault.keyring.primary_id:
        raise Conflict(f"key {key_id!r} is the primary key; make another key primary first")
    async with store.transaction() as conn:
        for entry in REGISTRY:
            column = entry.table.c[entry.kek_column]
            count = int(
                (
                    await conn.execute(sa.select(sa.func.count()).select_from(entry.table).where(column == key_id))
                ).scalar_one()
            )
            if count:
                raise Conflict(f"key {key_id!r} still seals {count} row(s) of {entry.table.name}; run a rewrap first")
        await vault_keys.record_seal(conn, key_id, 0)
        await conn.execute(
            schema.vault_keys.update().where(schema.vault_keys.c.key_id == key_id).values(retired_at=datetime.now(UTC))
        )
        action(conn, actor, "vault.retired", f"vault_key:{key_id}", {"key_id": key_id})
