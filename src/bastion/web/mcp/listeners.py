"""Live downstream sessions that hear list_changed and resource updates, by gateway, and the one task that tells them.

Two kinds of listener, one per protocol era: a handshake-era session (its notifications go on the
session's GET stream; it leaves when the session ends) and a 2026-era `subscriptions/listen` stream (it
leaves when the stream does). What is relayed: an upstream's change notice to the sessions whose
principal it concerns (`Proxy.reaches`: their gateway mounts the server and, for a per-user server,
their own identity's session sent it), and Bastion's own changes (a gateway's servers, aliases or
provisioning; a workspace's policy) to every session they change the listings of. A `resources/updated`
goes only to listeners holding a subscription to its URI (``Listener.held``; let go of when they leave).
"""

from __future__ import annotations

import logging
from collections.abc import AsyncGenerator, Awaitable, Callable, Mapping
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any, Final

import anyio
import mcp_types as types
from anyio.streams.memory import MemoryObjectReceiveStream, MemoryObjectSendStream
from mcp.server import ServerRequestContext
from mcp.server.connection import Connection
from mcp.shared.exceptions import MCPError
from mcp.shared.subscriptions import (
    SUBSCRIPTION_ID_META_KEY,
    PromptsListChanged,
    ResourcesListChanged,
    ResourceUpdated,
    ServerEvent,
    ToolsListChanged,
    event_matches,
    event_to_notification,
)
from mcp_types.version import MODERN_PROTOCOL_VERSIONS

from bastion.domain.connections import Principal
from bastion.errors import BastionError
from bastion.events.bus import Changed, Subject
from bastion.services.proxy import Proxy
from bastion.upstream.notifications import LIST_CHANGES, Notice
from bastion.upstream.subscriptions import Release

logger = logging.getLogger("bastion.mcp")
MAX_PENDING_CHANGES: Final = 4096
SEND_TIMEOUT_S: Final = 5.0

ACCESS_ENDED: Final = -32057  # a listen stream ended because a change refused its token (host disabled, revoked…)
MAX_RESOURCE_SUBSCRIPTIONS: Final = 64  # per listen stream; further URIs are left out of its acknowledgement

Deliver = Callable[[ServerEvent], Awaitable[None]]
Subscribe = Callable[[Principal, str, Callable[[], None]], Awaitable[Release | None]]


def _nothing() -> None:
    return None


@dataclass(eq=False, slots=True)
class Listener:
    """One downstream session (or listen stream) of ``principal``; ``held``: the resource URIs it subscribed to,
    each with how to let go of its upstream subscriptions."""

    principal: Principal
    deliver: Deliver
    held: dict[str, Release] = field(default_factory=dict[str, Release])
    gateway_id: str = ""  # where the registry keeps it (a session's later requests may name another gateway)
    live: bool = True  # False once removed: a subscription made meanwhile is let go of at once
    # Ends the stream when a change refuses its token (a listen stream answers with the error; a handshake-era
    # session is ended with its session, ``Handshakes.end``).
    end: Callable[[BastionError], None] = field(default=lambda _error: None)

    def wants(self, event: ServerEvent) -> bool:
        return not isinstance(event, ResourceUpdated) or event.uri in self.held


Change = Notice | Changed


