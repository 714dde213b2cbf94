"""Per-member credential isolation under concurrency (security checklist items 8 and 9).

Many members call one gateway at once, each through its own agent connection; the recording upstream
logs the credential every call carried. Every call must carry its caller's own credential and nothing
the agent sent: not the bst_ token, not any credential-looking header the agent adds on purpose.
"""

from __future__ import annotations

import contextlib
import itertools
from collections.abc import AsyncGenerator, Sequence
from dataclasses import dataclass, field
from typing import Any, Final

import anyio
import httpx2
import pytest
from hypothesis import HealthCheck, Phase, given, note, settings
from hypothesis import strategies as st
from mcp import Client
from mcp.client.streamable_http import streamable_http_client
from mcp.shared.exceptions import MCPError

from bastion.db.store import Store
from bastion.domain.actor import Actor
from bastion.domain.identities import bearer_secret
from bastion.domain.models import AuthKind, Transport
from bastion.domain.specs import GatewayServerSpec, GatewaySpec, HostSpec, MemberSpec, ServerSpec
from bastion.pipeline.errors import IDENTITY_REQUIRED
from bastion.services import connections, gateways, hosts, identities, members, servers
from bastion.services.apikeys import KeyHasher
from bastion.settings import Settings
from bastion.web.app import create_app
from tests.mcp_support import Recorder, gateway_client, recording_upstream, serving, untraced
from tests.processes import HEAVY_TIMEOUT_S

pytestmark = [pytest.mark.anyio, pytest.mark.e2e, pytest.mark.timeout(HEAVY_TIMEOUT_S)]

MEMBERS: Final = 12
MODES: Final = ("legacy", "2026-07-28")
# Each member holds one agent session per protocol era; a schedule entry names (member, era) as member * 2 + era.
SESSIONS: Final = MEMBERS * len(MODES)
IN_FLIGHT: Final = 48
# Headers an agent might send hoping they reach the upstream; none may.
CREDENTIAL_HEADERS: Final = (
    "X-Api-Key",
    "Cookie",
    "Proxy-Authorization",
    "X-Auth-Token",
    "X-Forwarded-Authorization",
    "X-Upstream-Authorization",
    "Api-Key",
    "X-Access-Token",
)


def _credential(index: int) -> str:
    return f"member-{index:02d}-own-upstream-credential"


@dataclass
class World:
    """One gateway with one per-user server, MEMBERS members with their own identities and two agent sessions each."""

    recorder: Recorder
    url: str
    tokens: list[str]
    clients: list[Client] = field(default_factory=list[Client])
    http: list[httpx2.AsyncClient] = field(default_factory=list[httpx2.AsyncClient])
    nonces: itertools.count[int] = field(default_factory=itertools.count)
    # What the agents really put on the wire, so the property is not vacuous.
    sent: set[str] = field(default_factory=set[str])

    def __repr__(self) -> str:
        return f"World({self.url}, {len(self.clients)} sessions, {len(self.recorder.tool_calls)} calls recorded)"

    def _repr_pretty_(self, printer: Any, _cycle: bool) -> None:
        # Hypothesis prints a failing example's arguments (dataclasses field by field); the recordings are huge.
        printer.text(repr(self))


async def _crm_gateway(store: Store, operator: Actor, upstream_url: str) -> None:
    await servers.create(
        store, operator, ServerSpec("crm", Transport.STREAMABLE_HTTP, url=upstream_url, auth_kind=AuthKind.BEARER)
    )
    await gateways.create(store, operator, GatewaySpec("sales", servers=(GatewayServerSpec("crm"),)))
    await hosts.create(store, operator, HostSpec("agent"))


async def _member(
    store: Store, vault: Any, hasher: KeyHasher, operator: Actor, email: str, credential: str
) -> tuple[str, str]:
    """A member with their own identity for `crm` and a connection to `sales`: (access token, identity id)."""
    await members.create(store, operator, MemberSpec(email, email.split("@")[0]))
    identity = await identities.create(
        store, vault, hasher, operator, server="crm", owner=email, secret=bearer_secret(credential)
    )
    _c, _t, token = await connections.create(store, hasher, operator, host="agent", gateway="sales", member=email)
    return token, identity.id


