"""Admin changes hold at once, whichever process makes them: the CLI's change and the very next call.

A gateway serves in this process (its lifespan running, as under `bastion serve`) while the real `bastion`
executable changes things in a process of its own, on the same database: SQLite (the change reaches the server
through the database's change log) and PostgreSQL (through LISTEN/NOTIFY).
"""

from __future__ import annotations

import json
from collections.abc import Awaitable, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any, Final

import anyio
import httpx2
import pytest
import sqlalchemy as sa
from mcp.shared.exceptions import MCPError

from bastion.db import schema
from bastion.db.store import Store
from bastion.domain.actor import Actor
from bastion.domain.models import Transport
from bastion.domain.specs import ServerSpec
from bastion.pipeline.errors import POLICY_DENIED
from bastion.services import hosts, members, principals, tokens
from bastion.services.apikeys import KeyHasher
from bastion.settings import Settings
from bastion.web.app import create_app
from bastion.web.mcp.listeners import ACCESS_ENDED
from tests.mcp_support import Recorder, gateway_client, recording_upstream, serving
from tests.processes import BASTION, clean_env
from tests.worlds import ada_connected

pytestmark = [pytest.mark.anyio, pytest.mark.e2e]


def _cli_env(settings: Settings) -> dict[str, str]:
    """The settings of the server under test, as the CLI process reads them: the same database and secrets."""
    values = {
        "BASTION_DATA_DIR": str(settings.data_dir),
        "BASTION_DATABASE_URL": settings.resolved_database_url,
        "BASTION_VAULT_PRIMARY_KEY_ID": str(settings.vault_primary_key_id),
    }
    for name in ("secret_key", "token_pepper", "audit_key", "vault_keys"):
        secret = getattr(settings, name)
        values[f"BASTION_{name.upper()}"] = secret.get_secret_value()
    return clean_env(**values)


async def _cli(env: dict[str, str], cwd: Path, *args: str) -> Any:
    ran = await anyio.run_process([str(BASTION), *args, "--json"], env=env, cwd=cwd, check=False)
    assert ran.returncode == 0, ran.stderr.decode()
    return json.loads(ran.stdout)


@asynccontextmanager
async def _world(settings: Settings, store: Store, hasher: KeyHasher, operator: Actor, upstream: str) -> Any:
    crm = ServerSpec("crm", Transport.STREAMABLE_HTTP, url=f"{upstream}/mcp")
    token = await ada_connected(store, hasher, operator, crm)
    async with serving(create_app(settings, store)) as bastion:
        yield f"{bastion}/g/g/mcp", token


async def _refusal(url: str, token: str) -> str:
    """Why the next call is refused now, or "allowed": as an agent makes it, a fresh client each time.

    Refused at the door, the answer is the HTTP status and its body (the SDK client would say only "error
    response"); refused by policy, the JSON-RPC error."""
    async with httpx2.AsyncClient(timeout=30) as http:
        door = await http.post(url, json=PING, headers={"Authorization": f"Bearer {token}", **ERA_HEADERS})
    if door.status_code in (401, 403):
        return f"HTTP {door.status_code} {door.text}"
    try:
        async with gateway_client(url, token, "2026-07-28") as client:
            await client.call_tool("crm__whoami", {})
    except Exception as exc:
        refused = _mcp_error_in(exc)
        if refused is None:
            raise
        return f"{refused.code} {refused.message}"
    return "allowed"


def _mcp_error_in(exc: BaseException) -> MCPError | None:
    """The JSON-RPC error a call raised, also from inside the client's task groups (or as the cause of a lost
    subscription: the SDK's iterator says the stream was lost, from the error that ended it)."""
    if isinstance(exc, MCPError):
        return exc
    if exc.__cause__ is not None:
        return _mcp_error_in(exc.__cause__)
    if isinstance(exc, BaseExceptionGroup):
        for inner in exc.exceptions:
            found = _mcp_error_in(inner)
            if found is not None:
                return found
    return None


PING: Final = {"jsonrpc": "2.0", "id": 1, "method": "ping", "params": {}}
ERA_HEADERS: Final = {
    "accept": "application/json, text/event-stream",
    "content-type": "application/json",
    "mcp-protocol-version": "2026-07-28",
}


async def test_cli_changes_hold_for_the_very_next_call_of_a_running_gateway(
    settings: Settings, store: Store, hasher: KeyHasher, operator: Actor, tmp_path: Path
) -> None:
    recorder = Recorder()
    env = _cli_env(settings)
    async with (
        serving(recording_upstream(recorder)) as upstream,
        _world(settings, store, hasher, operator, upstream) as (url, token),
    ):
        assert await _refusal(url, token) == "allowed"

        await _cli(env, tmp_path, "host", "disable", "agent")
        refused = await _refusal(url, token)
        assert "disabled" in refused, refused
        await _cli(env, tmp_path, "host", "enable", "agent")
        assert await _refusal(url, token) == "allowed"

        await _cli(
            env,
            tmp_path,
            "policy",
            "add",
            "--effect",
            "deny",
            "--subject-kind",
            "member",
            "--subject",
            "ada@example.com",
            "--server",
            "crm",
            "--name",
            "whoami",
        )
        assert (await _refusal(url, token)).startswith(str(POLICY_DENIED))
        for listed in await _cli(env, tmp_path, "policy", "list"):
            await _cli(env, tmp_path, "policy", "remove", listed["id"])
        assert await _refusal(url, token) == "allowed"

        # Provisioning narrowed, then widened again: the tool goes and comes back for the very next call.
        await _cli(env, tmp_path, "gateway", "update", "g", "--tools", "crm=block_all")
        assert "whoami" in await _refusal(url, token)
        await _cli(env, tmp_path, "gateway", "update", "g", "--tools", "crm=allow_all")
        assert await _refusal(url, token) == "allowed"

        await _cli(env, tmp_path, "token", "revoke", (await _cli(env, tmp_path, "token", "list"))[0]["id"])
        refused = await _refusal(url, token)
        assert "revoked" in refused or "401" in refused, refused


