"""The role-by-route matrix (SECURITY-CHECKLIST item 6), generated from the OpenAPI document.

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
from typing import Any, Final

import httpx2
import pytest
from fastapi.routing import APIRoute
from starlette.routing import Route

from bastion.db import schema
from bastion.db.store import Store
from bastion.domain import tokens
from bastion.domain.actor import Actor
from bastion.domain.capabilities import OWNER_ROLE, Capability
from bastion.domain.content import ContentAction
from bastion.domain.models import MemberStatus, Transport
from bastion.domain.policy import Effect
from bastion.domain.ratelimits import LimitPer
from bastion.domain.specs import GatewayServerSpec, GatewaySpec, HostSpec, MemberSpec, RoleSpec, ServerSpec
from bastion.services import apikeys, gateways, host_keys, hosts, members, roles, rules, servers, webhooks
from bastion.services.apikeys import KeyHasher
from bastion.web.api.deps import ACCESS_KEY, HOST, SELF
from bastion.web.api.routes import router
from bastion.web.app import build_api
from tests.conftest import problem_of
from tests.processes import HEAVY_TIMEOUT_S

pytestmark = [pytest.mark.anyio, pytest.mark.timeout(HEAVY_TIMEOUT_S)]

API = "/api/v1"
METHODS = ("get", "post", "put", "patch", "delete")
BASE_SERVER = "base-server"
BASE_HOST = "base-host"
EMPTY_GATEWAY = "empty-gateway"
SERVER_GATEWAY = "server-gateway"
# Documentation routes are public on purpose; every other route must be in the schema and so in the matrix.
PUBLIC_ROUTES = frozenset({"/openapi.json", "/docs", "/docs/oauth2-redirect"})

Refs = dict[str, str]
Body = Callable[[int, Refs], dict[str, Any]]
# A valid body for every POST/PUT/PATCH operation, keyed by operationId; ``None`` for one that takes none. The
# body gets a fresh number and the ids ``World.path_for`` made. A new write route without an entry here fails
# the matrix, so it cannot slip in unchecked.
EXAMPLE_BODIES: dict[str, Body | None] = {
    "create_my_api_key": lambda n, _: {"name": f"key {n}"},
    "create_role": lambda n, _: {"name": f"role-{n}", "description": "made by the matrix", "capabilities": []},
    "update_role": lambda n, _: {"description": f"edited {n}"},
    "create_member": lambda n, _: {"email": f"new{n}@example.com", "name": f"New {n}", "role": "member"},
    "update_member": lambda n, _: {"name": f"Renamed {n}"},
    "invite_member": None,
    "reset_member_password": None,
    "create_server": lambda n, _: {"name": f"server-{n}", "transport": "streamable_http", "url": "https://m.example/"},
    "update_server": lambda n, _: {"description": f"edited {n}"},
    "create_gateway": lambda n, _: {"slug": f"gateway-{n}", "servers": [{"server": BASE_SERVER}]},
    "update_gateway": lambda n, _: {"description": f"edited {n}"},
    "create_host": lambda n, _: {"name": f"host-{n}", "webhook_url": "https://agent.example.com/hook"},
    "update_host": lambda n, _: {"description": f"edited {n}"},
    "disable_host": None,
    "enable_host": None,
    "create_identity": lambda n, _: {"server": BASE_SERVER, "token": f"upstream-secret-{n}", "label": f"id {n}"},
    "update_identity": lambda n, _: {"label": f"relabelled {n}"},
    "create_connection": lambda _n, _: {"host": BASE_HOST, "gateway": EMPTY_GATEWAY},
    "set_connection_identity": lambda _n, refs: {"identity_id": refs["identity_id"]},
    "disable_connection": None,
    "enable_connection": None,
    "mint_connection_token": lambda _n, _: {},
    "revoke_token": None,
    "create_link": lambda n, _: {"host": BASE_HOST, "gateway": EMPTY_GATEWAY, "note": f"link {n}"},
    "revoke_link": None,
    "create_policy": lambda n, _: {
        "effect": "deny",
        "subject_kind": "role",
        "subject": f"role-{n}",
        "gateway": SERVER_GATEWAY,
        "server": BASE_SERVER,
    },
    "create_content_rule": lambda n, _: {"name": f"rule-{n}", "pattern": "sk-[a-z]+", "action": "redact"},
    "update_content_rule": lambda _n, _: {"enabled": False},
    "create_rate_limit": lambda n, _: {"per": "member", "limit": f"{n}/minute"},
    # Webhook endpoints listen on a closed loopback port: tests and redeliveries are attempted and fail at once.
    "create_webhook": lambda n, _: {"url": f"https://127.0.0.1:9/hook-{n}"},
    "update_webhook": lambda n, _: {"description": f"edited {n}"},
    "rotate_webhook_secret": lambda _n, _: {"overlap_hours": 1},
    "retire_webhook_secrets": None,
    "test_webhook": None,
    "redeliver_webhook_event": None,
    "create_host_key": lambda n, _: {"name": f"key {n}"},
    "redeem_claim": lambda _n, _: {"claim_code": tokens.mint(tokens.CLAIM_CODE_PREFIX)},
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
    client: httpx2.AsyncClient
    owner: dict[str, str] = field(default_factory=dict[str, str])
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

    async def post(self, path: str, body: dict[str, Any], headers: dict[str, str]) -> dict[str, Any]:
        response = await self.client.post(API + path, json=body, headers=headers)
        assert response.is_success, f"setting up {path}: {response.status_code} {response.text}"
        out: dict[str, Any] = response.json()
        return out

    async def identity_of(self, headers: dict[str, str]) -> str:
        body = {"server": BASE_SERVER, "token": f"upstream-{self.n()}"}
        identity_id: str = (await self.post("/identities", body, headers))["id"]
        return identity_id

    async def connection_of(self, headers: dict[str, str]) -> dict[str, Any]:
        body = {
            "host": BASE_HOST,
            "gateway": SERVER_GATEWAY,
            "identities": {BASE_SERVER: await self.identity_of(headers)},
        }
        return await self.post("/connections", body, headers)

    async def endpoint_of(self, host_id: str) -> tuple[str, str]:
        """A webhook endpoint of the host and a failed event of it (which a redelivery attempts again)."""
        assert self.store.vault is not None
        endpoint, _secret = await webhooks.create_endpoint(
            self.store, self.store.vault, self.operator, host_id, url="https://127.0.0.1:9/hook"
        )
        event_id, now = f"0196f1c2-0000-7000-8000-{self.n():012d}", datetime.now(UTC)
        async with self.store.transaction() as conn:
            await conn.execute(
                schema.webhook_outbox.insert().values(
                    id=event_id,
                    workspace_id=self.operator.workspace_id,
                    endpoint_id=endpoint.id,
                    event_id=event_id,
                    event_type="host.disabled",
                    version=1,
                    payload={"type": "host.disabled", "data": {"host": "target"}},
                    status="failed",
                    attempts=1,
                    failures=1,
                    occurred_at=now,
                    next_attempt_at=now,
                )
            )
        return endpoint.id, event_id

    async def path_for(self, op: Operation, caller_id: str, headers: dict[str, str], refs: Refs) -> str:
        """The operation's path with fresh objects behind each parameter, so destructive calls can repeat."""
        n = self.n()
        path = op.path
        if path.startswith("/identities/"):
            path = path.replace("{identity_id}", await self.identity_of(headers))
        elif path.startswith("/connections/"):
            connection = (await self.connection_of(headers))["connection"]
            path = path.replace("{connection_id}", connection["id"]).replace("{alias}", BASE_SERVER)
            refs["identity_id"] = await self.identity_of(headers)
            if path.endswith("/enable"):
                await self.post(f"/connections/{connection['id']}/disable", {}, self.owner)
        elif path.startswith("/tokens/"):
            path = path.replace("{token_id}", (await self.connection_of(headers))["token"]["id"])
        elif path.startswith("/links/"):
            link = await self.post("/links", {"host": BASE_HOST, "gateway": EMPTY_GATEWAY}, self.owner)
            path = path.replace("{link_id}", link["link"]["id"])
        elif path.startswith("/me/api-keys/"):
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
                self.store,
                self.operator,
                ServerSpec(f"target-{n}", Transport.STREAMABLE_HTTP, "https://t.example.com/"),
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
            if "{endpoint_id}" in path:
                endpoint_id, event_id = await self.endpoint_of(host.id)
                path = path.replace("{endpoint_id}", endpoint_id).replace("{event_id}", event_id)
            if "{key_id}" in path:
                key, _secret = await host_keys.create(self.store, self.hasher, self.operator, host.id, name="target")
                path = path.replace("{key_id}", key.id)
        elif path.startswith("/policies/"):
            policy = await rules.create_policy(self.store, self.operator, effect=Effect.DENY)
            path = path.replace("{rule_id}", policy.rule.id)
        elif path.startswith("/content-rules/"):
            content = await rules.create_content_rule(
                self.store, self.operator, name=f"target-{n}", pattern="k+", action=ContentAction.BLOCK
            )
            path = path.replace("{ref}", content.rule.id)
        elif path.startswith("/rate-limits/"):
            limit = await rules.create_rate_limit(self.store, self.operator, per=LimitPer.HOST, limit="1/second")
            path = path.replace("{rule_id}", limit.rule.id)
        elif path.startswith("/audit/events/"):
            event_id = f"0196f1c2-0000-7000-8000-{n:012d}"
            async with self.store.transaction() as conn:
                await conn.execute(
                    schema.audit_events.insert().values(
                        id=event_id,
                        occurred_at=datetime.now(UTC),
                        workspace=self.operator.workspace_id,
                        kind="admin",
                        method="matrix.probe",
                        outcome="ok",
                    )
                )
            path = path.replace("{event_id}", event_id)
        assert "{" not in path, f"no objects made for the parameters of {op}; teach World.path_for"
        return API + path

    async def call(
        self,
        client: httpx2.AsyncClient,
        op: Operation,
        caller_id: str,
        headers: dict[str, str],
        refused: dict[str, tuple[str, Refs]] | None = None,
    ) -> httpx2.Response:
        """``op`` as the caller, on objects made for it; ``refused``: a call expected to be refused may reuse the
        objects made for another such call of the same operation (a refused call changes nothing), unless they
        are the caller's own (identities, connections, tokens, their API keys)."""
        if refused is not None and not op.path.startswith(CALLERS_OWN):
            if op.operation_id not in refused:
                made: Refs = {}
                refused[op.operation_id] = (await self.path_for(op, caller_id, headers, made), made)
            path, refs = refused[op.operation_id]
        else:
            refs = {}
            path = await self.path_for(op, caller_id, headers, refs)
        example = EXAMPLE_BODIES.get(op.operation_id)
        body = example(self.n(), refs) if example is not None else None
        return await client.request(op.method.upper(), path, json=body, headers=headers)