class Listeners:
    """The registry: gateway id → live listeners. Run ``async with listeners.running():`` for delivery."""

    def __init__(self, proxy: Proxy) -> None:
        self._proxy = proxy
        self._by_gateway: dict[str, set[Listener]] = {}
        self._send: MemoryObjectSendStream[Change] | None = None

    def __repr__(self) -> str:
        return f"Listeners(gateways={len(self._by_gateway)}, live={self.count})"

    @property
    def count(self) -> int:
        return sum(len(listeners) for listeners in self._by_gateway.values())

    def token_ids(self) -> set[str]:
        return {listener.principal.token_id for live in self._by_gateway.values() for listener in live}

    def end(self, refused: Mapping[str, BastionError]) -> int:
        """End the listeners whose token ``refused`` names, each with its refusal; how many."""
        everyone = [listener for live in self._by_gateway.values() for listener in live]
        ended = [listener for listener in everyone if listener.principal.token_id in refused]
        for listener in ended:
            listener.end(refused[listener.principal.token_id])
        return len(ended)

    def add(
        self, principal: Principal, deliver: Deliver, end: Callable[[BastionError], None] | None = None
    ) -> Listener:
        listener = Listener(principal, deliver, gateway_id=principal.gateway_id)
        if end is not None:
            listener.end = end
        self._by_gateway.setdefault(principal.gateway_id, set()).add(listener)
        return listener

    def move(self, listener: Listener, principal: Principal) -> None:
        """The listener now acts for ``principal`` (a session's token may reach it through another gateway)."""
        if listener.gateway_id != principal.gateway_id:
            self._unfile(listener)
            listener.gateway_id = principal.gateway_id
            self._by_gateway.setdefault(principal.gateway_id, set()).add(listener)
        listener.principal = principal

    def remove(self, listener: Listener) -> None:
        """The listener leaves; the resource subscriptions it held are let go of."""
        listener.live = False
        self._unfile(listener)
        while listener.held:
            _uri, release = listener.held.popitem()
            release()

    def hold(self, listener: Listener, uri: str, release: Release | None) -> None:
        """``listener`` now hears ``uri``'s updates; ``release`` lets go of its upstream subscriptions (None: it
        holds none here, yet may hear updates another replica's subscription brings)."""
        release = release or _nothing
        if not listener.live or uri in listener.held:
            release()  # it left meanwhile, or already holds one (a concurrent subscribe): not needed twice
            return
        listener.held[uri] = release

    def let_go(self, listener: Listener, uri: str) -> None:
        release = listener.held.pop(uri, None)
        if release is not None:
            release()

    def _unfile(self, listener: Listener) -> None:
        live = self._by_gateway.get(listener.gateway_id)
        if live is None:
            return
        live.discard(listener)
        if not live:
            del self._by_gateway[listener.gateway_id]

    @asynccontextmanager
    async def running(self) -> AsyncGenerator[Listeners]:
        send, receive = anyio.create_memory_object_stream[Change](MAX_PENDING_CHANGES)
        unsubscribe = (self._proxy.notices.subscribe(self._queue), self._proxy.bus.subscribe(self._queue))
        self._send = send
        try:
            async with anyio.create_task_group() as tasks:
                tasks.start_soon(self._relay, receive)
                try:
                    yield self
                finally:
                    tasks.cancel_scope.cancel()
        finally:
            self._send = None
            for stop in unsubscribe:
                stop()
            send.close()

    def _queue(self, change: Change) -> None:
        if self._send is None or not self._by_gateway:
            return  # nobody listens: nothing to do
        if isinstance(change, Changed) and change.subject not in (Subject.GATEWAY, Subject.POLICY, Subject.ALL):
            return
        try:
            self._send.send_nowait(change)
        except anyio.WouldBlock:
            logger.warning("list_changed relay backlog full; dropped one change", extra={"change": repr(change)})

    async def _relay(self, receive: MemoryObjectReceiveStream[Change]) -> None:
        async with receive:
            async for change in receive:
                try:
                    for listener, events in await self._audience(change):
                        for event in events:
                            if listener.wants(event):
                                await self._deliver(listener, event)
                except Exception:
                    logger.exception("could not relay a list change", extra={"change": repr(change)})

    async def _audience(self, change: Change) -> list[tuple[Listener, tuple[ServerEvent, ...]]]:
        everyone = [listener for live in list(self._by_gateway.values()) for listener in live]
        if isinstance(change, Notice):
            reached = [listener for listener in everyone if await self._proxy.reaches(listener.principal, change)]
            return [(listener, (change.event,)) for listener in reached]
        if change.subject is Subject.GATEWAY:
            chosen = list(self._by_gateway.get(change.id, ()))
        elif change.subject is Subject.POLICY:
            chosen = [listener for listener in everyone if listener.principal.workspace_id == change.id]
        else:
            chosen = everyone
        return [(listener, LIST_CHANGES) for listener in chosen]

    @staticmethod
    async def _deliver(listener: Listener, event: ServerEvent) -> None:
        # A session that stopped reading must not hold up everyone else's notifications.
        with anyio.move_on_after(SEND_TIMEOUT_S):
            try:
                await listener.deliver(event)
            except (anyio.ClosedResourceError, anyio.BrokenResourceError, OSError) as exc:
                logger.debug("a downstream session could not take a notification", extra={"reason": repr(exc)})


# --- the two eras' ways in ---------------------------------------------------------------------------------------

_LISTENER_STATE: Final = "bastion.listener"


def _to_connection(connection: Connection) -> Deliver:
    async def deliver(event: ServerEvent) -> None:
        # The connection's standalone channel: the session's GET stream (dropped, not raised, when it has none).
        if isinstance(event, ToolsListChanged):
            await connection.send_tool_list_changed()
        elif isinstance(event, PromptsListChanged):
            await connection.send_prompt_list_changed()
        elif isinstance(event, ResourcesListChanged):
            await connection.send_resource_list_changed()
        else:
            await connection.send_resource_updated(event.uri)

    return deliver


