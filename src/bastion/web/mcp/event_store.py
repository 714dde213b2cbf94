"""A bounded in-memory SSE event store, so a legacy-era caller can resume a dropped stream (`Last-Event-ID`).

Event ids are random, so one caller cannot guess its way into another caller's stream; the oldest events
are forgotten first once the store is full. Resumption therefore works within one replica, for recent events.
Messages are kept as the JSON the SDK sends them as (a sixth of the memory of the message objects: a full
store of small results is about 1.5 MB instead of 9.5) and read back only when a stream is resumed.
"""

from __future__ import annotations

import secrets
from collections import OrderedDict
from typing import Final

from mcp.server.streamable_http import EventCallback, EventId, EventMessage, EventStore, StreamId
from mcp_types import JSONRPCMessage, jsonrpc_message_adapter

DEFAULT_MAX_EVENTS: Final = 10_000


class BoundedEventStore(EventStore):
    def __init__(self, max_events: int = DEFAULT_MAX_EVENTS) -> None:
        self._max = max_events
        self._events: OrderedDict[EventId, tuple[StreamId, str | None]] = OrderedDict()

    def __repr__(self) -> str:
        return f"BoundedEventStore(events={len(self._events)})"

    async def store_event(self, stream_id: StreamId, message: JSONRPCMessage | None) -> EventId:
        event_id = secrets.token_urlsafe(12)
        # As the SDK writes an event's data, so a replayed message is the one first sent.
        stored = message.model_dump_json(by_alias=True, exclude_unset=True) if message is not None else None
        self._events[event_id] = (stream_id, stored)
        while len(self._events) > self._max:
            self._events.popitem(last=False)
        return event_id

    async def replay_events_after(self, last_event_id: EventId, send_callback: EventCallback) -> StreamId | None:
        found = self._events.get(last_event_id)
        if found is None:
            return None
        stream = found[0]
        after = False
        for event_id, (stream_id, message) in list(self._events.items()):
            if event_id == last_event_id:
                after = True
            elif after and stream_id == stream and message is not None:
                await send_callback(EventMessage(jsonrpc_message_adapter.validate_json(message), event_id))
        return stream
