"""Applying an import plan: each server on its own, existing names untouched, capability checked."""

from __future__ import annotations

import pytest

from bastion.db.store import Store
from bastion.domain import importing
from bastion.domain.actor import Actor
from bastion.domain.models import Transport
from bastion.domain.specs import ServerSpec
from bastion.errors import Forbidden
from bastion.services import importing as importing_service
from bastion.services import servers

pytestmark = pytest.mark.anyio

CONFIG = """{"mcpServers": {
  "github": {"command": "npx", "args": ["server-github"], "env": {"GITHUB_TOKEN": "ghp_CanaryServiceLayer123456789"}},
  "linear": {"url": "https://mcp.linear.app/mcp"}
}}"""


async def test_an_existing_name_is_skipped_while_the_others_are_created(store: Store, operator: Actor) -> None:
    await servers.create(store, operator, ServerSpec("github", Transport.STDIO, command="docker"))
    report = await importing_service.apply(store, operator, importing.parse(CONFIG))
    assert [(c.spec.name, c.id is not None) for c in report.created] == [("linear", True)]
    assert [(s.name, s.reason) for s in report.skipped] == [("github", "already exists")]
    # What was left out of a server that was not imported is not worth acting on.
    assert report.secrets_left_out == ()
    kept = await servers.get(store, operator, "github")
    assert (kept.command, kept.env, kept.version) == ("docker", {}, 1)


async def test_a_dry_run_writes_nothing(store: Store, operator: Actor) -> None:
    report = await importing_service.apply(store, operator, importing.parse(CONFIG), dry_run=True)
    assert [(c.spec.name, c.id) for c in report.created] == [("github", None), ("linear", None)]
    assert [s.where for s in report.secrets_left_out] == ["env.GITHUB_TOKEN"]
    assert (await servers.list_page(store, operator)).items == []


async def test_importing_needs_the_servers_manage_capability(store: Store, operator: Actor) -> None:
    viewer = Actor(operator.workspace_id, None, frozenset(), "viewer")
    with pytest.raises(Forbidden):
        await importing_service.apply(store, viewer, importing.parse(CONFIG), dry_run=True)


async def test_an_imported_server_keeps_the_name_of_the_variable_its_token_was_in(
    store: Store, operator: Actor
) -> None:
    report = await importing_service.apply(store, operator, importing.parse(CONFIG))
    github = await servers.get(store, operator, "github")
    assert (github.token_env, github.env) == ("GITHUB_TOKEN", {})
    assert [(n.server, n.message) for n in report.notes] == [
        ("github", "GITHUB_TOKEN will carry each person's token (token_env)")
    ]
    assert (await servers.get(store, operator, "linear")).token_env is None