def join(listeners: Listeners, ctx: ServerRequestContext[Any, Any], principal: Principal | None) -> Listener | None:
    """The handshake-era session of ``ctx`` as a listener (added on its first message, removed when it ends)."""
    if principal is None or ctx.protocol_version in MODERN_PROTOCOL_VERSIONS:
        return None
    # The SDK hands handlers no public way to the connection, whose exit stack ends with the session.
    connection = getattr(ctx.session, "_connection", None)
    if not isinstance(connection, Connection) or not connection.has_standalone_channel:
        return None  # a stateless handshake-era request: nowhere to send anything later
    listener = connection.state.get(_LISTENER_STATE)
    if isinstance(listener, Listener):
        listeners.move(listener, principal)  # the same token; its identities may have been changed since
        return listener
    listener = listeners.add(principal, _to_connection(connection))
    connection.state[_LISTENER_STATE] = listener
    connection.exit_stack.callback(listeners.remove, listener)
    return listener


class ListenStreams:
    """`subscriptions/listen` (2026-07-28): each call is a listener until the caller drops the stream.

    Honours the three list_changed kinds, and each asked resource URI (up to ``MAX_RESOURCE_SUBSCRIPTIONS``) that
    some mounted server took a subscription to (``subscribe``: ``Proxy.subscribe``); the acknowledgement names
    exactly those. If one of those upstream subscriptions is lost, the stream ends: its caller listens again.
    """

    def __init__(
        self,
        listeners: Listeners,
        principal: Callable[[], Principal],
        subscribe: Subscribe,
        *,
        max_buffered: int = 256,
    ) -> None:
        self._listeners = listeners
        self._principal = principal
        self._subscribe = subscribe
        self._max_buffered = max_buffered

    async def __call__(
        self, ctx: ServerRequestContext[Any, Any], params: types.SubscriptionsListenRequestParams
    ) -> types.SubscriptionsListenResult:
        principal = self._principal()
        subscription_id = ctx.request_id
        if subscription_id is None:
            raise MCPError(types.INVALID_REQUEST, "subscriptions/listen requires a request id")
        asked = params.notifications
        kinds = types.SubscriptionFilter(
            tools_list_changed=True if asked.tools_list_changed else None,
            prompts_list_changed=True if asked.prompts_list_changed else None,
            resources_list_changed=True if asked.resources_list_changed else None,
        )
        uris = list(dict.fromkeys(asked.resource_subscriptions or ()))[:MAX_RESOURCE_SUBSCRIPTIONS]
        meta: dict[str, Any] = {SUBSCRIPTION_ID_META_KEY: subscription_id}
        send, receive = anyio.create_memory_object_stream[ServerEvent](self._max_buffered)
        refused: list[BastionError] = []

        def end(error: BastionError) -> None:  # a change refused the token: the stream answers with why
            refused.append(error)
            send.close()

        async def deliver(event: ServerEvent) -> None:
            # A resources/updated got here only for a URI the listener holds (``Listener.wants``).
            if isinstance(event, ResourceUpdated) or event_matches(kinds, frozenset(), event):
                try:
                    send.send_nowait(event)
                except anyio.WouldBlock:  # the caller stopped reading: end its stream (it re-listens and refetches)
                    send.close()

        # Registered before subscribing and before the acknowledgement, so a change meanwhile is not lost.
        listener = self._listeners.add(principal, deliver, end)
        try:
            for uri in uris:
                # A lost upstream subscription ends the stream: the caller listens again, which subscribes afresh.
                release = await self._subscribe(principal, uri, send.close)
                if release is not None:  # some server took it: honoured
                    self._listeners.hold(listener, uri, release)
            honored = kinds.model_copy(update={"resource_subscriptions": list(listener.held) or None})
            acknowledged = types.SubscriptionsAcknowledgedNotification(
                params=types.SubscriptionsAcknowledgedNotificationParams(notifications=honored, _meta=meta)
            )
            await ctx.session.send_notification(acknowledged, related_request_id=subscription_id)
            async with receive:
                async for event in receive:
                    notification = event_to_notification(event, meta)
                    await ctx.session.send_notification(notification, related_request_id=subscription_id)
        finally:
            self._listeners.remove(listener)
            send.close()
        if refused:
            raise MCPError(ACCESS_ENDED, f"access ended: {refused[0].detail}")
        return types.SubscriptionsListenResult(_meta=meta)
