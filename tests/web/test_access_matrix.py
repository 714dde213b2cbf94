"""The role × route matrix (SECURITY-CHECKLIST item 6), generated from the OpenAPI document.

Every operation declares who may call it in ``x-bastion-access``: capability names (any one admits) or
"self" (every signed-in member). For each operation and each capability, a member whose custom role holds
exactly that capability calls the route with a valid request; the answer must be 403 exactly when the
capability is not declared. A route without the declaration fails: deny by default.
"""

from __future__ import annotations

import itertools
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

import httpx2
import pytest
import sqlalchemy as sa
from fastapi.routing import APIRoute
from starlette.routing import Route

from bastion.db import schema
from bastion.db.store import Store
from bastion.domain import tokens
from bastion.domain.actor import Actor
from bastion.domain.capabilities import OWNER_ROLE, Capability
from bastion.domain.models import MemberStatus, Transport
from bastion.domain.specs import GatewayServerSpec, GatewaySpec, HostSpec, MemberSpec, RoleSpec, ServerSpec
from bastion.services import apikeys, gateways, hosts, members, roles, servers
from bastion.services.apikeys import KeyHasher
from bastion.web.api.deps import ACCESS_KEY, SELF
from bastion.web.api.routes import router
from bastion.web.app import build_api
from tests.conftest import problem_of

pytestmark = pytest.mark.anyio

API = "/api/v1"
METHODS = ("get", "post", "put", "patch", "delete")
BASE_SERVER = "base-server"
# Documentation routes are public on purpose; every other route must be in the schema and so in the matrix.
PUBLIC_ROUTES = frozenset({"/openapi.json", "/docs", "/docs/oauth2-redirect"})

Body = Callable[[int], dict[str, Any]]
# A valid body for every POST/PATCH operation, keyed by operationId; ``None`` for a POST that takes none.
# A new write route without an entry here fails the matrix, so it cannot slip in unchecked.
EXAMPLE_BODIES: dict[str, Body | None] = {
    "create_my_api_key": lambda n: {"name": f"key {n}"},
    "create_role": lambda n: {"name": f"role-{n}", "description": "made by the matrix", "capabilities": []},
    "update_role": lambda n: {"description": f"edited {n}"},
    "create_member": lambda n: {"email": f"new{n}@example.com", "name": f"New {n}", "role": "member"},
    "update_member": lambda n: {"name": f"Renamed {n}"},
    "create_server": lambda n: {"name": f"server-{n}", "transport": "streamable_http", "url": "https://mcp.example.com/"},
    "update_server": lambda n: {"description": f"edited {n}"},
    "create_gateway": lambda n: {"slug": f"gateway-{n}", "servers": [{"server": BASE_SERVER}]},
    "update_gateway": lambda n: {"description": f"edited {n}"},
    "create_host": lambda n: {"name": f"host-{n}", "webhook_url": "https://agent.example.com/hook"},
    "update_host": lambda n: {"description": f"edited {n}"},
    "disable_host": None,
    "enable_host": None,
}


@dataclass(frozen=True, slots=True)
class Operation:
    method: str
    path: str
    operation_id: str
    access: list[str] | str | None
    has_body: bool

    def __str__(self) -> str:
        return f"{self.method.upper()} {self.path} ({self.operation_id})"


def operations_of(document: dict[str, Any]) -> list[Operation]:
    found: list[Operation] = []
    for path, item in document["paths"].items():
        for method in METHODS:
            if method in item:
                op = item[method]
                found.append(Operation(method, path, op["operationId"], op.get(ACCESS_KEY), "requestBody" in op))
    return found


def role_name(capability: Capability | None) -> str:
    return "nothing" if capability is None else "only-" + re.sub(r"[._]", "-", capability.value)


