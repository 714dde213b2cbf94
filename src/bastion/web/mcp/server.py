"""The one low-level MCP `Server` behind every gateway URL; handlers act for the request's Principal."""

from __future__ import annotations

import logging
import warnings
from collections.abc import AsyncGenerator, Awaitable, Callable
from contextlib import asynccontextmanager
from contextvars import ContextVar
from functools import wraps
from typing import Any, TypeVar, cast

import anyio
import mcp_types as types
from mcp.server import NotificationOptions, Server, ServerRequestContext
from mcp.server.models import InitializationOptions
from mcp.shared.exceptions import MCPDeprecationWarning, MCPError

from bastion import __version__
from bastion.domain.connections import Principal
from bastion.pipeline.errors import (
    to_jsonrpc,
)
from bastion.services.audit import Audit, CallRecord, before_forwarding, current_record
from bastion.services.principals import Resolver
from bastion.services.proxy import Proxy, RoundTrip
from bastion.types import JSONValue
from bastion.upstream import relay
from bastion.web.mcp.listeners import Listeners, ListenStreams, join
from bastion.web.mcp.sentinel import Sentinel
from bastion.web.mcp.sessions import Handshakes

logger = logging.getLogger("bastion.mcp")
current_principal: ContextVar[Principal | None] = ContextVar("bastion_principal", default=None)

R = TypeVar("R")


def _principal() -> Principal:
    principal = current_principal.get()
    if principal is None:  # the endpoint authenticates before the SDK sees the request
        raise MCPError(types.INVALID_REQUEST, "not authenticated")
    return principal


Handler = Callable[[ServerRequestContext[Any, Any], Any], Awaitable[R]]


def _audited(audit: Audit, method: str, listeners: Listeners | None = None) -> Callable[[Handler[R]], Handler[R]]:
    """One audit record per request, and Bastion errors mapped to JSON-RPC, around a handler.

    With ``listeners``, the request's handshake-era session also joins the sessions told about list changes.
    """

    def decorate(fn: Handler[R]) -> Handler[R]:
        @wraps(fn)
        async def wrapper(ctx: ServerRequestContext[Any, Any], params: Any) -> R:
            principal = _principal()
            if listeners is not None:
                join(listeners, ctx, principal)
            name = getattr(params, "name", None) or (str(params.uri) if hasattr(params, "uri") else None)
            record = CallRecord(method=method, gateway=principal.gateway_slug, principal=principal, name=name)
            arguments: Any = getattr(params, "arguments", None)
            if isinstance(arguments, dict):
                record.arguments = cast("dict[str, JSONValue]", arguments).copy()
            async with audit.call(record):
                caller = relay.downstream.set(ctx)
                try:
                    return await fn(ctx, params)
                except MCPError as exc:
                    record.failed(str(exc.code))
                    raise
                except Exception as exc:
                    mapped = to_jsonrpc(exc)
                    record.failed(getattr(exc, "code", None) or str(mapped.code))
                    raise mapped from exc
                finally:
                    relay.downstream.reset(caller)

        return wrapper

    return decorate


class _GatewayServer(Server[Any]):
    """Declares what Bastion relays: list changes and resource updates, in both eras.

    The SDK derives the 2026-era capabilities from `subscriptions/listen` being served (`resources.subscribe`
    included: the listen filter's `resourceSubscriptions` replaces `resources/subscribe`), which Bastion honours.
    """

    def create_initialization_options(
        self,
        notification_options: NotificationOptions | None = None,
        experimental_capabilities: dict[str, dict[str, Any]] | None = None,
        extensions: dict[str, dict[str, Any]] | None = None,
    ) -> InitializationOptions:
        relayed = NotificationOptions(prompts_changed=True, resources_changed=True, tools_changed=True)
        return super().create_initialization_options(
            notification_options or relayed, experimental_capabilities, extensions
        )


