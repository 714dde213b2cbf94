"""What upstream sessions announce (tools, prompts or resources changed), tagged with the session it came from.

A handshake-era upstream sends `notifications/*/list_changed` on its session's GET stream; the pooled
client's ``message_handler`` (one per session, from :meth:`UpstreamNotices.handler`) sees them. A
2026-era upstream sends them only on a `subscriptions/listen` stream, so :meth:`UpstreamNotices.watch`
opens one per pooled session once Bastion has listed through it. Either way listeners get a
:class:`Notice` naming the server and the identity whose session heard it, never who should hear it next.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Coroutine
from dataclasses import dataclass
from typing import Any, Final

import mcp_types as types
from mcp import Client
from mcp.client.session import IncomingMessage, MessageHandlerFnT
from mcp.client.subscriptions import ListenNotSupportedError, SubscriptionLost
from mcp.shared.exceptions import MCPError
from mcp.shared.subscriptions import (
    PromptsListChanged,
    ResourcesListChanged,
    ResourceUpdated,
    ServerEvent,
    ToolsListChanged,
)
from mcp_types.version import MODERN_PROTOCOL_VERSIONS

logger = logging.getLogger("bastion.upstream")
LIST_CHANGES: Final[tuple[ServerEvent, ...]] = (ToolsListChanged(), PromptsListChanged(), ResourcesListChanged())


@dataclass(frozen=True, slots=True)
class Notice:
    """An upstream session of ``server_id`` opened with ``identity_id`` (None: no credential) announced ``event``.

    ``relayed``: the session is another replica's, and its notice came here through PostgreSQL
    (``events/notices.py``); such a notice is told to this process's agents but never sent on again.
    """

    server_id: str
    identity_id: str | None
    event: ServerEvent
    relayed: bool = False


Listener = Callable[[Notice], None]


def event_of(message: IncomingMessage) -> ServerEvent | None:
    """The change a server notification announces, or None for anything else (logs, progress, errors)."""
    if isinstance(message, types.ToolListChangedNotification):
        return ToolsListChanged()
    if isinstance(message, types.PromptListChangedNotification):
        return PromptsListChanged()
    if isinstance(message, types.ResourceListChangedNotification):
        return ResourcesListChanged()
    if isinstance(message, types.ResourceUpdatedNotification):
        return ResourceUpdated(uri=str(message.params.uri))
    return None


class UpstreamNotices:
    """Fans out upstream change notices to synchronous listeners (which must not block or raise)."""

    def __init__(self) -> None:
        self._listeners: dict[object, Listener] = {}
        # Pooled clients with a listen stream open (by id: the client is referenced by its task meanwhile).
        self._watched: set[int] = set()

    def subscribe(self, listener: Listener) -> Callable[[], None]:
        token = object()
        self._listeners[token] = listener

        def unsubscribe() -> None:
            self._listeners.pop(token, None)

        return unsubscribe

    def publish(self, notice: Notice) -> None:
        for listener in list(self._listeners.values()):
            try:
                listener(notice)
            except Exception:  # a fan-out boundary: one listener's bug must not starve the others
                logger.exception("an upstream notice listener raised")

    def handler(self, server_id: str, identity_id: str | None) -> MessageHandlerFnT:
        """The ``message_handler`` for one pooled session: its change notifications become notices."""

        async def handle(message: IncomingMessage) -> None:
            event = event_of(message)
            if event is not None:
                self.publish(Notice(server_id, identity_id, event))

        return handle

    def watch(
        self,
        client: Client,
        server_id: str,
        identity_id: str | None,
        start: Callable[[Callable[[], Coroutine[Any, Any, None]]], object],
    ) -> None:
        """Open a listen stream on a 2026-era pooled session (once; ``start`` runs it in the pool's task group).

        Its events reach the session's ``message_handler`` too (the SDK tees them), so this only keeps it open.
        """
        if id(client) in self._watched:
            return
        try:
            version = client.session.protocol_version
        except RuntimeError:  # the session has already closed
            return
        if version not in MODERN_PROTOCOL_VERSIONS:
            return  # handshake era: notifications arrive on the session's GET stream
        self._watched.add(id(client))

        async def listen() -> None:
            try:
                async with client.listen(
                    tools_list_changed=True, prompts_list_changed=True, resources_list_changed=True
                ) as subscription:
                    async for _event in subscription:
                        pass  # delivered through the message handler
            except (MCPError, SubscriptionLost, ListenNotSupportedError, RuntimeError, OSError) as exc:
                # The upstream does not serve listen, or the session ended: nothing more will come from it.
                logger.debug("upstream listen stream ended", extra={"server_id": server_id, "reason": repr(exc)})
            finally:
                self._watched.discard(id(client))

        start(listen)
