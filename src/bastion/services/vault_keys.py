"""The durable count of seals per key-encryption key, and the warning long before GCM's nonce limit."""

from __future__ import annotations

import logging
from datetime import UTC, datetime

import sqlalchemy as sa
from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.asyncio import AsyncConnection

from bastion.db import schema
from bastion.vault.crypto import NONCE_WARNING_SEALS

logger = logging.getLogger("bastion.vault")
T = schema.vault_keys


async def record_seal(conn: AsyncConnection, key_id: str, count: int = 1) -> int:
    """Add ``count`` seals under ``key_id`` in the caller's transaction; returns the new total."""
    update = T.update().where(T.c.key_id == key_id).values(seals=T.c.seals + count)
    if (await conn.execute(update)).rowcount == 0:
        try:
            async with conn.begin_nested():
                await conn.execute(T.insert().values(key_id=key_id, seals=count, first_used_at=datetime.now(UTC)))
        except IntegrityError:
            await conn.execute(update)
    total = int((await conn.execute(sa.select(T.c.seals).where(T.c.key_id == key_id))).scalar_one())
    if total >= NONCE_WARNING_SEALS and total - count < NONCE_WARNING_SEALS:
        logger.warning(
            "vault key has sealed over 2^30 values; rotate it (`bastion vault rotate`)",
            extra={"key_id": key_id, "seals": total},
        )
    return total


async def seal_counts(conn: AsyncConnection) -> dict[str, int]:
    return {row.key_id: int(row.seals) for row in (await conn.execute(sa.select(T))).all()}
