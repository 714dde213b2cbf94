"""The legacy era's SSE event store: what a resumed stream replays, to whom, and how much is kept."""

from __future__ import annotations

import mcp_types as types
import pytest
from mcp.server.streamable_http import EventMessage
from mcp_types import jsonrpc_message_adapter

from bastion.web.mcp.event_store import BoundedEventStore

pytestmark = pytest.mark.anyio


def _result(request_id: int, text: str) -> types.JSONRPCMessage:
    return jsonrpc_message_adapter.validate_python(
        {"jsonrpc": "2.0", "id": request_id, "result": {"content": [{"type": "text", "text": text}]}}
    )


async def _replayed(store: BoundedEventStore, after: str) -> tuple[str | None, list[EventMessage]]:
    sent: list[EventMessage] = []

    async def send(event: EventMessage) -> None:
        sent.append(event)

    return await store.replay_events_after(after, send), sent


async def test_a_resumed_stream_gets_its_own_later_events_as_they_were_sent_and_no_other_streams() -> None:
    store = BoundedEventStore()
    priming = await store.store_event("s1", None)
    first = _result(1, "ünïcode ✓")
    first_id = await store.store_event("s1", first)
    await store.store_event("s2", _result(2, "another caller's"))
    progress = jsonrpc_message_adapter.validate_python(
        {"jsonrpc": "2.0", "method": "notifications/progress", "params": {"progressToken": 7, "progress": 0.5}}
    )
    progress_id = await store.store_event("s1", progress)
    stream, sent = await _replayed(store, priming)
    assert stream == "s1"
    assert [(e.event_id, e.message) for e in sent] == [(first_id, first), (progress_id, progress)]
    # What the SDK writes as the event's data is the same bytes as when the message was first sent.
    assert [e.message.model_dump_json(by_alias=True, exclude_unset=True) for e in sent] == [
        m.model_dump_json(by_alias=True, exclude_unset=True) for m in (first, progress)
    ]


async def test_the_oldest_events_are_forgotten_once_the_store_is_full() -> None:
    store = BoundedEventStore(max_events=3)
    ids = [await store.store_event("s", _result(i, str(i))) for i in range(5)]
    assert await _replayed(store, ids[0]) == (None, [])  # forgotten: the caller learns it cannot resume
    stream, sent = await _replayed(store, ids[2])
    assert stream == "s"
    assert [e.event_id for e in sent] == ids[3:]
    assert "events=3" in repr(store)
