"""Resource subscriptions held at upstreams, one per (server, identity, URI), shared by whoever needs them.

A handshake-era upstream is sent `resources/subscribe` (and `resources/unsubscribe` once nobody needs the URI);
a 2026-era upstream has no such request, so the subscription is a `subscriptions/listen` stream of its own
whose filter names the URI, open until nobody needs it. Either way its `resources/updated` reaches the pooled
session's message handler and becomes a ``Notice`` (``notifications.py``): this module only keeps the
subscription in place. It is counted: agents that share an identity (a shared one, or one member's several
sessions) share one upstream subscription, and it is let go when the last of them lets go.

A subscription lives on the pooled session it was made on, which the pool then keeps open through idleness
(``UpstreamPool.keep``). If that session closes anyway (its credential or server changed, the upstream
dropped it) the subscription is lost: it is forgotten and each holder's ``on_lost`` is called, so a 2026-era
listen stream can end and its agent listen again (which subscribes afresh).
"""

from __future__ import annotations

import logging
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Final

import anyio
from mcp import Client
from mcp.shared.exceptions import MCPDeprecationWarning, MCPError
from mcp_types.version import MODERN_PROTOCOL_VERSIONS

from bastion.upstream import relay
from bastion.upstream.pool import Kept, UpstreamPool, UpstreamUnavailable

logger = logging.getLogger("bastion.upstream")
UNSUBSCRIBE_TIMEOUT_S: Final = 10.0
ACK_WAIT_S: Final = 2.0  # longest a listen stream's acknowledgement is waited for before it is presumed

Release = Callable[[], None]
Key = tuple[str, str | None, str]  # (server id, identity id or None, URI)


@dataclass(eq=False, slots=True)
class _Held:
    """One upstream subscription: how many hold it, and the scope that ends it once none does."""

    key: Key
    count: int = 0
    ready: anyio.Event = field(default_factory=anyio.Event)  # the upstream has answered (or failed)
    honoured: bool = False
    error: BaseException | None = None
    lost: bool = False
    scope: anyio.CancelScope = field(default_factory=anyio.CancelScope)  # cancelled when the last holder lets go
    on_lost: dict[object, Callable[[], None]] = field(default_factory=dict[object, Callable[[], None]])


