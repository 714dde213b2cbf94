"""Readable names for the ids in identity, connection, token and link records: emails, server and host names, slugs."""

from __future__ import annotations

from dataclasses import dataclass

from bastion.cli.context import CliContext, all_pages
from bastion.services import gateways, hosts, members, servers


@dataclass(frozen=True, slots=True)
class Names:
    members: dict[str, str]
    servers: dict[str, str]
    hosts: dict[str, str]
    gateways: dict[str, str]

    @classmethod
    async def load(cls, ctx: CliContext) -> Names:
        """Every member, server, host and gateway of the workspace: a CLI lists whole tables anyway."""
        store, actor = ctx.store, ctx.actor
        found_members = await all_pages(lambda c, n: members.list_page(store, actor, cursor=c, limit=n))
        found_servers = await all_pages(lambda c, n: servers.list_page(store, actor, cursor=c, limit=n))
        found_hosts = await all_pages(lambda c, n: hosts.list_page(store, actor, cursor=c, limit=n))
        found_gateways = await all_pages(lambda c, n: gateways.list_page(store, actor, cursor=c, limit=n))
        return cls(
            {m.id: m.email for m in found_members},
            {s.id: s.name for s in found_servers},
            {h.id: h.name for h in found_hosts},
            {g.id: g.slug for g, _spec in found_gateways},
        )

    def member(self, member_id: str | None) -> str | None:
        return None if member_id is None else self.members.get(member_id, member_id)

    def server(self, server_id: str) -> str:
        return self.servers.get(server_id, server_id)

    def host(self, host_id: str) -> str:
        return self.hosts.get(host_id, host_id)

    def gateway(self, gateway_id: str) -> str:
        return self.gateways.get(gateway_id, gateway_id)
