"""Webhook endpoints as admins manage them: endpoints per host, secret rotation, the delivery log, redeliver, test.

Reading needs ``hosts.manage``, ``tokens.manage`` or ``admin.view``; changing needs ``hosts.manage``. A host's own
``webhook_url`` is its first endpoint (``from_host``): editing that endpoint's URL edits the host's, and deleting it
clears it. Redeliver and test attempt at once, through the same code as the worker, and answer with the attempt.
"""

from __future__ import annotations

import random
from collections.abc import Iterable, Mapping
from datetime import UTC, datetime, timedelta
from typing import Any, Final

import sqlalchemy as sa
from sqlalchemy.ext.asyncio import AsyncConnection

from bastion.db import crud, schema
from bastion.db.crud import Page
from bastion.db.store import Store, emit, outbound_of
from bastion.domain.actor import Actor
from bastion.domain.capabilities import Capability
from bastion.domain.ids import new_id
from bastion.domain.models import Host
from bastion.domain.specs import description as clean_description
from bastion.domain.webhooks import (
    CARRIES_TOKEN,
    DEFAULT_ROTATION_OVERLAP,
    MAX_ROTATION_OVERLAP,
    DeliveryInfo,
    Endpoint,
    MessageInfo,
    MessageStatus,
    TokenDelivery,
    Trigger,
    event_types,
    message_id,
)
from bastion.errors import Conflict, ValidationFailed, VersionMismatch
from bastion.events.bus import Changed, Subject
from bastion.net.outbound import check_url_shape
from bastion.services import delivery, endpoints, hosts, outbox
from bastion.services.actions import action
from bastion.services.delivery import Sender
from bastion.types import JSONObject
from bastion.vault.sealer import Vault

E = schema.webhook_endpoints
OB = schema.webhook_outbox
D = schema.webhook_deliveries
READ: Final = (Capability.HOSTS_MANAGE, Capability.TOKENS_MANAGE, Capability.ADMIN_VIEW)
_FIELDS: Final = frozenset({"url", "description", "enabled", "event_types", "token_delivery"})


async def _endpoint(conn: AsyncConnection, actor: Actor, host: str, endpoint_id: str) -> tuple[Host, Endpoint]:
    target = await hosts.find(conn, actor.workspace_id, host)
    return target, await endpoints.find(conn, actor.workspace_id, target.id, endpoint_id)


def _target(endpoint: Endpoint) -> str:
    return f"webhook_endpoint:{endpoint.id}"


async def _touch_host(conn: AsyncConnection, host: Host, url: str | None) -> None:
    """The host's ``webhook_url`` follows its own endpoint (a new version, so its ETag changes)."""
    await conn.execute(
        schema.hosts.update()
        .where(schema.hosts.c.id == host.id)
        .values(webhook_url=url, version=schema.hosts.c.version + 1, updated_at=datetime.now(UTC))
    )
    emit(conn, Changed(Subject.HOST, host.id))


async def list_endpoints(store: Store, actor: Actor, host: str) -> list[Endpoint]:
    actor.require_any(*READ)
    async with store.transaction() as conn:
        target = await hosts.find(conn, actor.workspace_id, host)
        found = await conn.execute(sa.select(E).where(E.c.host_id == target.id).order_by(E.c.id))
        return [await endpoints.load(conn, row) for row in found.all()]


async def get_endpoint(store: Store, actor: Actor, host: str, endpoint_id: str) -> Endpoint:
    actor.require_any(*READ)
    async with store.transaction() as conn:
        return (await _endpoint(conn, actor, host, endpoint_id))[1]


async def create_endpoint(
    store: Store,
    vault: Vault,
    actor: Actor,
    host: str,
    *,
    url: str,
    description: str = "",
    types: Iterable[str] | None = None,
    token_delivery: TokenDelivery = TokenDelivery.CLAIM_CODE,
    enabled: bool = True,
) -> tuple[Endpoint, str]:
    """A new endpoint and its first signing secret (returned once)."""
    actor.require(Capability.HOSTS_MANAGE)
    subscribed = event_types(types)
    description = clean_description(description)
    async with store.transaction() as conn:
        target = await hosts.find(conn, actor.workspace_id, host)
        endpoint_id = await endpoints.insert(
            conn,
            actor.workspace_id,
            target.id,
            url=url,
            description=description,
            enabled=enabled,
            types=subscribed,
            delivery=token_delivery,
        )
        secret = await endpoints.add_secret(conn, vault, actor.workspace_id, endpoint_id, DEFAULT_ROTATION_OVERLAP)
        detail: JSONObject = {"host": target.id, "url": url, "token_delivery": token_delivery.value}
        action(conn, actor, "webhook.created", f"webhook_endpoint:{endpoint_id}", detail)
        return await endpoints.find(conn, actor.workspace_id, target.id, endpoint_id), secret


