"""The ASGI application: health endpoints, the admin API, and the seam for gateways at /g/{gateway}/mcp."""

from __future__ import annotations

import logging
import re
import threading
from collections.abc import AsyncGenerator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from functools import partial
from typing import TYPE_CHECKING, Any, Final

import anyio
from mcp.server.streamable_http_manager import StreamableHTTPSessionManager
from mcp.server.transport_security import TransportSecurityMiddleware, TransportSecuritySettings
from starlette.applications import Starlette
from starlette.datastructures import State
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import JSONResponse, PlainTextResponse, Response
from starlette.routing import Mount, Route
from starlette.types import ASGIApp, Receive, Scope, Send

from bastion import __version__, wiring
from bastion.db.store import Store
from bastion.events import pg as pg_events
from bastion.events.notices import NoticeRelay
from bastion.events.replicas import Replica
from bastion.pipeline.admission import Admission
from bastion.pipeline.handshake import HandshakeRelay
from bastion.pipeline.modern import ModernRelay
from bastion.services import janitor, rotation
from bastion.services.delivery import Sender, Worker
from bastion.settings import Settings
from bastion.web import problems, ui
from bastion.web.api.deps import CONTEXT_KEY, ApiContext
from bastion.web.mcp.endpoint import McpEndpoint
from bastion.web.mcp.event_store import BoundedEventStore
from bastion.web.mcp.fastpath import FastPath
from bastion.web.mcp.server import build_server
from bastion.web.mcp.session_path import HandshakePath
from bastion.web.mcp.sessions import Handshakes
from bastion.web.middleware import BodyLimit, RequestContext
from bastion.web.oauth_routes import client_metadata_route

if TYPE_CHECKING:
    from fastapi import FastAPI
    from fastapi.routing import APIRoute

    from bastion.vault.sealer import Vault


@dataclass(slots=True)
class Lifecycle:
    """Readiness as the load balancer should see it: false while starting and while draining."""

    started: bool = False
    draining: bool = False
    store: Store | None = field(default=None)


def _operation_id(route: APIRoute) -> str:
    """The handler's name: stable, readable operationIds (``create_host``) that clients and tests key on."""
    return route.name


_api: FastAPI | None = None
_api_lock = threading.Lock()


def build_api() -> FastAPI:
    """The admin API: one FastAPI app per process, built on first use (its routes and models take about a second
    to import and build, which neither `serve`'s start nor an in-process test should pay more than once)."""
    global _api  # built once per process, under the lock
    with _api_lock:
        if _api is None:
            _api = _new_api()
        return _api


def _new_api() -> FastAPI:
    from fastapi import Depends, FastAPI

    from bastion.web.api import deps, openapi
    from bastion.web.api.routes import router
    from bastion.web.api.routes_accounts import router as accounts_router
    from bastion.web.api.routes_audit import router as audit_router
    from bastion.web.api.routes_identity import router as identity_router
    from bastion.web.api.routes_rules import router as rules_router
    from bastion.web.api.routes_webhooks import router as webhooks_router

    api = FastAPI(
        dependencies=[Depends(deps.plain_parameters)],
        generate_unique_id_function=_operation_id,
        title="Bastion admin API",
        version=__version__,
        openapi_url="/openapi.json",
        docs_url="/docs",
        redoc_url=None,
        description="Manage the workspace behind a Bastion MCP gateway. Authenticate with a member API key "
        "(`Authorization: Bearer bsk_…`). Errors are application/problem+json with a stable `code`.",
    )
    problems.install(api)
    generated = api.openapi

    def documented() -> dict[str, Any]:
        if api.openapi_schema is None:
            api.openapi_schema = openapi.document(generated())
        return api.openapi_schema

    api.openapi = documented  # type: ignore[method-assign]  # FastAPI's documented way to customise it
    api.include_router(router)
    api.include_router(identity_router)
    api.include_router(audit_router)
    api.include_router(rules_router)
    api.include_router(accounts_router)
    api.include_router(webhooks_router)
    return api


logger = logging.getLogger("bastion.app")
CHANGE_POLL_S: Final = 0.25
REBIND_RETRY_S: Final = 60.0