class ResourceSubscriptions:
    """The upstream resource subscriptions this process holds (see the module docstring)."""

    def __init__(self, pool: UpstreamPool) -> None:
        self._pool = pool
        self._held: dict[Key, _Held] = {}

    def __repr__(self) -> str:
        return f"ResourceSubscriptions(held={len(self._held)})"

    async def hold(self, client: Client, key: Key, on_lost: Callable[[], None] | None = None) -> Release | None:
        """Subscribe to ``key``'s URI on ``client`` (the pooled session of its server and identity), or join the
        subscription already held; returns how to let go of it (idempotent), or None when the upstream did not
        take it. ``on_lost`` is called if the subscription ends before it is let go.

        Raises:
            MCPError, TimeoutError, UpstreamUnavailable: the upstream failed to answer (first holder only).
        """
        held = self._held.get(key)
        first = held is None
        if held is None:
            held = self._held[key] = _Held(key)
        held.count += 1
        try:
            if first:
                await self._subscribe(client, held)
            await held.ready.wait()
        except BaseException:
            self._let_go(held)
            raise
        if not held.honoured or held.lost:
            self._let_go(held)
            if first and held.error is not None:
                raise held.error
            return None
        token = object()
        if on_lost is not None:
            held.on_lost[token] = on_lost
        released = False

        def release() -> None:
            nonlocal released
            if not released:
                released = True
                held.on_lost.pop(token, None)
                self._let_go(held)

        return release

    def _let_go(self, held: _Held) -> None:
        held.count -= 1
        if held.count > 0:
            return
        if self._held.get(held.key) is held:
            del self._held[held.key]
        held.scope.cancel()  # the keeper, if one runs, unsubscribes (or closes its listen stream)

    async def _subscribe(self, client: Client, held: _Held) -> None:
        kept = self._pool.keep(client)
        try:
            version = client.session.protocol_version if kept is not None else None
        except RuntimeError:  # the session has just closed
            version = None
        if kept is None or version is None or kept.ended.is_set():
            if kept is not None:
                kept.release()
            held.error = UpstreamUnavailable("the upstream session closed before the subscription was made")
            held.ready.set()
            return
        if version in MODERN_PROTOCOL_VERSIONS:
            # The listen stream's context must be entered and left by one task: the pool's, not this request's.
            if not self._pool.close_later(lambda: self._listen(client, held, kept)):
                kept.release()
                held.error = UpstreamUnavailable("the upstream pool is not running")
                held.ready.set()
            return
        try:
            with warnings.catch_warnings():  # deprecated as of 2026-07-28, still the handshake era's
                warnings.simplefilter("ignore", MCPDeprecationWarning)
                await client.session.subscribe_resource(held.key[2])  # pyright: ignore[reportDeprecated]
            held.honoured = self._pool.close_later(lambda: self._keep(client, held, kept))
        finally:
            held.ready.set()
            if not held.honoured:
                kept.release()

    async def _keep(self, client: Client, held: _Held, kept: Kept) -> None:
        """A handshake-era subscription: wait until nobody needs it (then unsubscribe) or its session ends."""
        relay.downstream.set(None)  # not the request that happened to subscribe first
        try:
            with held.scope:
                await kept.ended.wait()
            if kept.ended.is_set():
                self._lose(held)
                return
            with anyio.move_on_after(UNSUBSCRIBE_TIMEOUT_S), warnings.catch_warnings():
                warnings.simplefilter("ignore", MCPDeprecationWarning)
                await client.session.unsubscribe_resource(held.key[2])  # pyright: ignore[reportDeprecated]
        except Exception as exc:  # noqa: BLE001  a task in the pool's task group must never raise
            logger.info("upstream unsubscribe failed", extra={"server_id": held.key[0], "reason": repr(exc)})
        finally:
            kept.release()

    async def _listen(self, client: Client, held: _Held, kept: Kept) -> None:
        """A 2026-era subscription: a listen stream asking for the URI, open until nobody needs it.

        An upstream that keeps the stream open without an acknowledgement the SDK can read (seen in the wild) is
        presumed to honour it after ``ACK_WAIT_S``: the holder is not kept waiting for the whole call timeout, and
        whatever updates the upstream sends on the stream still reach the session's message handler.
        """
        relay.downstream.set(None)
        uri = held.key[2]
        try:
            with held.scope:
                async with anyio.create_task_group() as waiting:
                    unacknowledged = anyio.CancelScope()

                    async def presume() -> None:
                        with unacknowledged:
                            await anyio.sleep(ACK_WAIT_S)
                            logger.info(
                                "an upstream listen stream was not acknowledged", extra={"server_id": held.key[0]}
                            )
                            held.honoured = True
                            held.ready.set()

                    waiting.start_soon(presume)
                    async with client.listen(resource_subscriptions=[uri]) as subscription:
                        unacknowledged.cancel()
                        if not held.ready.is_set():
                            held.honoured = uri in (subscription.honored.resource_subscriptions or ())
                            held.ready.set()
                        if held.honoured:
                            async for _event in subscription:
                                pass  # its updates reach the session's message handler (the SDK tees them)
            if held.honoured:
                self._lose(held)  # unless let go of: the upstream ended the stream
        except (MCPError, TimeoutError) as exc:  # before the acknowledgement: the holder that subscribed is told
            held.error = exc
            self._lose(held)
        except Exception as exc:  # noqa: BLE001  a task in the pool's task group must never raise
            # Typically SubscriptionLost: the session closed under the stream.
            held.error = UpstreamUnavailable(f"the upstream listen stream ended: {exc!r}")
            self._lose(held)
        finally:
            held.ready.set()
            kept.release()

    def _lose(self, held: _Held) -> None:
        if held.lost or held.scope.cancel_called or not held.honoured:
            return  # let go of already, or never made: nobody to tell
        held.lost = True
        logger.info("an upstream resource subscription was lost", extra={"server_id": held.key[0]})
        if self._held.get(held.key) is held:
            del self._held[held.key]
        for tell in list(held.on_lost.values()):
            try:
                tell()
            except Exception:  # a fan-out boundary: one holder's bug must not keep the others uninformed
                logger.exception("a lost-subscription callback raised")
