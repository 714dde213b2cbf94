"""Every relay of a `tools/call` gives the same JSON-RPC answer and writes the same audit event.

A call reaches its upstream one of three ways: as bytes on the 2026-era fast path, posted into the pooled upstream
session on the handshake-era hot path, or through the SDK's server and client (the full path, which the settings'
``fast_path=False`` forces). Each outcome is produced once per way, in each caller era, against one recording
upstream with the rules a real workspace has (a policy rule, content rules on arguments and results, a rate
limit), and the answers and audit events of the byte relays are compared with the full path's.

How a call proves which way it went: the upstream sees the caller's own client name (``mcp``) only on the 2026-era
fast path, and a request id of Bastion's own (``bastion-N``) only on the handshake-era hot path.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

import anyio
import mcp_types as types
import pytest
import sqlalchemy as sa
from mcp.server import Server, ServerRequestContext
from mcp.shared.exceptions import MCPError
from starlette.types import ASGIApp, Receive, Scope, Send

from bastion.db import schema
from bastion.db.store import Store
from bastion.domain.actor import Actor
from bastion.domain.content import ContentAction, ContentTarget
from bastion.domain.identities import IdentitySecret
from bastion.domain.models import AuthKind, ProtocolEra, Provisioning, ProvisionMode, Transport
from bastion.domain.policy import Effect, SubjectKind
from bastion.domain.ratelimits import LimitPer
from bastion.domain.specs import GatewayServerSpec, GatewaySpec, HostSpec, MemberSpec, ServerSpec
from bastion.oauth.model import ClientAuth
from bastion.pipeline.errors import (
    CONTENT_BLOCKED,
    IDENTITY_NEEDS_REAUTH,
    IDENTITY_REQUIRED,
    REQUEST_TIMEOUT,
    UPSTREAM_UNAVAILABLE,
)
from bastion.services import connections, gateways, hosts, identities, members, rules, servers
from bastion.services.apikeys import KeyHasher
from bastion.settings import Settings
from bastion.upstream import budget
from bastion.vault.sealer import Vault
from bastion.web.app import create_app
from bastion.web.mcp.fastpath import read_body, replaying
from tests.fixtures.token_server import TokenServer, require_bearer
from tests.mcp_support import gateway_client, mcp_app, serving
from tests.oauth.refresh_support import oauth_client, oauth_identity
from tests.processes import free_port

pytestmark = [pytest.mark.anyio, pytest.mark.e2e]
E = schema.audit_events
CLIENT_INFO_KEY = "io.modelcontextprotocol/clientInfo"
ADA = "ada@example.com"
MODERN = "2026-07-28"
CARD = "4111111111111111"
# Each outcome: a name, the tool called and its arguments. `hidden` is not provisioned; `forbidden` is denied.
CALLS: list[tuple[str, str, dict[str, Any]]] = [
    ("ok", "echo", {"text": "hello"}),
    ("tool error", "fail", {}),
    ("jsonrpc error", "boom", {}),
    ("hidden tool", "hidden", {}),
    ("denied", "forbidden", {}),
    ("arguments masked", "echo", {"text": f"pay with {CARD}"}),
    ("result redacted", "echo", {"text": "the code is secret-abc123"}),
    ("arguments blocked", "echo", {"text": "DROP TABLE users"}),
    ("result blocked", "echo", {"text": "classified TOPSECRET file"}),
    ("within the limit", "echo", {"text": "once"}),
    ("rate limited", "echo", {"text": "twice"}),
]


Call = tuple[str, dict[str, Any], Any, Any]


@dataclass
class Seen:
    """What the upstream saw of each call: the tool, its arguments, who sent it and with which request id."""

    calls: list[Call] = field(default_factory=list["Call"])


def upstream(seen: Seen) -> ASGIApp:
    """Both eras (the SDK's low-level Server): `echo` answers its text, `fail` a tool error, `boom` a JSON-RPC
    error; `forbidden` and `hidden` would answer if they were ever reached."""

    async def list_tools(_ctx: ServerRequestContext[Any, Any], _p: Any) -> types.ListToolsResult:
        schema_ = {"type": "object", "properties": {"text": {"type": "string"}}}
        names = ("echo", "fail", "boom", "forbidden", "hidden")
        return types.ListToolsResult(tools=[types.Tool(name=n, description=n, input_schema=schema_) for n in names])

    async def call_tool(ctx: ServerRequestContext[Any, Any], params: types.CallToolRequestParams) -> Any:
        meta = dict((ctx.params or {}).get("_meta", {}))
        arguments = dict(params.arguments or {})
        seen.calls.append((params.name, arguments, meta.get(CLIENT_INFO_KEY, {}).get("name"), ctx.request_id))
        if params.name == "boom":
            raise MCPError(types.INVALID_PARAMS, "boom: the upstream refuses this", {"why": "on purpose"})
        text = str(arguments.get("text", params.name))
        return types.CallToolResult(content=[types.TextContent(type="text", text=text)], is_error=params.name == "fail")

    server: Server[Any] = Server("both-eras", version="1", on_list_tools=list_tools, on_call_tool=call_tool)
    return mcp_app(server)


async def _world(store: Store, hasher: KeyHasher, operator: Actor, url: str, era: ProtocolEra) -> str:
    await servers.create(store, operator, ServerSpec("up", Transport.STREAMABLE_HTTP, url=url, era=era))
    tools = Provisioning(ProvisionMode.ALLOW_SELECTED, frozenset({"echo", "fail", "boom", "forbidden"}))
    await gateways.create(store, operator, GatewaySpec("g", servers=(GatewayServerSpec("up", tools=tools),)))
    await hosts.create(store, operator, HostSpec("agent"))
    await members.create(store, operator, MemberSpec(ADA, "Ada"))
    await rules.create_policy(store, operator, effect=Effect.DENY, subject_kind=SubjectKind.ANY, name="forbidden")
    for name, pattern, action, target in (
        ("cards", r"\b\d{16}\b", ContentAction.MASK, ContentTarget.ARGUMENTS),
        ("codes", r"secret-\w+", ContentAction.REDACT, ContentTarget.RESULTS),
        ("no-drop", r"(?i)drop\s+table", ContentAction.BLOCK, ContentTarget.ARGUMENTS),
        ("classified", r"TOPSECRET", ContentAction.BLOCK, ContentTarget.RESULTS),
    ):
        await rules.create_content_rule(store, operator, name=name, pattern=pattern, action=action, target=target)
    _c, _t, token = await connections.create(store, hasher, operator, host="agent", gateway="g", member=ADA)
    return token


async def _run(
    settings: Settings, store: Store, operator: Actor, token: str, mode: str, fast_path: bool
) -> tuple[list[Any], list[Any]]:
    """Every call of ``CALLS`` (after one unrecorded call that opens the upstream session); the answers and the
    audit events, with what differs by nature between runs (rule ids, times) left out."""
    async with store.transaction() as conn:
        before = (await conn.execute(sa.select(sa.func.max(E.c.seq)))).scalar_one() or 0
    answers: list[Any] = []
    limit = None
    chosen = settings.model_copy(update={"fast_path": fast_path})
    async with serving(create_app(chosen, store)) as bastion, gateway_client(f"{bastion}/g/g/mcp", token, mode) as ada:
        await ada.call_tool("up__echo", {"text": "warm"})  # the first call of an identity opens its upstream session
        async with store.transaction() as conn:
            before = (await conn.execute(sa.select(sa.func.max(E.c.seq)))).scalar_one()
        for name, tool, arguments in CALLS:
            if name == "within the limit":
                limit = await rules.create_rate_limit(store, operator, per=LimitPer.MEMBER, limit="1/minute")
            try:
                result = await ada.call_tool(f"up__{tool}", arguments)
                answers.append((name, [c.model_dump() for c in result.content], result.is_error))
            except MCPError as exc:
                data = dict(exc.error.data or {}) if isinstance(exc.error.data, dict) else exc.error.data
                answers.append((name, exc.code, exc.message, data))
    assert limit is not None
    await rules.delete_rate_limit(store, operator, limit.rule.id)
    async with store.transaction() as conn:
        query = sa.select(E).where(E.c.method == "tools/call", E.c.seq > before).order_by(E.c.seq)
        rows = [dict(row._mapping) for row in (await conn.execute(query)).all()]  # pyright: ignore[reportPrivateUsage]
    events = [
        (
            row["name"],
            row["outcome"],
            row["reason"],
            row["decision"],
            row["upstream_status"],
            row["args_preview"],
            (row["detail"] or {}).get("content"),
        )
        for row in rows
    ]
    text = json.dumps([answers, events], default=str).replace(limit.rule.id, "<limit>")
    doc = json.loads(text.replace(f"retry in {60}", "retry in N"))
    return doc[0], doc[1]


@pytest.mark.parametrize(("mode", "era"), [(MODERN, ProtocolEra.MODERN), ("legacy", ProtocolEra.LEGACY)])
async def test_every_outcome_is_answered_and_audited_alike_by_the_byte_relay_and_the_full_path(
    mode: str, era: ProtocolEra, settings: Settings, store: Store, hasher: KeyHasher, operator: Actor
) -> None:
    seen = Seen()
    async with serving(upstream(seen)) as up:
        token = await _world(store, hasher, operator, f"{up}/mcp", era)
        fast_answers, fast_events = await _run(settings, store, operator, token, mode, fast_path=True)
        fast_calls, seen.calls = seen.calls[1:], []
        full_answers, full_events = await _run(settings, store, operator, token, mode, fast_path=False)
        full_calls = seen.calls[1:]

    # The byte relays served every call that reached the upstream; the full path none.
    if mode == MODERN:
        assert {client for _t, _a, client, _id in fast_calls} == {"mcp"}
        assert {client for _t, _a, client, _id in full_calls} == {"bastion"}
    else:
        assert all(str(request_id).startswith("bastion-") for *_x, request_id in fast_calls)
        assert not any(str(request_id).startswith("bastion-") for *_x, request_id in full_calls)
    # The upstream saw the same calls, with the card masked and never the blocked or refused ones.
    assert [(t, a) for t, a, _c, _i in fast_calls] == [(t, a) for t, a, _c, _i in full_calls]
    assert [a.get("text") for t, a, _c, _i in fast_calls if t == "echo"] == [
        "hello",
        "pay with ************1111",
        "the code is secret-abc123",
        "classified TOPSECRET file",
        "once",
    ]

    assert len(fast_answers) == len(full_answers) == len(CALLS)
    for fast, full in zip(fast_answers, full_answers, strict=True):
        assert fast == full, f"{fast[0]}: the byte relay answered {fast[1:]}, the full path {full[1:]}"
    answers = {a[0]: a[1:] for a in full_answers}
    assert answers["result redacted"][0][0]["text"] == "the code is [REDACTED]"
    assert answers["result blocked"][0] == answers["arguments blocked"][0] == CONTENT_BLOCKED

    assert len(fast_events) == len(full_events) == len(CALLS)
    for fast, full in zip(fast_events, full_events, strict=True):
        assert fast == full, f"{fast[0]}: the byte relay wrote {fast[1:]}, the full path {full[1:]}"
    assert [e[1] for e in full_events] == [
        "ok",
        "ok",  # a tool's error result is an answered call (its upstream status says "error")
        "error",
        "error",
        "denied",
        "ok",
        "ok",
        "blocked",
        "blocked",
        "ok",
        "limited",
    ]


# --- failures: credentials, timeouts, missing and broken identities, an upstream away or forgetful ------------------


@dataclass
class Gate:
    """What the protected upstream does to the next calls: refuse each `tools/call` with ``status`` (a standing 401
    or 403), or answer a session's next request with 404 (``forget``: it no longer knows the session)."""

    status: int | None = None
    forget: bool = False
    forget_call: bool = False  # as ``forget``, for the next `tools/call` only (not a stream or a notification)


def gated(inner: ASGIApp, gate: Gate) -> ASGIApp:
    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        sent = dict(scope.get("headers", [])) if scope["type"] == "http" else {}
        if gate.forget and b"mcp-session-id" in sent:
            gate.forget = False
            await _answer(send, 404, [])
            return
        if (gate.status is not None or gate.forget_call) and scope["type"] == "http" and scope["method"] == "POST":
            body, messages = await read_body(receive)
            if json.loads(body).get("method") == "tools/call":  # both eras (the 2025 one has no Mcp-Method)
                if gate.forget_call and b"mcp-session-id" in sent:
                    gate.forget_call = False
                    await _answer(send, 404, [])
                    return
                if gate.status is not None:
                    challenge = b'Bearer error="insufficient_scope", scope="crm:write"'
                    await _answer(send, gate.status, [(b"www-authenticate", challenge)])
                    return
            receive = replaying(messages, receive)
        await inner(scope, receive, send)

    return app


async def _answer(send: Send, status: int, headers: list[tuple[bytes, bytes]]) -> None:
    await send({"type": "http.response.start", "status": status, "headers": [*headers, (b"content-length", b"0")]})
    await send({"type": "http.response.body", "body": b""})


def slow_upstream() -> ASGIApp:
    """Both eras: `echo` answers its text, `slow` answers after longer than Bastion waits for it."""

    async def list_tools(_ctx: ServerRequestContext[Any, Any], _p: Any) -> types.ListToolsResult:
        schema_ = {"type": "object", "properties": {"text": {"type": "string"}}}
        names = ("echo", "slow", "patient")
        return types.ListToolsResult(tools=[types.Tool(name=n, input_schema=schema_) for n in names])

    async def call_tool(_ctx: ServerRequestContext[Any, Any], params: types.CallToolRequestParams) -> Any:
        if params.name in ("slow", "patient"):
            await anyio.sleep(SLOW_S if params.name == "slow" else PATIENT_S)
        text = str((params.arguments or {}).get("text", params.name))
        return types.CallToolResult(content=[types.TextContent(type="text", text=text)])

    server: Server[Any] = Server("slow", version="1", on_list_tools=list_tools, on_call_tool=call_tool)
    return mcp_app(server)


SLOW_S = 4.0
PATIENT_S = 0.6  # longer than the byte relay waits before it watches for its caller hanging up, within the timeout
# Far above PATIENT_S: a loaded machine (the suite's heavy tests beside this one) must not make it a timeout.
CALL_TIMEOUT_S = 2.0
CANCEL_AFTER_S = 0.5
FAILURES = [
    "ok",
    "answered after a while",
    "401 then refresh",
    "standing 401",
    "standing 403",
    "timeout",
    "cancelled",
    "upstream forgot its session",
    "missing identity",
    "upstream down",
    "needs reauthorization",
    "needs reauthorization again",
]


@dataclass
class Failing:
    """The world of the failures: "crm" (OAuth, behind ``tokens``' resource check and ``gate``), "other" (a per-user
    bearer server nobody holds an identity for) and "gone" (nothing listens there), in gateway "g"."""

    tokens: TokenServer
    gate: Gate
    issuer: str
    resource: str
    row: str


async def _failing_world(store: Store, operator: Actor, up: str, issuer: str, tokens: TokenServer, era: ProtocolEra,
                         gate: Gate, vault: Vault) -> Failing:  # fmt: skip
    resource = f"{up}/mcp"
    crm = ServerSpec("crm", Transport.STREAMABLE_HTTP, url=resource, auth_kind=AuthKind.OAUTH, era=era,
                     call_timeout_s=CALL_TIMEOUT_S)  # fmt: skip
    await servers.create(store, operator, crm)
    await servers.create(store, operator, ServerSpec("other", Transport.STREAMABLE_HTTP, url=resource,
                                                     auth_kind=AuthKind.BEARER, era=era))  # fmt: skip
    closed = f"http://127.0.0.1:{free_port()}/mcp"
    await servers.create(store, operator, ServerSpec("gone", Transport.STREAMABLE_HTTP, url=closed, era=era))
    members_ = (GatewayServerSpec("crm"), GatewayServerSpec("other"), GatewayServerSpec("gone"))
    await gateways.create(store, operator, GatewaySpec("g", servers=members_))
    await hosts.create(store, operator, HostSpec("agent"))
    tokens.register("bastion-client", "client_secret_post", "client-secret-value")
    row = await oauth_client(store, vault, operator, server="crm", issuer=issuer, client_id="bastion-client",
                             auth_method=ClientAuth.POST, secret="client-secret-value")  # fmt: skip
    return Failing(tokens, gate, issuer, resource, row)


async def _person(store: Store, vault: Vault, hasher: KeyHasher, operator: Actor, world: Failing, email: str
                  ) -> tuple[str, str]:  # fmt: skip
    """A member with an OAuth identity for "crm" and a pasted one for "other", connected to "g": their Bastion
    token and the pasted identity's id."""
    await members.create(store, operator, MemberSpec(email, email.partition("@")[0]))
    access, refresh = world.tokens.grant(world.resource)
    await oauth_identity(store, vault, hasher, operator, server="crm", owner=email, issuer=world.issuer,
                         client_row=world.row, access_token=access, refresh_token=refresh,
                         expires_at=datetime.now(UTC) + timedelta(hours=1), resource=world.resource)  # fmt: skip
    pasted = await identities.create(store, vault, hasher, operator, server="other",
                                     secret=IdentitySecret(token=f"pasted-{email}"), owner=email)  # fmt: skip
    _c, _t, token = await connections.create(store, hasher, operator, host="agent", gateway="g", member=email)
    return token, pasted.id


async def _fail_all(settings: Settings, store: Store, operator: Actor, world: Failing, person: tuple[str, str],
                    mode: str, fast_path: bool) -> tuple[list[Any], list[Any]]:  # fmt: skip
    """Each of ``FAILURES`` in turn, on one client; the answers and the audit events (ids and times left out)."""
    async with store.transaction() as conn:
        before = (await conn.execute(sa.select(sa.func.max(E.c.seq)))).scalar_one() or 0
    answers: list[Any] = []
    chosen = settings.model_copy(update={"fast_path": fast_path})
    token, pasted = person
    async with serving(create_app(chosen, store)) as bastion, gateway_client(f"{bastion}/g/g/mcp", token, mode) as ada:
        for name in FAILURES:
            tool, arguments = "crm__echo", {"text": name}
            if name == "answered after a while":
                tool = "crm__patient"
            elif name == "401 then refresh":
                for access in list(world.tokens.access_tokens):
                    world.tokens.expire(access)  # revoked at the AS: the next call is refused once
            elif name in ("standing 401", "standing 403"):
                world.gate.status = int(name[-3:])
            elif name == "timeout":
                world.gate.status, tool = None, "crm__slow"
            elif name == "upstream forgot its session":
                world.gate.forget = True
            elif name == "missing identity":
                await identities.delete(store, operator, pasted)  # deleted while the connection still names it
                tool = "other__echo"
            elif name == "upstream down":
                tool = "gone__echo"
            elif name == "needs reauthorization":
                world.tokens.access_tokens.clear()
                world.tokens.refresh_tokens.clear()  # the grant was revoked: the refresh is refused
            elif name == "cancelled":
                tool = "crm__slow"
                with anyio.move_on_after(CANCEL_AFTER_S):  # the caller gives up on the call mid-flight
                    await ada.call_tool(tool, arguments)
                answers.append((name, "cancelled by the caller"))
                continue
            try:
                result = await ada.call_tool(tool, arguments)
                answers.append((name, [c.model_dump() for c in result.content], result.is_error))
            except MCPError as exc:
                data = dict(exc.error.data or {}) if isinstance(exc.error.data, dict) else exc.error.data
                answers.append((name, exc.code, exc.message, data))
    async with store.transaction() as conn:
        query = sa.select(E).where(E.c.method == "tools/call", E.c.seq > before).order_by(E.c.seq)
        rows = [dict(row._mapping) for row in (await conn.execute(query)).all()]  # pyright: ignore[reportPrivateUsage]
    events = [(r["name"], r["outcome"], r["reason"], r["decision"], r["upstream_status"]) for r in rows]
    text = json.dumps([answers, events], default=str)
    text = re.sub(r"/me/identities/[0-9a-f-]+/", "/me/identities/<id>/", text)
    doc = json.loads(re.sub(r"127\.0\.0\.1:\d+", "127.0.0.1:<port>", text))
    return doc[0], doc[1]


@pytest.mark.parametrize(("mode", "era"), [(MODERN, ProtocolEra.MODERN), ("legacy", ProtocolEra.LEGACY)])
async def test_every_failure_is_answered_and_audited_alike_by_the_byte_relay_and_the_full_path(
    mode: str, era: ProtocolEra, settings: Settings, store: Store, vault: Vault, hasher: KeyHasher, operator: Actor
) -> None:
    tokens, gate = TokenServer(), Gate()
    async with serving(tokens.app()) as issuer, serving(require_bearer(gated(slow_upstream(), gate), tokens)) as up:
        world = await _failing_world(store, operator, up, issuer, tokens, era, gate, vault)
        ada = await _person(store, vault, hasher, operator, world, ADA)
        fast_answers, fast_events = await _fail_all(settings, store, operator, world, ada, mode, fast_path=True)
        gate.status, gate.forget = None, False
        bob = await _person(store, vault, hasher, operator, world, "bob@example.com")
        full_answers, full_events = await _fail_all(settings, store, operator, world, bob, mode, fast_path=False)

    assert len(fast_answers) == len(full_answers) == len(FAILURES)
    for fast, full in zip(fast_answers, full_answers, strict=True):
        assert fast == full, f"{fast[0]}: the byte relay answered {fast[1:]}, the full path {full[1:]}"
    assert len(fast_events) == len(full_events)
    for fast, full in zip(fast_events, full_events, strict=True):
        assert fast == full, f"the byte relay wrote {fast}, the full path {full}"
    answers = {a[0]: a[1:] for a in full_answers}
    for name in ("ok", "answered after a while", "401 then refresh", "upstream forgot its session"):
        assert answers[name][0][0]["text"] == name  # answered, after a refresh or in a fresh upstream session
    assert answers["cancelled"] == ["cancelled by the caller"]
    codes = {name: (a[0], a[2]["code"]) for name, a in answers.items() if isinstance(a[0], int)}
    assert codes == {
        "standing 401": (UPSTREAM_UNAVAILABLE, "upstream_refused_credential"),
        "standing 403": (IDENTITY_NEEDS_REAUTH, "identity_needs_scope"),  # it asked for more scope
        "timeout": (REQUEST_TIMEOUT, "upstream_timeout"),
        "missing identity": (IDENTITY_REQUIRED, "identity_required"),
        "upstream down": (UPSTREAM_UNAVAILABLE, "upstream_unavailable"),
        "needs reauthorization": (IDENTITY_NEEDS_REAUTH, "identity_needs_reauth"),
        "needs reauthorization again": (IDENTITY_NEEDS_REAUTH, "identity_needs_reauth"),
    }
    assert [tuple(e[1:]) for e in full_events] == [
        ("ok", "no policy rule applies", "allow", "ok"),
        ("ok", "no policy rule applies", "allow", "ok"),
        ("ok", "no policy rule applies", "allow", "ok"),
        ("error", "upstream_refused_credential", "allow", "401"),
        ("error", "identity_needs_scope", "allow", "403"),
        ("error", "upstream_timeout", "allow", "timeout"),
        ("error", "cancelled", "allow", None),
        ("ok", "no policy rule applies", "allow", "ok"),
        ("error", "identity_required", "allow", None),
        ("error", "upstream_unavailable", "allow", "unavailable"),
        ("error", "identity_needs_reauth", "allow", "401"),
        ("error", "identity_needs_reauth", "allow", None),
    ]
    # One refresh per person for the 401, one for the standing 401, one refused (invalid_grant), then none.
    assert len(tokens.refreshes) == 6


@pytest.mark.parametrize(("mode", "era"), [(MODERN, ProtocolEra.MODERN), ("legacy", ProtocolEra.LEGACY)])
async def test_a_retry_over_the_servers_budget_is_not_made_and_both_relays_say_so_alike(
    mode: str,
    era: ProtocolEra,
    settings: Settings,
    store: Store,
    vault: Vault,
    hasher: KeyHasher,
    operator: Actor,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # One retry in the budget, and nothing earns another: by calls or by time.
    monkeypatch.setattr(budget, "BURST", 1.0)
    monkeypatch.setattr(budget, "RATIO", 0.0)
    monkeypatch.setattr(budget, "MIN_PER_S", 0.0)
    tokens, gate = TokenServer(), Gate()
    seen: dict[bool, tuple[list[Any], list[Any], int]] = {}
    async with serving(tokens.app()) as issuer, serving(require_bearer(gated(slow_upstream(), gate), tokens)) as up:
        world = await _failing_world(store, operator, up, issuer, tokens, era, gate, vault)
        for fast_path, email in ((True, ADA), (False, "bob@example.com")):
            token, _pasted = await _person(store, vault, hasher, operator, world, email)
            async with store.transaction() as conn:
                before = (await conn.execute(sa.select(sa.func.max(E.c.seq)))).scalar_one() or 0
            refreshed = len(tokens.refreshes)
            answers: list[Any] = []
            chosen = settings.model_copy(update={"fast_path": fast_path})
            async with (
                serving(create_app(chosen, store)) as bastion,
                gateway_client(f"{bastion}/g/g/mcp", token, mode) as client,
            ):
                gate.status = 401  # every call refused: the first renews and retries, the second may not
                steps = ["standing 401", "standing 401 over budget"]
                if era is ProtocolEra.LEGACY:
                    steps.append("forgotten session over budget")
                for step in steps:
                    if step == "forgotten session over budget":
                        gate.status, gate.forget_call = None, True
                    with pytest.raises(MCPError) as caught:
                        await client.call_tool("crm__echo", {"text": step})
                    answers.append((step, caught.value.code, caught.value.message, caught.value.error.data))
                gate.status, gate.forget_call = None, False
            async with store.transaction() as conn:
                query = sa.select(E).where(E.c.method == "tools/call", E.c.seq > before).order_by(E.c.seq)
                rows = [r._mapping for r in (await conn.execute(query)).all()]  # pyright: ignore[reportPrivateUsage]
            events = [(r["outcome"], r["reason"], r["upstream_status"]) for r in rows]
            seen[fast_path] = (answers, events, len(tokens.refreshes) - refreshed)

    assert seen[True] == seen[False], f"the byte relay: {seen[True]}; the full path: {seen[False]}"
    answers, events, refreshes = seen[True]
    assert refreshes == 1  # the first call's renewal spent the budget: the second call was not retried
    refused = (UPSTREAM_UNAVAILABLE, "upstream 'crm' refused the credential (HTTP 401)")
    assert [a[1:3] for a in answers[:2]] == [refused, refused]
    assert events[:2] == [("error", "upstream_refused_credential", "401")] * 2
    if era is ProtocolEra.LEGACY:
        assert answers[2][1:3] == (UPSTREAM_UNAVAILABLE, "upstream 'crm' no longer knows the session")
        assert events[2][:2] == ("error", "upstream_unavailable")