async def _not_found(request: Request, exc: Exception) -> Response:
    """A path no route matches: a problem under /api/ (as the API answers everything), plain text elsewhere."""
    if request.url.path.startswith("/api/"):
        return problems.problem(404, "not_found", "Not Found", "no such path in the admin API")
    detail = exc.detail if isinstance(exc, HTTPException) else "Not Found"
    return PlainTextResponse(detail, status_code=404)


async def _rebind_seals(store: Store, vault: Vault) -> None:
    """Migration 0010's online half: identities sealed unbound are re-sealed bound to server and owner.

    They open meanwhile, and until `bastion vault rebind` marks their workspace (db/seals.py); a failure (the
    database away) tries again.
    """
    while True:
        try:
            done = await rotation.rebind(store, vault, mark=False)  # older replicas may still seal unbound
        except Exception as exc:  # noqa: BLE001  serving goes on; the next attempt (or `vault rebind`) finishes it
            logger.warning("binding identity seals to server and owner failed (%s); trying again", type(exc).__name__)
            await anyio.sleep(REBIND_RETRY_S)
            continue
        if done:
            logger.info("bound identity seals to their server and owner", extra={"rows": done})
        return


async def _freshen_every(store: Store, interval_s: float) -> None:
    while True:
        await anyio.sleep(interval_s)
        store.freshen()


class AdminApi:
    """`/api/v1`: the process's admin API with this app's context in each request's scope.

    Until the API is built its first request waits for it in a worker thread, so calls on the event loop go on;
    `serve` starts building it in the background as soon as it listens.
    """

    def __init__(self, ctx: ApiContext) -> None:
        self._ctx = ctx

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        api = _api if _api is not None else await anyio.to_thread.run_sync(build_api)
        await api({**scope, CONTEXT_KEY: self._ctx}, receive, send)


