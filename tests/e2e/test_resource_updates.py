"""`resources/updated` relayed: an agent hears the updates of the resources it subscribed to, and of no other.

A 2026-era agent asks on a `subscriptions/listen` stream (`resourceSubscriptions`), a handshake-era one with
`resources/subscribe`. Bastion holds the subscription at the upstream in the upstream's own era
(`resources/subscribe`, or a listen stream naming the URI), once per identity and URI however many agents
hold it, and lets it go when the last of them does. The upstream here honours subscriptions to its two
resources only, logs what it was asked, and announces an update when the test says so; readiness is waited
on (the acknowledgement, the upstream's GET stream), never slept on.
"""

from __future__ import annotations

import contextlib
import warnings
from collections import defaultdict
from collections.abc import AsyncGenerator
from dataclasses import dataclass, field
from typing import Any

import anyio
import httpx2
import mcp_types as types
import pytest
from mcp import Client
from mcp.client.session import IncomingMessage
from mcp.client.streamable_http import streamable_http_client
from mcp.client.subscriptions import Subscription
from mcp.server import Server, ServerRequestContext
from mcp.server.session import ServerSession
from mcp.server.subscriptions import InMemorySubscriptionBus, ListenHandler, ResourceUpdated
from mcp.shared.exceptions import MCPDeprecationWarning, MCPError
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from bastion.db.store import Store
from bastion.domain.actor import Actor
from bastion.domain.identities import bearer_secret
from bastion.domain.models import AuthKind, ProtocolEra, Transport
from bastion.domain.specs import GatewayServerSpec, GatewaySpec, HostSpec, MemberSpec, ServerSpec
from bastion.services import connections, gateways, hosts, identities, members, servers
from bastion.services.apikeys import KeyHasher
from bastion.settings import Settings
from bastion.web.app import create_app
from tests.mcp_support import gateway_client, mcp_app, serving

pytestmark = [pytest.mark.anyio, pytest.mark.e2e]
UPSTREAM_ERAS = (ProtocolEra.LEGACY, ProtocolEra.MODERN)
WAIT_S = 10
NOTE, OTHER, UNKNOWN = "mem://note", "mem://other", "mem://unknown"
ADA = "Bearer ada-own-credential"
LIST_CHANGED = "resources/list_changed"


@dataclass
class Upstream:
    """A server of two resources; ``log``: (what, credential, URI) for each subscription made and let go."""

    buses: dict[str, InMemorySubscriptionBus] = field(default_factory=lambda: defaultdict(InMemorySubscriptionBus))
    subscribed: dict[tuple[str, str], ServerSession] = field(default_factory=dict[tuple[str, str], ServerSession])
    log: list[tuple[str, str, str]] = field(default_factory=list[tuple[str, str, str]])
    dropped: dict[tuple[str, str], anyio.Event] = field(default_factory=lambda: defaultdict(anyio.Event))
    get_streams: dict[str, int] = field(default_factory=lambda: defaultdict(int))
    get_opened: anyio.Event = field(default_factory=anyio.Event)

    async def update(self, uri: str) -> None:
        """The resource changed: tell whoever subscribed to it (a listen stream, or a session's GET stream)."""
        for bus in list(self.buses.values()):
            await bus.publish(ResourceUpdated(uri))
        for (_credential, subscribed), session in list(self.subscribed.items()):
            if subscribed == uri:
                with contextlib.suppress(anyio.ClosedResourceError, anyio.BrokenResourceError):  # a session gone
                    await session.send_resource_updated(uri)

    async def wait_get_streams(self, credential: str, count: int) -> None:
        with anyio.fail_after(WAIT_S):
            while self.get_streams[credential] < count:
                await self.get_opened.wait()
                self.get_opened = anyio.Event()

    def let_go(self, credential: str, uri: str, what: str) -> None:
        self.log.append((what, credential, uri))
        self.dropped[(credential, uri)].set()


def _credential(ctx: ServerRequestContext[Any, Any]) -> str:
    request = ctx.request
    return request.headers.get("authorization", "<none>") if request is not None else "<none>"


