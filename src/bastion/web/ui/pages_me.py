"""The signed-in person's own pages: their connections and identities, reconnecting one, and the OAuth callback."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any
from urllib.parse import quote

from starlette.requests import Request
from starlette.responses import RedirectResponse, Response
from starlette.routing import BaseRoute, Route

from bastion.errors import BastionError, Forbidden, NotFound
from bastion.services import enrollment, step_up
from bastion.web.ui.connect import Connector
from bastion.web.ui.context import UiContext, redirect


def _links_for(draft_id: str | None) -> dict[str, str]:
    """Where to go after a failed connection attempt: back to the open enrollment, or to one's connections."""
    if draft_id is not None:
        return {"Back to your enrollment": f"/enroll/drafts/{draft_id}", "My connections": "/me"}
    return {"My connections": "/me"}


def routes(ctx: UiContext) -> list[BaseRoute]:
    def connector() -> Connector:
        if ctx.connector is None:
            raise NotFound("connecting with OAuth is not available on this Bastion")
        return ctx.connector

    async def mine(request: Request) -> Response:
        who = await ctx.require(request)
        connections, identities = await enrollment.my_connections(ctx.store, who)
        return await ctx.render(request, "me.html", connections=connections, identities=identities)

    async def reconnect_page(request: Request) -> Response:
        who = await ctx.require(request)
        identity, server = await enrollment.reconnectable(ctx.store, who, request.path_params["identity_id"])
        return await ctx.render(request, "reconnect.html", identity=identity, server=server, oauth=ctx.connector)

    async def reconnect(request: Request) -> Response:
        who = await ctx.require(request)
        identity, server = await enrollment.reconnectable(ctx.store, who, request.path_params["identity_id"])
        # After a 403 insufficient_scope the identity keeps the scope to ask for (step-up); else the default.
        wanted = identity.details.get(step_up.STEP_UP_KEY)
        url = await connector().begin(
            workspace_id=who.member.workspace_id,
            member_id=who.member.id,
            server_id=server.id,
            browser=ctx.session_browser(who),
            context={"reconnect": identity.id},
            scope=wanted if isinstance(wanted, str) and wanted else None,
        )
        return RedirectResponse(url, status_code=303)

    async def oauth_callback(request: Request) -> Response:
        """Where authorization servers send the person back: finish, then continue what the connection was for."""
        who = await ctx.signed_in(request)
        if who is None:
            return await ctx.message(
                request,
                "Signed out meanwhile",
                "Your Bastion session ended before the connection finished, so nothing was connected. "
                "Sign in and connect again.",
                status=401,
                links={"Sign in": "/signin"},
            )
        try:
            connected = await connector().complete(browser=ctx.session_browser(who), params=dict(request.query_params))
        except BastionError as error:
            # The attempt's own context went with its state; this session's open enrollment is where it came from.
            links = _links_for(await enrollment.latest_draft(ctx.store, who))
            return await ctx.message(request, error.title, error.detail, status=error.status, links=links)
        if connected.member_id != who.member.id:
            raise Forbidden("this connection was started by someone else")
        context: Mapping[str, Any] = connected.context
        draft_id, alias, identity_id = context.get("draft"), context.get("alias"), context.get("reconnect")
        if isinstance(draft_id, str) and isinstance(alias, str):
            await enrollment.set_oauth(
                ctx.store,
                ctx.vault,
                ctx.hasher,
                who,
                draft_id,
                alias,
                server_id=connected.server_id,
                secret=connected.secret,
                details=connected.details,
                label=connected.label,
                revoker=ctx.revoker,
            )
            return redirect(f"/enroll/drafts/{quote(draft_id)}?changed={quote(alias)}#server-{quote(alias)}")
        if isinstance(identity_id, str):
            identity = await enrollment.replace_secret(
                ctx.store,
                ctx.vault,
                ctx.hasher,
                who,
                identity_id,
                server_id=connected.server_id,
                secret=connected.secret,
                details=connected.details,
                revoker=ctx.revoker,
            )
            return await ctx.message(
                request,
                "Reconnected",
                f"{identity.label} is connected again; your agents can use it right away.",
                links={"My connections": "/me"},
            )
        raise NotFound("this connection attempt is not one Bastion knows what to do with")

    return [
        Route("/me", ctx.page(mine), methods=["GET"]),
        Route("/me/identities/{identity_id}/reconnect", ctx.page(reconnect_page), methods=["GET"]),
        Route("/me/identities/{identity_id}/reconnect", ctx.page(reconnect), methods=["POST"]),
        Route("/oauth/callback", ctx.page(oauth_callback), methods=["GET"]),
    ]
