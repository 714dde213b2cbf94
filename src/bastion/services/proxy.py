"""The gateway's data plane: merge what the mounted servers offer, route calls, call upstreams as the person.

Every upstream call carries the member's own identity for per-user servers, the gateway's global
identity for shared ones, and nothing else: the agent's token never leaves Bastion.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Any, Final, TypeVar, cast

import anyio
import mcp_types as types
from mcp import Client
from mcp.shared.dispatcher import ProgressFnT
from mcp.shared.exceptions import MCPError
from mcp.shared.inbound import x_mcp_header_map
from mcp.shared.subscriptions import PromptsListChanged, ServerEvent, ToolsListChanged
from pydantic import BaseModel

from bastion.db.store import Store
from bastion.domain import routing
from bastion.domain.connections import Principal
from bastion.domain.models import AuthKind, IdentityScheme, ProvisionMode
from bastion.errors import BastionError, NotFound, ValidationFailed
from bastion.events.bus import Changed, EventBus, Subject
from bastion.oauth.refresh import Refresher
from bastion.services import step_up
from bastion.services.audit import AuditUnavailable, CallRecord, before_forwarding, current_record
from bastion.services.credentials import Credentials, IdentityNeedsReauth, IdentityRequired, generation_of
from bastion.services.directory import Directory, GatewayView, Mounted
from bastion.services.guard import Guard
from bastion.upstream import refusals, relay
from bastion.upstream.notifications import Notice, UpstreamNotices
from bastion.upstream.pool import (
    Lease,
    SessionRetired,
    UpstreamPool,
    UpstreamRefused,
    UpstreamUnavailable,
    refused_by,
)
from bastion.upstream.refusals import FORBIDDEN, UNAUTHORIZED, Refusal
from bastion.upstream.subscriptions import Key, Release, ResourceSubscriptions
from bastion.upstream.transports import Credential
from bastion.vault.sealer import Vault

logger = logging.getLogger("bastion.proxy")
T = TypeVar("T")
MAX_PAGES_PER_SERVER: Final = 100
ProgressRelay = ProgressFnT


class UnknownName(ValidationFailed):
    code = "unknown_name"


@dataclass(frozen=True, slots=True)
class RoundTrip:
    """A 2026-era caller's answers to an earlier input-required result, passed back to the upstream as they are."""

    input_responses: Any = None
    request_state: str | None = None


def _raise_standing(mounted: Mounted, refusal: Refusal, exc: Exception) -> None:
    """A refusal that stands becomes the byte relays' error for it, never the SDK's generic one (else: returns)."""
    status = FORBIDDEN if refusal.forbidden is not None else UNAUTHORIZED if refusal.seen else None
    if status is None:
        return
    if isinstance(exc, UpstreamRefused):
        raise exc
    raise refused_by(mounted.alias, status, refusal.generation) from exc


def _client_closed(exc: RuntimeError) -> bool:
    """The SDK client's refusal to send once its session has ended (it is raised before anything is sent)."""
    return "must be used within an async context manager" in str(exc)


@dataclass(frozen=True, slots=True)
class _Listed:
    """A listed tool's input schema and the argument headers it declares (``Mcp-Param-*``)."""

    schema: dict[str, Any]
    params: dict[tuple[str, ...], str]