def resource_upstream(upstream: Upstream) -> ASGIApp:
    async def list_resources(_ctx: ServerRequestContext[Any, Any], _p: Any) -> types.ListResourcesResult:
        return types.ListResourcesResult(resources=[types.Resource(name=uri, uri=uri) for uri in (NOTE, OTHER)])

    async def read_resource(_ctx: ServerRequestContext[Any, Any], params: types.ReadResourceRequestParams) -> Any:
        return types.ReadResourceResult(contents=[types.TextResourceContents(uri=str(params.uri), text="text")])

    async def subscribe(ctx: ServerRequestContext[Any, Any], params: types.SubscribeRequestParams) -> Any:
        uri = str(params.uri)
        if uri not in (NOTE, OTHER):
            raise MCPError(types.INVALID_PARAMS, "Resource not found", {"uri": uri})
        upstream.subscribed[(_credential(ctx), uri)] = ctx.session
        upstream.log.append(("subscribe", _credential(ctx), uri))
        return types.EmptyResult()

    async def unsubscribe(ctx: ServerRequestContext[Any, Any], params: types.UnsubscribeRequestParams) -> Any:
        upstream.subscribed.pop((_credential(ctx), str(params.uri)), None)
        upstream.let_go(_credential(ctx), str(params.uri), "unsubscribe")
        return types.EmptyResult()

    async def listen(ctx: ServerRequestContext[Any, Any], params: types.SubscriptionsListenRequestParams) -> Any:
        credential = _credential(ctx)
        asked = params.notifications
        known = [uri for uri in asked.resource_subscriptions or () if uri in (NOTE, OTHER)]
        params = params.model_copy(
            update={"notifications": asked.model_copy(update={"resource_subscriptions": known or None})}
        )
        upstream.log.extend(("listen", credential, uri) for uri in known)
        try:
            return await ListenHandler(upstream.buses[credential])(ctx, params)
        finally:
            for uri in known:
                upstream.let_go(credential, uri, "unlisten")

    with warnings.catch_warnings():  # resources/subscribe is deprecated on 2026-07-28, still the handshake era's
        warnings.simplefilter("ignore", MCPDeprecationWarning)
        server: Server[Any] = Server(  # pyright: ignore[reportDeprecated]
            "resource-upstream",
            on_list_resources=list_resources,
            on_read_resource=read_resource,
            on_subscribe_resource=subscribe,
            on_unsubscribe_resource=unsubscribe,
            on_subscriptions_listen=listen,
        )
    app = mcp_app(server)

    async def watched(scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["method"] != "GET":
            await app(scope, receive, send)
            return
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope["headers"]}

        async def watching(message: Message) -> None:
            await send(message)
            if message["type"] == "http.response.start" and message["status"] == 200:
                upstream.get_streams[headers.get("authorization", "<none>")] += 1  # the GET stream is registered
                upstream.get_opened.set()

        await app(scope, receive, watching)

    return watched


@dataclass
class Ear:
    """What one listen stream (or handshake-era session) heard: updated URIs, and resources list changes."""

    heard: list[str] = field(default_factory=list[str])
    changed: anyio.Event = field(default_factory=anyio.Event)
    ended: anyio.Event = field(default_factory=anyio.Event)

    def hear(self, item: str) -> None:
        self.heard.append(item)
        self.changed.set()

    async def wait_for(self, item: str) -> None:
        with anyio.fail_after(WAIT_S):
            while item not in self.heard:
                await self.changed.wait()
                self.changed = anyio.Event()


@contextlib.asynccontextmanager
async def listening(client: Client, *uris: str) -> AsyncGenerator[tuple[Subscription, Ear]]:
    """An acknowledged listen stream for ``uris`` (and resource list changes), heard until it is left."""
    ear = Ear()

    async def drain(subscription: Subscription) -> None:
        async for event in subscription:
            ear.hear(event.uri if isinstance(event, ResourceUpdated) else LIST_CHANGED)
        ear.ended.set()  # the server closed the stream

    async with (
        client.listen(resources_list_changed=True, resource_subscriptions=uris) as subscription,
        anyio.create_task_group() as tg,
    ):
        tg.start_soon(drain, subscription)
        yield subscription, ear
        tg.cancel_scope.cancel()


@contextlib.asynccontextmanager
async def legacy_agent(url: str, token: str) -> AsyncGenerator[tuple[Client, Ear]]:
    """A handshake-era agent whose GET stream is open, hearing updates and resource list changes on it."""
    get_open = anyio.Event()
    ear = Ear()

    async def on_response(response: httpx2.Response) -> None:
        if response.request.method == "GET" and response.status_code == 200:
            get_open.set()

    async def on_message(message: IncomingMessage) -> None:
        if isinstance(message, types.ResourceUpdatedNotification):
            ear.hear(str(message.params.uri))
        elif isinstance(message, types.ResourceListChangedNotification):
            ear.hear(LIST_CHANGED)

    async with (
        httpx2.AsyncClient(
            headers={"Authorization": f"Bearer {token}"}, timeout=30, event_hooks={"response": [on_response]}
        ) as http,
        Client(
            streamable_http_client(url, http_client=http), mode="legacy", cache=None, message_handler=on_message
        ) as client,
    ):
        with anyio.fail_after(WAIT_S):
            await get_open.wait()
        yield client, ear


