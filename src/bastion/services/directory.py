"""Gateways as the data plane needs them: the gateway with its mounted servers, cached until something changes."""

from __future__ import annotations

from dataclasses import dataclass

import sqlalchemy as sa

from bastion.db import rows, schema
from bastion.db.store import Store
from bastion.domain.models import Gateway, GatewayServer, Server
from bastion.errors import NotFound
from bastion.events.bus import Changed, Subject
from bastion.services import gateways


@dataclass(frozen=True, slots=True)
class Mounted:
    entry: GatewayServer
    server: Server

    @property
    def alias(self) -> str:
        return self.entry.alias


@dataclass(frozen=True, slots=True)
class GatewayView:
    gateway: Gateway
    mounted: tuple[Mounted, ...]

    def by_alias(self, alias: str) -> Mounted | None:
        for mounted in self.mounted:
            if mounted.alias == alias:
                return mounted
        return None


class Directory:
    """Caches gateway views by id; gateway and server changes empty the cache (on every replica, via events)."""

    def __init__(self, store: Store) -> None:
        self._store = store
        self._views: dict[str, GatewayView] = {}
        self._unsubscribe = store.bus.subscribe(self._on_change)

    def _on_change(self, event: Changed) -> None:
        if event.subject in (Subject.GATEWAY, Subject.SERVER, Subject.SERVER_INFO, Subject.ALL):
            self._views.clear()

    def close(self) -> None:
        self._unsubscribe()

    async def view(self, workspace_id: str, gateway_id: str) -> GatewayView:
        cached = self._views.get(gateway_id)
        if cached is not None:
            return cached
        generation = self._store.bus.generation
        async with self._store.transaction() as conn:
            gateway = await gateways.find(conn, workspace_id, gateway_id)
            ids = [entry.server_id for entry in gateway.servers]
            found = (await conn.execute(sa.select(schema.servers).where(schema.servers.c.id.in_(ids)))).all()
        servers = {row.id: rows.server(row) for row in found}
        missing = [e.server_id for e in gateway.servers if e.server_id not in servers]
        if missing:
            raise NotFound(f"gateway {gateway.slug!r} names a server that no longer exists")
        view = GatewayView(gateway, tuple(Mounted(e, servers[e.server_id]) for e in gateway.servers))
        if self._store.bus.keeps(generation):  # else a change came while this was read: keep nothing
            self._views[gateway_id] = view
        return view
