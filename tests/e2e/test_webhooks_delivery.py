"""Webhooks end to end: `bastion serve` (two replicas on PostgreSQL) delivers signed events to a real receiver that
verifies each with the official `standardwebhooks` package; the agent redeems its claim code with its host key;
a receiver that refuses for a while gets the event once it answers again; every event arrives once."""

from __future__ import annotations

import itertools
from collections import Counter
from collections.abc import Awaitable, Callable, Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path
from typing import Any

import anyio
import httpx2
import pytest

from bastion.db.store import Store
from bastion.domain.actor import Actor
from bastion.domain.capabilities import OWNER_ROLE
from bastion.services.apikeys import KeyHasher
from bastion.settings import Settings
from tests.conftest import member_with_key
from tests.mcp_support import serving
from tests.processes import Server, clean_env
from tests.processes import serving as serving_process
from tests.webhooks.receiver import PATH, Receiver, verify

pytestmark = [pytest.mark.anyio, pytest.mark.e2e]
PUBLIC_URL = "https://bastion.example.com"
TOGGLES = 6
WAIT_S = 30


@contextmanager
def replicas(settings: Settings, tmp_path: Path, count: int) -> Iterator[list[Server]]:
    secrets = {
        name: getattr(settings, name).get_secret_value()
        for name in ("secret_key", "token_pepper", "audit_key", "vault_keys")
    }
    env = clean_env(
        BASTION_DATA_DIR=str(tmp_path / "data"),
        BASTION_DATABASE_URL=settings.resolved_database_url,
        BASTION_PUBLIC_URL=PUBLIC_URL,
        BASTION_VAULT_PRIMARY_KEY_ID=str(settings.vault_primary_key_id),
        **{f"BASTION_{k.upper()}": v for k, v in secrets.items()},
    )
    with ExitStack() as stack:
        yield [stack.enter_context(serving_process(env, tmp_path)) for _ in range(count)]


async def until(check: Callable[[], Awaitable[bool]]) -> None:
    """Poll ``check`` (bounded by the caller's ``fail_after``): for state only the server's API shows."""
    for _ in itertools.count():
        if await check():
            return
        await anyio.sleep(0.05)


async def test_events_reach_the_agent_signed_its_claim_code_redeems_and_none_is_lost_or_repeated(
    settings: Settings, store: Store, hasher: KeyHasher, operator: Actor, tmp_path: Path
) -> None:
    owner = await member_with_key(store, hasher, operator, "owner@example.com", OWNER_ROLE)
    count = 2 if store.dialect == "postgresql" else 1  # SQLite serves from one process
    receiver = Receiver()
    async with serving(receiver.app()) as receiver_url:
        with replicas(settings, tmp_path, count) as servers:
            first, last = servers[0].base_url + "/api/v1", servers[-1].base_url + "/api/v1"
            async with httpx2.AsyncClient(headers=owner, timeout=20) as api:

                async def post(url: str, body: dict[str, Any] | None = None) -> dict[str, Any]:
                    response = await api.post(url, json=body)
                    assert response.is_success, response.text
                    result: dict[str, Any] = response.json()
                    return result

                await post(f"{first}/hosts", {"name": "agent"})
                await post(f"{first}/gateways", {"slug": "sales"})
                await post(f"{first}/members", {"email": "ada@example.com", "name": "Ada", "role": "member"})
                created = await post(f"{first}/hosts/agent/webhooks", {"url": receiver_url + PATH})
                endpoint, secret = created["endpoint"], created["secret"]
                receiver.secrets.append(secret)
                host_key = (await post(f"{first}/hosts/agent/keys", {"name": "agent"}))["secret"]

                # Ada is connected: the agent hears of it, signed, with a claim code instead of the token.
                connected = await post(
                    f"{last}/connections", {"member": "ada@example.com", "host": "agent", "gateway": "sales"}
                )
                with anyio.fail_after(WAIT_S):
                    (event,) = await receiver.wait_for(1)
                assert event.verified_by == (0,) and verify(secret, event)["type"] == "connection.created"
                data = event.data
                assert (data["member"]["email"], data["token"], data["mcp_url"]) == (
                    "ada@example.com",
                    None,
                    f"{PUBLIC_URL}/g/sales/mcp",
                )
                redeemed = await api.post(
                    f"{first}/claims/redeem",
                    json={"claim_code": data["claim_code"]},
                    headers={"Authorization": f"Bearer {host_key}"},
                )
                assert redeemed.status_code == 200, redeemed.text
                assert redeemed.json()["token"] == connected["secret"]

                # The agent refuses for a while (503): the event is retried, same webhook-id, until it answers.
                receiver.status = 503
                await post(f"{first}/tokens/{connected['token']['id']}/revoke")
                with anyio.fail_after(WAIT_S):
                    refused = (await receiver.wait_for(2))[1]
                    receiver.status = 204
                    retried = (await receiver.wait_for(3))[2]
                assert refused.webhook_id == retried.webhook_id and retried.event["type"] == "token.revoked"
                assert retried.verified_by == (0,)

                # Many changes across the replicas: each event arrives, once.
                for n in range(TOGGLES):
                    change = "disable" if n % 2 == 0 else "enable"
                    await post(f"{servers[n % count].base_url}/api/v1/hosts/agent/{change}")
                with anyio.fail_after(WAIT_S):
                    await receiver.wait_for(3 + TOGGLES)

                    async def all_delivered() -> bool:
                        listed = await api.get(f"{first}/hosts/agent/webhooks/{endpoint['id']}/events")
                        return {e["status"] for e in listed.json()["items"]} == {"delivered"}

                    await until(all_delivered)
                log = (await api.get(f"{first}/hosts/agent/webhooks/{endpoint['id']}/deliveries")).json()["items"]
    ids = Counter(r.webhook_id for r in receiver.received)
    assert len(ids) == 2 + TOGGLES
    assert ids[retried.webhook_id] == 2 and set(ids.values()) - {1} == {2}
    assert all(r.verified_by == (0,) for r in receiver.received)
    versions = [r.data["version"] for r in receiver.received if r.event["type"].startswith("host.")]
    assert sorted(versions) == list(range(1, TOGGLES + 1))
    assert len(log) == len(receiver.received) and [d["outcome"] for d in log].count("failed") == 1