@dataclass
class World:
    """One database for the whole matrix: callers, and fresh targets made for each call."""

    store: Store
    hasher: KeyHasher
    operator: Actor
    counter: itertools.count[int] = field(default_factory=lambda: itertools.count(1))

    def n(self) -> int:
        return next(self.counter)

    async def member(self, role: str) -> tuple[str, dict[str, str]]:
        n = self.n()
        member = await members.create(self.store, self.operator, MemberSpec(f"m{n}@example.com", f"Member {n}", role))
        _key, secret = await apikeys.create(self.store, self.hasher, self.operator, name="matrix", member=member.id)
        return member.id, {"Authorization": f"Bearer {secret}"}

    async def key_of(self, member_id: str) -> str:
        key, _secret = await apikeys.create(self.store, self.hasher, self.operator, name="target", member=member_id)
        return key.id

    async def path_for(self, op: Operation, caller_id: str) -> str:
        """The operation's path with fresh objects behind each parameter, so destructive calls can repeat."""
        n = self.n()
        path = op.path
        if path.startswith("/me/api-keys/"):
            path = path.replace("{key_id}", await self.key_of(caller_id))
        elif path.startswith("/members/"):
            target = await members.create(self.store, self.operator, MemberSpec(f"t{n}@example.com", f"Target {n}"))
            path = path.replace("{ref}", target.id)
            if "{key_id}" in path:
                path = path.replace("{key_id}", await self.key_of(target.id))
        elif path.startswith("/roles/"):
            role = await roles.create(self.store, self.operator, RoleSpec(f"target-{n}"))
            path = path.replace("{ref}", role.id)
        elif path.startswith("/servers/"):
            server = await servers.create(
                self.store, self.operator, ServerSpec(f"target-{n}", Transport.STREAMABLE_HTTP, "https://t.example.com/")
            )
            path = path.replace("{ref}", server.id)
        elif path.startswith("/gateways/"):
            gateway = await gateways.create(
                self.store, self.operator, GatewaySpec(f"target-{n}", servers=(GatewayServerSpec(BASE_SERVER),))
            )
            path = path.replace("{ref}", gateway.id)
        elif path.startswith("/hosts/"):
            host = await hosts.create(self.store, self.operator, HostSpec(f"target-{n}"))
            if path.endswith("/enable"):
                host = await hosts.set_enabled(self.store, self.operator, host.id, False)
            path = path.replace("{ref}", host.id)
        assert "{" not in path, f"no objects made for the parameters of {op}; teach World.path_for"
        return API + path

    async def call(
        self, client: httpx2.AsyncClient, op: Operation, caller_id: str, headers: dict[str, str]
    ) -> httpx2.Response:
        example = EXAMPLE_BODIES.get(op.operation_id)
        body = example(self.n()) if example is not None else None
        path = await self.path_for(op, caller_id)
        return await client.request(op.method.upper(), path, json=body, headers=headers)


async def openapi_operations(client: httpx2.AsyncClient) -> list[Operation]:
    response = await client.get(f"{API}/openapi.json")
    assert response.status_code == 200, response.text
    return operations_of(response.json())


async def make_world(store: Store, hasher: KeyHasher, operator: Actor) -> World:
    world = World(store, hasher, operator)
    await servers.create(store, operator, ServerSpec(BASE_SERVER, Transport.STREAMABLE_HTTP, "https://base.example.com"))
    return world


async def test_every_operation_declares_who_may_call_it(client: httpx2.AsyncClient) -> None:
    ops = await openapi_operations(client)
    assert len(ops) >= 30
    known = {c.value for c in Capability}
    undeclared = [str(op) for op in ops if op.access is None]
    assert undeclared == [], "routes without x-bastion-access (deny by default): " + ", ".join(undeclared)
    for op in ops:
        if op.access != SELF:
            assert isinstance(op.access, list), op
            assert op.access, f"{op} admits nobody"
            assert set(op.access) <= known, f"{op} names unknown capabilities: {set(op.access) - known}"


def test_every_api_route_is_in_the_schema_so_the_matrix_sees_it() -> None:
    hidden = [getattr(r, "path", r) for r in router.routes if not (isinstance(r, APIRoute) and r.include_in_schema)]
    assert hidden == []
    # Routes added to the app itself, outside the router, must be the public documentation only.
    outside = {r.path for r in build_api().routes if isinstance(r, Route)}
    assert outside <= PUBLIC_ROUTES


async def test_every_write_operation_has_an_example_body(client: httpx2.AsyncClient) -> None:
    ops = await openapi_operations(client)
    writes = [op for op in ops if op.method in ("post", "put", "patch")]
    missing = [str(op) for op in writes if op.operation_id not in EXAMPLE_BODIES]
    assert missing == [], "add a valid body to EXAMPLE_BODIES for: " + ", ".join(missing)
    bodyless = [str(op) for op in writes if op.has_body and EXAMPLE_BODIES[op.operation_id] is None]
    assert bodyless == [], "these take a body; give them an example: " + ", ".join(bodyless)
    stale = set(EXAMPLE_BODIES) - {op.operation_id for op in writes}
    assert stale == set(), f"examples for operations that no longer exist: {stale}"


async def test_each_capability_opens_exactly_the_routes_that_declare_it(
    client: httpx2.AsyncClient, store: Store, hasher: KeyHasher, operator: Actor
) -> None:
    ops = await openapi_operations(client)
    world = await make_world(store, hasher, operator)
    callers: dict[Capability | None, tuple[str, dict[str, str]]] = {}
    for capability in [None, *Capability]:
        held = frozenset() if capability is None else frozenset({capability})
        await roles.create(store, operator, RoleSpec(role_name(capability), capabilities=held))
        callers[capability] = await world.member(role_name(capability))

    failures: list[str] = []
    checked = 0
    for op in ops:
        for capability, (caller_id, headers) in callers.items():
            response = await world.call(client, op, caller_id, headers)
            checked += 1
            admitted = op.access == SELF or (capability is not None and capability.value in (op.access or []))
            who = role_name(capability)
            if admitted and not response.is_success:
                failures.append(f"{op} as {who}: expected success, got {response.status_code} {response.text}")
            elif not admitted and (
                response.status_code != 403 or problem_of(response).get("code") != "forbidden"
            ):
                failures.append(f"{op} as {who}: expected 403 forbidden, got {response.status_code} {response.text}")
    assert failures == [], "\n".join(failures)
    assert checked == len(ops) * (len(Capability) + 1)