async def _world(store: Store, operator: Actor, url: str, era: ProtocolEra) -> None:
    spec = ServerSpec("crm", Transport.STREAMABLE_HTTP, url=url, auth_kind=AuthKind.BEARER, era=era)
    await servers.create(store, operator, spec)
    await gateways.create(store, operator, GatewaySpec("sales", servers=(GatewayServerSpec("crm"),)))
    await hosts.create(store, operator, HostSpec("agent"))


async def _enroll(store: Store, vault: Any, hasher: KeyHasher, operator: Actor, name: str) -> tuple[str, str]:
    """The member's access token, and the id of their own identity at crm."""
    email = f"{name}@example.com"
    await members.create(store, operator, MemberSpec(email, name))
    secret = bearer_secret(f"{name}-own-credential")
    identity = await identities.create(store, vault, hasher, operator, server="crm", owner=email, secret=secret)
    _c, _t, token = await connections.create(store, hasher, operator, host="agent", gateway="sales", member=email)
    return token, identity.id


async def _ready(upstream: Upstream, era: ProtocolEra, get_streams: int = 1) -> None:
    # A handshake-era upstream announces updates on the session's GET stream, which opens after the handshake.
    if era is ProtocolEra.LEGACY:
        await upstream.wait_get_streams(ADA, get_streams)


@pytest.mark.parametrize("era", UPSTREAM_ERAS, ids=lambda e: f"upstream-{e.value}")
async def test_a_2026_era_agent_hears_updates_of_the_resources_it_listens_for_and_of_no_other(
    era: ProtocolEra, settings: Settings, store: Store, vault: Any, hasher: KeyHasher, operator: Actor
) -> None:
    upstream = Upstream()
    async with serving(resource_upstream(upstream)) as upstream_url:
        await _world(store, operator, f"{upstream_url}/mcp", era)
        token, _identity = await _enroll(store, vault, hasher, operator, "ada")
        async with (
            serving(create_app(settings, store)) as bastion,
            gateway_client(f"{bastion}/g/sales/mcp", token, "2026-07-28") as client,
            listening(client, NOTE, UNKNOWN) as (note_stream, note),
            listening(client, OTHER) as (other_stream, other),
        ):
            discovered = await client.session.send_discover("2026-07-28")
            assert discovered["capabilities"]["resources"] == {"subscribe": True, "listChanged": True}
            # Acknowledged exactly: the URI no server took a subscription to is left out.
            assert note_stream.honored.resource_subscriptions == [NOTE]
            assert note_stream.honored.resources_list_changed is True
            assert other_stream.honored.resource_subscriptions == [OTHER]
            await _ready(upstream, era)
            await upstream.update(NOTE)
            await note.wait_for(NOTE)
            await upstream.update(OTHER)
            await other.wait_for(OTHER)
            # A change every stream hears comes after anything relayed before it, on each stream.
            await gateways.update(store, operator, "sales", {"name": "Sales, renamed"})
            await note.wait_for(LIST_CHANGED)
            await other.wait_for(LIST_CHANGED)
            assert note.heard == [NOTE, LIST_CHANGED]
            assert other.heard == [OTHER, LIST_CHANGED]
    how = "subscribe" if era is ProtocolEra.LEGACY else "listen"
    assert [entry for entry in upstream.log if entry[0] == how] == [(how, ADA, NOTE), (how, ADA, OTHER)]


