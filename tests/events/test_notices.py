"""Upstream change notices cross replicas through PostgreSQL: the payload, and two relays on one database."""

from __future__ import annotations

import contextlib
import json
import logging
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from functools import partial

import anyio
import pytest
from hypothesis import given
from hypothesis import strategies as st
from mcp.shared.subscriptions import (
    PromptsListChanged,
    ResourcesListChanged,
    ResourceUpdated,
    ServerEvent,
    ToolsListChanged,
)

from bastion.db.engine import create_engine
from bastion.events import pg as pg_events
from bastion.events.bus import EventBus
from bastion.events.notices import MAX_PAYLOAD_BYTES, NoticeRelay, decode, encode
from bastion.upstream.notifications import Notice, UpstreamNotices

SERVER = "0190a1b2-c3d4-7e5f-8a9b-0c1d2e3f4a5b"
IDENTITY = "0190a1b2-c3d4-7e5f-8a9b-0c1d2e3f4a6c"
EVENTS: tuple[ServerEvent, ...] = (
    ToolsListChanged(),
    PromptsListChanged(),
    ResourcesListChanged(),
    ResourceUpdated(uri='file:///notes/ünïcode "quoted" \\ and\ncontrol'),
)
WAIT_S = 10


# --- the payload -------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("identity", [IDENTITY, None], ids=["identity", "no-credential"])
@pytest.mark.parametrize("event", EVENTS, ids=lambda e: type(e).__name__)
def test_a_notice_survives_the_payload_and_arrives_marked_relayed(event: ServerEvent, identity: str | None) -> None:
    payload = encode("replica-a", Notice(SERVER, identity, event))
    assert payload is not None and payload.isascii()
    assert decode(payload) == ("replica-a", Notice(SERVER, identity, event, relayed=True))


@given(server=st.text(), identity=st.none() | st.text(), uri=st.text(), replica=st.text(min_size=1))
def test_any_notice_that_fits_round_trips_and_any_payload_fits_a_notify(
    server: str, identity: str | None, uri: str, replica: str
) -> None:
    notice = Notice(server, identity, ResourceUpdated(uri=uri))
    payload = encode(replica, notice)
    if payload is None:
        return
    assert len(payload.encode("utf-8")) < 8000
    assert decode(payload) == (replica, Notice(server, identity, ResourceUpdated(uri=uri), relayed=True))


