"""Admin command groups: members, roles, servers, gateways, hosts, API keys."""

from __future__ import annotations

from bastion.cli.apikeys import apikey_app
from bastion.cli.gateways import gateway_app
from bastion.cli.hosts import host_app
from bastion.cli.importing import import_
from bastion.cli.main import app
from bastion.cli.members import member_app
from bastion.cli.roles import role_app
from bastion.cli.servers import server_app

server_app.command("import")(import_)
app.add_typer(member_app, name="member")
app.add_typer(role_app, name="role")
app.add_typer(server_app, name="server")
app.add_typer(gateway_app, name="gateway")
app.add_typer(host_app, name="host")
app.add_typer(apikey_app, name="apikey")
