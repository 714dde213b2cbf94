"""`bastion vault …`: key usage, rotation to a new key, re-wrapping and retiring old keys. Key material never prints,
except a new key the operator must place in the environment themselves."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import typer

from bastion import wiring
from bastion.cli.context import CliContext, run_with
from bastion.cli.keyring_file import (
    ENV_KEYS,
    ENV_PRIMARY,
    add_primary_key,
    file_keyring,
    new_key,
    remove_key,
)
from bastion.cli.options import JsonFlag
from bastion.cli.output import console, emit_json, emit_record, emit_table, progress_bar, success, warn
from bastion.domain.capabilities import Capability
from bastion.errors import ConfigError, NotFound
from bastion.services import rotation
from bastion.settings import check_secrets, load_settings
from bastion.vault.sealer import Vault
from bastion.web.api.schemas_identity import KeyUsageOut

vault_app = typer.Typer(no_args_is_help=True, add_completion=False)

COLUMNS = ("key_id", "rows", "seals", "primary", "in_keyring")
Batch = Annotated[int, typer.Option(min=1, max=10_000, help="Rows re-wrapped per transaction.")]


def _source(path: Path | None) -> dict[str, Any]:
    return {"managed_by": "config_file" if path else "environment", "config_file": str(path) if path else None}


async def _rewrap(ctx: CliContext, vault: Vault, batch: int) -> dict[str, Any]:
    """Re-wrap everything not under ``vault``'s primary key, with a progress bar; resumable."""
    total = await rotation.remaining(ctx.store, vault)
    with progress_bar(f"re-wrapping under {vault.keyring.primary_id}", total) as advance:
        moved = await rotation.rewrap(ctx.store, vault, ctx.actor, batch=batch, progress=advance)
    return {
        "primary_key_id": vault.keyring.primary_id,
        "rewrapped": moved,
        "remaining": await rotation.remaining(ctx.store, vault),
    }


@vault_app.command("status")
def status(json_out: JsonFlag = False) -> None:
    """Rows and seals per key id, which key is primary and which the keyring holds. Never key material."""

    async def body(ctx: CliContext) -> dict[str, Any]:
        keys = [KeyUsageOut.of(u).model_dump(mode="json") for u in await rotation.usage(ctx.store, ctx.vault)]
        return {
            **_source(file_keyring(ctx.settings)),
            "primary_key_id": ctx.vault.keyring.primary_id,
            "pending_rewrap": await rotation.remaining(ctx.store, ctx.vault),
            "pending_rebind": await rotation.unbound(ctx.store),
            "workspaces_accepting_unbound": await rotation.unmarked(ctx.store),
            "keys": keys,
        }

    doc = run_with(body)
    if json_out:
        emit_json(doc)
        return
    emit_table(doc["keys"], COLUMNS, title="Vault keys")
    where = doc["config_file"] or "the environment (BASTION_VAULT_KEYS)"
    console.print(
        f"keyring from {where}; {doc['pending_rewrap']} row(s) not yet under the primary key; "
        f"{doc['pending_rebind']} identity seal(s) not yet bound to server and owner",
        markup=False,
        highlight=False,
    )
    if doc["workspaces_accepting_unbound"]:
        warn(
            f"{doc['workspaces_accepting_unbound']} workspace(s) still accept seals not bound to server and owner: "
            "run `bastion vault rebind` once every replica runs this release"
        )


@vault_app.command("rotate")
def rotate(batch: Batch = rotation.DEFAULT_BATCH, json_out: JsonFlag = False) -> None:
    """Add a new primary key and re-wrap every sealed row under it. Run it again to finish an interrupted rotation.

    When the keyring comes from the environment, nothing is changed: the new values to set are printed instead.
    """

    async def body(ctx: CliContext) -> dict[str, Any]:
        path = file_keyring(ctx.settings)
        previous = ctx.vault.keyring.primary_id
        if path is None:
            key = new_key(ctx.vault.keyring.key_ids)
            return {
                **_source(None),
                "changed": False,
                "previous_primary_key_id": previous,
                "kept_key_ids": sorted(ctx.vault.keyring.key_ids),
                "new_key_id": key.key_id,
                "env": {ENV_KEYS: f"${{{ENV_KEYS}}},{key.entry}", ENV_PRIMARY: key.key_id},
            }
        resumed = await rotation.remaining(ctx.store, ctx.vault) > 0
        vault, new_key_id = ctx.vault, None
        if not resumed:
            key = new_key(ctx.vault.keyring.key_ids)
            add_primary_key(path, key)
            settings = load_settings()
            check_secrets(settings)
            vault, new_key_id = wiring.vault_from(settings), key.key_id
            if vault.keyring.primary_id != key.key_id:
                raise ConfigError(f"{path} was updated but the settings still name {vault.keyring.primary_id!r}")
        done = await _rewrap(ctx, vault, batch)
        return {
            **_source(path),
            "changed": not resumed,
            "resumed": resumed,
            "previous_primary_key_id": previous,
            "new_key_id": new_key_id,
            **done,
        }

    doc = run_with(body)
    if json_out:
        emit_json(doc)
    elif doc["managed_by"] == "environment":
        _print_env_steps(doc)
    else:
        if doc["resumed"]:
            success(f"continued the unfinished rotation to {doc['primary_key_id']}; run rotate again for a new key")
        else:
            success(f"added key {doc['new_key_id']} to {doc['config_file']} as the primary key")
        success(f"re-wrapped {doc['rewrapped']} row(s); {doc['remaining']} remain under older keys")
        if doc["remaining"] == 0 and doc["previous_primary_key_id"] != doc["primary_key_id"]:
            success(f"`bastion vault retire {doc['previous_primary_key_id']}` can now drop the old key")
        emit_record(doc)


