from __future__ import annotations

import httpx2
import pytest

pytestmark = pytest.mark.anyio


async def test_owner_can_create_and_read_a_host(client: httpx2.AsyncClient, owner_headers: dict[str, str]) -> None:
    created = await client.post("/api/v1/hosts", json={"name": "sales-agent"}, headers=owner_headers)
    assert created.status_code == 201, created.text
    assert created.headers["etag"] == '"1"'
    got = await client.get("/api/v1/hosts/sales-agent", headers=owner_headers)
    assert got.json()["enabled"] is True
    ready = await client.get("/readyz")
    assert ready.status_code == 200, ready.text
