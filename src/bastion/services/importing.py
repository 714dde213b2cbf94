"""Applying an import plan: one transaction per server; an existing name is skipped, never overwritten."""

from __future__ import annotations

from dataclasses import dataclass

from bastion.db.store import Store
from bastion.domain.actor import Actor
from bastion.domain.capabilities import Capability
from bastion.domain.importing import ImportPlan, Note, Renamed, SecretLeftOut, Skipped
from bastion.domain.specs import ServerSpec
from bastion.errors import Conflict, NotFound, ValidationFailed
from bastion.services import servers

ALREADY_EXISTS = "already exists"


@dataclass(frozen=True, slots=True)
class Created:
    """A server the import created (``id`` set) or, on a dry run, would create (``id`` None)."""

    spec: ServerSpec
    id: str | None


@dataclass(frozen=True, slots=True)
class ImportReport:
    dry_run: bool
    created: tuple[Created, ...]
    skipped: tuple[Skipped, ...]
    secrets_left_out: tuple[SecretLeftOut, ...]
    renamed: tuple[Renamed, ...]
    notes: tuple[Note, ...]


async def _exists(store: Store, actor: Actor, name: str) -> bool:
    try:
        await servers.get(store, actor, name)
    except NotFound:
        return False
    return True


async def apply(store: Store, actor: Actor, plan: ImportPlan, *, dry_run: bool = False) -> ImportReport:
    """Create the plan's servers (or, with ``dry_run``, only check which could be created)."""
    actor.require(Capability.SERVERS_MANAGE)
    created: list[Created] = []
    skipped = list(plan.skipped)
    for spec in plan.servers:
        if dry_run:
            if await _exists(store, actor, spec.name):
                skipped.append(Skipped(spec.name, ALREADY_EXISTS))
            else:
                created.append(Created(spec, None))
            continue
        try:
            server = await servers.create(store, actor, spec, via="import")
        except Conflict:
            skipped.append(Skipped(spec.name, ALREADY_EXISTS))
        except ValidationFailed as error:
            skipped.append(Skipped(spec.name, error.detail))
        else:
            created.append(Created(spec, server.id))
    kept = {c.spec.name for c in created}
    return ImportReport(
        dry_run=dry_run,
        created=tuple(created),
        skipped=tuple(skipped),
        # Only what concerns a server that exists (or would) is worth acting on.
        secrets_left_out=tuple(s for s in plan.secrets_left_out if s.server in kept),
        renamed=plan.renamed,
        notes=tuple(n for n in plan.notes if n.server in kept),
    )
