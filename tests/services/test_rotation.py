"""Online key rotation: calls keep working while data keys move to the new primary; retire waits for the last row."""

from __future__ import annotations

import os

import anyio
import pytest

from bastion.db.store import Store
from bastion.domain.actor import Actor
from bastion.domain.identities import bearer_secret
from bastion.domain.models import Transport
from bastion.domain.specs import GatewayServerSpec, GatewaySpec, HostSpec, MemberSpec, ServerSpec
from bastion.errors import Conflict
from bastion.services import connections, gateways, hosts, identities, members, rotation, servers
from bastion.services.apikeys import KeyHasher
from bastion.services.principals import Resolver
from bastion.vault.crypto import Keyring
from bastion.vault.sealer import Vault

pytestmark = pytest.mark.anyio
PEOPLE = 24


async def test_rotation_under_load_loses_no_call_and_leaves_nothing_on_the_old_key(
    store: Store, hasher: KeyHasher, operator: Actor
) -> None:
    old_key, new_key = os.urandom(32), os.urandom(32)
    before = Vault(Keyring({"old": old_key}, "old"))
    await servers.create(store, operator, ServerSpec("bq", Transport.STREAMABLE_HTTP, url="https://bq.example.com/mcp"))
    await gateways.create(store, operator, GatewaySpec("analytics", servers=(GatewayServerSpec("bq"),)))
    await hosts.create(store, operator, HostSpec("agent"))
    tokens: list[tuple[str, str]] = []
    for n in range(PEOPLE):
        email = f"person{n}@example.com"
        await members.create(store, operator, MemberSpec(email, f"Person {n}"))
        await identities.create(
            store, before, hasher, operator, server="bq", owner=email, secret=bearer_secret(f"credential-of-person-{n}")
        )
        _c, _t, secret = await connections.create(
            store, hasher, operator, host="agent", gateway="analytics", member=email
        )
        tokens.append((secret, f"credential-of-person-{n}"))

    rotated = Keyring({"old": old_key, "new": new_key}, "new")
    # The serving side starts with the old keyring and learns the new key when it first meets it.
    serving = Vault(Keyring({"old": old_key}, "old"), reload=lambda: rotated)
    rotator = Vault(rotated)
    with pytest.raises(Conflict, match="still seals"):
        await rotation.retire(store, rotator, operator, "old")

    resolver = Resolver(store, hasher, cache_ttl_s=0)
    failures: list[BaseException] = []
    calls = 0
    moved_batches: list[int] = []
    done = anyio.Event()

    async def caller() -> None:
        nonlocal calls
        while not done.is_set():
            for secret, expected in tokens:
                try:
                    principal = await resolver.resolve(secret, gateway="analytics")
                    opened = await identities.open_secret(
                        store, serving, principal.workspace_id, principal.identities["bq"]
                    )
                    assert opened.token == expected
                    calls += 1
                except BaseException as exc:  # noqa: BLE001  every failure is counted, none may happen
                    failures.append(exc)
                    return

    async def rotate() -> None:
        try:
            await rotation.rewrap(store, rotator, operator, batch=5, progress=moved_batches.append)
        finally:
            done.set()

    with anyio.fail_after(60):
        async with anyio.create_task_group() as tg:
            tg.start_soon(caller)
            tg.start_soon(caller)
            tg.start_soon(rotate)

    assert failures == []
    assert calls >= PEOPLE
    assert sum(moved_batches) == PEOPLE
    assert await rotation.remaining(store, rotator) == 0
    usage = {u.key_id: u for u in await rotation.usage(store, rotator)}
    assert usage["old"].rows == 0
    assert usage["new"].rows == PEOPLE
    await rotation.retire(store, rotator, operator, "old")
    with pytest.raises(Conflict, match="primary"):
        await rotation.retire(store, rotator, operator, "new")
    resolver.close()


async def test_startup_refuses_a_keyring_missing_a_key_that_seals_rows(
    store: Store, hasher: KeyHasher, operator: Actor, settings: object
) -> None:
    import base64

    from bastion.cli.boot import check_keyring_covers_database
    from bastion.errors import ConfigError
    from bastion.settings import Settings

    assert isinstance(settings, Settings)
    gone = Vault(Keyring({"gone-key": os.urandom(32)}, "gone-key"))
    await servers.create(store, operator, ServerSpec("bq", Transport.STREAMABLE_HTTP, url="https://bq.example.com/mcp"))
    await members.create(store, operator, MemberSpec("ada@example.com", "Ada"))
    await identities.create(
        store, gone, hasher, operator, server="bq", owner="ada@example.com", secret=bearer_secret("credential-abcdefgh")
    )
    with pytest.raises(ConfigError, match="'gone-key' \\(1 rows\\)"):
        await check_keyring_covers_database(store, settings)
    restored = settings.model_copy(
        update={
            "vault_keys": type(settings.vault_keys)(  # type: ignore[misc]
                settings.vault_keys.get_secret_value()  # type: ignore[union-attr]
                + f",gone-key={base64.b64encode(gone.keyring._keys['gone-key']).decode()}"
            )
        }
    )
    await check_keyring_covers_database(store, restored)
