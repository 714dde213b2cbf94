"""The gateway's data plane: merge what the mounted servers offer, route calls, call upstreams as the person.

Every upstream call carries the member's own identity for per-user servers, the gateway's global
identity for shared ones, and nothing else: the agent's token never leaves Bastion.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable, Sequence
from typing import Any, Final, TypeVar

import anyio
import mcp_types as types
from mcp import Client
from mcp.shared.dispatcher import ProgressFnT
from mcp.shared.exceptions import MCPError

from bastion.db.store import Store
from bastion.domain import routing
from bastion.domain.connections import Principal
from bastion.domain.identities import IdentityStatus
from bastion.domain.models import AuthKind, IdentityScheme
from bastion.errors import BastionError, NotFound, ValidationFailed
from bastion.events.bus import Changed, Subject
from bastion.services import identities
from bastion.services.directory import Directory, GatewayView, Mounted
from bastion.upstream.pool import UpstreamPool, UpstreamUnavailable
from bastion.upstream.transports import Credential
from bastion.vault.sealer import Vault

logger = logging.getLogger("bastion.proxy")
T = TypeVar("T")
MAX_PAGES_PER_SERVER: Final = 100
ProgressRelay = ProgressFnT


class IdentityRequired(BastionError):
    code = "identity_required"
    status = 403
    title = "Identity required"


class IdentityNeedsReauth(BastionError):
    code = "identity_needs_reauth"
    status = 403
    title = "Identity needs re-authentication"


class UnknownName(ValidationFailed):
    code = "unknown_name"


class Proxy:
    """Answers MCP requests for a resolved Principal by fanning out to, or routing into, its gateway's servers."""

    def __init__(self, store: Store, vault: Vault, pool: UpstreamPool, directory: Directory) -> None:
        self._store = store
        self._vault = vault
        self._pool = pool
        self._directory = directory
        self._unsubscribe = store.bus.subscribe(self._on_change)
        # Input schemas from the last listing per (connection, tool), so tools/call needs no fresh listing.
        self._schemas: dict[tuple[str, str], dict[str, Any]] = {}

    def close(self) -> None:
        self._unsubscribe()

    def _on_change(self, event: Changed) -> None:
        if event.subject is Subject.IDENTITY:
            self._pool.discard(identity_id=event.id)
        elif event.subject is Subject.SERVER:
            self._pool.discard(server_id=event.id)
        elif event.subject is Subject.ALL:
            for view_server in list(self._schemas):
                self._schemas.pop(view_server, None)

    def input_schema(self, principal: Principal | None, name: str) -> dict[str, Any] | None:
        if principal is None:
            return None
        return self._schemas.get((principal.connection_id, name))

    # --- credentials and sessions ---------------------------------------------------------------------------------

    def _identity_for(self, principal: Principal, mounted: Mounted) -> str | None:
        if mounted.server.auth_kind is AuthKind.NONE:
            return None
        if mounted.entry.identity_scheme is IdentityScheme.SHARED:
            return mounted.entry.shared_identity_id
        identity_id = principal.identities.get(mounted.alias)
        if identity_id is None:
            raise IdentityRequired(
                f"you have no identity for {mounted.alias!r} at this gateway yet; enroll through a connection "
                "link to add your own"
            )
        return identity_id

    async def _credential(self, principal: Principal, identity_id: str | None) -> Credential:
        if identity_id is None:
            return Credential(None)
        async with self._store.transaction() as conn:
            identity = await identities.find(conn, principal.workspace_id, identity_id)
        if identity.status is IdentityStatus.NEEDS_REAUTH:
            raise IdentityNeedsReauth("your identity for this server needs to be connected again")
        if identity.status is IdentityStatus.DISABLED:
            raise IdentityRequired("your identity for this server is disabled")
        secret = await identities.open_secret(self._store, self._vault, principal.workspace_id, identity_id)
        return Credential(identity_id, secret)

    async def _client(self, principal: Principal, mounted: Mounted) -> Client:
        identity_id = self._identity_for(principal, mounted)
        cached = self._pool.cached(mounted.server, identity_id)
        if cached is not None:
            return cached
        return await self._pool.client(mounted.server, await self._credential(principal, identity_id))

    async def _view(self, principal: Principal) -> GatewayView:
        return await self._directory.view(principal.workspace_id, principal.gateway_id)

    async def _call(self, principal: Principal, mounted: Mounted, fn: Callable[[Client], Awaitable[T]]) -> T:
        client = await self._client(principal, mounted)
        async with self._pool.limiter(mounted.server.id):
            try:
                return await fn(client)
            except MCPError:
                raise
            except (anyio.ClosedResourceError, anyio.BrokenResourceError, OSError) as exc:
                self._pool.discard(server_id=mounted.server.id)
                raise UpstreamUnavailable(f"upstream {mounted.alias!r} dropped the connection") from exc

    # --- listings -------------------------------------------------------------------------------------------------

    async def _gather(
        self, principal: Principal, kind: str, fetch: Callable[[Mounted, Client], Awaitable[list[T]]]
    ) -> list[tuple[Mounted, T]]:
        """Everything of one kind from every mounted server, concurrently; a failing server is left out."""
        view = await self._view(principal)
        results: list[list[tuple[Mounted, T]]] = [[] for _ in view.mounted]

        async def one(index: int, mounted: Mounted) -> None:
            if _provisioning(mounted, kind).mode.value == "block_all":
                return
            try:
                items = await self._call(principal, mounted, lambda client: fetch(mounted, client))
            except (BastionError, MCPError, TimeoutError) as exc:
                logger.info(
                    "left a server out of a listing",
                    extra={"server": mounted.alias, "kind": kind, "reason": type(exc).__name__},
                )
                return
            results[index] = [(mounted, item) for item in items]

        async with anyio.create_task_group() as tg:
            for index, mounted in enumerate(view.mounted):
                tg.start_soon(one, index, mounted)
        return [pair for chunk in results for pair in chunk]

    async def list_tools(self, principal: Principal) -> list[types.Tool]:
        async def fetch(_mounted: Mounted, client: Client) -> list[types.Tool]:
            return await _all_pages(lambda cursor: client.list_tools(cursor=cursor), lambda r: r.tools)

        tools: list[types.Tool] = []
        for mounted, tool in await self._gather(principal, "tools", fetch):
            if not mounted.entry.tools.allows(tool.name):
                continue
            name = routing.namespaced(mounted.alias, tool.name)
            self._schemas[(principal.connection_id, name)] = dict(tool.input_schema)
            tools.append(tool.model_copy(update={"name": name}))
        return tools

    async def list_prompts(self, principal: Principal) -> list[types.Prompt]:
        async def fetch(_mounted: Mounted, client: Client) -> list[types.Prompt]:
            return await _all_pages(lambda cursor: client.list_prompts(cursor=cursor), lambda r: r.prompts)

        return [
            prompt.model_copy(update={"name": routing.namespaced(mounted.alias, prompt.name)})
            for mounted, prompt in await self._gather(principal, "prompts", fetch)
            if mounted.entry.prompts.allows(prompt.name)
        ]

    async def list_resources(self, principal: Principal) -> list[types.Resource]:
        async def fetch(_mounted: Mounted, client: Client) -> list[types.Resource]:
            return await _all_pages(lambda cursor: client.list_resources(cursor=cursor), lambda r: r.resources)

        return [r for mounted, r in await self._gather(principal, "resources", fetch) if _resource_allowed(mounted, r)]

    async def list_resource_templates(self, principal: Principal) -> list[types.ResourceTemplate]:
        async def fetch(_mounted: Mounted, client: Client) -> list[types.ResourceTemplate]:
            return await _all_pages(
                lambda cursor: client.list_resource_templates(cursor=cursor), lambda r: r.resource_templates
            )

        return [
            t
            for mounted, t in await self._gather(principal, "resources", fetch)
            if mounted.entry.resources.mode.value != "block_all"
        ]

    # --- routed requests ------------------------------------------------------------------------------------------

    async def _route(self, principal: Principal, qualified: str, kind: str) -> tuple[Mounted, str]:
        parts = routing.split(qualified)
        view = await self._view(principal)
        mounted = view.by_alias(parts[0]) if parts else None
        if parts is None or mounted is None or not _provisioning(mounted, kind).allows(parts[1]):
            singular = kind.rstrip("s")
            raise UnknownName(f"unknown {singular}: {qualified}", field="name")
        return mounted, parts[1]

    async def call_tool(
        self, principal: Principal, name: str, arguments: dict[str, Any] | None, progress: ProgressRelay | None = None
    ) -> types.CallToolResult:
        mounted, tool = await self._route(principal, name, "tools")

        async def call(client: Client) -> types.CallToolResult:
            return await client.call_tool(
                tool, arguments, read_timeout_seconds=mounted.server.call_timeout_s, progress_callback=progress
            )

        return await self._call(principal, mounted, call)

    async def get_prompt(
        self, principal: Principal, name: str, arguments: dict[str, str] | None
    ) -> types.GetPromptResult:
        mounted, prompt = await self._route(principal, name, "prompts")
        return await self._call(principal, mounted, lambda client: client.get_prompt(prompt, arguments))

    async def read_resource(self, principal: Principal, uri: str) -> types.ReadResourceResult:
        """Route by URI: to the server that listed it, else to the servers whose templates could have made it."""
        view = await self._view(principal)
        candidates = [m for m in view.mounted if m.entry.resources.mode.value != "block_all"]
        last_error: BaseException | None = None
        for mounted in candidates:
            if mounted.entry.resources.mode.value == "allow_selected" and uri not in mounted.entry.resources.selected:
                continue
            try:
                return await self._call(principal, mounted, lambda client: client.read_resource(uri))
            except MCPError as exc:
                last_error = exc
            except (IdentityRequired, IdentityNeedsReauth, UpstreamUnavailable) as exc:
                last_error = exc
        if isinstance(last_error, MCPError | BastionError):
            raise last_error
        raise NotFound(f"Resource not found: {uri}", field="uri")

    async def complete(
        self,
        principal: Principal,
        ref: types.PromptReference | types.ResourceTemplateReference,
        argument: dict[str, str],
        context: dict[str, str] | None,
    ) -> types.CompleteResult:
        if isinstance(ref, types.PromptReference):
            mounted, prompt = await self._route(principal, ref.name, "prompts")
            upstream_ref: types.PromptReference | types.ResourceTemplateReference = ref.model_copy(
                update={"name": prompt}
            )
        else:
            view = await self._view(principal)
            usable = [m for m in view.mounted if m.entry.resources.mode.value != "block_all"]
            if not usable:
                raise UnknownName("no server offers resource templates here", field="ref")
            mounted, upstream_ref = usable[0], ref
        return await self._call(principal, mounted, lambda client: client.complete(upstream_ref, argument, context))


def _provisioning(mounted: Mounted, kind: str) -> Any:
    return {"tools": mounted.entry.tools, "prompts": mounted.entry.prompts, "resources": mounted.entry.resources}[kind]


def _resource_allowed(mounted: Mounted, resource: types.Resource) -> bool:
    provisioning = mounted.entry.resources
    return provisioning.allows(str(resource.uri)) or provisioning.allows(resource.name)


async def _all_pages(fetch: Callable[[str | None], Awaitable[Any]], items: Callable[[Any], Sequence[T]]) -> list[T]:
    out: list[T] = []
    cursor: str | None = None
    for _ in range(MAX_PAGES_PER_SERVER):
        result = await fetch(cursor)
        out.extend(items(result))
        cursor = result.next_cursor
        if not cursor:
            break
    return out
