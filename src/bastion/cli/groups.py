"""The admin command groups, imported only when one is run: `bastion --help` lists them from this table."""

from __future__ import annotations

import functools
import importlib
from typing import TYPE_CHECKING, Final, NamedTuple

from typer.core import TyperGroup

from bastion.cli.output import json_errors

if TYPE_CHECKING:
    # Typer carries its own copy of click; its types are the ones TyperGroup's methods take.
    from typer._click import Command, Context, HelpFormatter  # pyright: ignore[reportPrivateImportUsage]


class Group(NamedTuple):
    module: str  # under bastion.cli
    attribute: str  # the module's typer.Typer
    help: str


GROUPS: Final[dict[str, Group]] = {
    "member": Group("members", "member_app", "Members: the people in the workspace."),
    "role": Group("roles", "role_app", "Roles: named sets of capabilities."),
    "server": Group("servers", "server_app", "Servers: the upstream MCP servers behind gateways."),
    "gateway": Group("gateways", "gateway_app", "Gateways: named sets of servers behind one URL."),
    "host": Group("hosts", "host_app", "Hosts: the agents that call gateways."),
    "host-key": Group("webhooks", "host_key_app", "Host keys: a host's own credential (redeeming claim codes)."),
    "webhook": Group("webhooks", "webhook_app", "Webhook endpoints: signed events about a host's tokens."),
    "apikey": Group("apikeys", "apikey_app", "API keys: members' credentials for the admin API."),
    "identity": Group("identities", "identity_app", "Identities: credentials for one server, sealed in the vault."),
    "connection": Group("connections", "connection_app", "Connections: a member at a gateway through a host."),
    "token": Group("tokens", "token_app", "Access tokens: what agents present, one per connection or more."),
    "link": Group("links", "link_app", "Connection links: enrollment URLs to share with people."),
    "vault": Group("vault", "vault_app", "The vault: key usage, rotation and retirement."),
    "audit": Group(
        "audit", "audit_app", "The audit log: list, export and verify events; checkpoint the chain; prune old events."
    ),
    "policy": Group("rules", "policy_app", "Policy rules: who may use which tools, prompts and resources. Deny wins."),
    "content-rule": Group(
        "rules", "content_rule_app", "Content rules: patterns to block, redact, mask, hash or replace in tool calls."
    ),
    "rate-limit": Group("rules", "rate_limit_app", "Rate limits: calls per window, per member, host or tool."),
}


@functools.cache
def load(name: str) -> Command:
    """The click command of group ``name``: its module is imported now, with its help from the table."""
    import typer.main

    group = GROUPS[name]
    module = importlib.import_module(f"bastion.cli.{group.module}")
    command = typer.main.get_command(getattr(module, group.attribute))
    command.help = group.help
    return command


class LazyGroup(TyperGroup):
    """The root command: its own commands, plus the admin groups, each imported when it is invoked.

    While the root's help is written a group is a stand-in carrying the table's help line, so `bastion
    --help` imports none of them."""

    listing = False

    def list_commands(self, ctx: Context) -> list[str]:
        return [*super().list_commands(ctx), *GROUPS]

    def get_command(self, ctx: Context, cmd_name: str) -> Command | None:
        if cmd_name not in GROUPS:
            return super().get_command(ctx, cmd_name)
        if self.listing:
            return TyperGroup(name=cmd_name, help=GROUPS[cmd_name].help)
        return load(cmd_name)

    def invoke(self, ctx: Context) -> object:
        json_errors(False)  # until a command's --json says otherwise (tests run many commands in one process)
        return super().invoke(ctx)

    def format_help(self, ctx: Context, formatter: HelpFormatter) -> None:
        self.listing = True
        try:
            super().format_help(ctx, formatter)
        finally:
            self.listing = False
