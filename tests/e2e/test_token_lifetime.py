"""BASTION_TOKEN_MAX_LIFETIME_DAYS: tokens and host keys minted under it expire, and the gateway refuses them then."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any

import httpx2
import pytest
import time_machine

from bastion.db.store import Store
from bastion.domain.actor import Actor
from bastion.domain.specs import HostSpec
from bastion.errors import ValidationFailed
from bastion.services import host_keys, hosts
from bastion.services.apikeys import KeyHasher
from bastion.settings import Settings
from bastion.web.app import create_app
from bastion.wiring import store_from
from tests.e2e.test_audit_calls import _world
from tests.e2e.test_bounded_inputs import CALL, MODERN_HEADERS
from tests.mcp_support import Recorder, recording_upstream, serving

pytestmark = [pytest.mark.anyio, pytest.mark.e2e]
LIFETIME = timedelta(days=1)


async def test_the_setting_reaches_the_store_that_mints(settings: Settings) -> None:
    for days, lifetime in ((1.5, timedelta(days=1.5)), (None, None)):
        made = store_from(settings.model_copy(update={"token_max_lifetime_days": days}))
        try:
            assert made.token_lifetime == lifetime
        finally:
            await made.close()


async def test_a_token_minted_under_the_longest_lifetime_is_refused_at_the_gateway_once_it_has_passed(
    settings: Settings, store: Store, vault: Any, hasher: KeyHasher, operator: Actor
) -> None:
    store.token_lifetime = LIFETIME  # what store_from does with BASTION_TOKEN_MAX_LIFETIME_DAYS=1
    recorder = Recorder()
    async with serving(recording_upstream(recorder)) as upstream:
        minted = datetime.now(UTC)
        tokens = await _world(store, vault, hasher, operator, f"{upstream}/mcp")
        headers = {**MODERN_HEADERS, "Authorization": f"Bearer {tokens['ada']}", "Mcp-Method": "tools/call"}
        headers["Mcp-Name"] = "crm__echo"
        async with serving(create_app(settings, store)) as bastion, httpx2.AsyncClient(base_url=bastion) as http:
            assert (await http.post("/g/sales/mcp", json=CALL, headers=headers)).status_code == 200
            with time_machine.travel(minted + LIFETIME + timedelta(minutes=1), tick=True):
                refused = await http.post("/g/sales/mcp", json=CALL, headers=headers)
    assert refused.status_code == 401
    challenge = refused.headers["www-authenticate"]
    assert 'error="invalid_token"' in challenge and 'error_description="the access token has expired"' in challenge
    assert [c.arguments for c in recorder.tool_calls] == [{"text": "still here"}]


async def test_a_host_key_gets_the_longest_lifetime_and_may_not_ask_for_more(
    store: Store, hasher: KeyHasher, operator: Actor
) -> None:
    store.token_lifetime = LIFETIME
    await hosts.create(store, operator, HostSpec("agent"))
    before = datetime.now(UTC)
    key, _secret = await host_keys.create(store, hasher, operator, "agent", name="ci")
    assert key.expires_at is not None and before + LIFETIME <= key.expires_at <= datetime.now(UTC) + LIFETIME
    with pytest.raises(ValidationFailed) as refused:
        await host_keys.create(store, hasher, operator, "agent", name="long", expires_at=before + timedelta(days=2))
    assert refused.value.field == "expires_at"
