from __future__ import annotations

from typing import Any

import httpx2
import pytest

from bastion.db.store import Store
from bastion.domain.actor import Actor
from bastion.domain.capabilities import MEMBER_ROLE, Capability
from bastion.domain.models import Transport
from bastion.domain.specs import GatewayServerSpec, GatewaySpec, ServerSpec
from bastion.services import gateways, servers
from bastion.services.apikeys import KeyHasher
from tests.conftest import member_with_key, problem_of
from tests.web.support import API, assert_invalid, assert_pages_cover, assert_problem, assert_unknown, caller_with

pytestmark = pytest.mark.anyio
POLICIES = f"{API}/policies"
CONTENT = f"{API}/content-rules"
LIMITS = f"{API}/rate-limits"
MISSING = "0196f1c2-0000-7000-8000-000000000000"


@pytest.fixture
async def gateway_id(store: Store, operator: Actor) -> str:
    await servers.create(store, operator, ServerSpec("github", Transport.STREAMABLE_HTTP, "https://gh.example.com/"))
    gateway = await gateways.create(store, operator, GatewaySpec("sales", servers=(GatewayServerSpec("github", "gh"),)))
    return gateway.id


async def _created(client: httpx2.AsyncClient, path: str, body: dict[str, Any], headers: dict[str, str]) -> Any:
    response = await client.post(path, json=body, headers=headers)
    assert response.status_code == 201, response.text
    assert response.headers["location"] == f"{path}/{response.json()['id']}"
    again = await client.get(response.headers["location"], headers=headers)
    assert again.status_code == 200 and again.json() == response.json()
    return response.json()


async def test_a_policy_rule_is_created_at_its_location_listed_and_deleted(
    client: httpx2.AsyncClient, owner_headers: dict[str, str], gateway_id: str
) -> None:
    body = {
        "effect": "deny",
        "subject_kind": "member",
        "subject": "ada@example.com",
        "gateway": "sales",
        "server": "gh",
        "name": "drop_*",
        "description": "no drops",
    }
    rule = await _created(client, POLICIES, body, owner_headers)
    assert (rule["gateway_id"], rule["gateway"], rule["server"], rule["name"]) == (gateway_id, "sales", "gh", "drop_*")
    assert rule["summary"] == "deny member ada@example.com on gh/drop_* in gateway sales"
    me = (await client.get(f"{API}/me", headers=owner_headers)).json()["member"]["id"]
    assert rule["created_by"] == me
    assert [p["id"] for p in (await client.get(POLICIES, headers=owner_headers)).json()["items"]] == [rule["id"]]

    assert (await client.delete(f"{POLICIES}/{rule['id']}", headers=owner_headers)).status_code == 204
    assert_problem(await client.get(f"{POLICIES}/{rule['id']}", headers=owner_headers), 404, "not_found")


@pytest.mark.parametrize(
    ("body", "field"),
    [
        ({"effect": "maybe"}, "effect"),
        ({"effect": "deny", "subject_kind": "role"}, "subject"),
        ({"effect": "deny", "subject": "ada@example.com"}, "subject"),
        ({"effect": "deny", "priority": 1}, "priority"),
    ],
)
async def test_an_invalid_policy_rule_is_refused_naming_the_field(
    client: httpx2.AsyncClient, owner_headers: dict[str, str], gateway_id: str, body: dict[str, Any], field: str
) -> None:
    assert_invalid(await client.post(POLICIES, json=body, headers=owner_headers), field)
    assert (await client.get(POLICIES, headers=owner_headers)).json()["items"] == []


async def test_a_rule_naming_a_gateway_or_a_server_alias_that_does_not_exist_is_not_found(
    client: httpx2.AsyncClient, owner_headers: dict[str, str], gateway_id: str
) -> None:
    del gateway_id  # gateway "sales", whose one server is "gh"
    assert_unknown(
        await client.post(POLICIES, json={"effect": "deny", "gateway": "nowhere"}, headers=owner_headers), "gateway"
    )
    policy = {"effect": "deny", "gateway": "sales", "server": "github"}
    assert_unknown(await client.post(POLICIES, json=policy, headers=owner_headers), "server")
    content = {"name": "cards", "pattern": r"\d{16}", "action": "mask", "gateway": "nowhere"}
    assert_unknown(await client.post(CONTENT, json=content, headers=owner_headers), "gateway")
    limit = {"per": "member", "limit": "10/minute", "gateway": "nowhere"}
    assert_unknown(await client.post(LIMITS, json=limit, headers=owner_headers), "gateway")
    for path in (POLICIES, CONTENT, LIMITS):
        assert (await client.get(path, headers=owner_headers)).json()["items"] == []