async def update_endpoint(
    store: Store,
    actor: Actor,
    host: str,
    endpoint_id: str,
    changes: Mapping[str, Any],
    expected_version: int | None = None,
) -> Endpoint:
    """Change only the fields given (url, description, enabled, event_types, token_delivery)."""
    actor.require(Capability.HOSTS_MANAGE)
    unknown = set(changes) - _FIELDS
    if unknown:
        raise ValidationFailed(f"cannot change {sorted(unknown)[0]!r}", field=sorted(unknown)[0])
    async with store.transaction() as conn:
        target, current = await _endpoint(conn, actor, host, endpoint_id)
        if expected_version is not None and expected_version != current.version:
            raise VersionMismatch(
                f"the endpoint changed since you read it (version {current.version}, you sent {expected_version})"
            )
        values: dict[str, Any] = {"updated_at": datetime.now(UTC), "version": current.version + 1}
        if "url" in changes:
            values["url"] = check_url_shape(str(changes["url"]), policy=outbound_of(conn))
        if "description" in changes:
            values["description"] = clean_description(str(changes["description"]))
        if "enabled" in changes:
            values["enabled"] = bool(changes["enabled"])
        if "event_types" in changes:
            values["event_types"] = [t.value for t in event_types(changes["event_types"])]
        if "token_delivery" in changes:
            values["token_delivery"] = TokenDelivery(changes["token_delivery"]).value
        result = await conn.execute(
            E.update().where(E.c.id == current.id, E.c.version == current.version).values(**values)
        )
        if result.rowcount != 1:
            raise VersionMismatch("the endpoint changed while you were updating it; read it again")
        if current.from_host and values.get("url", current.url) != current.url:
            await _touch_host(conn, target, values["url"])
        emit(conn, Changed(Subject.WEBHOOK, current.id))  # enabled again: its waiting events are due
        detail: JSONObject = {"host": target.id, "fields": [*sorted(changes)]}
        action(conn, actor, "webhook.updated", _target(current), detail)
        return await endpoints.find(conn, actor.workspace_id, target.id, current.id)


async def delete_endpoint(store: Store, actor: Actor, host: str, endpoint_id: str) -> None:
    """Delete an endpoint with its secrets, its waiting events and its log."""
    actor.require(Capability.HOSTS_MANAGE)
    async with store.transaction() as conn:
        target, current = await _endpoint(conn, actor, host, endpoint_id)
        await crud.delete(conn, E, current.id, what="endpoint")
        if current.from_host:
            await _touch_host(conn, target, None)
        action(conn, actor, "webhook.deleted", _target(current), {"host": target.id})


async def rotate_secret(
    store: Store,
    vault: Vault,
    actor: Actor,
    host: str,
    endpoint_id: str,
    *,
    overlap: timedelta = DEFAULT_ROTATION_OVERLAP,
) -> tuple[Endpoint, str]:
    """A new primary secret (returned once). Until ``overlap`` ends or ``retire_old_secrets``, both sign."""
    actor.require(Capability.HOSTS_MANAGE)
    if not timedelta(0) <= overlap <= MAX_ROTATION_OVERLAP:
        raise ValidationFailed("the overlap is between 0 and 7 days", field="overlap_hours")
    async with store.transaction() as conn:
        target, current = await _endpoint(conn, actor, host, endpoint_id)
        secret = await endpoints.add_secret(conn, vault, actor.workspace_id, current.id, overlap)
        emit(conn, Changed(Subject.WEBHOOK, current.id))  # an endpoint that had no secret can now be delivered to
        detail: JSONObject = {"host": target.id, "overlap_s": int(overlap.total_seconds())}
        action(conn, actor, "webhook.secret_rotated", _target(current), detail)
        return await endpoints.find(conn, actor.workspace_id, target.id, current.id), secret


async def retire_old_secrets(store: Store, actor: Actor, host: str, endpoint_id: str) -> Endpoint:
    """End a rotation now: only the newest secret signs from here on."""
    actor.require(Capability.HOSTS_MANAGE)
    async with store.transaction() as conn:
        target, current = await _endpoint(conn, actor, host, endpoint_id)
        retired = await endpoints.retire_old(conn, current.id)
        action(conn, actor, "webhook.secret_retired", _target(current), {"host": target.id, "retired": retired})
        return await endpoints.find(conn, actor.workspace_id, target.id, current.id)


# --- the delivery log -----------------------------------------------------------------------------------------------


def _message_info(row: sa.Row[Any]) -> MessageInfo:
    status = MessageStatus(row.status)
    return MessageInfo(
        id=row.id,
        endpoint_id=row.endpoint_id,
        event_id=row.event_id,
        webhook_id=message_id(row.event_id),
        event_type=row.event_type,
        connection_id=row.connection_id,
        version=row.version,
        status=status,
        attempts=row.attempts,
        occurred_at=row.occurred_at,
        next_attempt_at=row.next_attempt_at if status is MessageStatus.PENDING else None,
        last_attempt_at=row.last_attempt_at,
        delivered_at=row.delivered_at,
        last_error=row.last_error,
    )


