"""The durable webhook outbox: events written by the transaction that makes the change, leased by delivery workers.

``connection_event`` and ``host_event`` run inside the caller's transaction (a token minted and its event commit
together, or neither does): one row per subscribed endpoint, sharing the event id (and so ``webhook-id``). A token
the event hands over is sealed under the row id (``token`` delivery), or a claim code for it is (``claim_code``);
either is erased once delivered. Workers take due rows with a lease (``FOR UPDATE SKIP LOCKED`` on PostgreSQL), so
several replicas make each attempt once; a worker that dies mid-attempt leaves a lease that simply runs out.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING, Any, Final, NamedTuple

import sqlalchemy as sa
from sqlalchemy.ext.asyncio import AsyncConnection

from bastion.db import schema
from bastion.db.store import Store, emit, sealer
from bastion.domain.identities import IdentitySecret
from bastion.domain.ids import new_id
from bastion.domain.webhooks import (
    CARRIES_TOKEN,
    Attempt,
    EventSubject,
    EventType,
    MessageStatus,
    TokenDelivery,
    Trigger,
    next_attempt_at,
    payload,
)
from bastion.events.bus import Changed, Subject
from bastion.services import claims, endpoints, vault_keys
from bastion.types import JSONObject

if TYPE_CHECKING:  # apikeys imports members, whose deletion writes to the outbox
    from bastion.services.apikeys import KeyHasher

OB = schema.webhook_outbox
D = schema.webhook_deliveries
E = schema.webhook_endpoints
CLAIMS = schema.claim_codes
HISTORY_RETENTION: Final = timedelta(days=30)
_UNSEALED: Final = {"kek_id": None, "dek_wrapped": None, "secret_sealed": None, "secret_kind": None}


# --- writing events (in the caller's transaction) -------------------------------------------------------------------


async def _bump(conn: AsyncConnection, table: sa.Table, row_id: str) -> int:
    """The next event version of a connection or host (a row-locking increment: concurrent events serialise)."""
    result = await conn.execute(
        table.update().where(table.c.id == row_id).values(event_seq=table.c.event_seq + 1).returning(table.c.event_seq)
    )
    return int(result.scalar_one())


async def connection_event(
    conn: AsyncConnection,
    event_type: EventType,
    connection_id: str,
    *,
    token_id: str | None = None,
    secret: str | None = None,
    hasher: KeyHasher | None = None,
    expires_at: datetime | None = None,
    successor_token_id: str | None = None,
) -> int:
    """Queue ``event_type`` about a connection for its host's endpoints; returns how many rows were written.

    ``token_id`` names the token the event is about; ``secret`` (the plaintext token, for connection.created and
    token.minted) is sealed, never stored as is; ``hasher`` digests the claim codes made for it. ``expires_at``
    and ``successor_token_id`` are what a token.expiring event says.
    """
    c = schema.connections
    row = (
        await conn.execute(
            sa.select(c.c.workspace_id, c.c.host_id, schema.hosts.c.name, schema.gateways.c.slug)
            .add_columns(schema.members.c.id.label("member_id"), schema.members.c.email)
            .join(schema.hosts, schema.hosts.c.id == c.c.host_id)
            .join(schema.gateways, schema.gateways.c.id == c.c.gateway_id)
            .join(schema.members, schema.members.c.id == c.c.member_id)
            .where(c.c.id == connection_id)
        )
    ).one()
    targets = await endpoints.subscribed(conn, row.host_id, event_type)
    if not targets:
        return 0
    subject = EventSubject(
        host=row.name,
        gateway=row.slug,
        connection_id=connection_id,
        member_id=row.member_id,
        member_email=row.email,
        token_id=token_id,
        expires_at=expires_at,
        successor_token_id=successor_token_id,
    )
    version = await _bump(conn, c, connection_id)
    handed = secret if event_type in CARRIES_TOKEN else None
    return await _write(conn, row.workspace_id, row.host_id, targets, event_type, subject, version, handed, hasher)


async def host_event(conn: AsyncConnection, event_type: EventType, host_id: str) -> int:
    """Queue a host's own event (host.disabled, host.enabled), versioned by the host's counter."""
    h = schema.hosts
    row = (await conn.execute(sa.select(h.c.workspace_id, h.c.name).where(h.c.id == host_id))).one()
    targets = await endpoints.subscribed(conn, host_id, event_type)
    if not targets:
        return 0
    version = await _bump(conn, h, host_id)
    return await _write(conn, row.workspace_id, host_id, targets, event_type, EventSubject(host=row.name), version)


async def _write(
    conn: AsyncConnection,
    workspace_id: str,
    host_id: str,
    targets: Sequence[tuple[str, TokenDelivery]],
    event_type: EventType,
    subject: EventSubject,
    version: int,
    secret: str | None = None,
    hasher: KeyHasher | None = None,
) -> int:
    now = datetime.now(UTC)
    event_id = new_id()
    body = payload(event_type, event_id, now, subject, version)
    for endpoint_id, delivery in targets:
        row_id = new_id()
        values: dict[str, Any] = {**_UNSEALED, "claim_id": None}
        if secret is not None and subject.token_id is not None:
            vault = sealer(conn)
            handed = secret
            if delivery is TokenDelivery.CLAIM_CODE:
                if hasher is None:
                    raise RuntimeError("claim codes need the key hasher")
                claim_id, handed = await claims.mint(
                    conn,
                    vault,
                    hasher,
                    workspace_id=workspace_id,
                    host_id=host_id,
                    token_id=subject.token_id,
                    token=secret,
                )
                values["claim_id"] = claim_id
            sealed = vault.seal(workspace_id, row_id, IdentitySecret(token=handed))
            await vault_keys.record_seal(conn, sealed.kek_id)
            values |= {
                "kek_id": sealed.kek_id,
                "dek_wrapped": sealed.dek_wrapped,
                "secret_sealed": sealed.secret_sealed,
                "secret_kind": delivery.value,
            }
        await _insert(
            conn, row_id, workspace_id, endpoint_id, event_id, event_type, subject, version, body, now, values
        )
        emit(conn, Changed(Subject.WEBHOOK, endpoint_id))
    return len(targets)


async def _insert(
    conn: AsyncConnection,
    row_id: str,
    workspace_id: str,
    endpoint_id: str,
    event_id: str,
    event_type: EventType,
    subject: EventSubject,
    version: int,
    body: JSONObject,
    now: datetime,
    values: dict[str, Any],
) -> None:
    await conn.execute(
        OB.insert().values(
            id=row_id,
            workspace_id=workspace_id,
            endpoint_id=endpoint_id,
            event_id=event_id,
            event_type=event_type.value,
            connection_id=subject.connection_id,
            version=version,
            payload=body,
            token_id=subject.token_id,
            status=MessageStatus.PENDING.value,
            attempts=0,
            failures=0,
            occurred_at=now,
            next_attempt_at=now,
            first_attempt_at=None,
            last_attempt_at=None,
            delivered_at=None,
            last_error=None,
            **{"lease_owner": None, "lease_until": None, **values},
        )
    )


async def insert_test(
    conn: AsyncConnection, workspace_id: str, endpoint_id: str, host_name: str, owner: str, lease: timedelta
) -> str:
    """A ``webhook.test`` event for one endpoint, leased by ``owner`` at once (it is attempted now, not queued)."""
    now = datetime.now(UTC)
    row_id, event_id = new_id(), new_id()
    body = payload(EventType.TEST, event_id, now, EventSubject(host=host_name), 0)
    values: dict[str, Any] = {**_UNSEALED, "claim_id": None, "lease_owner": owner, "lease_until": now + lease}
    subject = EventSubject(host=host_name)
    await _insert(conn, row_id, workspace_id, endpoint_id, event_id, EventType.TEST, subject, 0, body, now, values)
    return row_id


async def announce_revoked(conn: AsyncConnection, *where: sa.ColumnElement[bool]) -> None:
    """Queue token.revoked for every live token of the connections matching ``where``, before those rows go."""
    a, c = schema.access_tokens, schema.connections
    live = (
        sa.select(a.c.id, a.c.connection_id)
        .join(c, c.c.id == a.c.connection_id)
        .where(a.c.revoked_at.is_(None), *where)
    )
    for token_id, connection_id in (await conn.execute(live)).all():
        await forget_token(conn, token_id)
        await connection_event(conn, EventType.TOKEN_REVOKED, connection_id, token_id=token_id)


async def forget_token(conn: AsyncConnection, token_id: str) -> None:
    """A revoked token is never delivered: every sealed copy waiting to go out is erased (its event still goes)."""
    await conn.execute(OB.update().where(OB.c.token_id == token_id, OB.c.kek_id.is_not(None)).values(**_UNSEALED))
    await claims.forget_token(conn, token_id)


# --- leasing and recording attempts (the delivery worker's side) ----------------------------------------------------


@dataclass(frozen=True, slots=True)
class Message:
    """One outbox row as a worker holds it while attempting it. ``repr`` leaves out the sealed value."""

    id: str
    workspace_id: str
    endpoint_id: str
    url: str
    event_id: str
    event_type: str
    payload: JSONObject
    claim_id: str | None
    secret_kind: str | None
    dek_wrapped: bytes | None = field(repr=False)
    secret_sealed: bytes | None = field(repr=False)
    attempts: int
    failures: int
    first_attempt_at: datetime | None


def _message(row: sa.Row[Any]) -> Message:
    return Message(
        id=row.id,
        workspace_id=row.workspace_id,
        endpoint_id=row.endpoint_id,
        url=row.url,
        event_id=row.event_id,
        event_type=row.event_type,
        payload=row.payload,
        claim_id=row.claim_id,
        secret_kind=row.secret_kind,
        dek_wrapped=row.dek_wrapped,
        secret_sealed=row.secret_sealed,
        attempts=row.attempts,
        failures=row.failures,
        first_attempt_at=row.first_attempt_at,
    )


def _with_url() -> sa.Select[Any]:
    return sa.select(OB, E.c.url).join(E, E.c.id == OB.c.endpoint_id)


async def lease_due(store: Store, owner: str, now: datetime, *, limit: int, lease: timedelta) -> list[Message]:
    """Take up to ``limit`` due rows, oldest first, for ``lease``: no other worker attempts them meanwhile."""
    async with store.transaction() as conn:
        query = (
            sa.select(OB.c.id)
            .join(E, E.c.id == OB.c.endpoint_id)
            .where(
                OB.c.status == MessageStatus.PENDING.value,
                OB.c.next_attempt_at <= now,
                sa.or_(OB.c.lease_until.is_(None), OB.c.lease_until < now),
                E.c.enabled,
                endpoints.has_live_secret(now),
            )
            .order_by(OB.c.occurred_at, OB.c.version, OB.c.id)
            .limit(limit)
        )
        if store.dialect == "postgresql":
            query = query.with_for_update(of=OB, skip_locked=True)
        ids = list((await conn.execute(query)).scalars())
        if not ids:
            return []
        await conn.execute(OB.update().where(OB.c.id.in_(ids)).values(lease_owner=owner, lease_until=now + lease))
        rows = (await conn.execute(_with_url().where(OB.c.id.in_(ids)))).all()
    order = {row_id: n for n, row_id in enumerate(ids)}
    return sorted((_message(r) for r in rows), key=lambda m: order[m.id])


async def lease_one(conn: AsyncConnection, message_id: str, owner: str, now: datetime, lease: timedelta) -> Message:
    """Take one row for an attempt made now (a redeliver or a test), whatever its schedule says."""
    await conn.execute(OB.update().where(OB.c.id == message_id).values(lease_owner=owner, lease_until=now + lease))
    return _message((await conn.execute(_with_url().where(OB.c.id == message_id))).one())


class Recorded(NamedTuple):
    delivery_id: str
    retry_at: datetime | None  # None: delivered, or given up


async def record(
    store: Store,
    message: Message,
    attempt: Attempt,
    *,
    owner: str,
    now: datetime,
    trigger: Trigger,
    rng: random.Random,
    retry: bool = True,
) -> Recorded:
    """Log the attempt and move the row on: delivered (its secret erased), retried later, or failed for good.

    A worker whose lease ran out meanwhile still logs its attempt, but leaves the row to whoever holds it now.
    """
    number = message.attempts + 1
    delivery_id = new_id()
    values: dict[str, Any] = {
        "attempts": OB.c.attempts + 1,
        "last_attempt_at": now,
        "last_error": attempt.error,
        "lease_owner": None,
        "lease_until": None,
        "first_attempt_at": message.first_attempt_at or now,
    }
    retry_at: datetime | None = None
    if attempt.delivered:
        values |= {"status": MessageStatus.DELIVERED.value, "delivered_at": now, **_UNSEALED}
    else:
        failures = message.failures + 1
        retry_at = next_attempt_at(now, message.first_attempt_at or now, failures, rng) if retry else None
        values |= {"failures": failures}
        if retry_at is None:
            values |= {"status": MessageStatus.FAILED.value}
        else:
            values |= {"status": MessageStatus.PENDING.value, "next_attempt_at": retry_at}
    async with store.transaction() as conn:
        await conn.execute(
            D.insert().values(
                id=delivery_id,
                workspace_id=message.workspace_id,
                endpoint_id=message.endpoint_id,
                message_id=message.id,
                attempt=number,
                trigger=trigger.value,
                attempted_at=now,
                status_code=attempt.status_code,
                error=attempt.error,
                duration_ms=attempt.duration_ms,
                outcome="delivered" if attempt.delivered else "failed",
            )
        )
        await conn.execute(OB.update().where(OB.c.id == message.id, OB.c.lease_owner == owner).values(**values))
    return Recorded(delivery_id, retry_at)


async def postpone(store: Store, ids: Sequence[str], owner: str, until: datetime, now: datetime) -> None:
    """Put an endpoint's later events back behind the one that just failed, so they keep their order.

    Their retry window starts now as well: they wait because the endpoint is down, which counts against them.
    """
    if not ids:
        return
    async with store.transaction() as conn:
        await conn.execute(
            OB.update()
            .where(OB.c.id.in_(list(ids)), OB.c.lease_owner == owner)
            .values(
                next_attempt_at=until,
                lease_owner=None,
                lease_until=None,
                first_attempt_at=sa.func.coalesce(OB.c.first_attempt_at, now),
            )
        )


async def next_due(store: Store, now: datetime) -> datetime | None:
    """When a row this worker could lease is next due (for its sleep): rows that wait for an endpoint to be
    enabled or to get a secret do not count, and a row another worker holds counts from the end of its lease."""
    eligible = sa.and_(OB.c.status == MessageStatus.PENDING.value, E.c.enabled, endpoints.has_live_secret(now))
    free = sa.or_(OB.c.lease_until.is_(None), OB.c.lease_until < now)
    async with store.transaction() as conn:
        base = sa.select().select_from(OB.join(E, E.c.id == OB.c.endpoint_id))
        due = (await conn.execute(base.add_columns(sa.func.min(OB.c.next_attempt_at)).where(eligible, free))).scalar()
        held = (await conn.execute(base.add_columns(sa.func.min(OB.c.lease_until)).where(eligible, ~free))).scalar()
    found = [_aware(t) for t in (due, held) if t is not None]
    return min(found) if found else None


def _aware(value: datetime) -> datetime:
    # Aggregates may skip the column type's conversion on SQLite: naive there means UTC.
    return value if value.tzinfo is not None else value.replace(tzinfo=UTC)


async def sweep(store: Store, now: datetime) -> int:
    """Housekeeping: used or lapsed claim codes nobody can still be sent, superseded secrets, old history."""
    live_rows = sa.select(OB.c.id).where(
        OB.c.claim_id == CLAIMS.c.id,
        OB.c.status.in_([MessageStatus.PENDING.value, MessageStatus.FAILED.value]),
    )
    async with store.transaction() as conn:
        claims_gone = await conn.execute(
            CLAIMS.delete().where(
                sa.or_(CLAIMS.c.redeemed_at.is_not(None), CLAIMS.c.expires_at < now), ~sa.exists(live_rows)
            )
        )
        secrets_gone = await conn.execute(
            schema.webhook_secrets.delete().where(schema.webhook_secrets.c.expires_at <= now)
        )
        history_gone = await conn.execute(
            OB.delete().where(
                OB.c.status.in_([MessageStatus.DELIVERED.value, MessageStatus.FAILED.value]),
                OB.c.last_attempt_at < now - HISTORY_RETENTION,
            )
        )
    return int(claims_gone.rowcount + secrets_gone.rowcount + history_gone.rowcount)
