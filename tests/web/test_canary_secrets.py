"""Canary secrets: run the identity flows through the API and find the secrets nowhere they must not be."""

from __future__ import annotations

import logging

import httpx2
import pytest
import sqlalchemy as sa

from bastion.db.schema import metadata
from bastion.db.store import Store

pytestmark = pytest.mark.anyio
CANARY_TOKEN = "canary-upstream-token-7f3a9b21c4d5e6f7"
CANARY_HEADER = "canary-header-value-0a1b2c3d4e5f6071"


async def _dump(store: Store) -> str:
    parts: list[str] = []
    async with store.transaction() as conn:
        for table in metadata.sorted_tables:
            for row in (await conn.execute(sa.select(table))).all():
                parts.extend(value.decode("latin-1") if isinstance(value, bytes) else str(value) for value in row)
    return "\n".join(parts)


async def test_canary_secrets_never_reach_logs_tables_or_responses(
    client: httpx2.AsyncClient, owner_headers: dict[str, str], store: Store, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    seen: list[str] = []

    async def call(method: str, url: str, **kwargs: object) -> httpx2.Response:
        response = await client.request(method, url, headers=owner_headers, **kwargs)  # type: ignore[arg-type]
        seen.append(response.text)
        return response

    assert (
        await call(
            "POST",
            "/api/v1/servers",
            json={"name": "bq", "transport": "streamable_http", "url": "https://bq.example.com/mcp"},
        )
    ).status_code == 201
    assert (
        await call("POST", "/api/v1/gateways", json={"slug": "analytics", "servers": [{"server": "bq"}]})
    ).status_code == 201
    assert (await call("POST", "/api/v1/hosts", json={"name": "agent"})).status_code == 201
    created = await call("POST", "/api/v1/identities", json={"server": "bq", "token": CANARY_TOKEN})
    assert created.status_code == 201, created.text
    identity_id = created.json()["id"]
    header_identity = await call(
        "POST", "/api/v1/identities", json={"server": "bq", "headers": {"X-Api-Key": CANARY_HEADER}, "shared": True}
    )
    assert header_identity.status_code == 201, header_identity.text
    # Bad input carrying a secret: the error must not echo it.
    bad = await call("POST", "/api/v1/identities", json={"server": "nope", "token": CANARY_TOKEN})
    assert bad.status_code == 404
    bad_field = await call("POST", "/api/v1/identities", json={"server": "bq", "token": CANARY_TOKEN, "x": 1})
    assert bad_field.status_code == 422
    connection = await call(
        "POST", "/api/v1/connections", json={"host": "agent", "gateway": "analytics", "identities": {"bq": identity_id}}
    )
    assert connection.status_code == 201, connection.text
    minted = connection.json()["secret"]
    seen.pop()  # the one response that shows the minted token, once, by design
    for url in (
        "/api/v1/identities",
        f"/api/v1/identities/{identity_id}",
        "/api/v1/connections",
        "/api/v1/tokens",
        "/api/v1/identities?shared=true",
    ):
        assert (await call("GET", url)).status_code == 200
    assert (
        await call("PATCH", f"/api/v1/identities/{identity_id}", json={"token": CANARY_TOKEN + "-rotated"})
    ).status_code == 200

    table_dump = await _dump(store)
    logs = "\n".join(f"{r.getMessage()} {r.__dict__}" for r in caplog.records)
    for haystack, where in ((table_dump, "tables"), (logs, "logs"), ("\n".join(seen), "responses")):
        for needle in (CANARY_TOKEN, CANARY_HEADER, minted, minted[4:]):
            assert needle not in haystack, f"secret found in {where}"
