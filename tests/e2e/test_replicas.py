"""Replicas on one PostgreSQL database: a change holds on every replica once whoever made it has heard it is done.

Two Bastion apps share the database with their own engines, buses and caches, as replicas behind a load balancer
do; a third store (an admin's CLI, another replica's API) makes the changes. The upstream counts what reaches it.
"""

from __future__ import annotations

import itertools
import json
import logging
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any, Final

import anyio
import httpx2
import psycopg
import pytest
import sqlalchemy as sa
from mcp.client import Client
from mcp.client.streamable_http import streamable_http_client

from bastion import wiring
from bastion.db import schema
from bastion.db.store import Store
from bastion.domain.actor import Actor
from bastion.domain.models import Transport
from bastion.domain.specs import HostSpec, ServerSpec
from bastion.events import replicas
from bastion.services import hosts
from bastion.services.apikeys import KeyHasher
from bastion.settings import Settings
from bastion.web.app import create_app
from tests.mcp_support import Recorder, recording_upstream, serving
from tests.processes import HEAVY_TIMEOUT_S
from tests.worlds import ada_connected

pytestmark = [
    pytest.mark.anyio,
    pytest.mark.e2e,
    pytest.mark.timeout(HEAVY_TIMEOUT_S),
    pytest.mark.parametrize("db_url", ["postgresql"], indirect=True),
]
ROUNDS: Final = 20
CALLERS_PER_REPLICA: Final = 3
HOLD_S: Final = 0.15  # how long each state lasts under load
LATE_S: Final = 0.05  # how late each replica hears each change
NOT_REPLAYED: Final = frozenset({"host", "content-length", "connection"})


@dataclass
class Call:
    number: int
    started: float
    status: int


@dataclass
class Load:
    """Calls made by the callers, each with its start time and HTTP status; ``stop`` ends them."""

    calls: list[Call] = field(default_factory=list[Call])
    stop: anyio.Event = field(default_factory=anyio.Event)
    numbers: itertools.count[int] = field(default_factory=itertools.count)


async def _captured(url: str, token: str) -> tuple[dict[str, str], dict[str, Any]]:
    """One 2026-era tools/call (echo) as the official SDK client puts it on the wire: replayed by the callers."""
    sent: list[tuple[dict[str, str], dict[str, Any]]] = []

    async def record(request: httpx2.Request) -> None:
        if request.method == "POST":
            sent.append((dict(request.headers), json.loads(request.content)))

    async with (
        httpx2.AsyncClient(
            headers={"Authorization": f"Bearer {token}"}, timeout=30, event_hooks={"request": [record]}
        ) as http,
        Client(streamable_http_client(url, http_client=http), mode="2026-07-28", cache=None) as client,  # type: ignore[arg-type]
    ):
        await client.call_tool("crm__echo", {"text": "warm-up"})
    headers, body = next((h, b) for h, b in sent if b.get("method") == "tools/call")
    return {k: v for k, v in headers.items() if k.lower() not in NOT_REPLAYED}, body


async def _caller(url: str, headers: dict[str, str], body: dict[str, Any], load: Load) -> None:
    async with httpx2.AsyncClient(timeout=30) as http:
        while not load.stop.is_set():
            number = next(load.numbers)
            call = {**body, "id": number, "params": {**body["params"], "arguments": {"text": f"call-{number}"}}}
            started = time.monotonic()
            answered = await http.post(url, json=call, headers=headers)
            load.calls.append(Call(number, started, answered.status_code))