# Paths whose objects are made as (or for) the caller: never shared between callers.
CALLERS_OWN: Final = ("/identities/", "/connections/", "/tokens/", "/me/")


async def openapi_operations(client: httpx2.AsyncClient) -> list[Operation]:
    response = await client.get(f"{API}/openapi.json")
    assert response.status_code == 200, response.text
    return operations_of(response.json())


async def make_world(client: httpx2.AsyncClient, store: Store, hasher: KeyHasher, operator: Actor) -> World:
    world = World(store, hasher, operator, client)
    await servers.create(
        store, operator, ServerSpec(BASE_SERVER, Transport.STREAMABLE_HTTP, "https://base.example.com")
    )
    await hosts.create(store, operator, HostSpec(BASE_HOST))
    await gateways.create(store, operator, GatewaySpec(EMPTY_GATEWAY))
    await gateways.create(store, operator, GatewaySpec(SERVER_GATEWAY, servers=(GatewayServerSpec(BASE_SERVER),)))
    _owner_id, world.owner = await world.member(OWNER_ROLE)
    return world


async def test_every_operation_declares_who_may_call_it(client: httpx2.AsyncClient) -> None:
    ops = await openapi_operations(client)
    assert len(ops) >= 30
    known = {c.value for c in Capability}
    undeclared = [str(op) for op in ops if op.access is None]
    assert undeclared == [], "routes without x-bastion-access (deny by default): " + ", ".join(undeclared)
    for op in ops:
        if op.access not in (SELF, HOST):
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