@contextlib.asynccontextmanager
async def _agent(
    url: str, headers: Sequence[tuple[str, str]], mode: str, sent: set[str] | None = None
) -> AsyncGenerator[tuple[Client, httpx2.AsyncClient]]:
    """The official SDK client with exactly ``headers`` on every request (duplicates kept); ``sent`` collects values."""

    async def record(request: httpx2.Request) -> None:
        if sent is not None:
            sent.update(value for _name, value in request.headers.multi_items())

    async with (
        httpx2.AsyncClient(headers=list(headers), timeout=30, event_hooks={"request": [record]}) as http,
        Client(streamable_http_client(url, http_client=http), mode=mode, cache=None) as client,  # type: ignore[arg-type]
    ):
        yield client, http


@pytest.fixture
async def world(
    settings: Settings, store: Store, vault: Any, hasher: KeyHasher, operator: Actor
) -> AsyncGenerator[World]:
    recorder = Recorder()
    async with contextlib.AsyncExitStack() as stack:
        upstream = await stack.enter_async_context(serving(recording_upstream(recorder)))
        await _crm_gateway(store, operator, f"{upstream}/mcp")
        tokens = [
            (await _member(store, vault, hasher, operator, f"member{i:02d}@example.com", _credential(i)))[0]
            for i in range(MEMBERS)
        ]
        bastion = await stack.enter_async_context(serving(create_app(settings, store)))
        built = World(recorder, f"{bastion}/g/sales/mcp", tokens)
        for session in range(SESSIONS):
            token = tokens[session // len(MODES)]
            client, http = await stack.enter_async_context(
                _agent(built.url, [("Authorization", f"Bearer {token}")], MODES[session % len(MODES)], built.sent)
            )
            built.clients.append(client)
            built.http.append(http)
        yield built


def _text(result: Any) -> str:
    content = result.content[0]
    assert content.type == "text", content
    text: str = content.text
    return text


def _leaked(recorder: Recorder, secrets: set[str]) -> list[tuple[str, str]]:
    """Header lines the upstream received that carry any of ``secrets`` (or any bst_ token)."""
    return [
        (name, value)
        for name, value in recorder.header_lines
        if "bst_" in value or any(secret in value for secret in secrets)
    ]


schedules = st.lists(st.integers(min_value=0, max_value=SESSIONS - 1), min_size=200, max_size=300)
agent_headers = st.lists(
    st.tuples(st.integers(min_value=0, max_value=SESSIONS - 1), st.sampled_from(CREDENTIAL_HEADERS)),
    min_size=1,
    max_size=3 * SESSIONS,
    unique=True,
)


@settings(
    max_examples=5,
    deadline=None,
    phases=(Phase.explicit, Phase.reuse, Phase.generate),
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow, HealthCheck.data_too_large],
)
@given(schedule=schedules, extra=agent_headers)
async def test_concurrent_members_only_ever_reach_the_upstream_with_their_own_credential(
    world: World, schedule: list[int], extra: list[tuple[int, str]]
) -> None:
    # The agents send credential-looking headers of their own, on purpose; each value is unique and traceable.
    example = next(world.nonces)
    bait: dict[int, dict[str, str]] = {}
    for session, name in extra:
        bait.setdefault(session, {})[name] = f"agent-bait-{example}-{session}-{name.lower()}"
    for session, http in enumerate(world.http):
        for name in CREDENTIAL_HEADERS:
            http.headers.pop(name, None)
        http.headers.update(bait.get(session, {}))
    note(f"bait={bait}")

    first_call = len(world.recorder.tool_calls)
    first_line = len(world.recorder.header_lines)
    expected: dict[str, int] = {}
    answers: dict[str, str] = {}
    limiter = anyio.CapacityLimiter(IN_FLIGHT)

    async def call(session: int, nonce: str) -> None:
        async with limiter:
            result = await world.clients[session].call_tool("crm__whoami", {"nonce": nonce})
        answers[nonce] = _text(result)

    with untraced():  # ~250 calls per example through paths the fixture's own calls already covered
        async with anyio.create_task_group() as tg:
            for session in schedule:
                nonce = f"call-{next(world.nonces)}"
                expected[nonce] = session // len(MODES)
                tg.start_soon(call, session, nonce)

    # Every answer carries exactly the caller's own credential.
    wrong = {n: a for n, a in answers.items() if a != f"Bearer {_credential(expected[n])}"}
    assert not wrong, f"{len(wrong)} of {len(answers)} calls came back with another credential: {wrong}"
    assert answers.keys() == expected.keys()
    # The upstream saw each call exactly once, with the caller's credential as the only Authorization.
    calls = world.recorder.tool_calls[first_call:]
    by_nonce = {c.arguments["nonce"]: c for c in calls}
    assert len(by_nonce) == len(calls), "the upstream received some call twice"
    assert by_nonce.keys() == expected.keys(), f"unexpected: {sorted(by_nonce.keys() - expected.keys())}"
    cross = {n: c.authorization for n, c in by_nonce.items() if c.authorization != f"Bearer {_credential(expected[n])}"}
    assert not cross, f"cross-member credential use at the upstream: {cross}"
    # Neither the agents' tokens nor anything they sent as a credential reached the upstream, on any request.
    baited = {v for headers in bait.values() for v in headers.values()}
    assert baited <= world.sent, "the agents did not send the headers this example is about"
    since = Recorder(header_lines=world.recorder.header_lines[first_line:])
    secrets = set(world.tokens) | baited
    assert not _leaked(since, secrets)
    authorizations = [v for k, v in since.header_lines if k == "authorization"]
    assert set(authorizations) <= {f"Bearer {_credential(i)}" for i in range(MEMBERS)}
    assert not {k for k, _v in since.header_lines} & {h.lower() for h in CREDENTIAL_HEADERS}


