"""Admin command groups: members, roles, servers, gateways, hosts, API keys, identities, connections, tokens,
links and the vault."""

from __future__ import annotations

from bastion.cli.apikeys import apikey_app
from bastion.cli.audit import audit_app
from bastion.cli.connections import connection_app
from bastion.cli.gateways import gateway_app
from bastion.cli.hosts import host_app
from bastion.cli.identities import identity_app
from bastion.cli.importing import import_
from bastion.cli.links import link_app
from bastion.cli.main import app
from bastion.cli.members import member_app
from bastion.cli.roles import role_app
from bastion.cli.rules import content_rule_app, policy_app, rate_limit_app
from bastion.cli.servers import server_app
from bastion.cli.tokens import token_app
from bastion.cli.vault import vault_app
from bastion.cli.webhooks import host_key_app, webhook_app

server_app.command("import")(import_)
app.add_typer(member_app, name="member")
app.add_typer(role_app, name="role")
app.add_typer(server_app, name="server")
app.add_typer(gateway_app, name="gateway")
app.add_typer(host_app, name="host")
app.add_typer(host_key_app, name="host-key")
app.add_typer(webhook_app, name="webhook")
app.add_typer(apikey_app, name="apikey")
app.add_typer(identity_app, name="identity")
app.add_typer(connection_app, name="connection")
app.add_typer(token_app, name="token")
app.add_typer(link_app, name="link")
app.add_typer(vault_app, name="vault")
app.add_typer(audit_app, name="audit")
app.add_typer(policy_app, name="policy")
app.add_typer(content_rule_app, name="content-rule")
app.add_typer(rate_limit_app, name="rate-limit")