async def test_a_content_rule_is_read_by_name_patched_switched_off_and_deleted(
    client: httpx2.AsyncClient, owner_headers: dict[str, str], gateway_id: str
) -> None:
    body = {"name": "cards", "pattern": r"\d{16}", "action": "mask", "gateway": gateway_id}
    rule = await _created(client, CONTENT, body, owner_headers)
    assert (rule["target"], rule["enabled"], rule["gateway"]) == ("both", True, "sales")
    assert (await client.get(f"{CONTENT}/cards", headers=owner_headers)).json() == rule

    replaced = await client.patch(
        f"{CONTENT}/cards", json={"action": "replace", "replacement": "<card>"}, headers=owner_headers
    )
    assert replaced.status_code == 200, replaced.text
    assert (replaced.json()["action"], replaced.json()["replacement"]) == ("replace", "<card>")
    off = await client.patch(
        f"{CONTENT}/{rule['id']}",
        json={"enabled": False, "action": "redact", "replacement": None},
        headers=owner_headers,
    )
    assert off.status_code == 200, off.text
    assert (off.json()["enabled"], off.json()["replacement"], off.json()["pattern"]) == (False, None, r"\d{16}")
    assert off.json()["summary"].endswith("(disabled)")

    assert (await client.delete(f"{CONTENT}/cards", headers=owner_headers)).status_code == 204
    assert_problem(await client.get(f"{CONTENT}/{rule['id']}", headers=owner_headers), 404, "not_found")


@pytest.mark.parametrize(
    ("body", "field"),
    [
        ({"pattern": "([a-z"}, "pattern"),
        ({"pattern": ".*"}, "pattern"),
        ({"pattern": "p" * 501}, "pattern"),
        ({"action": "replace"}, "replacement"),
        ({"action": "explode"}, "action"),
        ({"target": "headers"}, "target"),
        ({"name": "Card Numbers"}, "name"),
    ],
)
async def test_an_invalid_content_rule_is_refused_as_problem_json_naming_the_field(
    client: httpx2.AsyncClient, owner_headers: dict[str, str], body: dict[str, Any], field: str
) -> None:
    full = {"name": "cards", "pattern": r"\d{16}", "action": "mask"} | body
    response = await client.post(CONTENT, json=full, headers=owner_headers)
    assert_invalid(response, field)
    assert problem_of(response)["type"] == "urn:bastion:problem:validation_failed"
    assert (await client.get(CONTENT, headers=owner_headers)).json()["items"] == []


async def test_a_content_rule_edit_must_leave_a_valid_rule_and_names_stay_unique(
    client: httpx2.AsyncClient, owner_headers: dict[str, str]
) -> None:
    await _created(client, CONTENT, {"name": "keys", "pattern": "sk-[a-z]+", "action": "block"}, owner_headers)
    duplicate = await client.post(
        CONTENT, json={"name": "keys", "pattern": "x+", "action": "redact"}, headers=owner_headers
    )
    assert_problem(duplicate, 409, "conflict")
    bad_regex = await client.patch(f"{CONTENT}/keys", json={"pattern": "(oops"}, headers=owner_headers)
    assert_invalid(bad_regex, "pattern")
    assert "not a valid regular expression" in problem_of(bad_regex)["detail"]
    assert_invalid(
        await client.patch(f"{CONTENT}/keys", json={"action": "replace"}, headers=owner_headers), "replacement"
    )
    assert_invalid(await client.patch(f"{CONTENT}/keys", json={"pattern": None}, headers=owner_headers), "pattern")
    assert_invalid(await client.patch(f"{CONTENT}/keys", json={"name": "other"}, headers=owner_headers), "name")
    assert (await client.get(f"{CONTENT}/keys", headers=owner_headers)).json()["pattern"] == "sk-[a-z]+"
    # A change that fits alone but not the stored action conflicts with it (409), naming the field.
    given = await client.patch(f"{CONTENT}/keys", json={"replacement": "[key]"}, headers=owner_headers)
    assert assert_problem(given, 409, "conflict")["field"] == "replacement"
    to_replace = {"action": "replace", "replacement": "[key]"}
    assert (await client.patch(f"{CONTENT}/keys", json=to_replace, headers=owner_headers)).status_code == 200
    taken = await client.patch(f"{CONTENT}/keys", json={"replacement": None}, headers=owner_headers)
    assert assert_problem(taken, 409, "conflict")["field"] == "replacement"
    back = await client.patch(f"{CONTENT}/keys", json={"action": "block"}, headers=owner_headers)
    assert (back.json()["action"], back.json()["replacement"]) == ("block", None)


async def test_a_rate_limit_is_given_as_text_or_as_amount_and_window(
    client: httpx2.AsyncClient, owner_headers: dict[str, str], gateway_id: str
) -> None:
    by_text = await _created(
        client,
        LIMITS,
        {"per": "member", "limit": "100/minute", "strategy": "sliding", "gateway": "sales"},
        owner_headers,
    )
    assert (by_text["amount"], by_text["window_s"], by_text["limit"]) == (100, 60, "100/minute")
    assert (by_text["gateway_id"], by_text["gateway"], by_text["strategy"]) == (gateway_id, "sales", "sliding")
    by_numbers = await _created(
        client, LIMITS, {"per": "tool", "amount": 10, "window_s": 30, "name": "gh__*"}, owner_headers
    )
    assert (by_numbers["limit"], by_numbers["gateway"], by_numbers["name"]) == ("10/30s", None, "gh__*")
    assert by_numbers["summary"].startswith("10 per 30 s per tool on gh__*")

    listed = (await client.get(LIMITS, headers=owner_headers)).json()["items"]
    assert [r["id"] for r in listed] == [by_text["id"], by_numbers["id"]]
    assert (await client.delete(f"{LIMITS}/{by_text['id']}", headers=owner_headers)).status_code == 204
    assert_problem(await client.delete(f"{LIMITS}/{by_text['id']}", headers=owner_headers), 404, "not_found")