def build_server(
    proxy: Proxy, audit: Audit, handshakes: Handshakes | None = None, resolver: Resolver | None = None
) -> Server[Any]:
    """A Server whose handlers read the Principal the endpoint attached to this request.

    ``handshakes`` hears of each handshake-era session once its handshake is complete (the hot path serves them).
    With ``resolver``, what is open for a token (listen streams, sessions) ends once a change refuses it.
    """
    listeners = Listeners(proxy)

    @asynccontextmanager
    async def lifespan(_server: Server[Any]) -> AsyncGenerator[dict[str, Any]]:
        async with listeners.running(), anyio.create_task_group() as tasks:
            if resolver is not None:
                tasks.start_soon(Sentinel(resolver, proxy.bus, listeners, handshakes).run)
            try:
                yield {}
            finally:
                tasks.cancel_scope.cancel()

    def round_trip(ctx: ServerRequestContext[Any, Any], params: Any) -> RoundTrip | None:
        # 2026-era callers get input-required results passed through; handshake-era callers are asked mid-call.
        if relay.is_legacy(ctx):
            return None
        return RoundTrip(getattr(params, "input_responses", None), getattr(params, "request_state", None))

    @_audited(audit, "tools/list", listeners)
    async def list_tools(_ctx: ServerRequestContext[Any, Any], _params: Any) -> types.ListToolsResult:
        return types.ListToolsResult(tools=await proxy.list_tools(_principal()))

    @_audited(audit, "tools/call", listeners)
    async def call_tool(ctx: ServerRequestContext[Any, Any], params: types.CallToolRequestParams) -> Any:
        async def progress(progress: float, total: float | None, message: str | None) -> None:
            await ctx.session.report_progress(progress, total, message)

        arguments = dict(params.arguments or {})
        return await proxy.call_tool(_principal(), params.name, arguments, progress, round_trip(ctx, params))

    @_audited(audit, "prompts/list", listeners)
    async def list_prompts(_ctx: ServerRequestContext[Any, Any], _params: Any) -> types.ListPromptsResult:
        return types.ListPromptsResult(prompts=await proxy.list_prompts(_principal()))

    @_audited(audit, "prompts/get", listeners)
    async def get_prompt(ctx: ServerRequestContext[Any, Any], params: types.GetPromptRequestParams) -> Any:
        return await proxy.get_prompt(_principal(), params.name, params.arguments, round_trip(ctx, params))

    @_audited(audit, "resources/list", listeners)
    async def list_resources(_ctx: ServerRequestContext[Any, Any], _params: Any) -> types.ListResourcesResult:
        return types.ListResourcesResult(resources=await proxy.list_resources(_principal()))

    @_audited(audit, "resources/templates/list", listeners)
    async def list_templates(_ctx: ServerRequestContext[Any, Any], _params: Any) -> types.ListResourceTemplatesResult:
        return types.ListResourceTemplatesResult(resource_templates=await proxy.list_resource_templates(_principal()))

    @_audited(audit, "resources/read", listeners)
    async def read_resource(ctx: ServerRequestContext[Any, Any], params: types.ReadResourceRequestParams) -> Any:
        return await proxy.read_resource(_principal(), str(params.uri), round_trip(ctx, params))

    @_audited(audit, "resources/subscribe")
    async def subscribe(ctx: ServerRequestContext[Any, Any], params: types.SubscribeRequestParams) -> Any:
        uri = str(params.uri)
        listener = join(listeners, ctx, _principal())
        # A stateless request has nowhere to hear updates later; a URI already held is not subscribed twice.
        if listener is not None and uri not in listener.held:
            # Best effort, as the handshake era has no acknowledgement: held (and heard) even if no server took it.
            listeners.hold(listener, uri, await proxy.subscribe(_principal(), uri))
        return types.EmptyResult()

    @_audited(audit, "resources/unsubscribe")
    async def unsubscribe(ctx: ServerRequestContext[Any, Any], params: types.UnsubscribeRequestParams) -> Any:
        listener = join(listeners, ctx, _principal())
        if listener is not None:  # its upstream subscriptions go once no other listener holds them
            listeners.let_go(listener, str(params.uri))
        return types.EmptyResult()

    listen = ListenStreams(listeners, _principal, proxy.subscribe)

    @_audited(audit, "subscriptions/listen")
    async def subscriptions_listen(
        ctx: ServerRequestContext[Any, Any], params: types.SubscriptionsListenRequestParams
    ) -> types.SubscriptionsListenResult:
        # Written down as the stream opens (a stream still open shows as pending), sealed when it ends.
        await before_forwarding()
        try:
            return await listen(ctx, params)
        except anyio.get_cancelled_exc_class():
            # The usual end of a listen stream: its caller closed it (or the gateway stopped). Not an error.
            record = current_record()
            if record is not None and record.outcome == "ok":
                record.outcome, record.reason = "closed", "the stream was closed"
            raise

    async def initialized(ctx: ServerRequestContext[Any, Any], _params: types.NotificationParams) -> None:
        join(listeners, ctx, current_principal.get())  # from the start of the session, before any listing
        if handshakes is not None:
            handshakes.join(ctx, current_principal.get())

    @_audited(audit, "completion/complete", listeners)
    async def complete(
        _ctx: ServerRequestContext[Any, Any], params: types.CompleteRequestParams
    ) -> types.CompleteResult:
        argument = {"name": params.argument.name, "value": params.argument.value}
        context = dict(params.context.arguments or {}) if params.context else None
        return await proxy.complete(_principal(), params.ref, argument, context)

    async def set_logging_level(_ctx: ServerRequestContext[Any, Any], _params: Any) -> types.EmptyResult:
        # Upstream sessions log at debug; what reaches the caller is each upstream's own choice.
        return types.EmptyResult()

    def input_schema(name: str) -> dict[str, Any] | None:
        return proxy.input_schema(current_principal.get(), name)

    # Subscriptions and logging/setLevel are deprecated as of 2026-07-28 but still part of the handshake era.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", MCPDeprecationWarning)
        warnings.simplefilter("ignore", DeprecationWarning)
        server: Server[Any] = _GatewayServer(  # pyright: ignore[reportDeprecated]
            "bastion",
            lifespan=lifespan,
            version=__version__,
            instructions="Bastion gateway: tools run with your own credentials for each server.",
            on_list_tools=list_tools,
            on_call_tool=call_tool,
            on_list_prompts=list_prompts,
            on_get_prompt=get_prompt,
            on_list_resources=list_resources,
            on_list_resource_templates=list_templates,
            on_read_resource=read_resource,
            on_subscribe_resource=subscribe,
            on_unsubscribe_resource=unsubscribe,
            on_subscriptions_listen=subscriptions_listen,
            on_completion=complete,
            on_set_logging_level=set_logging_level,
            get_tool_input_schema=input_schema,
        )
    server.add_notification_handler("notifications/initialized", types.NotificationParams, initialized)
    # The SDK's default OpenTelemetry middleware costs a span per request even with no exporter configured.
    server.middleware.clear()
    return server