@pytest.mark.parametrize("mode", MODES)
async def test_a_second_authorization_header_is_refused_and_never_forwarded(
    mode: str, settings: Settings, store: Store, vault: Any, hasher: KeyHasher, operator: Actor
) -> None:
    recorder = Recorder()
    async with serving(recording_upstream(recorder)) as upstream:
        await _crm_gateway(store, operator, f"{upstream}/mcp")
        token, _identity = await _member(store, vault, hasher, operator, "ada@example.com", _credential(0))
        async with serving(create_app(settings, store)) as bastion, httpx2.AsyncClient(base_url=bastion) as http:
            body = {"jsonrpc": "2.0", "id": 1, "method": "tools/call", "params": {"name": "crm__whoami"}}
            base = [("Accept", "application/json, text/event-stream"), ("Content-Type", "application/json")]
            if mode != "legacy":
                base.append(("MCP-Protocol-Version", mode))
            for pair in (
                [("Authorization", f"Bearer {token}"), ("Authorization", "Bearer agent-second-credential")],
                [("Authorization", "Bearer agent-second-credential"), ("Authorization", f"Bearer {token}")],
                [("Authorization", "Basic YWdlbnQ6c2Vjb25k"), ("Authorization", f"Bearer {token}")],
            ):
                response = await http.post("/g/sales/mcp", json=body, headers=[*base, *pair])
                assert response.status_code == 400, response.text
                assert response.json()["error"] == "invalid_request"
            # With one Authorization header the same member gets through, so the refusals above were about the pair.
            async with gateway_client(f"{bastion}/g/sales/mcp", token, mode) as client:
                assert _text(await client.call_tool("crm__whoami", {})) == f"Bearer {_credential(0)}"
    assert not _leaked(recorder, {"agent-second-credential", "YWdlbnQ6c2Vjb25k"})
    assert [c.authorization for c in recorder.tool_calls] == [f"Bearer {_credential(0)}"]


