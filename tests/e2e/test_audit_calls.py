"""The audit log, policy, rate limits and content rules on real MCP calls through a served gateway."""

from __future__ import annotations

import json
import logging
from typing import Any

import anyio
import httpx2
import pytest
import sqlalchemy as sa
from mcp.shared.exceptions import MCPError

from bastion.db import schema
from bastion.db.store import Store
from bastion.domain.actor import Actor
from bastion.domain.content import ContentAction, ContentTarget
from bastion.domain.identities import bearer_secret
from bastion.domain.models import AuthKind, Provisioning, ProvisionMode, Transport
from bastion.domain.policy import Effect, SubjectKind
from bastion.domain.ratelimits import LimitPer, Strategy
from bastion.domain.specs import GatewayServerSpec, GatewaySpec, HostSpec, MemberSpec, ServerSpec
from bastion.pipeline.errors import AUDIT_UNAVAILABLE, CONTENT_BLOCKED, POLICY_DENIED, RATE_LIMITED
from bastion.services import connections, gateways, hosts, identities, members, rules, servers
from bastion.services.apikeys import KeyHasher
from bastion.settings import Settings
from bastion.web.app import create_app
from tests.conftest import member_with_key
from tests.mcp_support import Recorder, gateway_client, recording_upstream, serving

pytestmark = [pytest.mark.anyio, pytest.mark.e2e]
MODES = ("legacy", "2026-07-28")
ADA_CREDENTIAL = "ada-canary-upstream-credential-7f3a"
BOB_CREDENTIAL = "bob-canary-upstream-credential-9c1e"


async def _world(store: Store, vault: Any, hasher: KeyHasher, operator: Actor, upstream_url: str) -> dict[str, str]:
    await servers.create(
        store, operator, ServerSpec("crm", Transport.STREAMABLE_HTTP, url=upstream_url, auth_kind=AuthKind.BEARER)
    )
    tools = Provisioning(ProvisionMode.ALLOW_SELECTED, frozenset({"whoami", "echo", "wait"}))
    await gateways.create(store, operator, GatewaySpec("sales", servers=(GatewayServerSpec("crm", tools=tools),)))
    await hosts.create(store, operator, HostSpec("agent"))
    tokens: dict[str, str] = {}
    for person, credential in (("ada", ADA_CREDENTIAL), ("bob", BOB_CREDENTIAL)):
        email = f"{person}@example.com"
        await members.create(store, operator, MemberSpec(email, person))
        await identities.create(
            store, vault, hasher, operator, server="crm", owner=email, secret=bearer_secret(credential)
        )
        _c, _t, tokens[person] = await connections.create(
            store, hasher, operator, host="agent", gateway="sales", member=email
        )
    return tokens


async def _events(store: Store, kind: str = "mcp") -> list[dict[str, Any]]:
    async with store.transaction() as conn:
        query = sa.select(schema.audit_events).where(schema.audit_events.c.kind == kind)
        rows = (await conn.execute(query.order_by(schema.audit_events.c.seq))).all()
    return [dict(row._mapping) for row in rows]


async def _verified(store: Store, settings: Settings) -> None:
    assert settings.audit_key is not None
    from bastion.services import audit_query

    verdict = await audit_query.verify(store, settings.audit_key.get_secret_value().encode("utf-8"))
    assert verdict.broken is None, verdict.broken


