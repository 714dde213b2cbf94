"""What the API document promises about input is what the API accepts, at the edges schemathesis found."""

from __future__ import annotations

import httpx2
import pytest

from tests.web.support import API, assert_invalid, assert_problem

pytestmark = pytest.mark.anyio
MEMBERS = f"{API}/members"
LIMITS = f"{API}/rate-limits"
CONTENT = f"{API}/content-rules"


async def test_text_holding_nul_is_refused_in_a_body_a_query_and_a_path_on_either_database(
    client: httpx2.AsyncClient, owner_headers: dict[str, str]
) -> None:
    body = {"email": "ada@example.com", "name": "Ada\x00"}
    assert_invalid(await client.post(MEMBERS, json=body, headers=owner_headers), "name")
    nested = {"per": "member", "limit": "1/second", "name": "tools\x00*"}
    assert_invalid(await client.post(LIMITS, json=nested, headers=owner_headers), "name")
    query = await client.get(f"{API}/audit/events", params={"outcome": "ok\x00"}, headers=owner_headers)
    assert_invalid(query, "outcome")
    assert_invalid(await client.get(f"{MEMBERS}/a%00b", headers=owner_headers), "ref")
    assert [m["email"] for m in (await client.get(MEMBERS, headers=owner_headers)).json()["items"]] == [
        "owner@example.com"
    ]


async def test_a_time_is_written_out_and_a_number_is_not_taken_for_one(
    client: httpx2.AsyncClient, owner_headers: dict[str, str]
) -> None:
    for value in ("0.5", "1733600000"):
        response = await client.get(f"{API}/audit/export", params={"until": value}, headers=owner_headers)
        assert_invalid(response, "until")
    written = await client.get(f"{API}/audit/events", params={"until": "2030-01-01T00:00:00Z"}, headers=owner_headers)
    assert written.status_code == 200, written.text
    key = {"name": "ci", "expires_at": 1_900_000_000}
    assert_invalid(await client.post(f"{API}/me/api-keys", json=key, headers=owner_headers), "expires_at")


async def test_flags_and_counts_take_json_booleans_and_whole_numbers_only(
    client: httpx2.AsyncClient, owner_headers: dict[str, str]
) -> None:
    for enabled in (0, "true", "yes"):
        rule = {"name": "keys", "pattern": "sk-[a-z]+", "action": "block", "enabled": enabled}
        assert_invalid(await client.post(CONTENT, json=rule, headers=owner_headers), "enabled")
    for amount in (True, "5", 5.5):
        limit = {"per": "member", "amount": amount, "window_s": 60}
        assert_invalid(await client.post(LIMITS, json=limit, headers=owner_headers), "amount")
    whole = await client.post(LIMITS, json={"per": "member", "amount": 5.0, "window_s": 60}, headers=owner_headers)
    assert whole.status_code == 201, whole.text
    assert whole.json()["amount"] == 5


async def test_a_cursor_is_a_position_any_id_names_and_anything_else_is_refused(
    client: httpx2.AsyncClient, owner_headers: dict[str, str]
) -> None:
    for name in ("a", "b", "c"):
        created = await client.post(MEMBERS, json={"email": f"{name}@example.com", "name": name}, headers=owner_headers)
        assert created.status_code == 201, created.text
    everyone = [m["id"] for m in (await client.get(MEMBERS, headers=owner_headers)).json()["items"]]
    first = (await client.get(MEMBERS, params={"limit": 1}, headers=owner_headers)).json()
    assert first["next_cursor"] == everyone[0]
    after = await client.get(MEMBERS, params={"cursor": everyone[1]}, headers=owner_headers)
    assert [m["id"] for m in after.json()["items"]] == everyone[2:]
    beyond = await client.get(MEMBERS, params={"cursor": "ffffffff-ffff-7fff-bfff-ffffffffffff"}, headers=owner_headers)
    assert beyond.json() == {"items": [], "next_cursor": None}
    for made_up in ("", "bm90IGFuIGlk", everyone[0].upper()):
        refused = await client.get(MEMBERS, params={"cursor": made_up}, headers=owner_headers)
        assert assert_problem(refused, 422, "validation_failed")["field"] == "cursor"
