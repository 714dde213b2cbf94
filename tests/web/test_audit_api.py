"""The audit routes: the workspace's events listed, filtered, paged, read and exported, for audit.view_export only."""

from __future__ import annotations

import csv
import io
import json
from datetime import timedelta

import httpx2
import pytest

from bastion.db.store import Store
from bastion.domain.actor import Actor
from bastion.domain.capabilities import ALL_CAPABILITIES, Capability
from bastion.services.apikeys import KeyHasher
from bastion.settings import Settings
from tests.services.test_audit_query import (
    OTHER_WORKSPACE,
    T0,
    add_pending,
    append_events,
    audit_key_of,
    make_event,
    newest_first,
)
from tests.web.support import API, assert_invalid, assert_problem, caller_with

pytestmark = pytest.mark.anyio
EVENTS = f"{API}/audit/events"
EXPORT = f"{API}/audit/export"


async def test_events_are_listed_newest_first_filtered_and_paged(
    client: httpx2.AsyncClient, store: Store, operator: Actor, settings: Settings, owner_headers: dict[str, str]
) -> None:
    ws = operator.workspace_id
    events = [make_event(ws, n) for n in range(5)]
    events.append(make_event(ws, 7, name="search", outcome="denied", gateway="support"))
    await append_events(store, audit_key_of(settings), events)
    pending = make_event(ws, 9, outcome="pending")
    await add_pending(store, pending)

    seen: list[str] = []
    cursor: str | None = None
    while True:
        params: dict[str, str | int] = {"kind": "mcp", "limit": 3}
        if cursor is not None:
            params["cursor"] = cursor
        response = await client.get(EVENTS, params=params, headers=owner_headers)
        assert response.status_code == 200, response.text
        page = response.json()
        seen += [item["id"] for item in page["items"]]
        cursor = page["next_cursor"]
        if cursor is None:
            break
    assert seen == newest_first([*events, pending])

    response = await client.get(EVENTS, params={"kind": "mcp", "limit": 1}, headers=owner_headers)
    (newest,) = response.json()["items"]
    assert (newest["id"], newest["seq"], newest["hash"], newest["outcome"]) == (pending.id, None, None, "pending")

    denied = await client.get(
        EVENTS,
        params={
            "outcome": "denied",
            "gateway": "support",
            "name": "search",
            "since": (T0 + timedelta(minutes=6)).isoformat(),
        },
        headers=owner_headers,
    )
    (item,) = denied.json()["items"]
    assert item["id"] == events[-1].id
    assert item["detail"] == {"n": 7, "note": "ünïcode"}
    assert item["seq"] is not None and len(item["hash"]) == 64
    until = await client.get(
        EVENTS, params={"kind": "mcp", "until": (T0 + timedelta(minutes=1)).isoformat()}, headers=owner_headers
    )
    assert [i["id"] for i in until.json()["items"]] == [events[0].id]


async def test_one_event_is_read_by_id_and_another_workspace_events_are_not_found(
    client: httpx2.AsyncClient, store: Store, operator: Actor, settings: Settings, owner_headers: dict[str, str]
) -> None:
    own, foreign = make_event(operator.workspace_id, 1), make_event(OTHER_WORKSPACE, 2)
    sealed = await append_events(store, audit_key_of(settings), [own, foreign])

    response = await client.get(f"{EVENTS}/{own.id}", headers=owner_headers)
    assert response.status_code == 200, response.text
    body = response.json()
    assert (body["id"], body["seq"], body["prev_hash"], body["hash"]) == (
        own.id,
        sealed[0].seq,
        sealed[0].prev_hash,
        sealed[0].hash,
    )
    assert body["actor"] == "alice@example.com" and body["latency_us"] == 1001
    assert_problem(await client.get(f"{EVENTS}/{foreign.id}", headers=owner_headers), 404, "not_found")
    listed = (await client.get(EVENTS, params={"limit": 200}, headers=owner_headers)).json()["items"]
    assert foreign.id not in {i["id"] for i in listed}
    exported = (await client.get(EXPORT, headers=owner_headers)).text
    assert own.id in exported and foreign.id not in exported


async def test_the_audit_routes_need_audit_view_export(
    client: httpx2.AsyncClient, store: Store, hasher: KeyHasher, operator: Actor, settings: Settings
) -> None:
    event = make_event(operator.workspace_id)
    await append_events(store, audit_key_of(settings), [event])
    everything_else = ALL_CAPABILITIES - {Capability.AUDIT_VIEW_EXPORT}
    refused = await caller_with(store, hasher, operator, "admin@example.com", everything_else)
    auditor = await caller_with(store, hasher, operator, "auditor@example.com", {Capability.AUDIT_VIEW_EXPORT})
    for path in (EVENTS, f"{EVENTS}/{event.id}", EXPORT, f"{EXPORT}?format=csv"):
        problem = assert_problem(await client.get(path, headers=refused), 403, "forbidden")
        assert "audit.view_export" in problem["detail"]
        assert (await client.get(path, headers=auditor)).status_code == 200, path
        assert_problem(await client.get(path), 401, "unauthenticated")


async def test_the_export_streams_jsonl_or_csv_as_a_named_download(
    client: httpx2.AsyncClient, store: Store, operator: Actor, settings: Settings, owner_headers: dict[str, str]
) -> None:
    ws = operator.workspace_id
    sealed = await append_events(store, audit_key_of(settings), [make_event(ws, n) for n in range(3)])
    await add_pending(store, make_event(ws, 5, outcome="pending"))

    jsonl = await client.get(EXPORT, params={"kind": "mcp"}, headers=owner_headers)
    assert jsonl.status_code == 200, jsonl.text
    assert jsonl.headers["content-type"] == "application/x-ndjson"
    disposition = jsonl.headers["content-disposition"]
    assert disposition.startswith('attachment; filename="bastion-audit-') and disposition.endswith('.jsonl"')
    lines = [json.loads(line) for line in jsonl.text.splitlines()]
    assert [(x["seq"], x["hash"]) for x in lines] == [(s.seq, s.hash) for s in sealed] + [(None, None)]

    as_csv = await client.get(EXPORT, params={"format": "csv", "kind": "mcp", "name": "tool_1"}, headers=owner_headers)
    assert as_csv.status_code == 200, as_csv.text
    assert as_csv.headers["content-type"] == "text/csv; charset=utf-8"
    assert as_csv.headers["content-disposition"].endswith('.csv"')
    (row,) = list(csv.DictReader(io.StringIO(as_csv.text)))
    assert (row["id"], row["seq"], json.loads(row["detail"])) == (
        sealed[1].event.id,
        str(sealed[1].seq),
        {"n": 1, "note": "ünïcode"},
    )

    empty = await client.get(EXPORT, params={"name": "nothing"}, headers=owner_headers)
    assert (empty.status_code, empty.text) == (200, "")


async def test_an_unknown_format_filter_or_cursor_is_refused_naming_the_field(
    client: httpx2.AsyncClient, owner_headers: dict[str, str]
) -> None:
    assert_invalid(await client.get(EXPORT, params={"format": "xml"}, headers=owner_headers), "format")
    assert_invalid(await client.get(EVENTS, params={"since": "last tuesday"}, headers=owner_headers), "since")
    assert_invalid(await client.get(EVENTS, params={"kind": "k" * 9}, headers=owner_headers), "kind")
    assert_invalid(await client.get(EVENTS, params={"cursor": "not-a-cursor!"}, headers=owner_headers), "cursor")
    assert_invalid(await client.get(EVENTS, params={"limit": 0}, headers=owner_headers), "limit")