async def test_self_service_routes_serve_a_member_without_capabilities(
    client: httpx2.AsyncClient, store: Store, hasher: KeyHasher, operator: Actor
) -> None:
    ops = [op for op in await openapi_operations(client) if op.access == SELF]
    assert {op.operation_id for op in ops} >= {"get_me", "list_my_api_keys", "create_my_api_key", "revoke_my_api_key"}
    world = await make_world(store, hasher, operator)
    caller_id, headers = await world.member("member")
    for op in ops:
        response = await world.call(client, op, caller_id, headers)
        assert response.is_success, f"{op}: {response.status_code} {response.text}"


async def _refusals(
    client: httpx2.AsyncClient, world: World, headers: dict[str, str] | None
) -> list[tuple[Operation, httpx2.Response]]:
    out: list[tuple[Operation, httpx2.Response]] = []
    for op in await openapi_operations(client):
        # The credential is refused before any lookup, so placeholder ids are enough.
        path = API + re.sub(r"\{[a-z_]+\}", "0196f1c2-0000-7000-8000-000000000000", op.path)
        example = EXAMPLE_BODIES.get(op.operation_id)
        body = example(world.n()) if example is not None else None
        out.append((op, await client.request(op.method.upper(), path, json=body, headers=headers)))
    return out


async def test_every_route_answers_401_with_a_challenge_when_no_key_is_sent(
    client: httpx2.AsyncClient, store: Store, hasher: KeyHasher, operator: Actor
) -> None:
    world = await make_world(store, hasher, operator)
    for op, response in await _refusals(client, world, None):
        assert response.status_code == 401, f"{op}: {response.status_code} {response.text}"
        assert response.headers["www-authenticate"].startswith("Bearer"), op
        assert problem_of(response)["code"] == "unauthenticated"


@pytest.mark.parametrize(
    "authorization",
    [
        "Bearer bsk_nope",
        "Bearer " + tokens.mint(tokens.ACCESS_TOKEN_PREFIX),  # a gateway token is not an API key
        "Bearer " + tokens.mint(tokens.API_KEY_PREFIX),  # well formed, never issued
        "Basic b3duZXI6cGFzc3dvcmQ=",
        "bsk_without_a_scheme",
    ],
    ids=["malformed", "access-token", "unknown", "basic-scheme", "no-scheme"],
)
async def test_every_route_refuses_a_credential_that_is_not_a_live_key(
    client: httpx2.AsyncClient, store: Store, hasher: KeyHasher, operator: Actor, authorization: str
) -> None:
    world = await make_world(store, hasher, operator)
    for op, response in await _refusals(client, world, {"Authorization": authorization}):
        assert response.status_code == 401, f"{op}: {response.status_code} {response.text}"
        assert "www-authenticate" in response.headers, op


async def test_every_route_refuses_revoked_and_expired_keys_and_disabled_members(
    client: httpx2.AsyncClient, store: Store, hasher: KeyHasher, operator: Actor
) -> None:
    world = await make_world(store, hasher, operator)
    _revoked_id, revoked = await world.member(OWNER_ROLE)
    (key,) = (await client.get(f"{API}/me/api-keys", headers=revoked)).json()["items"]
    assert (await client.delete(f"{API}/me/api-keys/{key['id']}", headers=revoked)).status_code == 204
    expired_id, expired = await world.member(OWNER_ROLE)
    async with store.transaction() as conn:
        await conn.execute(
            schema.api_keys.update()
            .where(schema.api_keys.c.member_id == expired_id)
            .values(expires_at=datetime.now(UTC) - timedelta(seconds=1))
        )
    disabled_id, disabled = await world.member(OWNER_ROLE)
    await members.update(store, operator, disabled_id, {"status": MemberStatus.DISABLED})
    live_id, live = await world.member(OWNER_ROLE)
    assert (await client.get(f"{API}/me", headers=live)).json()["member"]["id"] == live_id

    for headers, expected in ((revoked, 401), (expired, 401), (disabled, 403)):
        for op, response in await _refusals(client, world, headers):
            assert response.status_code == expected, f"{op}: {response.status_code} {response.text}"
            assert problem_of(response)["code"] == ("unauthenticated" if expected == 401 else "forbidden")

