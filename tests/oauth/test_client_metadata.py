"""Bastion's client ID metadata document: served at its own URL, which is its client id."""

from __future__ import annotations

import httpx2
import pytest

from bastion.db.store import Store
from bastion.settings import Settings
from bastion.web.app import create_app

pytestmark = pytest.mark.anyio


@pytest.mark.parametrize("db_url", ["sqlite"], indirect=True)
async def test_the_document_names_its_own_url_as_client_id_and_the_callback(settings: Settings, store: Store) -> None:
    app = create_app(settings.model_copy(update={"public_url": "https://bastion.example/"}), store)
    async with httpx2.AsyncClient(transport=httpx2.ASGITransport(app=app), base_url="http://bastion.test") as client:
        response = await client.get("/oauth/client-metadata.json")
    assert response.status_code == 200
    assert response.headers["content-type"] == "application/json"
    document = response.json()
    assert document["client_id"] == "https://bastion.example/oauth/client-metadata.json"
    assert document["redirect_uris"] == ["https://bastion.example/oauth/callback"]
    assert document["token_endpoint_auth_method"] == "none"
    assert "refresh_token" in document["grant_types"]


@pytest.mark.parametrize("db_url", ["sqlite"], indirect=True)
async def test_without_a_public_url_the_document_is_built_from_the_address_served_on(
    settings: Settings, store: Store
) -> None:
    app = create_app(settings.model_copy(update={"host": "0.0.0.0", "port": 18631}), store)  # noqa: S104
    async with httpx2.AsyncClient(transport=httpx2.ASGITransport(app=app), base_url="http://bastion.test") as client:
        response = await client.get("/oauth/client-metadata.json")
    assert response.status_code == 200
    document = response.json()
    assert document["client_id"] == "http://127.0.0.1:18631/oauth/client-metadata.json"
    assert document["redirect_uris"] == ["http://127.0.0.1:18631/oauth/callback"]
    assert document["application_type"] == "native"
