"""The reference npm server `@modelcontextprotocol/server-everything` behind Bastion, over all three transports.

Bastion calls it over Streamable HTTP, the legacy HTTP+SSE transport and stdio; the official Python SDK
client calls Bastion in both protocol eras. server-everything (TypeScript SDK 1.x) only speaks the
handshake era, so a 2026-07-28 agent exercises Bastion's translation between eras.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import time
from collections.abc import AsyncGenerator, Iterator
from contextlib import asynccontextmanager, contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final

import anyio
import httpx2
import mcp_types as types
import pytest
from mcp import Client
from mcp.client.streamable_http import streamable_http_client

from bastion.db.store import Store
from bastion.domain.actor import Actor
from bastion.domain.identities import bearer_secret
from bastion.domain.models import AuthKind, ProtocolEra, Transport
from bastion.domain.specs import GatewayServerSpec, GatewaySpec, HostSpec, MemberSpec, ServerSpec
from bastion.services import connections, gateways, hosts, identities, members, servers
from bastion.services.apikeys import KeyHasher
from bastion.settings import Settings
from bastion.upstream.pool import Lease, UpstreamPool
from bastion.web.app import create_app
from tests.mcp_support import gateway_client, serving
from tests.processes import free_port

pytestmark = [pytest.mark.anyio, pytest.mark.e2e]

PACKAGE: Final = "@modelcontextprotocol/server-everything"
VERSION: Final = "2026.8.31"
TOOLS_DIR: Final = Path(__file__).resolve().parents[2] / ".tools" / "everything"
ENTRY: Final = TOOLS_DIR / "node_modules" / PACKAGE / "dist" / "index.js"
INSTALL_TIMEOUT_S: Final = 300.0
START_TIMEOUT_S: Final = 20.0
POLL_S: Final = 0.05
CREDENTIAL: Final = "ada-everything-credential"
MODES: Final = ("legacy", "2026-07-28")


def _node() -> str:
    node = shutil.which("node")
    assert node is not None, "server-everything needs Node.js >= 18 on PATH"
    return node


@pytest.fixture(scope="session")
def everything_entry() -> Path:
    """The installed package's entry point, installed from the npm registry into `.tools/everything` on first use."""
    if not ENTRY.is_file():
        npm = shutil.which("npm")
        assert npm is not None, "installing server-everything needs npm on PATH"
        TOOLS_DIR.mkdir(parents=True, exist_ok=True)
        done = subprocess.run(
            [npm, "install", "--prefix", str(TOOLS_DIR), f"{PACKAGE}@{VERSION}", "--no-audit", "--no-fund"],
            capture_output=True,
            text=True,
            timeout=INSTALL_TIMEOUT_S,
            check=False,
        )
        assert done.returncode == 0, f"npm install failed:\n{done.stderr}"
    assert ENTRY.is_file(), f"{ENTRY} is missing after npm install"
    return ENTRY


