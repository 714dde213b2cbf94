"""Online key rotation: re-wrap every sealed data key under the primary key, in resumable batches.

Only the wrapped data keys change; sealed fields keep their data key, so a batch is cheap and readers
holding either key keep working throughout.

`rebind` is the other online migration: it re-seals identities (and enrollment drafts) sealed before seals were
bound to their server and owner (`vault.sealer.Binding`). `bastion serve` runs it in the background at start;
`bastion vault rebind` runs it by hand and then marks each workspace with none left (``seals_bound_at``), after
which every process refuses an unbound seal there (db/seals.py).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Final

import sqlalchemy as sa

from bastion.db import schema
from bastion.db.seals import binding_of
from bastion.db.store import Store, emit
from bastion.domain.actor import Actor
from bastion.domain.capabilities import Capability
from bastion.errors import Conflict
from bastion.events.bus import Changed, Subject
from bastion.services import vault_keys
from bastion.services.actions import action
from bastion.types import JSONObject, WorkspaceId
from bastion.vault.crypto import VaultError
from bastion.vault.sealer import Binding, Vault

logger = logging.getLogger("bastion.vault")
DEFAULT_BATCH: Final = 200


@dataclass(frozen=True, slots=True)
class SealedColumns:
    """One table holding sealed values: where its key id, wrapped data key and row identity live."""

    table: sa.Table
    kek_column: str
    wrapped_column: str
    sealed_columns: tuple[str, ...]
    subject: Subject
    bound: bool = False  # sealed with a `Binding` of the row's server_id and owner_id (when sealed_bound)


# Every table with sealed values must be listed here (a test checks every LargeBinary column is accounted for).
# A row whose key id is NULL holds nothing sealed (a draft identity reusing an existing one, a public OAuth client).
REGISTRY: Final = (
    SealedColumns(schema.identities, "kek_id", "dek_wrapped", ("secret_sealed",), Subject.IDENTITY_INFO, bound=True),
    # Draft rows are sealed under their future identity's id, which is also their own id.
    SealedColumns(
        schema.draft_identities, "kek_id", "dek_wrapped", ("secret_sealed",), Subject.IDENTITY_INFO, bound=True
    ),
    # OAuth client secrets, sealed under their oauth_clients row id; nothing caches them.
    SealedColumns(schema.oauth_clients, "kek_id", "dek_wrapped", ("secret_sealed",), Subject.SERVER_INFO),
    # Webhooks: signing secrets, the token or claim code an event carries until delivered, the token behind a claim.
    SealedColumns(schema.webhook_secrets, "kek_id", "dek_wrapped", ("secret_sealed",), Subject.WEBHOOK),
    SealedColumns(schema.webhook_outbox, "kek_id", "dek_wrapped", ("secret_sealed",), Subject.WEBHOOK),
    SealedColumns(schema.claim_codes, "kek_id", "dek_wrapped", ("secret_sealed",), Subject.WEBHOOK),
)


_BOUND: Final = tuple(entry for entry in REGISTRY if entry.bound)
W = schema.workspaces
D = schema.enrollment_drafts
_REBIND_LABEL: Final = "bastion (re-sealing identities bound to server and owner)"


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
                binding = (table.c.server_id, table.c.owner_id, table.c.sealed_bound) if entry.bound else ()
                found = (
                    await conn.execute(
                        sa.select(
                            table.c.id, table.c.workspace_id, kek.label("kek"), wrapped.label("wrapped"), *binding
                        )
                        .where(kek != primary)
                        .order_by(table.c.id)
                        .limit(batch)
                    )
                ).all()
                if not found:
                    break
                done = 0
                for row in found:
                    bound_to = binding_of(row) if entry.bound else None
                    new_kek, new_wrapped = vault.rewrap(row.workspace_id, row.id, row.wrapped, bound_to)
                    # Only if nobody re-sealed the row meanwhile (a concurrent update seals under the primary).
                    result = await conn.execute(
                        table.update()
                        .where(table.c.id == row.id, kek == row.kek, wrapped == row.wrapped)
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


def _unbound_in(entry: SealedColumns) -> sa.ColumnElement[bool]:
    table = entry.table
    return sa.and_(table.c.kek_id.is_not(None), table.c.sealed_bound.is_(False))


async def unmarked(store: Store) -> int:
    """How many workspaces still accept unbound seals: `bastion vault rebind` has not marked them yet."""
    async with store.transaction() as conn:
        query = sa.select(sa.func.count()).select_from(W).where(W.c.seals_bound_at.is_(None))
        return int((await conn.execute(query)).scalar_one())


async def unbound(store: Store) -> int:
    """How many identities and enrollment drafts still hold a seal made before seals were bound (db/seals.py)."""
    async with store.transaction() as conn:
        total = 0
        for entry in _BOUND:
            table = entry.table
            query = (
                sa.select(sa.func.count())
                .select_from(table.join(W, W.c.id == table.c.workspace_id))
                .where(_unbound_in(entry), W.c.seals_bound_at.is_(None))
            )
            total += int((await conn.execute(query)).scalar_one())
    return total


async def rebind(
    store: Store,
    vault: Vault,
    *,
    mark: bool,
    batch: int = DEFAULT_BATCH,
    progress: Callable[[int], None] | None = None,
) -> int:
    """Re-seal identities and drafts sealed unbound, bound to their server and owner; returns how many.

    Only in workspaces not yet marked ``seals_bound_at``. With ``mark``, a workspace with none left is marked, and
    from then on an unbound row there is refused, never re-sealed (db/seals.py): `bastion vault rebind` marks, once
    no replica of an older release is left to seal unbound; `bastion serve` re-seals at start without marking.
    Safe to run in several processes at once and to stop: each batch commits, and a row someone re-sealed
    meanwhile is left as they wrote it. A row that does not open is logged and left, and keeps its workspace
    unmarked.
    """
    done = 0
    for entry in _BOUND:
        table = entry.table
        drafts = table is schema.draft_identities
        # A draft sealed before 0010 names its owner only through its enrollment draft.
        owner = sa.func.coalesce(table.c.owner_id, D.c.member_id) if drafts else table.c.owner_id
        source = table.join(W, W.c.id == table.c.workspace_id)
        after = ""
        while True:
            async with store.transaction() as conn:
                found = (
                    await conn.execute(
                        sa.select(table.c.id, table.c.workspace_id, table.c.server_id, owner.label("owner"))
                        .add_columns(table.c.dek_wrapped, table.c.secret_sealed)
                        .select_from(source.outerjoin(D, D.c.id == table.c.draft_id) if drafts else source)
                        .where(_unbound_in(entry), W.c.seals_bound_at.is_(None), table.c.id > after)
                        .order_by(table.c.id)
                        .limit(batch)
                    )
                ).all()
                if not found:
                    break
                after = found[-1].id
                by_workspace: dict[str, int] = {}
                for row in found:
                    try:
                        secret = vault.open(row.workspace_id, row.id, row.dek_wrapped, row.secret_sealed)
                    except VaultError as exc:
                        logger.warning("a seal could not be opened to bind it (%s)", exc.code, extra={"row": row.id})
                        continue
                    sealed = vault.seal(row.workspace_id, row.id, secret, Binding(row.server_id, row.owner))
                    values: dict[str, object] = {
                        "kek_id": sealed.kek_id,
                        "dek_wrapped": sealed.dek_wrapped,
                        "secret_sealed": sealed.secret_sealed,
                        "sealed_bound": True,
                    }
                    if drafts:
                        values["owner_id"] = row.owner
                    moved = table.c.sealed_bound.is_(False), table.c.dek_wrapped == row.dek_wrapped
                    if (await conn.execute(table.update().where(table.c.id == row.id, *moved).values(values))).rowcount:
                        by_workspace[row.workspace_id] = by_workspace.get(row.workspace_id, 0) + 1
                        emit(conn, Changed(entry.subject, row.id))
                await vault_keys.record_seal(conn, vault.keyring.primary_id, sum(by_workspace.values()))
                for workspace_id, rows in by_workspace.items():
                    actor = Actor(WorkspaceId(workspace_id), None, frozenset(), _REBIND_LABEL)
                    detail: JSONObject = {"table": table.name, "rows": rows}
                    action(conn, actor, "vault.rebound", "vault:seals", detail)
            done += sum(by_workspace.values())
            if progress is not None:
                progress(len(found))
    if not mark:
        return done
    async with store.transaction() as conn:
        left = [sa.exists().where(e.table.c.workspace_id == W.c.id, _unbound_in(e)) for e in _BOUND]
        await conn.execute(
            W.update()
            .where(W.c.seals_bound_at.is_(None), *(sa.not_(e) for e in left))
            .values(seals_bound_at=datetime.now(UTC))
        )
    return done


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