def test_a_uri_up_to_the_bound_is_sent_and_one_beyond_it_is_not() -> None:
    empty = encode("replica-a", Notice(SERVER, IDENTITY, ResourceUpdated(uri="")))
    assert empty is not None
    room = MAX_PAYLOAD_BYTES - len(empty)
    fitting = encode("replica-a", Notice(SERVER, IDENTITY, ResourceUpdated(uri="u" * room)))
    assert fitting is not None and len(fitting) == MAX_PAYLOAD_BYTES
    assert encode("replica-a", Notice(SERVER, IDENTITY, ResourceUpdated(uri="u" * (room + 1)))) is None
    # An escaped character counts as what it takes on the wire, not as one.
    assert encode("replica-a", Notice(SERVER, IDENTITY, ResourceUpdated(uri="é" * (room // 6 + 1)))) is None


@pytest.mark.parametrize(
    "payload",
    [
        "",
        "not json",
        "host:0190a1b2",  # a change event's encoding, on the wrong channel
        "[1, 2]",
        "[" * 5000 + "]" * 5000,
        json.dumps({"server": SERVER, "identity": None, "event": "tools"}),
        json.dumps({"replica": "r", "identity": None, "event": "tools"}),
        json.dumps({"replica": "r", "server": SERVER, "identity": 7, "event": "tools"}),
        json.dumps({"replica": "r", "server": SERVER, "identity": None, "event": "everything"}),
        json.dumps({"replica": "r", "server": SERVER, "identity": None, "event": "updated"}),
        json.dumps({"replica": "r", "server": SERVER, "identity": None, "event": "updated", "uri": 3}),
    ],
)
def test_a_payload_that_is_not_a_notice_decodes_to_nothing(payload: str) -> None:
    assert decode(payload) is None


# --- one relay, no database ----------------------------------------------------------------------------------------


@dataclass
class Heard:
    """What one process's local listeners were told, with an event for "something more arrived"."""

    notices: list[Notice] = field(default_factory=list[Notice])
    arrived: anyio.Event = field(default_factory=anyio.Event)

    def __call__(self, notice: Notice) -> None:
        self.notices.append(notice)
        self.arrived.set()

    async def wait_for(self, count: int) -> None:
        with anyio.fail_after(WAIT_S):
            while len(self.notices) < count:
                await self.arrived.wait()
                self.arrived = anyio.Event()


def test_a_replica_ignores_its_own_notices_and_malformed_ones_and_tells_its_listeners_the_others() -> None:
    notices, heard = UpstreamNotices(), Heard()
    notices.subscribe(heard)
    relay = NoticeRelay(create_engine("postgresql://nobody@127.0.0.1:1/none"), notices, replica_id="me")
    tools = Notice(SERVER, None, ToolsListChanged())
    for sender in ("me", "other"):
        payload = encode(sender, tools)
        assert payload is not None
        relay.hear(payload)
    relay.hear("garbage")
    assert heard.notices == [Notice(SERVER, None, ToolsListChanged(), relayed=True)]


class _Recording(logging.Handler):
    """Sets ``arrived`` on each warning of the relay's logger, so a test waits for the log line, not a clock."""

    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.messages: list[str] = []
        self.arrived = anyio.Event()

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage())
        self.arrived.set()


@pytest.fixture
def warnings() -> Iterator[_Recording]:
    handler = _Recording()
    logger = logging.getLogger("bastion.events.notices")
    logger.addHandler(handler)
    try:
        yield handler
    finally:
        logger.removeHandler(handler)


@pytest.mark.anyio
async def test_an_unreachable_database_drops_the_notice_with_a_warning_and_the_relay_goes_on(
    warnings: _Recording,
) -> None:
    notices = UpstreamNotices()
    engine = create_engine("postgresql://nobody@127.0.0.1:1/none")  # nothing listens on port 1
    relay = NoticeRelay(engine, notices)
    ready = anyio.Event()
    try:
        async with anyio.create_task_group() as tasks:
            tasks.start_soon(lambda: relay.run(ready=ready))
            with anyio.fail_after(WAIT_S):
                await ready.wait()
                for expected in (1, 2):
                    notices.publish(Notice(SERVER, IDENTITY, ToolsListChanged()))  # returns at once, never raises
                    while len(warnings.messages) < expected:
                        await warnings.arrived.wait()
                        warnings.arrived = anyio.Event()
            tasks.cancel_scope.cancel()
    finally:
        await engine.dispose()
    assert all("could not send upstream notices" in message for message in warnings.messages)


# --- two replicas on one PostgreSQL database -----------------------------------------------------------------------


@dataclass
class Replica:
    notices: UpstreamNotices
    relay: NoticeRelay
    heard: Heard


@contextlib.asynccontextmanager
async def two_replicas(url: str) -> AsyncIterator[tuple[Replica, Replica]]:
    """Two processes' relays on one database, each sending and listening as a replica's lifespan has them do."""
    engines = [create_engine(url, pool_size=2) for _ in range(2)]
    pair: list[Replica] = []
    for engine in engines:
        notices, heard = UpstreamNotices(), Heard()
        notices.subscribe(heard)
        pair.append(Replica(notices, NoticeRelay(engine, notices), heard))
    try:
        async with anyio.create_task_group() as tasks:
            for replica in pair:
                sending, listening = anyio.Event(), anyio.Event()
                tasks.start_soon(partial(replica.relay.run, ready=sending))
                tasks.start_soon(
                    partial(pg_events.listen, url, EventBus(), ready=listening, notices=replica.relay.hear)
                )
                with anyio.fail_after(WAIT_S):
                    await sending.wait()
                    await listening.wait()
            yield pair[0], pair[1]
            tasks.cancel_scope.cancel()
    finally:
        for engine in engines:
            await engine.dispose()


@pytest.mark.anyio
async def test_a_notice_one_replica_hears_reaches_the_other_once_and_never_comes_back(pg_migrated_url: str) -> None:
    first = Notice(SERVER, IDENTITY, ToolsListChanged())
    too_long = Notice(SERVER, IDENTITY, ResourceUpdated(uri="mem://" + "x" * MAX_PAYLOAD_BYTES))
    async with two_replicas(pg_migrated_url) as (a, b):
        a.notices.publish(too_long)  # not sent: the other replica never hears of it
        a.notices.publish(first)
        await b.heard.wait_for(1)
        empty = encode(b.relay.replica_id, Notice(SERVER, None, ResourceUpdated(uri="")))
        assert empty is not None
        second = Notice(SERVER, None, ResourceUpdated(uri="u" * (MAX_PAYLOAD_BYTES - len(empty))))  # PostgreSQL's most
        b.notices.publish(second)
        await a.heard.wait_for(3)
    # A's NOTIFY of `first` reached A's own listening connection before B's `second` (commit order): it was
    # ignored. Had B sent `first` on again, A would have heard it before `second` as well.
    assert a.heard.notices == [too_long, first, Notice(SERVER, None, second.event, relayed=True)]
    assert b.heard.notices == [Notice(SERVER, IDENTITY, ToolsListChanged(), relayed=True), second]