# Access is decided in the web layer from the caller's role, the same on either database, and the full matrix (about
# a thousand calls) is the suite's costliest test: it runs on PostgreSQL, the database of multi-replica installs.
# Every route's own behaviour on both databases is the route tests' (tests/web/test_*.py).
@pytest.mark.parametrize("db_url", ["postgresql"], indirect=True)
async def test_each_capability_opens_exactly_the_routes_that_declare_it(
    client: httpx2.AsyncClient, store: Store, hasher: KeyHasher, operator: Actor
) -> None:
    ops = await openapi_operations(client)
    world = await make_world(client, store, hasher, operator)
    callers: dict[Capability | None, tuple[str, dict[str, str]]] = {}
    for capability in [None, *Capability]:
        held = frozenset() if capability is None else frozenset({capability})
        await roles.create(store, operator, RoleSpec(role_name(capability), capabilities=held))
        callers[capability] = await world.member(role_name(capability))

    failures: list[str] = []
    checked = 0
    refused: dict[str, tuple[str, Refs]] = {}
    for op in ops:
        for capability, (caller_id, headers) in callers.items():
            admitted = op.access == SELF or (capability is not None and capability.value in (op.access or []))
            response = await world.call(client, op, caller_id, headers, refused=None if admitted else refused)
            checked += 1
            who = role_name(capability)
            if op.access == HOST:  # a host's route: no member key is a host key, whatever the member may do
                if response.status_code != 401:
                    failures.append(f"{op} as {who}: expected 401, got {response.status_code} {response.text}")
            elif admitted and not response.is_success:
                failures.append(f"{op} as {who}: expected success, got {response.status_code} {response.text}")
            elif not admitted and (response.status_code != 403 or problem_of(response).get("code") != "forbidden"):
                failures.append(f"{op} as {who}: expected 403 forbidden, got {response.status_code} {response.text}")
    assert failures == [], "\n".join(failures)
    assert checked == len(ops) * (len(Capability) + 1)