def _listening(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.settimeout(POLL_S)
        return sock.connect_ex(("127.0.0.1", port)) == 0


@contextmanager
def _everything_over_http(entry: Path, transport: str, log: Path) -> Iterator[int]:
    """`node index.js <transport>` on a free port (it reads PORT), accepting connections on entry, killed on exit."""
    port = free_port()
    env = {"PATH": os.environ.get("PATH", ""), "HOME": str(log.parent), "PORT": str(port)}
    with log.open("wb") as out:
        process = subprocess.Popen(
            [_node(), str(entry), transport], env=env, stdout=out, stderr=subprocess.STDOUT, cwd=log.parent
        )
        try:
            deadline = time.monotonic() + START_TIMEOUT_S
            while not _listening(port):
                try:
                    code = process.wait(timeout=POLL_S)  # paces the loop and notices a crash at once
                except subprocess.TimeoutExpired:
                    if time.monotonic() > deadline:
                        raise AssertionError(
                            f"server-everything ({transport}) did not listen within {START_TIMEOUT_S} s"
                        ) from None
                    continue
                log_text = log.read_text(encoding="utf-8", errors="replace")
                raise AssertionError(f"server-everything ({transport}) exited with {code}:\n{log_text}")
            yield port
        finally:
            if process.poll() is None:
                process.send_signal(signal.SIGKILL)
            process.wait(timeout=10)


@pytest.fixture(scope="module")
def everything_urls(everything_entry: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[Transport, str]]:
    """One server-everything process per HTTP transport for the whole module (each agent session is its own)."""
    logs = tmp_path_factory.mktemp("everything")
    with (
        _everything_over_http(everything_entry, "streamableHttp", logs / "streamable.log") as streamable,
        _everything_over_http(everything_entry, "sse", logs / "sse.log") as sse,
    ):
        yield {
            Transport.STREAMABLE_HTTP: f"http://127.0.0.1:{streamable}/mcp",
            Transport.SSE: f"http://127.0.0.1:{sse}/sse",
        }


@dataclass(frozen=True)
class Route:
    transport: Transport
    era: ProtocolEra

    @property
    def id(self) -> str:
        return f"{self.transport.value}-{self.era.value}"


ROUTES: Final = (
    Route(Transport.STREAMABLE_HTTP, ProtocolEra.AUTO),
    Route(Transport.STREAMABLE_HTTP, ProtocolEra.LEGACY),
    Route(Transport.SSE, ProtocolEra.LEGACY),
    Route(Transport.STDIO, ProtocolEra.AUTO),
)


async def _mount(
    store: Store,
    vault: Any,
    hasher: KeyHasher,
    operator: Actor,
    route: Route,
    urls: dict[Transport, str],
    entry: Path,
    token_env: str | None = None,
) -> str:
    """A gateway `lab` mounting server-everything as `ev` over ``route``; returns Ada's access token."""
    if route.transport is Transport.STDIO:
        spec = ServerSpec(
            "ev",
            Transport.STDIO,
            command=_node(),
            args=(str(entry), "stdio"),
            auth_kind=AuthKind.BEARER,
            era=route.era,
            token_env=token_env,
        )
    else:
        spec = ServerSpec("ev", route.transport, url=urls[route.transport], auth_kind=AuthKind.BEARER, era=route.era)
    await servers.create(store, operator, spec)
    await gateways.create(store, operator, GatewaySpec("lab", servers=(GatewayServerSpec("ev"),)))
    await hosts.create(store, operator, HostSpec("agent"))
    await members.create(store, operator, MemberSpec("ada@example.com", "ada"))
    await identities.create(
        store, vault, hasher, operator, server="ev", owner="ada@example.com", secret=bearer_secret(CREDENTIAL)
    )
    _c, _t, token = await connections.create(
        store, hasher, operator, host="agent", gateway="lab", member="ada@example.com"
    )
    return token


def _text(result: Any) -> str:
    content = result.content[0]
    assert content.type == "text", content
    text: str = content.text
    return text


async def _exercise(settings: Settings, store: Store, token: str, mode: str) -> dict[str, Any]:
    """List and use tools, resources and prompts through Bastion; returns what came back for route-specific checks."""
    async with (
        serving(create_app(settings, store)) as bastion,
        gateway_client(f"{bastion}/g/lab/mcp", token, mode) as client,
    ):
        tools = {t.name: t for t in (await client.list_tools()).tools}
        assert {"ev__echo", "ev__get-sum", "ev__get-env"} <= tools.keys(), sorted(tools)
        assert all(name.startswith("ev__") for name in tools)
        assert tools["ev__get-sum"].input_schema["required"] == ["a", "b"]

        assert _text(await client.call_tool("ev__echo", {"message": "hello through bastion"})) == (
            "Echo: hello through bastion"
        )
        assert _text(await client.call_tool("ev__get-sum", {"a": 2, "b": 40})) == "The sum of 2 and 40 is 42."
        refused = await client.call_tool("ev__get-sum", {"a": "two", "b": 40})
        assert refused.is_error

        resources = {str(r.uri): r for r in (await client.list_resources()).resources}
        doc = "demo://resource/static/document/instructions.md"
        assert doc in resources, sorted(resources)
        read = await client.read_resource(doc)
        assert read.contents[0].mime_type == "text/markdown"
        assert read.contents[0].text.strip()  # type: ignore[union-attr]
        templates = [t.uri_template for t in (await client.list_resource_templates()).resource_templates]
        assert "demo://resource/dynamic/text/{resourceId}" in templates
        dynamic = await client.read_resource("demo://resource/dynamic/text/7")
        assert "7" in dynamic.contents[0].text  # type: ignore[union-attr]

        prompts = {p.name for p in (await client.list_prompts()).prompts}
        assert {"ev__simple-prompt", "ev__args-prompt"} <= prompts, sorted(prompts)
        simple = await client.get_prompt("ev__simple-prompt")
        assert simple.messages[0].content.text == "This is a simple prompt without arguments."  # type: ignore[union-attr]
        args = await client.get_prompt("ev__args-prompt", {"city": "Lisbon", "state": "Lisboa"})
        assert args.messages[0].content.text == "What's weather in Lisbon, Lisboa?"  # type: ignore[union-attr]

        environment: dict[str, str] = json.loads(_text(await client.call_tool("ev__get-env", {})))
    return {"environment": environment}


@pytest.mark.parametrize("db_url", ["sqlite"], indirect=True)
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("route", ROUTES, ids=lambda r: r.id)
@pytest.mark.usefixtures("untraced")
async def test_server_everything_works_behind_bastion_over_every_transport_and_era(
    route: Route,
    mode: str,
    everything_urls: dict[Transport, str],
    everything_entry: Path,
    settings: Settings,
    store: Store,
    vault: Any,
    hasher: KeyHasher,
    operator: Actor,
) -> None:
    token = await _mount(store, vault, hasher, operator, route, everything_urls, everything_entry)
    seen = await _exercise(settings, store, token, mode)
    environment = seen["environment"]
    if route.transport is Transport.STDIO:
        # A stdio upstream gets the member's credential in its environment, and nothing of Bastion's own.
        assert environment.get("BASTION_BEARER_TOKEN") == CREDENTIAL
        assert not [k for k in environment if k.startswith("BASTION_") and k != "BASTION_BEARER_TOKEN"]
    else:
        assert "BASTION_BEARER_TOKEN" not in environment
    assert token not in json.dumps(environment)


@pytest.mark.parametrize("db_url", ["sqlite"], indirect=True)
async def test_a_stdio_server_with_a_token_env_gets_the_person_s_token_in_that_variable_only(
    everything_urls: dict[Transport, str],
    everything_entry: Path,
    settings: Settings,
    store: Store,
    vault: Any,
    hasher: KeyHasher,
    operator: Actor,
) -> None:
    route = Route(Transport.STDIO, ProtocolEra.AUTO)
    token = await _mount(
        store, vault, hasher, operator, route, everything_urls, everything_entry, token_env="EVERYTHING_API_TOKEN"
    )
    environment = (await _exercise(settings, store, token, "2026-07-28"))["environment"]
    assert environment.get("EVERYTHING_API_TOKEN") == CREDENTIAL
    assert "BASTION_BEARER_TOKEN" not in environment
    assert token not in json.dumps(environment)


@pytest.mark.parametrize("db_url", ["postgresql"], indirect=True)
async def test_server_everything_works_behind_bastion_on_postgresql(
    everything_urls: dict[Transport, str],
    everything_entry: Path,
    settings: Settings,
    store: Store,
    vault: Any,
    hasher: KeyHasher,
    operator: Actor,
) -> None:
    route = Route(Transport.STREAMABLE_HTTP, ProtocolEra.AUTO)
    token = await _mount(store, vault, hasher, operator, route, everything_urls, everything_entry)
    await _exercise(settings, store, token, "2026-07-28")


# stdio and HTTP+SSE name no call in a server->client request: Bastion has such sessions take turns.
SAMPLING_ROUTES: Final = tuple(pytest.param(route, id=route.id) for route in (ROUTES[0], ROUTES[2], ROUTES[3]))


@pytest.mark.parametrize("db_url", ["sqlite"], indirect=True)
@pytest.mark.parametrize("route", SAMPLING_ROUTES)
async def test_server_everything_sampling_requests_reach_a_legacy_agent_through_bastion(
    route: Route,
    everything_urls: dict[Transport, str],
    everything_entry: Path,
    settings: Settings,
    store: Store,
    vault: Any,
    hasher: KeyHasher,
    operator: Actor,
) -> None:
    token = await _mount(store, vault, hasher, operator, route, everything_urls, everything_entry)
    asked: list[types.CreateMessageRequestParams] = []

    async def sample(_ctx: Any, params: types.CreateMessageRequestParams) -> types.CreateMessageResult:
        asked.append(params)
        return types.CreateMessageResult(
            role="assistant", content=types.TextContent(type="text", text="sampled by the agent"), model="agent-model"
        )

    async with (
        serving(create_app(settings, store)) as bastion,
        httpx2.AsyncClient(headers={"Authorization": f"Bearer {token}"}, timeout=30) as http,
        Client(
            streamable_http_client(f"{bastion}/g/lab/mcp", http_client=http),
            mode="legacy",
            cache=None,
            sampling_callback=sample,
        ) as client,
    ):
        # server-everything offers this tool only to a client that declared sampling: Bastion declared it for us.
        names = {t.name for t in (await client.list_tools()).tools}
        assert "ev__trigger-sampling-request" in names, sorted(names)
        result = await client.call_tool("ev__trigger-sampling-request", {"prompt": "capital of Portugal?"})
    assert not result.is_error, result
    assert "sampled by the agent" in _text(result)
    assert len(asked) == 1
    assert "capital of Portugal?" in asked[0].messages[0].content.text  # type: ignore[union-attr]


@pytest.mark.parametrize("db_url", ["sqlite"], indirect=True)
@pytest.mark.parametrize("route", (ROUTES[2], ROUTES[3]), ids=lambda r: r.id)
async def test_two_agents_sharing_a_stdio_or_sse_session_each_get_only_their_own_sampling_request(
    route: Route,
    everything_urls: dict[Transport, str],
    everything_entry: Path,
    settings: Settings,
    store: Store,
    vault: Any,
    hasher: KeyHasher,
    operator: Actor,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    token = await _mount(store, vault, hasher, operator, route, everything_urls, everything_entry)
    # A second agent of the same person: same identity and capability profile, so the same pooled session.
    await hosts.create(store, operator, HostSpec("agent-2"))
    _c, _t, token_2 = await connections.create(
        store, hasher, operator, host="agent-2", gateway="lab", member="ada@example.com"
    )
    # Signals when a second call reaches the shared session while the first is being asked to sample.
    second_waits = anyio.Event()
    turn = UpstreamPool.turn

    @asynccontextmanager
    async def observed(pool: UpstreamPool, lease: Lease, wait_s: float) -> AsyncGenerator[None]:
        if lease.turns is not None and lease.turns.lock.locked():
            second_waits.set()
        async with turn(pool, lease, wait_s):
            yield

    monkeypatch.setattr(UpstreamPool, "turn", observed)
    asked: dict[str, list[str]] = {"first": [], "second": []}
    first_asked = anyio.Event()

    def sampler(agent: str) -> Any:
        async def sample(_ctx: Any, params: types.CreateMessageRequestParams) -> types.CreateMessageResult:
            asked[agent].append(params.messages[0].content.text)  # type: ignore[union-attr]
            if agent == "first":
                first_asked.set()  # the first call holds the session: now the second agent calls
                with anyio.fail_after(10):
                    await second_waits.wait()  # the second call is at Bastion while this request is open
            return types.CreateMessageResult(
                role="assistant", content=types.TextContent(type="text", text=f"{agent} answers"), model="m"
            )

        return sample

    results: dict[str, str] = {}

    async def agent(bastion: str, name: str, bearer: str, prompt: str) -> None:
        async with (
            httpx2.AsyncClient(headers={"Authorization": f"Bearer {bearer}"}, timeout=30) as http,
            Client(
                streamable_http_client(f"{bastion}/g/lab/mcp", http_client=http),
                mode="legacy",
                cache=None,
                sampling_callback=sampler(name),
            ) as client,
        ):
            if name == "second":
                with anyio.fail_after(10):
                    await first_asked.wait()
            result = await client.call_tool("ev__trigger-sampling-request", {"prompt": prompt})
            assert not result.is_error, result
            results[name] = _text(result)

    async with serving(create_app(settings, store)) as bastion, anyio.create_task_group() as tg:
        tg.start_soon(agent, bastion, "first", token, "first prompt")
        tg.start_soon(agent, bastion, "second", token_2, "second prompt")
    assert second_waits.is_set()
    assert len(asked["first"]) == 1 and "first prompt" in asked["first"][0], asked
    assert len(asked["second"]) == 1 and "second prompt" in asked["second"][0], asked
    assert "first answers" in results["first"] and "second" not in results["first"], results
    assert "second answers" in results["second"] and "first" not in results["second"], results