def _print_env_steps(doc: dict[str, Any]) -> None:
    env = doc["env"]
    warn(f"the keyring comes from {ENV_KEYS}; Bastion edits no file and changed nothing")
    console.print(
        f"New key {doc['new_key_id']} (shown once). Keep the existing keys ({', '.join(doc['kept_key_ids'])}).\n"
        f'1. On every replica, add the key, then restart it:\n   {ENV_KEYS}="{env[ENV_KEYS]}"\n'
        f"2. Once all have it, make it primary on every replica, then restart them:\n"
        f"   {ENV_PRIMARY}={env[ENV_PRIMARY]}\n"
        f"3. With both values set here too, run `bastion vault rewrap`, then "
        f"`bastion vault retire {doc['previous_primary_key_id']}`.",
        markup=False,
        highlight=False,
        soft_wrap=True,
    )


@vault_app.command("rewrap")
def rewrap(batch: Batch = rotation.DEFAULT_BATCH, json_out: JsonFlag = False) -> None:
    """Re-wrap every sealed row not yet under the primary key. Safe to stop and run again."""

    async def body(ctx: CliContext) -> dict[str, Any]:
        return await _rewrap(ctx, ctx.vault, batch)

    doc = run_with(body)
    if json_out:
        emit_json(doc)
    else:
        success(f"re-wrapped {doc['rewrapped']} row(s) under {doc['primary_key_id']}; {doc['remaining']} remain")


@vault_app.command("rebind")
def rebind(batch: Batch = rotation.DEFAULT_BATCH, json_out: JsonFlag = False) -> None:
    """Bind every identity seal to its server and owner, then refuse unbound ones. Run it after an upgrade to 0010,
    once every replica runs it (`bastion serve` re-seals at start too, but older replicas may still seal unbound)."""

    async def body(ctx: CliContext) -> dict[str, Any]:
        ctx.actor.require(Capability.IDENTITIES_MANAGE)
        with progress_bar("binding identity seals to server and owner", await rotation.unbound(ctx.store)) as advance:
            done = await rotation.rebind(ctx.store, ctx.vault, mark=True, batch=batch, progress=advance)
        return {"rebound": done, "remaining": await rotation.unbound(ctx.store)}

    doc = run_with(body)
    if json_out:
        emit_json(doc)
    else:
        success(f"bound {doc['rebound']} identity seal(s) to their server and owner; {doc['remaining']} remain")


@vault_app.command("retire")
def retire(
    key_id: Annotated[str, typer.Argument(help="The key id to retire (see `vault status`).")],
    json_out: JsonFlag = False,
) -> None:
    """Retire a key no row uses any more; it is then removed from the config file's keyring."""

    async def body(ctx: CliContext) -> dict[str, Any]:
        known = {u.key_id for u in await rotation.usage(ctx.store, ctx.vault)}
        if key_id not in known:
            raise NotFound(f"no vault key {key_id!r} in the keyring or the database")
        await rotation.retire(ctx.store, ctx.vault, ctx.actor, key_id)
        path = file_keyring(ctx.settings)
        removed = remove_key(path, key_id) if path else False
        return {"retired": key_id, **_source(path), "removed_from_config_file": removed}

    doc = run_with(body)
    if json_out:
        emit_json(doc)
        return
    success(f"retired key {doc['retired']}")
    if doc["removed_from_config_file"]:
        success(f"removed it from {doc['config_file']}")
    elif doc["managed_by"] == "environment":
        warn(f"remove {doc['retired']} from {ENV_KEYS} on every replica")