@pytest.mark.parametrize(
    ("body", "field"),
    [
        ({"limit": "many/minute"}, "limit"),
        ({"limit": "10/fortnight"}, "limit"),
        ({"limit": "10/minute", "amount": 10, "window_s": 60}, "limit"),
        ({"amount": 10}, "limit"),
        ({"amount": 0, "window_s": 60}, "amount"),
        ({"limit": "10/minute", "per": "planet"}, "per"),
    ],
)
async def test_an_invalid_rate_limit_is_refused_naming_the_field(
    client: httpx2.AsyncClient, owner_headers: dict[str, str], body: dict[str, Any], field: str
) -> None:
    assert_invalid(await client.post(LIMITS, json={"per": "member"} | body, headers=owner_headers), field)


async def test_unknown_rule_ids_are_not_found(client: httpx2.AsyncClient, owner_headers: dict[str, str]) -> None:
    for response in (
        await client.get(f"{POLICIES}/{MISSING}", headers=owner_headers),
        await client.delete(f"{POLICIES}/{MISSING}", headers=owner_headers),
        await client.get(f"{CONTENT}/ghost", headers=owner_headers),
        await client.patch(f"{CONTENT}/ghost", json={"enabled": False}, headers=owner_headers),
        await client.delete(f"{CONTENT}/ghost", headers=owner_headers),
        await client.get(f"{LIMITS}/{MISSING}", headers=owner_headers),
        await client.delete(f"{LIMITS}/{MISSING}", headers=owner_headers),
    ):
        assert_problem(response, 404, "not_found")


async def test_a_plain_member_is_forbidden_and_a_viewer_may_only_read(
    client: httpx2.AsyncClient,
    store: Store,
    hasher: KeyHasher,
    operator: Actor,
    owner_headers: dict[str, str],
) -> None:
    policy = await _created(client, POLICIES, {"effect": "deny"}, owner_headers)
    content = await _created(client, CONTENT, {"name": "k", "pattern": "k+", "action": "block"}, owner_headers)
    limit = await _created(client, LIMITS, {"per": "host", "limit": "1/second"}, owner_headers)
    member = await member_with_key(store, hasher, operator, "bob@example.com", MEMBER_ROLE)
    viewer = await caller_with(store, hasher, operator, "vic@example.com", {Capability.ADMIN_VIEW})

    for path, created in ((POLICIES, policy), (CONTENT, content), (LIMITS, limit)):
        assert_problem(await client.get(path, headers=member), 403, "forbidden")
        assert_problem(await client.get(f"{path}/{created['id']}", headers=member), 403, "forbidden")
        assert (await client.get(f"{path}/{created['id']}", headers=viewer)).status_code == 200
        assert_problem(await client.delete(f"{path}/{created['id']}", headers=viewer), 403, "forbidden")
    assert_problem(await client.post(POLICIES, json={"effect": "allow"}, headers=viewer), 403, "forbidden")
    assert_problem(
        await client.post(CONTENT, json={"name": "x", "pattern": "x+", "action": "block"}, headers=member),
        403,
        "forbidden",
    )
    assert_problem(await client.patch(f"{CONTENT}/k", json={"enabled": False}, headers=viewer), 403, "forbidden")
    assert_problem(
        await client.post(LIMITS, json={"per": "host", "limit": "1/second"}, headers=viewer), 403, "forbidden"
    )
    assert (await client.get(f"{CONTENT}/k", headers=owner_headers)).json()["enabled"] is True


async def test_each_kind_of_rule_pages_through_a_cursor_each_seen_once(
    client: httpx2.AsyncClient, owner_headers: dict[str, str]
) -> None:
    made = [
        (await client.post(POLICIES, json={"effect": "deny"}, headers=owner_headers)).json()["id"] for _ in range(4)
    ]
    await assert_pages_cover(client, owner_headers, POLICIES, made)
    made = [
        (
            await client.post(
                CONTENT, json={"name": f"r{i}", "pattern": "k+", "action": "block"}, headers=owner_headers
            )
        ).json()["id"]
        for i in range(4)
    ]
    await assert_pages_cover(client, owner_headers, CONTENT, made)
    made = [
        (await client.post(LIMITS, json={"per": "host", "limit": f"{i + 1}/second"}, headers=owner_headers)).json()[
            "id"
        ]
        for i in range(4)
    ]
    await assert_pages_cover(client, owner_headers, LIMITS, made)
