"""Revision 0006 on both engines: a host's existing webhook URL becomes its first endpoint, and going back down
keeps every host and connection (dropping the event counters must not rebuild, and so empty, those tables)."""

from __future__ import annotations

from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path

import pytest
import sqlalchemy as sa

from bastion.db import migrate, schema
from bastion.db.engine import sync_url


@pytest.fixture(params=["sqlite", "postgresql"])
def empty_url(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    if request.param == "sqlite":
        yield f"sqlite:///{tmp_path / 'bastion.db'}"
    else:
        yield request.getfixturevalue("fresh_pg_url")


def test_host_webhook_urls_become_endpoints_and_a_downgrade_keeps_hosts_and_connections(empty_url: str) -> None:
    migrate.upgrade(empty_url, "0005")
    now = datetime.now(UTC)
    stamps = {"version": 1, "created_at": now, "updated_at": now, "workspace_id": "w"}
    host = {"description": "", "kind": "token", "enabled": True, "disabled_at": None, "disabled_by": None, **stamps}
    engine = sa.create_engine(sync_url(empty_url))
    try:
        with engine.begin() as conn:
            conn.execute(schema.workspaces.insert().values(id="w", name="w", created_at=now))
            role = {"id": "r", "name": "member", "description": "", "capabilities": "[]", "builtin": False, **stamps}
            member = {"id": "m", "email": "ada@example.com", "name": "Ada", "status": "active", "role_id": "r"}
            for table, values in (("roles", role), ("members", {**member, **stamps})):
                conn.execute(sa.table(table, *(sa.column(k) for k in values)).insert().values(values))
            for name, url in (("with-hook", "https://agent.example.com/hook"), ("without", None)):
                values = {"id": name, "name": name, "webhook_url": url, **host}
                conn.execute(sa.table("hosts", *(sa.column(k) for k in values)).insert().values(values))
            gateway = {"id": "g", "slug": "sales", "name": "", "description": "", "enabled": True, **stamps}
            conn.execute(sa.table("gateways", *(sa.column(k) for k in gateway)).insert().values(gateway))
            connection = {"id": "c", "member_id": "m", "host_id": "with-hook", "gateway_id": "g", "link_id": None}
            connection |= {"enabled": True, "disabled_at": None, "disabled_by": None, **stamps}
            conn.execute(sa.table("connections", *(sa.column(k) for k in connection)).insert().values(connection))

        migrate.upgrade(empty_url)
        with engine.connect() as conn:
            (endpoint,) = conn.execute(sa.select(schema.webhook_endpoints)).all()
            counters = conn.execute(sa.select(schema.hosts.c.id, schema.hosts.c.event_seq)).all()
        assert (endpoint.host_id, endpoint.url, endpoint.from_host, endpoint.token_delivery) == (
            "with-hook",
            "https://agent.example.com/hook",
            True,
            "claim_code",
        )
        assert len(endpoint.event_types) == 7 and sorted(counters) == [("with-hook", 0), ("without", 0)]

        migrate.downgrade(empty_url, "0005")
        with engine.connect() as conn:
            hosts = conn.execute(sa.text("SELECT id, webhook_url FROM hosts ORDER BY id")).all()
            connections = conn.execute(sa.text("SELECT id FROM connections")).all()
        assert [tuple(h) for h in hosts] == [("with-hook", "https://agent.example.com/hook"), ("without", None)]
        assert [tuple(c) for c in connections] == [("c",)]
    finally:
        engine.dispose()
