from __future__ import annotations

from collections.abc import AsyncIterator

import httpx2
import pytest

from bastion.db.store import Store
from bastion.settings import Settings
from bastion.web.app import create_app
from tests.conftest import problem_of
from tests.web.support import API

pytestmark = pytest.mark.anyio
LIMIT = 1024


@pytest.fixture
async def small_client(settings: Settings, store: Store) -> AsyncIterator[httpx2.AsyncClient]:
    app = create_app(settings.model_copy(update={"max_request_body_bytes": LIMIT}), store)
    async with httpx2.AsyncClient(transport=httpx2.ASGITransport(app=app), base_url="http://bastion.test") as c:
        yield c


async def test_a_well_formed_request_id_is_echoed_and_carried_in_problems(client: httpx2.AsyncClient) -> None:
    response = await client.get(f"{API}/me", headers={"x-request-id": "trace-42.a_b"})
    assert response.headers["x-request-id"] == "trace-42.a_b"
    assert problem_of(response)["request_id"] == "trace-42.a_b"


@pytest.mark.parametrize("supplied", [None, "has space", "x" * 65, "semi;colon"])
async def test_a_missing_or_odd_request_id_is_replaced_by_a_fresh_one(
    client: httpx2.AsyncClient, supplied: str | None
) -> None:
    headers = {"x-request-id": supplied} if supplied is not None else {}
    first = await client.get("/healthz", headers=headers)
    second = await client.get("/healthz", headers=headers)
    assert first.headers["x-request-id"] != supplied
    assert len(first.headers["x-request-id"]) == 16
    assert first.headers["x-request-id"] != second.headers["x-request-id"]


async def test_a_body_declared_over_the_limit_is_refused_with_413(
    small_client: httpx2.AsyncClient, owner_headers: dict[str, str]
) -> None:
    response = await small_client.post(
        f"{API}/hosts", json={"name": "big", "description": "d" * LIMIT}, headers=owner_headers
    )
    assert response.status_code == 413
    assert problem_of(response)["code"] == "payload_too_large"
    assert "x-request-id" in response.headers
    assert (await small_client.get(f"{API}/hosts/big", headers=owner_headers)).status_code == 404


async def test_a_streamed_body_over_the_limit_is_refused_with_413(
    small_client: httpx2.AsyncClient, owner_headers: dict[str, str]
) -> None:
    async def chunks() -> AsyncIterator[bytes]:
        yield b'{"name": "big", "description": "'
        for _ in range(LIMIT // 100 + 1):
            yield b"d" * 100
        yield b'"}'

    response = await small_client.post(
        f"{API}/hosts", content=chunks(), headers={**owner_headers, "content-type": "application/json"}
    )
    assert "content-length" not in response.request.headers
    assert response.status_code == 413, response.text
    assert problem_of(response)["code"] == "payload_too_large"
    assert (await small_client.get(f"{API}/hosts/big", headers=owner_headers)).status_code == 404


async def test_a_body_within_the_limit_is_served(
    small_client: httpx2.AsyncClient, owner_headers: dict[str, str]
) -> None:
    response = await small_client.post(f"{API}/hosts", json={"name": "small"}, headers=owner_headers)
    assert response.status_code == 201, response.text


async def test_a_streamed_body_within_the_limit_reaches_the_app_whole(
    small_client: httpx2.AsyncClient, owner_headers: dict[str, str]
) -> None:
    async def chunks() -> AsyncIterator[bytes]:
        for part in (b'{"name": "chun', b'ked", "descrip', b'tion": "in parts"}'):
            yield part

    response = await small_client.post(
        f"{API}/hosts", content=chunks(), headers={**owner_headers, "content-type": "application/json"}
    )
    assert "content-length" not in response.request.headers
    assert response.status_code == 201, response.text
    created = await small_client.get(f"{API}/hosts/chunked", headers=owner_headers)
    assert created.json()["description"] == "in parts"
