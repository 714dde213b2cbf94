"""A workspace for webhook tests: a host with a gateway and a member, endpoints on a real receiver, a worker."""

from __future__ import annotations

import random
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import sqlalchemy as sa

from bastion.db import schema
from bastion.db.store import Store
from bastion.domain.actor import Actor
from bastion.domain.connections import AccessToken, Connection
from bastion.domain.models import Host
from bastion.domain.specs import GatewaySpec, HostSpec, MemberSpec
from bastion.domain.webhooks import Endpoint, TokenDelivery
from bastion.net.outbound import OutboundPolicy
from bastion.services import connections, gateways, hosts, members, webhooks
from bastion.services.apikeys import KeyHasher
from bastion.services.delivery import Post, Sender, Worker
from bastion.vault.sealer import Vault
from tests.webhooks.receiver import PATH

PUBLIC_URL = "https://bastion.example.com"
GATEWAY = "sales"
ADA = "ada@example.com"


@dataclass
class World:
    store: Store
    hasher: KeyHasher
    vault: Vault
    operator: Actor
    host: Host

    def sender(self, policy: OutboundPolicy | None = None) -> Sender:
        # The receiver listens on http://127.0.0.1: these tests opt in to loopback, as every test upstream does.
        return Sender(self.vault, policy or OutboundPolicy(allow_loopback=True), PUBLIC_URL)

    async def endpoint(
        self, base_url: str, *, delivery: TokenDelivery = TokenDelivery.CLAIM_CODE, **options: Any
    ) -> tuple[Endpoint, str]:
        return await webhooks.create_endpoint(
            self.store,
            self.vault,
            self.operator,
            self.host.name,
            url=base_url + PATH,
            token_delivery=delivery,
            **options,
        )

    async def connect(self, email: str = ADA) -> tuple[Connection, AccessToken, str]:
        return await connections.create(
            self.store, self.hasher, self.operator, host=self.host.name, gateway=GATEWAY, member=email
        )

    async def rows(self, table: sa.Table, *where: sa.ColumnElement[bool]) -> list[sa.Row[Any]]:
        async with self.store.transaction() as conn:
            return list((await conn.execute(sa.select(table).where(*where))).all())

    async def outbox(self) -> list[sa.Row[Any]]:
        o = schema.webhook_outbox
        async with self.store.transaction() as conn:
            return list((await conn.execute(sa.select(o).order_by(o.c.occurred_at, o.c.version, o.c.id))).all())


async def build_world(store: Store, hasher: KeyHasher, operator: Actor, *, host: str = "agent") -> World:
    """Host ``host``, gateway "sales" (its servers need no identity) and the member Ada."""
    assert store.vault is not None
    made = await hosts.create(store, operator, HostSpec(host))
    await gateways.create(store, operator, GatewaySpec(GATEWAY))
    await members.create(store, operator, MemberSpec(ADA, "Ada"))
    return World(store, hasher, store.vault, operator, made)


@asynccontextmanager
async def worker(
    world: World, *, seed: int = 7, policy: OutboundPolicy | None = None
) -> AsyncIterator[tuple[Worker, Post]]:
    """A worker over ``world`` (not running its loop: tests drive ``run_once``) and the poster it attempts with."""
    sender = world.sender(policy)
    found = Worker(world.store, sender, rng=random.Random(seed))  # noqa: S311  seeded jitter
    async with sender.client() as client:
        yield found, sender.poster(client)


async def drain(found: Worker, post: Post) -> int:
    """Attempt everything due now, batch after batch; returns how many rows were leased."""
    total = 0
    while (leased := await found.run_once(post)) > 0:
        total += leased
    return total


def at(row: sa.Row[Any], column: str) -> datetime:
    value: datetime = getattr(row, column)
    return value
