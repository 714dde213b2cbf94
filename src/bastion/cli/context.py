"""What every CLI command needs: settings, the store, the workspace, the local operator and the vault."""

from __future__ import annotations

import os
from collections.abc import AsyncGenerator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import TypeVar

import anyio

from bastion import wiring
from bastion.cli import instances
from bastion.cli.output import fail, info
from bastion.db.crud import MAX_PAGE_SIZE, Page
from bastion.db.store import Store
from bastion.domain.actor import Actor
from bastion.errors import BastionError, ConfigError
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


_WHERE_SETTINGS: tuple[str, ...] = ("BASTION_DATA_DIR", "BASTION_DATABASE_URL", "BASTION_CONFIG_FILE")


def cli_settings(*, may_create: bool = False) -> Settings:
    """An admin command's settings: the environment and config file, as for `serve`.

    When neither names a database and there is no ./.bastion here, the one running `bastion serve` is used
    (say, the command is run from another directory); with none or several, the error says where it looked
    (``may_create``: with none, `init` makes a new instance here). Links are printed with the address the
    instance serves on, unless BASTION_PUBLIC_URL says otherwise.
    """
    settings = load_settings()
    if not any(os.environ.get(name) for name in _WHERE_SETTINGS) and not settings.data_dir.exists():
        here = settings.data_dir.resolve()
        live = instances.running()
        if not live and may_create:
            return settings
        if not live:
            raise ConfigError(
                f"no Bastion data directory at {here} and no running `bastion serve` found; run this where you "
                "ran `bastion serve` or `bastion init`, or set BASTION_DATA_DIR (`bastion init` here would start "
                "a new, empty instance)"
            )
        if len(live) > 1:
            dirs = ", ".join(i.data_dir for i in live)
            raise ConfigError(
                f"no Bastion data directory at {here}, and {len(live)} are served: {dirs}; set BASTION_DATA_DIR to one"
            )
        os.environ["BASTION_DATA_DIR"] = live[0].data_dir  # the config file beside it is read too
        info(f"using {live[0].data_dir}, served at {live[0].base_url}")
        settings = load_settings()
    if settings.public_url is None:
        serving = instances.for_data_dir(settings.data_dir)
        if serving is not None:
            settings = settings.model_copy(update={"public_url": serving.base_url})
    return settings


@asynccontextmanager
async def cli_context() -> AsyncGenerator[CliContext, None]:
    settings = cli_settings()
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