def create_app(settings: Settings, store: Store | None = None) -> McpFirst:
    """The whole service. ``store`` may be given by tests (it is then left open); otherwise it comes from settings."""
    lifecycle = Lifecycle()
    parts = wiring.build(settings, store)
    lifecycle.store = parts.store
    # Webhook events go through the same outbound policy as upstreams; the worker drains the outbox while serving.
    sender = Sender(parts.vault, parts.pool.outbound, settings.public_url)
    webhook_worker = Worker(parts.store, sender)
    api = AdminApi(
        ApiContext(
            store=parts.store,
            hasher=parts.hasher,
            vault=parts.vault,
            revoker=parts.revoker,
            webhooks=sender,
            audit=parts.audit,
            public_url=settings.public_url,
        )
    )
    ui_ctx, ui_routes = ui.build(
        settings, parts.store, parts.hasher, parts.vault, limiter=parts.limiter, revoker=parts.revoker
    )
    # Engines connect lazily, so the app can serve at once, even where no lifespan runs (in-process tests).
    lifecycle.started = True

    security = TransportSecuritySettings(
        enable_dns_rebinding_protection=True,
        allowed_hosts=settings.mcp_allowed_hosts(),
        allowed_origins=settings.mcp_allowed_origins(),
    )
    handshakes = Handshakes()
    mcp_manager = StreamableHTTPSessionManager(
        app=build_server(parts.proxy, parts.audit, handshakes, parts.resolver),
        stateless=False,
        event_store=BoundedEventStore(),
        security_settings=security,
        max_request_body_size=settings.max_request_body_bytes,
    )
    handshakes.bind(mcp_manager)
    admission = Admission(parts.proxy, parts.pool, parts.audit)
    modern = ModernRelay(admission)
    fast_path = FastPath(admission, modern, TransportSecurityMiddleware(security))
    handshake_path = HandshakePath(fast_path, HandshakeRelay(admission, modern), handshakes)
    mcp_endpoint = McpEndpoint(
        parts.resolver,
        mcp_manager,
        parts.audit,
        fast_path if settings.fast_path else None,
        handshake_path if settings.fast_path else None,
    )

    @asynccontextmanager
    async def lifespan(_app: Starlette) -> AsyncGenerator[None, None]:
        # Exits run in reverse: in-flight calls end, upstream sessions close, then every audit event is flushed.
        async with parts.audit.running(), anyio.create_task_group() as tasks, parts.pool.running(), mcp_manager.run():
            if parts.store.dialect == "postgresql":
                # Other replicas' changes (revoked tokens, disabled hosts) reach this process's caches, and what
                # upstream sessions announce (list_changed) reaches the agents connected to every replica.
                relay = NoticeRelay(parts.store.engine, parts.pool.notices)
                tasks.start_soon(relay.run)
                # Until the listener is connected this process could miss a change: its caches keep nothing.
                parts.store.bus.live = False
                replica = Replica(parts.store.engine, parts.store.bus)
                parts.store.replica_id = replica.id
                tasks.start_soon(replica.run)
                tasks.start_soon(
                    partial(
                        pg_events.listen,
                        settings.resolved_database_url,
                        parts.store.bus,
                        notices=relay.hear,
                        replica=replica,
                    )
                )
            # Expired drafts, OAuth states and sessions are deleted on a schedule, not only in passing; tokens
            # about to expire are announced (and succeeded) on the same schedule.
            tasks.start_soon(
                partial(
                    janitor.run,
                    parts.store,
                    ui_ctx.lifetimes,
                    interval_s=settings.janitor_interval_s,
                    revoker=parts.revoker,
                    hasher=parts.hasher,
                )
            )
            tasks.start_soon(webhook_worker.run)
            tasks.start_soon(_rebind_seals, parts.store, parts.vault)
            if parts.store.dialect == "sqlite":
                # What a CLI commits reaches this process within a poll (the data plane looks before each call).
                tasks.start_soon(_freshen_every, parts.store, CHANGE_POLL_S)
            if _api is None:  # build the admin API while serving, off the event loop
                tasks.start_soon(partial(anyio.to_thread.run_sync, build_api, abandon_on_cancel=True))
            try:
                yield
            finally:
                lifecycle.draining = True
                await admission.close()
                tasks.cancel_scope.cancel()
        if store is None:
            await parts.close()

    async def healthz(_request: Request) -> Response:
        return JSONResponse({"status": "alive", "version": __version__})

    async def readyz(_request: Request) -> Response:
        checks = {"started": lifecycle.started, "draining": lifecycle.draining, "database": False, "migrations": False}
        if lifecycle.store is not None and lifecycle.started and not lifecycle.draining:
            checks["database"] = await lifecycle.store.ping()
            checks["migrations"] = checks["database"] and await lifecycle.store.migrations_current()
        ready = bool(checks["started"] and not checks["draining"] and checks["database"] and checks["migrations"])
        return JSONResponse(
            {"status": "ready" if ready else "not ready", "checks": checks}, status_code=200 if ready else 503
        )

    app = Starlette(
        routes=[
            Route("/healthz", healthz),
            Route("/readyz", readyz),
            client_metadata_route(settings),
            Mount("/api/v1", app=api),
            Route("/g/{gateway}/mcp", mcp_endpoint, methods=["GET", "POST", "DELETE"]),
            # The pages people use in a browser: sign-in, enrollment (/enroll/…), their connections (/me).
            *ui_routes,
        ],
        lifespan=lifespan,
        exception_handlers={404: _not_found},
    )
    app.state.lifecycle = lifecycle
    return McpFirst(
        RequestContext(BodyLimit(mcp_endpoint, settings.max_request_body_bytes)),
        RequestContext(BodyLimit(app, settings.max_request_body_bytes)),
        app.state,
    )


class McpFirst:
    """MCP requests go straight to their endpoint (same request id, log line and body cap); the rest to Starlette.

    The gateway URL is the hot path: Starlette's router and exception layers cost a measurable share of a call
    and give it nothing (the endpoint answers its own errors).
    """

    def __init__(self, mcp: ASGIApp, rest: ASGIApp, state: State) -> None:
        self._mcp = mcp
        self._rest = rest
        self.state = state  # the Starlette app's: `bastion serve` reads its lifecycle

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and scope["method"] in _MCP_METHODS:
            match = _MCP_PATH.fullmatch(scope["path"])
            if match is not None:
                scope["path_params"] = {"gateway": match.group(1)}
                await self._mcp(scope, receive, send)
                return
        await self._rest(scope, receive, send)


_MCP_PATH: Final = re.compile(r"/g/([^/]+)/mcp")
_MCP_METHODS: Final = frozenset({"GET", "POST", "DELETE"})
