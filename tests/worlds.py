"""What most gateway tests start from: servers, a gateway of them, a host, and Ada connected through it."""

from __future__ import annotations

from bastion.db.store import Store
from bastion.domain.actor import Actor
from bastion.domain.specs import GatewayServerSpec, GatewaySpec, HostSpec, MemberSpec, ServerSpec
from bastion.services import connections, gateways, hosts, members, servers
from bastion.services.apikeys import KeyHasher

ADA = "ada@example.com"


async def ada_connected(
    store: Store, hasher: KeyHasher, operator: Actor, *specs: ServerSpec, gateway: str = "g", host: str = "agent"
) -> str:
    """Create ``specs``, gateway ``gateway`` mounting each (per-user, everything allowed), host ``host`` and Ada,
    and connect her; her access token."""
    for spec in specs:
        await servers.create(store, operator, spec)
    await gateways.create(
        store, operator, GatewaySpec(gateway, servers=tuple(GatewayServerSpec(s.name) for s in specs))
    )
    await hosts.create(store, operator, HostSpec(host))
    await members.create(store, operator, MemberSpec(ADA, "Ada"))
    _c, _t, token = await connections.create(store, hasher, operator, host=host, gateway=gateway, member=ADA)
    return token