def _delivery_info(row: sa.Row[Any]) -> DeliveryInfo:
    return DeliveryInfo(
        id=row.id,
        endpoint_id=row.endpoint_id,
        message_id=row.message_id,
        attempt=row.attempt,
        trigger=Trigger(row.trigger),
        attempted_at=row.attempted_at,
        status_code=row.status_code,
        error=row.error,
        duration_ms=row.duration_ms,
        outcome=row.outcome,
    )


async def list_messages(
    store: Store,
    actor: Actor,
    host: str,
    endpoint_id: str,
    *,
    status: MessageStatus | None = None,
    cursor: str | None = None,
    limit: int | None = None,
) -> Page[MessageInfo]:
    """The endpoint's events, oldest first, with where each stands."""
    actor.require_any(*READ)
    async with store.transaction() as conn:
        _target_host, current = await _endpoint(conn, actor, host, endpoint_id)
        where = [OB.c.endpoint_id == current.id]
        if status is not None:
            where.append(OB.c.status == status.value)
        found, next_cursor = await crud.page(conn, OB, where, cursor=cursor, limit=limit)
    return Page([_message_info(r) for r in found], next_cursor)


async def list_deliveries(
    store: Store,
    actor: Actor,
    host: str,
    endpoint_id: str,
    *,
    message: str | None = None,
    cursor: str | None = None,
    limit: int | None = None,
) -> Page[DeliveryInfo]:
    """Every attempt at the endpoint (or at one of its events), oldest first."""
    actor.require_any(*READ)
    async with store.transaction() as conn:
        _target_host, current = await _endpoint(conn, actor, host, endpoint_id)
        where = [D.c.endpoint_id == current.id]
        if message is not None:
            where.append(D.c.message_id == message)
        found, next_cursor = await crud.page(conn, D, where, cursor=cursor, limit=limit)
    return Page([_delivery_info(r) for r in found], next_cursor)


async def _attempt_now(
    store: Store, sender: Sender, message: outbox.Message, owner: str, trigger: Trigger, *, retry: bool
) -> DeliveryInfo:
    now = datetime.now(UTC)
    async with sender.client() as client:
        result = await delivery.attempt(store, sender, sender.poster(client), message, now=now)
    rng = random.Random()  # noqa: S311  retry jitter, not a secret
    recorded = await outbox.record(store, message, result, owner=owner, now=now, trigger=trigger, rng=rng, retry=retry)
    async with store.transaction() as conn:
        return _delivery_info(await crud.fetch_one(conn, D, D.c.id == recorded.delivery_id, what="delivery"))


async def redeliver(
    store: Store, sender: Sender, actor: Actor, host: str, endpoint_id: str, message: str
) -> DeliveryInfo:
    """Attempt one event again now; if that fails it is retried on a fresh schedule (another 24 hours)."""
    actor.require(Capability.HOSTS_MANAGE)
    owner = f"manual:{new_id()}"
    now = datetime.now(UTC)
    async with store.transaction() as conn:
        target, current = await _endpoint(conn, actor, host, endpoint_id)
        row = await crud.fetch_one(conn, OB, OB.c.endpoint_id == current.id, OB.c.id == message, what="event")
        if row.lease_until is not None and row.lease_until > now:
            raise Conflict("this event is being delivered right now; look at its log in a moment")
        carried = row.event_type in {t.value for t in CARRIES_TOKEN}
        if carried and row.status == MessageStatus.DELIVERED.value:
            raise Conflict(
                "this event was delivered and the token it handed over is no longer kept; "
                "mint a new token for the connection instead"
            )
        await conn.execute(
            OB.update()
            .where(OB.c.id == row.id)
            .values(status=MessageStatus.PENDING.value, failures=0, first_attempt_at=None, next_attempt_at=now)
        )
        leased = await outbox.lease_one(conn, row.id, owner, now, delivery.LEASE)
        action(conn, actor, "webhook.redelivered", _target(current), {"host": target.id, "event": row.event_id})
    return await _attempt_now(store, sender, leased, owner, Trigger.MANUAL, retry=True)


async def send_test(store: Store, sender: Sender, actor: Actor, host: str, endpoint_id: str) -> DeliveryInfo:
    """Send a signed ``webhook.test`` event now (once, no retries) and answer with how it went."""
    actor.require(Capability.HOSTS_MANAGE)
    owner = f"test:{new_id()}"
    async with store.transaction() as conn:
        target, current = await _endpoint(conn, actor, host, endpoint_id)
        if not current.secrets:
            raise Conflict("this endpoint has no signing secret yet; rotate one in first")
        row_id = await outbox.insert_test(conn, actor.workspace_id, current.id, target.name, owner, delivery.LEASE)
        leased = await outbox.lease_one(conn, row_id, owner, datetime.now(UTC), delivery.LEASE)
        action(conn, actor, "webhook.tested", _target(current), {"host": target.id})
    return await _attempt_now(store, sender, leased, owner, Trigger.TEST, retry=False)