@pytest.mark.parametrize("era", UPSTREAM_ERAS, ids=lambda e: f"upstream-{e.value}")
async def test_an_upstream_subscription_is_let_go_only_when_the_last_stream_holding_it_ends(
    era: ProtocolEra, settings: Settings, store: Store, vault: Any, hasher: KeyHasher, operator: Actor
) -> None:
    upstream = Upstream()
    how, undo = ("subscribe", "unsubscribe") if era is ProtocolEra.LEGACY else ("listen", "unlisten")
    async with serving(resource_upstream(upstream)) as upstream_url:
        await _world(store, operator, f"{upstream_url}/mcp", era)
        token, _identity = await _enroll(store, vault, hasher, operator, "ada")
        async with (
            serving(create_app(settings, store)) as bastion,
            gateway_client(f"{bastion}/g/sales/mcp", token, "2026-07-28") as client,
        ):
            async with listening(client, NOTE) as (_stream, staying):
                async with listening(client, NOTE, OTHER) as (leaving_stream, _leaving):
                    assert leaving_stream.honored.resource_subscriptions == [NOTE, OTHER]
                    # One upstream subscription per URI for the identity, however many streams hold it.
                    assert upstream.log == [(how, ADA, NOTE), (how, ADA, OTHER)]
                # The leaving stream's URIs are let go of together: once OTHER is, NOTE was kept, not let go.
                with anyio.fail_after(WAIT_S):
                    await upstream.dropped[(ADA, OTHER)].wait()
                assert upstream.log == [(how, ADA, NOTE), (how, ADA, OTHER), (undo, ADA, OTHER)]
                await _ready(upstream, era)
                await upstream.update(NOTE)
                await staying.wait_for(NOTE)
            with anyio.fail_after(WAIT_S):
                await upstream.dropped[(ADA, NOTE)].wait()
    assert upstream.log == [(how, ADA, NOTE), (how, ADA, OTHER), (undo, ADA, OTHER), (undo, ADA, NOTE)]


@pytest.mark.parametrize("era", UPSTREAM_ERAS, ids=lambda e: f"upstream-{e.value}")
async def test_a_listen_stream_ends_when_its_upstream_subscription_is_lost_and_listening_again_subscribes_afresh(
    era: ProtocolEra, settings: Settings, store: Store, vault: Any, hasher: KeyHasher, operator: Actor
) -> None:
    upstream = Upstream()
    renewed = "Bearer ada-renewed-credential"
    async with serving(resource_upstream(upstream)) as upstream_url:
        await _world(store, operator, f"{upstream_url}/mcp", era)
        token, identity_id = await _enroll(store, vault, hasher, operator, "ada")
        async with (
            serving(create_app(settings, store)) as bastion,
            gateway_client(f"{bastion}/g/sales/mcp", token, "2026-07-28") as client,
        ):
            async with listening(client, NOTE) as (_stream, first):
                # A new secret closes the identity's upstream sessions, and the subscription with them.
                secret = bearer_secret("ada-renewed-credential")
                await identities.update(store, vault, hasher, operator, identity_id, secret=secret)
                with anyio.fail_after(WAIT_S):
                    await first.ended.wait()
            async with listening(client, NOTE) as (stream, second):
                assert stream.honored.resource_subscriptions == [NOTE]
                if era is ProtocolEra.LEGACY:
                    await upstream.wait_get_streams(renewed, 1)
                await upstream.update(NOTE)
                await second.wait_for(NOTE)
    how = "subscribe" if era is ProtocolEra.LEGACY else "listen"
    assert [entry for entry in upstream.log if entry[0] == how] == [(how, ADA, NOTE), (how, renewed, NOTE)]


@pytest.mark.parametrize("era", UPSTREAM_ERAS, ids=lambda e: f"upstream-{e.value}")
async def test_a_handshake_era_agent_hears_updates_of_what_it_subscribed_to_beside_a_2026_era_agent(
    era: ProtocolEra, settings: Settings, store: Store, vault: Any, hasher: KeyHasher, operator: Actor
) -> None:
    upstream = Upstream()
    async with serving(resource_upstream(upstream)) as upstream_url:
        await _world(store, operator, f"{upstream_url}/mcp", era)
        token, _identity = await _enroll(store, vault, hasher, operator, "ada")
        async with (
            serving(create_app(settings, store)) as bastion,
            legacy_agent(f"{bastion}/g/sales/mcp", token) as (legacy_client, legacy),
            gateway_client(f"{bastion}/g/sales/mcp", token, "2026-07-28") as client,
            listening(client, OTHER) as (_stream, modern),
        ):
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", MCPDeprecationWarning)
                await legacy_client.subscribe_resource(NOTE)  # pyright: ignore[reportDeprecated]
            await _ready(upstream, era)
            await upstream.update(NOTE)
            await legacy.wait_for(NOTE)
            await upstream.update(OTHER)
            await modern.wait_for(OTHER)
            await gateways.update(store, operator, "sales", {"name": "Sales, renamed"})
            await legacy.wait_for(LIST_CHANGED)
            await modern.wait_for(LIST_CHANGED)
            assert legacy.heard == [NOTE, LIST_CHANGED]
            assert modern.heard == [OTHER, LIST_CHANGED]
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", MCPDeprecationWarning)
                await legacy_client.unsubscribe_resource(NOTE)  # pyright: ignore[reportDeprecated]
            with anyio.fail_after(WAIT_S):
                await upstream.dropped[(ADA, NOTE)].wait()
            assert not upstream.dropped[(ADA, OTHER)].is_set()