@pytest.mark.parametrize("mode", MODES)
async def test_the_audit_api_shows_a_call_sealed_as_soon_as_it_has_answered(
    mode: str,
    settings: Settings,
    store: Store,
    vault: Any,
    hasher: KeyHasher,
    operator: Actor,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # Seals are written in the background (after the delay, or woken by the next call): a reader on this
    # process must not see the call it just made as pending meanwhile. The delay is put out of reach.
    monkeypatch.setattr("bastion.services.audit.SEAL_DELAY_S", 3600.0)
    admin = await member_with_key(store, hasher, operator, "auditor@example.com", "admin")
    async with serving(recording_upstream(Recorder())) as upstream:
        tokens = await _world(store, vault, hasher, operator, f"{upstream}/mcp")
        async with serving(create_app(settings, store)) as bastion:
            async with gateway_client(f"{bastion}/g/sales/mcp", tokens["ada"], mode) as client:
                await client.list_tools()
                for text in ("one", "two"):
                    await client.call_tool("crm__echo", {"text": text})
            async with httpx2.AsyncClient(base_url=f"{bastion}/api/v1", headers=admin) as api:
                listed = (await api.get("/audit/events", params={"method": "tools/call"})).json()["items"]
                assert [(e["actor"], e["outcome"], e["seq"] is not None) for e in listed] == [
                    ("ada@example.com", "ok", True)
                ] * 2


@pytest.mark.parametrize("mode", MODES)
async def test_every_call_writes_exactly_one_sealed_event_in_the_callers_name_under_concurrency(
    mode: str, settings: Settings, store: Store, vault: Any, hasher: KeyHasher, operator: Actor
) -> None:
    recorder = Recorder()
    calls_each = 20
    async with serving(recording_upstream(recorder)) as upstream:
        tokens = await _world(store, vault, hasher, operator, f"{upstream}/mcp")
        async with serving(create_app(settings, store)) as bastion:
            url = f"{bastion}/g/sales/mcp"

            async def person(name: str) -> None:
                async with gateway_client(url, tokens[name], mode) as client:
                    # Listed first, so the client does not list again on its own to check each result's schema.
                    await client.list_tools()
                    async with anyio.create_task_group() as tg:
                        for i in range(calls_each):
                            tg.start_soon(client.call_tool, "crm__echo", {"text": f"{name}-{i}"})

            async with anyio.create_task_group() as tg:
                tg.start_soon(person, "ada")
                tg.start_soon(person, "bob")
    # The gateway has stopped: everything it queued is flushed and sealed.
    events = await _events(store)
    calls = [e for e in events if e["method"] == "tools/call"]
    assert len(calls) == 2 * calls_each == len(recorder.tool_calls)
    assert sorted(e["actor"] for e in calls) == ["ada@example.com"] * calls_each + ["bob@example.com"] * calls_each
    assert len([e for e in events if e["method"] == "tools/list"]) == 2
    assert all(e["seq"] is not None and e["outcome"] == "ok" and e["upstream_status"] == "ok" for e in events)
    assert all(e["server"] == "crm" and e["name"] == "crm__echo" and e["decision"] == "allow" for e in calls)
    assert all(e["latency_us"] > 0 and e["args_hmac"] and e["host_id"] and e["token_id"] for e in calls)
    assert len({e["id"] for e in events}) == len(events)
    await _verified(store, settings)


async def test_an_audit_log_that_cannot_be_written_refuses_the_call_and_nothing_reaches_the_upstream(
    settings: Settings,
    store: Store,
    vault: Any,
    hasher: KeyHasher,
    operator: Actor,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO, logger="bastion.audit")
    recorder = Recorder()

    def broken(*_args: Any) -> None:
        raise OSError("injected: the audit store cannot write")

    async with serving(recording_upstream(recorder)) as upstream:
        tokens = await _world(store, vault, hasher, operator, f"{upstream}/mcp")
        async with (
            serving(create_app(settings, store)) as bastion,
            gateway_client(f"{bastion}/g/sales/mcp", tokens["ada"], "2026-07-28") as client,
        ):
            monkeypatch.setattr("bastion.db.audit.write_pending", broken)
            for call in (lambda: client.call_tool("crm__whoami", {}), client.list_tools):
                with pytest.raises(MCPError) as caught:
                    await call()
                assert caught.value.code == AUDIT_UNAVAILABLE
                assert caught.value.error.data["status"] == 503  # type: ignore[index]
            monkeypatch.undo()
            # The log is back: calls flow again.
            assert (await client.call_tool("crm__echo", {"text": "back"})).content[0].text == "back"  # type: ignore[union-attr]
    # Not one HTTP request reached the upstream while the log was down: only the call after it recovered.
    assert [c.name for c in recorder.tool_calls] == ["echo"]
    refused = [e for e in await _events(store) if e["reason"] == "audit_unavailable"]
    assert len(refused) == 2 and all(e["outcome"] == "error" for e in refused)
    await _verified(store, settings)
    # Two failed writes, one log line (with its traceback): an outage is summarised, not logged per call.
    failures = [r for r in caplog.records if r.name == "bastion.audit" and r.levelno >= logging.ERROR]
    assert [r.getMessage() for r in failures] == ["audit writes failed: 1 OSError"]
    assert failures[0].exc_info is not None


@pytest.mark.parametrize("mode", MODES)
async def test_a_policy_rule_hides_and_refuses_a_tool_for_one_member_and_names_itself(
    mode: str, settings: Settings, store: Store, vault: Any, hasher: KeyHasher, operator: Actor
) -> None:
    recorder = Recorder()
    async with serving(recording_upstream(recorder)) as upstream:
        tokens = await _world(store, vault, hasher, operator, f"{upstream}/mcp")
        rule = await rules.create_policy(
            store,
            operator,
            effect=Effect.DENY,
            subject_kind=SubjectKind.MEMBER,
            subject="ada@example.com",
            gateway="sales",
            server="crm",
            name="echo",
            description="ada may not echo",
        )
        async with serving(create_app(settings, store)) as bastion:
            url = f"{bastion}/g/sales/mcp"
            async with gateway_client(url, tokens["ada"], mode) as ada:
                assert "crm__echo" not in [t.name for t in (await ada.list_tools()).tools]
                with pytest.raises(MCPError) as caught:
                    await ada.call_tool("crm__echo", {"text": "hi"})
                assert caught.value.code == POLICY_DENIED
                assert caught.value.error.data["rule"] == rule.rule.id  # type: ignore[index]
                assert rule.rule.id in caught.value.error.message
                assert (await ada.call_tool("crm__whoami", {})).content[0].text == f"Bearer {ADA_CREDENTIAL}"  # type: ignore[union-attr]
            async with gateway_client(url, tokens["bob"], mode) as bob:
                assert "crm__echo" in [t.name for t in (await bob.list_tools()).tools]
                assert (await bob.call_tool("crm__echo", {"text": "hi"})).content[0].text == "hi"  # type: ignore[union-attr]
    assert [(c.name, c.authorization) for c in recorder.tool_calls] == [
        ("whoami", f"Bearer {ADA_CREDENTIAL}"),
        ("echo", f"Bearer {BOB_CREDENTIAL}"),
    ]
    denied = [e for e in await _events(store) if e["outcome"] == "denied"]
    assert len(denied) == 1
    assert denied[0]["decision"] == "deny" and rule.rule.id in denied[0]["reason"]
    assert denied[0]["actor"] == "ada@example.com" and denied[0]["upstream_status"] is None


async def test_a_rate_limit_per_member_refuses_with_a_retry_time_and_leaves_others_alone(
    settings: Settings, store: Store, vault: Any, hasher: KeyHasher, operator: Actor
) -> None:
    recorder = Recorder()
    async with serving(recording_upstream(recorder)) as upstream:
        tokens = await _world(store, vault, hasher, operator, f"{upstream}/mcp")
        await rules.create_rate_limit(
            store, operator, per=LimitPer.MEMBER, limit="2/minute", strategy=Strategy.FIXED, gateway="sales"
        )
        async with serving(create_app(settings, store)) as bastion:
            url = f"{bastion}/g/sales/mcp"
            async with gateway_client(url, tokens["ada"], "2026-07-28") as ada:
                for i in range(2):
                    await ada.call_tool("crm__echo", {"text": str(i)})
                with pytest.raises(MCPError) as caught:
                    await ada.call_tool("crm__echo", {"text": "one too many"})
                assert caught.value.code == RATE_LIMITED
                assert 1 <= caught.value.error.data["retryAfter"] <= 60  # type: ignore[index]
            async with gateway_client(url, tokens["bob"], "2026-07-28") as bob:
                assert (await bob.call_tool("crm__echo", {"text": "bob"})).content[0].text == "bob"  # type: ignore[union-attr]
    assert [c.arguments["text"] for c in recorder.tool_calls] == ["0", "1", "bob"]
    limited = [e for e in await _events(store) if e["outcome"] == "limited"]
    assert len(limited) == 1 and limited[0]["actor"] == "ada@example.com"


async def test_content_rules_mask_arguments_redact_results_and_block_and_the_audit_keeps_no_secret(
    settings: Settings, store: Store, vault: Any, hasher: KeyHasher, operator: Actor
) -> None:
    recorder = Recorder()
    card = "4111111111111111"
    async with serving(recording_upstream(recorder)) as upstream:
        tokens = await _world(store, vault, hasher, operator, f"{upstream}/mcp")
        await rules.create_content_rule(
            store,
            operator,
            name="cards",
            pattern=r"\b\d{16}\b",
            action=ContentAction.MASK,
            target=ContentTarget.ARGUMENTS,
        )
        await rules.create_content_rule(
            store,
            operator,
            name="upstream-creds",
            pattern=r"canary-upstream-credential-\w+",
            action=ContentAction.REDACT,
            target=ContentTarget.RESULTS,
        )
        await rules.create_content_rule(
            store,
            operator,
            name="no-drop",
            pattern=r"(?i)drop\s+table",
            action=ContentAction.BLOCK,
            target=ContentTarget.BOTH,
        )
        async with (
            serving(create_app(settings, store)) as bastion,
            gateway_client(f"{bastion}/g/sales/mcp", tokens["ada"], "2026-07-28") as ada,
        ):
            echoed = await ada.call_tool("crm__echo", {"text": f"pay with {card}", "password": "hunter2-canary"})
            assert echoed.content[0].text == "pay with ************1111"  # type: ignore[union-attr]
            whoami = await ada.call_tool("crm__whoami", {})
            assert whoami.content[0].text == "Bearer ada-[REDACTED]"  # type: ignore[union-attr]
            with pytest.raises(MCPError) as caught:
                await ada.call_tool("crm__echo", {"text": "DROP TABLE users"})
            assert caught.value.code == CONTENT_BLOCKED and "no-drop" in caught.value.error.message
    # The upstream saw the masked card and never the blocked call.
    assert [c.arguments.get("text") for c in recorder.tool_calls] == ["pay with ************1111", None]
    events = await _events(store)
    dumped = json.dumps(events, default=str)
    for canary in (card, "hunter2-canary", ADA_CREDENTIAL, tokens["ada"]):
        assert canary not in dumped
    echo = next(e for e in events if e["name"] == "crm__echo" and e["outcome"] == "ok")
    assert echo["detail"]["content"] == [{"rule": "cards", "action": "mask", "where": "arguments", "count": 1}]
    assert "[REDACTED]" in echo["args_preview"]
    blocked = [e for e in events if e["outcome"] == "blocked"]
    assert len(blocked) == 1 and "no-drop" in blocked[0]["reason"]


async def test_refusals_at_the_door_are_written_down_with_whom_they_name(
    settings: Settings, store: Store, vault: Any, hasher: KeyHasher, operator: Actor
) -> None:
    recorder = Recorder()
    async with serving(recording_upstream(recorder)) as upstream:
        tokens = await _world(store, vault, hasher, operator, f"{upstream}/mcp")
        await hosts.set_enabled(store, operator, "agent", False)
        async with serving(create_app(settings, store)) as bastion:
            body = {"jsonrpc": "2.0", "id": 1, "method": "tools/list", "params": {}}
            async with httpx2.AsyncClient(base_url=bastion) as http:
                bad = await http.post("/g/sales/mcp", json=body, headers={"Authorization": "Bearer bst_nope"})
                assert bad.status_code == 401
                disabled = await http.post(
                    "/g/sales/mcp", json=body, headers={"Authorization": f"Bearer {tokens['ada']}"}
                )
                assert disabled.status_code == 403
    events = await _events(store)
    assert [(e["outcome"], e["reason"], e["actor"]) for e in events] == [
        ("refused", "invalid_token", None),
        ("refused", "host_disabled", "ada@example.com"),
    ]
    assert tokens["ada"] not in json.dumps(events, default=str)
    disabled_by = [e for e in await _events(store, "admin") if e["method"] == "host.disabled"]
    assert len(disabled_by) == 1 and disabled_by[0]["actor"] == operator.label