async def test_a_look_up_held_between_its_read_and_its_insert_never_undoes_a_disable(
    store: Store, hasher: KeyHasher, operator: Actor, monkeypatch: pytest.MonkeyPatch
) -> None:
    crm = ServerSpec("crm", Transport.STREAMABLE_HTTP, url="https://crm.example/mcp")
    token = await ada_connected(store, hasher, operator, crm)
    resolver = principals.Resolver(store, hasher, cache_ttl_s=300)
    original = store.transaction
    read, go_on = anyio.Event(), anyio.Event()

    @asynccontextmanager
    async def held() -> Any:
        async with original() as conn:
            yield conn
        read.set()  # the token row has been read (host enabled); the answer is not cached yet
        await go_on.wait()

    monkeypatch.setattr(store, "transaction", held)
    async with anyio.create_task_group() as tasks:
        tasks.start_soon(resolver.resolve, token)
        await read.wait()
        monkeypatch.setattr(store, "transaction", original)
        await hosts.set_enabled(store, operator, "agent", False)  # commits and publishes while the look-up waits
        go_on.set()
    with pytest.raises(principals.HostDisabled):
        await resolver.resolve(token)
    resolver.close()


HANDSHAKE_HEADERS: Final = {"accept": "application/json, text/event-stream", "content-type": "application/json"}
INITIALIZE: Final = {
    "jsonrpc": "2.0",
    "id": 1,
    "method": "initialize",
    "params": {"protocolVersion": "2025-11-25", "capabilities": {}, "clientInfo": {"name": "agent", "version": "1"}},
}


async def _disable_host(store: Store, operator: Actor, _token_id: str) -> None:
    await hosts.set_enabled(store, operator, "agent", False)


async def _revoke_token(store: Store, operator: Actor, token_id: str) -> None:
    await tokens.revoke(store, operator, token_id)


async def _disable_member(store: Store, operator: Actor, _token_id: str) -> None:
    await members.update(store, operator, "ada@example.com", {"status": "disabled"})


@pytest.mark.parametrize("change", [_disable_host, _revoke_token, _disable_member], ids=["host", "token", "member"])
async def test_what_is_open_for_a_token_ends_when_a_change_refuses_it(
    change: Callable[[Store, Actor, str], Awaitable[None]],
    settings: Settings,
    store: Store,
    hasher: KeyHasher,
    operator: Actor,
) -> None:
    """A handshake-era session with its GET stream open and a 2026-era listen stream, both of one token: the change
    ends both, the listen stream saying why, and the session serves nothing more."""
    recorder = Recorder()
    async with (
        serving(recording_upstream(recorder)) as upstream,
        _world(settings, store, hasher, operator, upstream) as (url, token),
        httpx2.AsyncClient(timeout=30, headers={"Authorization": f"Bearer {token}"}) as http,
    ):
        async with store.transaction() as conn:
            token_id = (await conn.execute(sa.select(schema.access_tokens.c.id))).scalar_one()
        opened = await http.post(url, json=INITIALIZE, headers=HANDSHAKE_HEADERS)
        assert opened.status_code == 200, opened.text
        session = {**HANDSHAKE_HEADERS, "mcp-session-id": opened.headers["mcp-session-id"]}
        session["mcp-protocol-version"] = "2025-11-25"
        initialized = {"jsonrpc": "2.0", "method": "notifications/initialized"}
        assert (await http.post(url, json=initialized, headers=session)).status_code == 202
        ended: dict[str, str] = {}

        async def get_stream(ready: anyio.Event) -> None:
            async with http.stream("GET", url, headers={**session, "accept": "text/event-stream"}) as stream:
                assert stream.status_code == 200
                ready.set()
                async for _chunk in stream.aiter_bytes():
                    pass
            ended["get"] = "closed"

        async def listen_stream(ready: anyio.Event) -> None:
            try:
                async with (
                    gateway_client(url, token, "2026-07-28") as client,
                    client.listen(tools_list_changed=True) as subscription,
                ):
                    ready.set()
                    async for _event in subscription:
                        pass
            except Exception as exc:
                refused = _mcp_error_in(exc)
                if refused is None:
                    raise
                ended["listen"] = f"{refused.code} {refused.message}"

        with anyio.fail_after(30):
            async with anyio.create_task_group() as streams:
                for stream in (get_stream, listen_stream):
                    ready = anyio.Event()
                    streams.start_soon(stream, ready)
                    await ready.wait()
                await change(store, operator, token_id)
        assert ended["get"] == "closed"
        code, _, why = ended["listen"].partition(" ")
        assert int(code) == ACCESS_ENDED and why.startswith("access ended:"), ended
        # The session serves nothing more: refused at the door now, and unknown once the token would be let in.
        call = {"jsonrpc": "2.0", "id": 2, "method": "tools/list", "params": {}}
        assert (await http.post(url, json=call, headers=session)).status_code in (401, 403)