class Proxy:
    """Answers MCP requests for a resolved Principal by fanning out to, or routing into, its gateway's servers."""

    def __init__(
        self,
        store: Store,
        vault: Vault,
        pool: UpstreamPool,
        directory: Directory,
        guard: Guard | None = None,
        *,
        refresher: Refresher | None = None,
        public_url: str | None = None,
    ) -> None:
        self._store = store
        self._credentials = Credentials(store, vault, refresher, public_url)
        self._guard = guard
        self._vault = vault
        self._pool = pool
        self._directory = directory
        self._unsubscribe = store.bus.subscribe(self._on_change)
        self._unsubscribe_notices = pool.notices.subscribe(self._on_notice)
        self._subscriptions = ResourceSubscriptions(pool)
        # Input schemas from the last listing per (connection, tool), so tools/call needs no fresh listing.
        self._schemas: dict[tuple[str, str], _Listed] = {}
        # Which of those keys each server's listing filled, so an upstream's tools/list_changed drops its own.
        self._schema_keys: dict[str, set[tuple[str, str]]] = {}

    @property
    def guard(self) -> Guard | None:
        return self._guard

    def close(self) -> None:
        self._unsubscribe()
        self._unsubscribe_notices()

    @property
    def notices(self) -> UpstreamNotices:
        """What upstream sessions announce (list_changed), tagged with their (server, identity)."""
        return self._pool.notices

    @property
    def bus(self) -> EventBus:
        return self._store.bus

    def _on_change(self, event: Changed) -> None:
        if event.subject is Subject.IDENTITY:
            self._credentials.forget(event.id)
            self._pool.discard(identity_id=event.id)
        elif event.subject is Subject.IDENTITY_INFO:
            self._credentials.forget(event.id)  # the same credential goes upstream: its open sessions stay
        elif event.subject is Subject.SERVER:
            self._forget_schemas(event.id)
            self._pool.discard(server_id=event.id)
            self._pool.breakers.forget(event.id)  # how it is reached changed: try it afresh
        elif event.subject is Subject.ALL:
            # Events may have been missed: no cached schema or open session can be trusted to be current.
            self._schemas.clear()
            self._schema_keys.clear()
            self._credentials.forget()
            self._pool.discard_all()
            self._pool.breakers.forget()

    def _on_notice(self, notice: Notice) -> None:
        if isinstance(notice.event, ToolsListChanged):
            self._forget_schemas(notice.server_id)  # the next listing fills them again

    def _forget_schemas(self, server_id: str) -> None:
        for key in self._schema_keys.pop(server_id, set()):
            self._schemas.pop(key, None)

    async def reaches(self, principal: Principal, notice: Notice) -> bool:
        """Whether ``notice`` concerns what ``principal`` sees: a server their gateway mounts, heard with the very
        identity that serves them there (a per-user identity's news is never another member's)."""
        try:
            view = await self._view(principal)
        except BastionError:
            return False  # the gateway is gone: its sessions are refused at their next request anyway
        kind = _kind_of(notice.event)
        for mounted in view.mounted:
            if mounted.server.id != notice.server_id or _provisioning(mounted, kind).mode is ProvisionMode.BLOCK_ALL:
                continue
            if mounted.server.auth_kind is AuthKind.NONE:
                if notice.identity_id is None:
                    return True
            elif mounted.entry.identity_scheme is IdentityScheme.SHARED:
                if notice.identity_id is not None and notice.identity_id == mounted.entry.shared_identity_id:
                    return True
            elif notice.identity_id is not None and principal.identities.get(mounted.alias) == notice.identity_id:
                return True
        return False

    def input_schema(self, principal: Principal | None, name: str) -> dict[str, Any] | None:
        listed = self._listed(principal, name)
        return listed.schema if listed is not None else None

    def param_headers(self, principal: Principal, name: str) -> dict[tuple[str, ...], str] | None:
        """The tool's ``x-mcp-header`` annotations (argument path → header name), read once when it was listed; None
        when it has not been listed for this connection."""
        listed = self._listed(principal, name)
        return listed.params if listed is not None else None

    def _listed(self, principal: Principal | None, name: str) -> _Listed | None:
        return self._schemas.get((principal.connection_id, name)) if principal is not None else None

    # --- credentials and sessions ---------------------------------------------------------------------------------

    async def route_tool(self, principal: Principal, name: str) -> tuple[Mounted, str]:
        """The mounted server and its own name for an exposed tool name, with provisioning applied."""
        return await self._route(principal, name, "tools")

    def identity_for(self, principal: Principal, mounted: Mounted) -> str | None:
        """Which identity serves this person at this mounted server (None: the server takes no credential).

        Raises:
            IdentityRequired: a per-user server for which the person has no identity yet.
        """
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

    async def credential(self, principal: Principal, identity_id: str | None) -> Credential:
        """The credential to open an upstream session with (an OAuth identity's refreshed first if due)."""
        return await self._credentials.open(principal.workspace_id, identity_id)

    async def generation(self, principal: Principal, identity_id: str | None) -> str | None:
        """Which access token calls for this identity carry now (renewed first if about to expire)."""
        return await self._credentials.generation(principal.workspace_id, identity_id)

    async def renew(
        self, principal: Principal, mounted: Mounted, identity_id: str | None, rejected: str | None
    ) -> bool:
        """Refresh an OAuth identity whose token ``rejected`` upstream ``mounted`` refused, for one retry of the call;
        False: nothing to renew, or no refresh within the server's retry budget (upstream/budget.py).

        The budget is spent by the call whose renewal refreshes (`Refresher.live`): calls refused with the same
        token meanwhile (or after another call renewed it) retry with the renewed token for free, so an expiry
        under load costs one.
        """
        return await self._credentials.renew(
            principal.workspace_id, identity_id, rejected, self._pool.retries.may_retry
        )

    async def _client(self, principal: Principal, mounted: Mounted) -> Lease:
        identity_id = self.identity_for(principal, mounted)
        caller = relay.downstream.get()
        profile = relay.Profile.of(caller.session.client_capabilities) if caller is not None else relay.NO_PROFILE
        current = await self.generation(principal, identity_id)
        cached = self._pool.cached_lease(mounted.server, identity_id, profile, current)
        if cached is not None:
            return cached
        credential = await self.credential(principal, identity_id)
        return await self._pool.lease(mounted.server, credential, profile, generation=generation_of(credential))

    async def _view(self, principal: Principal) -> GatewayView:
        return await self._directory.view(principal.workspace_id, principal.gateway_id)

    async def step_up(self, principal: Principal, mounted: Mounted, www_authenticate: Sequence[str]) -> None:
        """After an upstream's 403: if more scope would help an OAuth identity, say so (with the reconnect link).

        Raises:
            IdentityNeedsScope: the member reconnects with the scope the upstream asked for.
        """
        identity_id = self.identity_for(principal, mounted)
        link = self._credentials.reconnect_link(identity_id or "")
        await step_up.needs_scope(self._store, principal.workspace_id, identity_id, www_authenticate, reconnect=link)

    async def _call(self, principal: Principal, mounted: Mounted, fn: Callable[[Client], Awaitable[T]]) -> T:
        await before_forwarding()  # the request's audit event is durable before anything reaches an upstream
        rejected: str | None = None
        with refusals.watching() as refusal:
            try:
                return await self._attempt(principal, mounted, fn)
            except (MCPError, UpstreamUnavailable) as exc:
                await self._refused(principal, mounted, refusal, exc)
                rejected = exc.generation if isinstance(exc, UpstreamRefused) else refusal.generation
                identity_id = self.identity_for(principal, mounted)
                if rejected is None or not await self.renew(principal, mounted, identity_id, rejected):
                    _raise_standing(mounted, refusal, exc)
                    raise
        # The upstream refused the access token (HTTP 401), so it did not act on the call: one retry with the
        # renewed token is safe. A second refusal is the caller's answer.
        with refusals.watching() as refusal:
            try:
                return await self._attempt(principal, mounted, fn)
            except (MCPError, UpstreamUnavailable) as exc:
                await self._refused(principal, mounted, refusal, exc)
                _raise_standing(mounted, refusal, exc)
                raise

    async def _refused(self, principal: Principal, mounted: Mounted, refusal: Refusal, exc: Exception) -> None:
        """Note what the upstream answered (the SDK reports a refusal as a generic error, and a session it could not
        open as no answer); after a 403, say so if more scope would help (raises IdentityNeedsScope with the
        reconnect link)."""
        record = current_record()
        status = FORBIDDEN if refusal.forbidden is not None else UNAUTHORIZED if refusal.seen else None
        if isinstance(exc, UpstreamRefused):
            status = UNAUTHORIZED
        if record is not None and status is not None:
            record.upstream_status = str(status)
        elif record is not None and record.upstream_status is None and type(exc) is UpstreamUnavailable:
            record.upstream_status = "unavailable"
        if refusal.forbidden is not None:
            await self.step_up(principal, mounted, refusal.forbidden)

    async def _attempt(self, principal: Principal, mounted: Mounted, fn: Callable[[Client], Awaitable[T]]) -> T:
        try:
            return await self._attempt_on(await self._client(principal, mounted), principal, mounted, fn)
        except SessionRetired as exc:
            # The call never reached the upstream: the session it waited for was closed under it. The retired
            # session is out of the pool, so this opens (or joins) a fresh one, within the server's retry budget.
            if not self._pool.retries.may_retry(mounted.server.id):
                raise UpstreamUnavailable(str(exc).removesuffix("; retry")) from exc
            return await self._attempt_on(await self._client(principal, mounted), principal, mounted, fn)

    async def _attempt_on(
        self, lease: Lease, principal: Principal, mounted: Mounted, fn: Callable[[Client], Awaitable[T]]
    ) -> T:
        client = lease.client
        record = current_record()
        # Turn before slot: a call waiting for its session's turn must not hold one of the server's slots. The
        # session stays open for this call even if an edit takes it out of the pool meanwhile (``using``).
        with self._pool.using(lease):
            return await self._attempt_using(lease, client, record, principal, mounted, fn)

    async def _attempt_using(
        self,
        lease: Lease,
        client: Client,
        record: CallRecord | None,
        principal: Principal,
        mounted: Mounted,
        fn: Callable[[Client], Awaitable[T]],
    ) -> T:
        async with self._pool.turn(lease, mounted.server.call_timeout_s), self._pool.slot(mounted.server.id):
            try:
                # The server's call timeout, Bastion's own on every relay: the SDK is given none, so a slow upstream
                # gets the same error here as on the byte relays (and the SDK tells the upstream the call is off).
                with relay.in_flight(client.session), anyio.fail_after(mounted.server.call_timeout_s):
                    result = await fn(client)
            except MCPError as exc:
                if record is not None:
                    record.upstream_status = str(exc.code)
                if refusals.session_lost():
                    # The upstream answered 404: it forgot the session (restarted, expired), so it did not act on
                    # the call. Close the session; the retry opens a fresh one (``_attempt``).
                    if record is not None:
                        record.upstream_status = "404"  # as the byte relay says it, should no retry follow
                    self._pool.forget(lease)
                    raise SessionRetired(f"upstream {mounted.alias!r} no longer knows the session; retry") from exc
                if exc.code == types.CONNECTION_CLOSED:
                    # The pooled session is dead (or never reached the upstream): forget it so the next call opens
                    # a fresh one. Said as the byte relays say it: the SDK cannot tell a refused connection apart.
                    if record is not None:
                        record.upstream_status = "unavailable"
                    identity_id = self.identity_for(principal, mounted)
                    if identity_id is not None:
                        self._pool.discard(identity_id=identity_id)
                    else:
                        self._pool.discard(server_id=mounted.server.id)
                    raise UpstreamUnavailable(f"upstream {mounted.alias!r} is unavailable") from exc
                raise
            except TimeoutError:
                if record is not None:
                    record.upstream_status = "timeout"
                    record.failed("upstream_timeout")
                raise
            except RuntimeError as exc:
                if not _client_closed(exc):
                    raise
                # The pooled session was closed under this call (an edit, a pool reset) before anything was sent:
                # the SDK client refuses to send on it. A fresh session takes the call (``_attempt``).
                self._pool.forget(lease)
                raise SessionRetired(f"upstream {mounted.alias!r} session was closed before the call; retry") from exc
            except (anyio.ClosedResourceError, anyio.BrokenResourceError, OSError) as exc:
                if record is not None:
                    record.upstream_status = "unavailable"
                self._pool.discard(server_id=mounted.server.id)
                raise UpstreamUnavailable(f"upstream {mounted.alias!r} dropped the connection") from exc
        if record is not None:
            record.upstream_status = "error" if getattr(result, "is_error", False) else "ok"
        return result

    # --- listings -------------------------------------------------------------------------------------------------

    async def _gather(
        self, principal: Principal, kind: str, fetch: Callable[[Mounted, Client], Awaitable[list[T]]]
    ) -> list[tuple[Mounted, T]]:
        """Everything of one kind from every mounted server, concurrently; a failing server is left out."""
        view = await self._view(principal)
        results: list[list[tuple[Mounted, T]]] = [[] for _ in view.mounted]
        if any(_provisioning(m, kind).mode is not ProvisionMode.BLOCK_ALL for m in view.mounted):
            await before_forwarding()  # once, before the concurrent fan-out

        async def one(index: int, mounted: Mounted) -> None:
            if _provisioning(mounted, kind).mode is ProvisionMode.BLOCK_ALL:
                return

            async def fetch_and_watch(client: Client) -> list[T]:
                # A 2026-era upstream announces changes only on a listen stream: keep one open per session.
                self.notices.watch(
                    client, mounted.server.id, self.identity_for(principal, mounted), self._pool.close_later
                )
                return await fetch(mounted, client)

            try:
                items = await self._call(principal, mounted, fetch_and_watch)
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
        pairs = [pair for chunk in results for pair in chunk]
        if self._guard is None:
            return pairs
        ruleset = await self._guard.rules(principal.workspace_id)
        if not ruleset.policies:
            return pairs
        return [(m, item) for m, item in pairs if self._guard.visible(ruleset, principal, m.alias, _item_name(item))]

    async def list_tools(self, principal: Principal) -> list[types.Tool]:
        async def fetch(_mounted: Mounted, client: Client) -> list[types.Tool]:
            return await _all_pages(lambda cursor: client.list_tools(cursor=cursor), lambda r: r.tools)

        tools: list[types.Tool] = []
        for mounted, tool in await self._gather(principal, "tools", fetch):
            if not mounted.entry.tools.allows(tool.name):
                continue
            name = _exposed(mounted, tool.name)
            schema = dict(tool.input_schema)
            self._schemas[(principal.connection_id, name)] = _Listed(schema, x_mcp_header_map(schema))
            self._schema_keys.setdefault(mounted.server.id, set()).add((principal.connection_id, name))
            tools.append(tool if name == tool.name else tool.model_copy(update={"name": name}))
        return tools

    async def list_prompts(self, principal: Principal) -> list[types.Prompt]:
        async def fetch(_mounted: Mounted, client: Client) -> list[types.Prompt]:
            return await _all_pages(lambda cursor: client.list_prompts(cursor=cursor), lambda r: r.prompts)

        return [
            prompt.model_copy(update={"name": _exposed(mounted, prompt.name)})
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

        return [template for _mounted, template in await self._gather(principal, "resources", fetch)]

    # --- routed requests ------------------------------------------------------------------------------------------

    async def _route(self, principal: Principal, qualified: str, kind: str) -> tuple[Mounted, str]:
        """The mounted server and its own name for an exposed name; hidden and unknown names are refused alike."""
        view = await self._view(principal)
        parts = routing.split(qualified)
        mounted = view.by_alias(parts[0]) if parts is not None else None
        if mounted is not None and mounted.entry.namespaced and parts is not None:
            name = parts[1]
        else:
            mounted = next((m for m in view.mounted if not m.entry.namespaced), None)
            name = qualified
        if mounted is None or not _provisioning(mounted, kind).allows(name):
            raise UnknownName(f"unknown {kind.rstrip('s')}: {qualified}", field="name")
        return mounted, name

    async def call_tool(
        self,
        principal: Principal,
        name: str,
        arguments: dict[str, Any] | None,
        progress: ProgressRelay | None = None,
        round_trip: RoundTrip | None = None,
    ) -> Any:
        """The upstream's result; for a 2026-era caller an input-required result passes through to it."""
        mounted, tool = await self._route(principal, name, "tools")
        guard = self._guard
        ruleset = None
        if guard is not None:
            ruleset = await guard.admit(principal, mounted.alias, tool)
            await guard.count(ruleset, principal, name)
            if ruleset.content:
                arguments = cast("dict[str, Any]", guard.scan(ruleset, principal, arguments or {}, "arguments"))
                if round_trip is not None and round_trip.input_responses is not None:
                    # The caller's answers to an earlier input request are arguments too.
                    answers = guard.scan(ruleset, principal, round_trip.input_responses, "arguments")
                    round_trip = RoundTrip(answers, round_trip.request_state)

        async def call(client: Client) -> Any:
            if round_trip is not None:
                return await client.session.call_tool(
                    tool,
                    arguments,
                    None,
                    progress,
                    input_responses=round_trip.input_responses,
                    request_state=round_trip.request_state,
                    allow_input_required=True,
                )
            return await client.call_tool(tool, arguments, progress_callback=progress)

        result = await self._call(principal, mounted, call)
        if guard is not None and ruleset is not None and ruleset.content and isinstance(result, BaseModel):
            # Any result, an input-required one included: what reaches the caller passes the rules.
            result = type(result).model_validate(guard.scan(ruleset, principal, result, "results"))
        return result

    async def get_prompt(
        self, principal: Principal, name: str, arguments: dict[str, str] | None, round_trip: RoundTrip | None = None
    ) -> Any:
        mounted, prompt = await self._route(principal, name, "prompts")
        if self._guard is not None:
            await self._guard.admit(principal, mounted.alias, prompt)

        async def get(client: Client) -> Any:
            if round_trip is not None:
                return await client.session.get_prompt(
                    prompt,
                    arguments,
                    input_responses=round_trip.input_responses,
                    request_state=round_trip.request_state,
                    allow_input_required=True,
                )
            return await client.get_prompt(prompt, arguments)

        return await self._call(principal, mounted, get)

    async def read_resource(self, principal: Principal, uri: str, round_trip: RoundTrip | None = None) -> Any:
        """Route by URI: the servers that may offer it are asked in turn until one has it."""
        view = await self._view(principal)
        last_error: BaseException | None = None
        for mounted in view.mounted:
            if not mounted.entry.resources.allows(uri) and mounted.entry.resources.mode is not ProvisionMode.ALLOW_ALL:
                continue
            if self._guard is not None:
                await self._guard.admit(principal, mounted.alias, uri)

            async def read(client: Client) -> Any:
                if round_trip is not None:
                    return await client.session.read_resource(
                        uri,
                        input_responses=round_trip.input_responses,
                        request_state=round_trip.request_state,
                        allow_input_required=True,
                    )
                return await client.read_resource(uri)

            try:
                return await self._call(principal, mounted, read)
            except (MCPError, IdentityRequired, IdentityNeedsReauth, UpstreamUnavailable) as exc:
                last_error = exc
        if isinstance(last_error, MCPError) and _resource_not_found(last_error):
            # Whatever the upstream's era called it (-32002 before 2026-07-28), the caller hears it as the spec
            # now says: invalid params naming the URI.
            raise NotFound(f"Resource not found: {uri}", field="uri") from last_error
        if isinstance(last_error, MCPError | BastionError):
            raise last_error
        raise NotFound(f"Resource not found: {uri}", field="uri")

    async def subscribe(
        self, principal: Principal, uri: str, on_lost: Callable[[], None] | None = None
    ) -> Release | None:
        """Hold a subscription to ``uri`` at the servers that may offer it, as the person (counted: see
        ``upstream/subscriptions.py``); returns how to let go of it, or None when no server took it.

        Each upstream's own way: `resources/subscribe` for a handshake-era one, a listen stream naming the URI for
        a 2026-era one. ``on_lost`` is called if one of them ends before it is let go (its session closed).

        Raises:
            AuditUnavailable: not forwarded because the log cannot be written (the caller must know).
        """
        view = await self._view(principal)
        releases: list[Release] = []
        try:
            for mounted in view.mounted:
                if mounted.entry.resources.mode is ProvisionMode.BLOCK_ALL:
                    continue
                if self._guard is not None and not self._guard.visible(
                    await self._guard.rules(principal.workspace_id), principal, mounted.alias, uri
                ):
                    continue  # policy denies this resource at this server: nothing to subscribe to there
                try:
                    key = (mounted.server.id, self.identity_for(principal, mounted), uri)

                    async def forward(client: Client, key: Key = key) -> Release | None:
                        return await self._subscriptions.hold(client, key, on_lost)

                    release = await self._call(principal, mounted, forward)
                except AuditUnavailable:
                    raise
                except (MCPError, BastionError, TimeoutError) as exc:
                    logger.info(
                        "subscription not forwarded", extra={"server": mounted.alias, "reason": type(exc).__name__}
                    )
                    continue
                if release is not None:
                    releases.append(release)
        except BaseException:
            for release in releases:
                release()
            raise
        if not releases:
            return None

        def release_all() -> None:
            for release in releases:
                release()  # each is idempotent

        return release_all

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
            usable = [m for m in view.mounted if m.entry.resources.mode is not ProvisionMode.BLOCK_ALL]
            if not usable:
                raise UnknownName("no server offers resource templates here", field="ref")
            mounted, upstream_ref = usable[0], ref
        if self._guard is not None:
            target = upstream_ref.name if isinstance(upstream_ref, types.PromptReference) else upstream_ref.uri
            await self._guard.admit(principal, mounted.alias, target)
        return await self._call(principal, mounted, lambda client: client.complete(upstream_ref, argument, context))


def _exposed(mounted: Mounted, name: str) -> str:
    return routing.namespaced(mounted.alias, name) if mounted.entry.namespaced else name


def _kind_of(event: ServerEvent) -> str:
    if isinstance(event, ToolsListChanged):
        return "tools"
    if isinstance(event, PromptsListChanged):
        return "prompts"
    return "resources"


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


def _item_name(item: Any) -> str:
    """The name policy rules match for a listed item: a tool's or prompt's name, a resource's URI."""
    for attribute in ("uri", "uri_template"):
        value = getattr(item, attribute, None)
        if value is not None:
            return str(value)
    return str(getattr(item, "name", ""))


LEGACY_RESOURCE_NOT_FOUND: Final = -32002  # what handshake-era servers answer for an unknown URI


def _resource_not_found(error: MCPError) -> bool:
    """Whether an upstream's error for `resources/read` says the resource does not exist."""
    return error.code == LEGACY_RESOURCE_NOT_FOUND or (
        error.code == types.INVALID_PARAMS and "not found" in error.message.lower()
    )
