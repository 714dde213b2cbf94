"""Admin edits never break calls: callers in both protocol eras go on while servers and identities are edited.

Edits that leave how a server is reached alone (a description, a label, the same token pasted again) close
nothing; an edit of how it is reached (its call timeout) moves new calls to fresh upstream sessions while the
calls already on the old ones finish there. Either way every call is answered with its result.
"""

from __future__ import annotations

from typing import Any, Final

import anyio
import pytest

from bastion.db.store import Store
from bastion.domain.actor import Actor
from bastion.domain.identities import bearer_secret
from bastion.domain.models import AuthKind, ProtocolEra, Transport
from bastion.domain.specs import GatewayServerSpec, GatewaySpec, HostSpec, MemberSpec, ServerSpec
from bastion.services import connections, gateways, hosts, identities, members, servers
from bastion.services.apikeys import KeyHasher
from bastion.settings import Settings
from bastion.web.app import create_app
from tests.mcp_support import Recorder, gateway_client, recording_upstream, serving
from tests.processes import HEAVY_TIMEOUT_S

pytestmark = [pytest.mark.anyio, pytest.mark.e2e, pytest.mark.timeout(HEAVY_TIMEOUT_S)]
CALLERS_PER_ERA: Final = 3
ROUNDS: Final = 6
CREDENTIAL: Final = "ada-own-crm-token"
SERVERS: Final = {"legacy": ("crm", ProtocolEra.LEGACY), "2026-07-28": ("crm2026", ProtocolEra.MODERN)}


async def test_calls_in_both_eras_all_answer_while_servers_and_identities_are_edited(
    settings: Settings, store: Store, vault: Any, hasher: KeyHasher, operator: Actor
) -> None:
    recorder = Recorder()
    async with serving(recording_upstream(recorder)) as upstream:
        for name, era in SERVERS.values():
            spec = ServerSpec(
                name, Transport.STREAMABLE_HTTP, url=f"{upstream}/mcp", auth_kind=AuthKind.BEARER, era=era
            )
            await servers.create(store, operator, spec)
        mounted = tuple(GatewayServerSpec(name) for name, _era in SERVERS.values())
        await gateways.create(store, operator, GatewaySpec("g", servers=mounted))
        await hosts.create(store, operator, HostSpec("agent"))
        await members.create(store, operator, MemberSpec("ada@example.com", "Ada"))
        owned = [
            await identities.create(
                store, vault, hasher, operator, server=name, owner="ada@example.com", secret=bearer_secret(CREDENTIAL)
            )
            for name, _era in SERVERS.values()
        ]
        _c, _t, token = await connections.create(
            store, hasher, operator, host="agent", gateway="g", member="ada@example.com"
        )
        answered: list[str] = []
        failed: list[str] = []
        editing_done = anyio.Event()

        async def caller(url: str, mode: str, number: int) -> None:
            tool = f"{SERVERS[mode][0]}__echo"
            async with gateway_client(url, token, mode) as client:
                sent = 0
                while not editing_done.is_set() or sent < 3:
                    sent += 1
                    text = f"{mode}-{number}-{sent}"
                    try:
                        result = await client.call_tool(tool, {"text": text})
                    except Exception as exc:  # noqa: BLE001  every failure is collected and shown
                        failed.append(f"{text}: {exc!r}")
                        continue
                    echoed = getattr(result.content[0], "text", None) if result.content else None
                    (answered if echoed == text and not result.is_error else failed).append(f"{text}: {echoed}")

        async def edit() -> None:
            for n in range(ROUNDS):
                for name, _era in SERVERS.values():
                    await servers.update(store, operator, name, {"description": f"edit {n}"})
                    await anyio.sleep(0.03)
                    await servers.update(store, operator, name, {"call_timeout_s": 30.0 + n})  # how it is reached
                    await anyio.sleep(0.03)
                for identity in owned:
                    await identities.update(
                        store, vault, hasher, operator, identity.id, secret=bearer_secret(CREDENTIAL)
                    )
                    await identities.update(store, vault, hasher, operator, identity.id, label=f"Ada's, edit {n}")
                    await anyio.sleep(0.03)
            editing_done.set()

        async with serving(create_app(settings, store)) as bastion:
            url = f"{bastion}/g/g/mcp"
            with anyio.fail_after(120):
                async with anyio.create_task_group() as tasks:
                    for mode in SERVERS:
                        for number in range(CALLERS_PER_ERA):
                            tasks.start_soon(caller, url, mode, number)
                    tasks.start_soon(edit)
    assert failed == []
    assert len(answered) >= 2 * CALLERS_PER_ERA * 3
    # Every call reached the upstream with Ada's own token, whatever was edited meanwhile.
    assert {call.headers.get("authorization") for call in recorder.tool_calls} == {f"Bearer {CREDENTIAL}"}