async def test_two_replicas_admit_no_call_after_a_host_disable_has_committed_twenty_times_under_load(
    settings: Settings, store: Store, hasher: KeyHasher, operator: Actor, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Replicas hear every NOTIFY late, as a loaded one does: without waiting for their word, a disable would
    # answer while they still admit calls from their caches.
    heard_at_once = psycopg.AsyncConnection.notifies

    async def heard_late(self: psycopg.AsyncConnection[Any], **kwargs: Any) -> AsyncIterator[psycopg.Notify]:
        async for notify in heard_at_once(self, **kwargs):
            await anyio.sleep(LATE_S)
            yield notify

    monkeypatch.setattr(psycopg.AsyncConnection, "notifies", heard_late)
    recorder = Recorder()
    stores = [wiring.store_from(settings), wiring.store_from(settings)]  # each replica's own engine, bus and caches
    try:
        async with serving(recording_upstream(recorder)) as upstream:
            crm = ServerSpec("crm", Transport.STREAMABLE_HTTP, url=f"{upstream}/mcp")
            token = await ada_connected(store, hasher, operator, crm)
            async with (
                serving(create_app(settings, stores[0])) as replica_a,
                serving(create_app(settings, stores[1])) as replica_b,
            ):
                urls = [f"{replica_a}/g/g/mcp", f"{replica_b}/g/g/mcp"]
                headers, body = await _captured(urls[0], token)
                await _both_live(store)
                load = Load()
                disabled: list[tuple[float, float]] = []  # (disable answered, enable sent)
                enabled: list[tuple[float, float]] = []  # (enable answered, next disable sent)
                async with anyio.create_task_group() as callers:
                    for url in urls:
                        for _ in range(CALLERS_PER_REPLICA):
                            callers.start_soon(_caller, url, headers, body, load)
                    await anyio.sleep(HOLD_S)
                    for _ in range(ROUNDS):
                        off_sent = time.monotonic()
                        if enabled:
                            enabled[-1] = (enabled[-1][0], off_sent)
                        await hosts.set_enabled(store, operator, "agent", False)
                        off = time.monotonic()
                        await anyio.sleep(HOLD_S)
                        on_sent = time.monotonic()
                        await hosts.set_enabled(store, operator, "agent", True)
                        disabled.append((off, on_sent))
                        enabled.append((time.monotonic(), float("inf")))
                        await anyio.sleep(HOLD_S)
                    load.stop.set()
    finally:
        for each in stores:
            await each.close()

    texts = [str(c.arguments.get("text")) for c in recorder.tool_calls if c.name == "echo"]
    reached = {int(text.removeprefix("call-")) for text in texts if text.startswith("call-")}
    in_disabled = [c for c in load.calls if any(start <= c.started < end for start, end in disabled)]
    in_enabled = [c for c in load.calls if any(start <= c.started < end for start, end in enabled)]
    admitted_while_disabled = [c for c in in_disabled if c.number in reached]
    assert len(in_disabled) >= ROUNDS and len(in_enabled) >= ROUNDS, "the load was too thin to show anything"
    assert admitted_while_disabled == []
    assert {c.status for c in in_disabled} == {403}
    # Widening holds as at once: every call started after an enable had answered went through.
    assert {c.status for c in in_enabled} == {200}
    assert all(c.number in reached for c in in_enabled)


async def _both_live(store: Store) -> None:
    """Both replicas' listeners are connected (their rows are fresh): from now on a change waits for them."""
    with anyio.fail_after(30):
        while True:
            async with store.transaction() as conn:
                if len(await replicas.others(conn, None)) >= 2:
                    return
            await anyio.sleep(0.05)


async def test_a_change_waits_for_a_live_replica_that_has_not_answered_and_names_it(
    store: Store, operator: Actor, caplog: pytest.LogCaptureFixture
) -> None:
    """A replica that renews its row but never answers (hung) is waited for until the bound, then named."""
    await hosts.create(store, operator, HostSpec("agent"))
    async with store.transaction() as conn:
        now = sa.func.now()
        await conn.execute(schema.replicas.insert().values(id="silent-replica", started_at=now, seen_at=now))
    with caplog.at_level(logging.WARNING, logger="bastion.events.replicas"):
        await hosts.set_enabled(store, operator, "agent", False)
    (warning,) = [r for r in caplog.records if r.name == "bastion.events.replicas"]
    assert warning.__dict__["replicas"] == ["silent-replica"]
    # A replica that stopped renewing its row (crashed) is no longer waited for.
    async with store.transaction() as conn:
        old = sa.func.now() - sa.text("interval '1 minute'")
        await conn.execute(schema.replicas.update().values(seen_at=old))
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="bastion.events.replicas"):
        await hosts.set_enabled(store, operator, "agent", True)
    assert [r for r in caplog.records if r.name == "bastion.events.replicas"] == []