@pytest.mark.parametrize("mode", MODES)
async def test_a_member_without_an_identity_for_a_per_user_server_is_told_to_enroll_and_nothing_is_sent(
    mode: str, settings: Settings, store: Store, vault: Any, hasher: KeyHasher, operator: Actor
) -> None:
    crm, erp = Recorder(), Recorder()
    async with serving(recording_upstream(crm)) as crm_url, serving(recording_upstream(erp)) as erp_url:
        await _crm_gateway(store, operator, f"{crm_url}/mcp")
        token, _identity = await _member(store, vault, hasher, operator, "ada@example.com", _credential(0))
        # A second per-user server joins the gateway after Ada connected: her connection has no identity for it.
        await servers.create(
            store,
            operator,
            ServerSpec("erp", Transport.STREAMABLE_HTTP, url=f"{erp_url}/mcp", auth_kind=AuthKind.BEARER),
        )
        await gateways.update(
            store, operator, "sales", {"servers": [GatewayServerSpec("crm"), GatewayServerSpec("erp")]}
        )
        async with (
            serving(create_app(settings, store)) as bastion,
            gateway_client(f"{bastion}/g/sales/mcp", token, mode) as client,
        ):
            listed = {t.name for t in (await client.list_tools()).tools}
            assert "crm__whoami" in listed
            assert not {n for n in listed if n.startswith("erp__")}
            with pytest.raises(MCPError) as caught:
                await client.call_tool("erp__whoami", {"nonce": "no-identity"})
            assert caught.value.code == IDENTITY_REQUIRED
            assert "enroll" in caught.value.message
            assert caught.value.data == {"code": "identity_required"}
            # The member's other server still works on the same session.
            assert _text(await client.call_tool("crm__whoami", {})) == f"Bearer {_credential(0)}"
    assert erp.tool_calls == []
    assert erp.header_lines == []  # not even a handshake: Bastion had nothing to send as Ada
    assert "no-identity" not in {c.arguments.get("nonce") for c in crm.tool_calls}


@pytest.mark.parametrize("mode", MODES)
async def test_a_member_whose_identity_was_deleted_is_told_to_enroll_and_nothing_is_sent(
    mode: str, settings: Settings, store: Store, vault: Any, hasher: KeyHasher, operator: Actor
) -> None:
    recorder = Recorder()
    async with serving(recording_upstream(recorder)) as upstream:
        await _crm_gateway(store, operator, f"{upstream}/mcp")
        ada, ada_identity = await _member(store, vault, hasher, operator, "ada@example.com", _credential(0))
        bob, _bob_identity = await _member(store, vault, hasher, operator, "bob@example.com", _credential(1))
        async with (
            serving(create_app(settings, store)) as bastion,
            gateway_client(f"{bastion}/g/sales/mcp", ada, mode) as as_ada,
            gateway_client(f"{bastion}/g/sales/mcp", bob, mode) as as_bob,
        ):
            # Both have a warm pooled upstream session before Ada's identity goes.
            assert _text(await as_ada.call_tool("crm__whoami", {"nonce": "before"})) == f"Bearer {_credential(0)}"
            assert _text(await as_bob.call_tool("crm__whoami", {})) == f"Bearer {_credential(1)}"
            await identities.delete(store, operator, ada_identity)
            for attempt in range(3):
                with pytest.raises(MCPError) as caught:
                    await as_ada.call_tool("crm__whoami", {"nonce": f"after-{attempt}"})
                assert caught.value.code == IDENTITY_REQUIRED
                assert "enroll" in caught.value.message
            # Bob is untouched, and never sees Ada's credential.
            assert _text(await as_bob.call_tool("crm__whoami", {})) == f"Bearer {_credential(1)}"
    nonces = [c.arguments.get("nonce") for c in recorder.tool_calls]
    assert "before" in nonces
    assert not [n for n in nonces if str(n).startswith("after-")]