async def test_self_service_routes_serve_a_member_without_capabilities(
    client: httpx2.AsyncClient, store: Store, hasher: KeyHasher, operator: Actor
) -> None:
    ops = [op for op in await openapi_operations(client) if op.access == SELF]
    assert {op.operation_id for op in ops} >= {"get_me", "list_my_api_keys", "create_my_api_key", "revoke_my_api_key"}
    world = await make_world(client, store, hasher, operator)
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
        body = example(world.n(), {"identity_id": "0196f1c2-0000-7000-8000-000000000000"}) if example else None
        out.append((op, await client.request(op.method.upper(), path, json=body, headers=headers)))
    return out


async def test_every_route_answers_401_with_a_challenge_when_no_key_is_sent(
    client: httpx2.AsyncClient, store: Store, hasher: KeyHasher, operator: Actor
) -> None:
    world = await make_world(client, store, hasher, operator)
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
    world = await make_world(client, store, hasher, operator)
    for op, response in await _refusals(client, world, {"Authorization": authorization}):
        assert response.status_code == 401, f"{op}: {response.status_code} {response.text}"
        assert "www-authenticate" in response.headers, op


async def test_every_route_refuses_revoked_and_expired_keys_and_disabled_members(
    client: httpx2.AsyncClient, store: Store, hasher: KeyHasher, operator: Actor
) -> None:
    world = await make_world(client, store, hasher, operator)
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

    for headers, refused in ((revoked, 401), (expired, 401), (disabled, 403)):
        for op, response in await _refusals(client, world, headers):
            expected = 401 if op.access == HOST else refused  # a member's key, live or not, is never a host key
            assert response.status_code == expected, f"{op}: {response.status_code} {response.text}"
            assert problem_of(response)["code"] == ("unauthenticated" if expected == 401 else "forbidden")
