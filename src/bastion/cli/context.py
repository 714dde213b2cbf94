"""What every CLI command needs: settings, the store, the workspace, the local operator and the vault."""

from __future__ import annotations

from collections.abc import AsyncGenerator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import TypeVar

import anyio

from bastion import wiring
from bastion.cli.output import fail
from bastion.db.crud import MAX_PAGE_SIZE, Page
from bastion.db.store import Store
from bastion.domain.actor import Actor
from bastion.errors import BastionError
from bastion.net.outbound import OutboundPolicy
from bastion.oauth.revocation import Revoker
from bastion.services import workspace
from bastion.services.apikeys import KeyHasher
from bastion.settings import Settings, check_secrets, load_settings
from bastion.vault.sealer import Vault

T = TypeVar("T")


@dataclass(frozen=True, slots=True)
class CliContext:
    settings: Settings
    store: Store
    actor: Actor
    hasher: KeyHasher
    vault: Vault

    def revoker(self) -> Revoker:
        """RFC 7009 revocation at authorization servers, through the outbound policy the settings describe."""
        return Revoker(self.vault, OutboundPolicy.from_settings(self.settings).client)


@asynccontextmanager
async def cli_context() -> AsyncGenerator[CliContext, None]:
    settings = load_settings()
    check_secrets(settings)
    store = wiring.store_from(settings)
    try:
        ws = await workspace.default_workspace(store)
        pepper = settings.token_pepper.get_secret_value() if settings.token_pepper else ""
        hasher = KeyHasher(pepper.encode("utf-8"))  # check_secrets has refused a missing pepper
        yield CliContext(settings, store, Actor.local_operator(ws.id), hasher, wiring.vault_from(settings))
    finally:
        await store.close()


async def all_pages(fetch: Callable[[str | None, int], Awaitable[Page[T]]]) -> list[T]:
    """Every item of a cursor-paged listing: ``fetch(cursor, limit)`` is called until the last page."""
    out: list[T] = []
    cursor: str | None = None
    while True:
        page = await fetch(cursor, MAX_PAGE_SIZE)
        out += page.items
        if page.next_cursor is None:
            return out
        cursor = page.next_cursor


def guarded(fn: Callable[[], T]) -> T:
    """Run a synchronous command body; Bastion errors become a readable message and a meaningful exit code."""
    try:
        return fn()
    except BastionError as error:
        fail(error)


def run(fn: Callable[[], Awaitable[T]]) -> T:
    """Run an async command body; Bastion errors become a readable message and a meaningful exit code."""
    try:
        return anyio.run(fn)
    except BastionError as error:
        fail(error)


def run_with(fn: Callable[[CliContext], Awaitable[T]]) -> T:
    async def body() -> T:
        async with cli_context() as ctx:
            return await fn(ctx)

    return run(body)
