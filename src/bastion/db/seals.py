"""What an identity's seal is bound to, read from its row, and whether a seal bound to less may still open.

Identities (and enrollment drafts) are sealed bound to their server and owner (`vault.sealer.Binding`). Rows sealed
before release 0010 are bound to workspace and id only; they open until `services.rotation.rebind` has re-sealed
every one of their workspace and set ``workspaces.seals_bound_at``. From then on an unbound row there can only be
tampering (an old ciphertext restored, perhaps re-pointed to another member) and is refused, in every process.
"""

from __future__ import annotations

from typing import Any

import sqlalchemy as sa
from sqlalchemy.ext.asyncio import AsyncConnection

from bastion.db import schema
from bastion.vault.sealer import Binding, Unbound

W = schema.workspaces


def binding_of(row: sa.Row[Any]) -> Binding | None:
    """The binding a row (``server_id``, ``owner_id``, ``sealed_bound``) says its seal has; None: unbound."""
    return Binding(row.server_id, row.owner_id) if row.sealed_bound else None


async def binding_for(conn: AsyncConnection, row: sa.Row[Any]) -> Binding | None:
    """The binding to open the row's seal with (``workspace_id`` too, for an unbound one).

    Raises:
        Unbound: the row's seal is unbound but every seal of its workspace was bound already.
    """
    binding = binding_of(row)
    if binding is None:
        bound_at = (await conn.execute(sa.select(W.c.seals_bound_at).where(W.c.id == row.workspace_id))).scalar()
        if bound_at is not None:
            raise Unbound("this identity's secret is not bound to its server and owner as every one here is")
    return binding
