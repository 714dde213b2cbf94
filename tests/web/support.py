"""Helpers the admin API tests share: callers with chosen capabilities, problem fields, page walking."""

from __future__ import annotations

import itertools
from collections.abc import Iterable
from typing import Any

import httpx2

from bastion.db.store import Store
from bastion.domain.actor import Actor
from bastion.domain.capabilities import Capability
from bastion.domain.specs import RoleSpec
from bastion.services import roles
from bastion.services.apikeys import KeyHasher
from tests.conftest import member_with_key, problem_of

API = "/api/v1"
_roles = itertools.count(1)


async def caller_with(
    store: Store, hasher: KeyHasher, operator: Actor, email: str, capabilities: Iterable[Capability]
) -> dict[str, str]:
    """Headers of a fresh member whose custom role holds exactly ``capabilities``."""
    name = f"custom-{next(_roles)}"
    await roles.create(store, operator, RoleSpec(name, capabilities=frozenset(capabilities)))
    return await member_with_key(store, hasher, operator, email, name)


def fields_of(response: httpx2.Response) -> set[str]:
    """Every field a problem+json response names, at the top level or in its ``errors`` list."""
    problem = problem_of(response)
    named = {e["field"] for e in problem.get("errors", [])}
    if "field" in problem:
        named.add(problem["field"])
    return named


def assert_invalid(response: httpx2.Response, field: str) -> None:
    assert response.status_code == 422, response.text
    assert problem_of(response)["code"] == "validation_failed"
    assert any(f == field or f.startswith(field + ".") for f in fields_of(response)), (field, response.text)


def assert_unknown(response: httpx2.Response, field: str) -> None:
    """A body naming something that does not exist: 404, naming the field."""
    assert response.status_code == 404, response.text
    assert problem_of(response)["code"] == "not_found"
    assert field in fields_of(response), (field, response.text)


def assert_problem(response: httpx2.Response, status: int, code: str) -> dict[str, Any]:
    assert response.status_code == status, response.text
    problem = problem_of(response)
    assert problem["code"] == code, problem
    assert problem["status"] == status
    return problem


async def walk_pages(client: httpx2.AsyncClient, headers: dict[str, str], path: str, limit: int) -> list[str]:
    """Ids of every item across the pages of ``path``, in order, following ``next_cursor``."""
    seen: list[str] = []
    cursor: str | None = None
    for _ in range(100):
        params: dict[str, str | int] = {"limit": limit}
        if cursor is not None:
            params["cursor"] = cursor
        response = await client.get(path, headers=headers, params=params)
        assert response.status_code == 200, response.text
        page = response.json()
        assert len(page["items"]) <= limit
        seen.extend(item["id"] for item in page["items"])
        cursor = page["next_cursor"]
        if cursor is None:
            return seen
    raise AssertionError("pagination never ended")


async def assert_pages_cover(
    client: httpx2.AsyncClient, headers: dict[str, str], path: str, created: list[str], limit: int = 3
) -> None:
    seen = await walk_pages(client, headers, path, limit)
    assert len(seen) == len(set(seen)), "an item appeared on two pages"
    assert set(created) <= set(seen)
    bad = await client.get(path, headers=headers, params={"cursor": "not-a-cursor!"})
    assert_invalid(bad, "cursor")
