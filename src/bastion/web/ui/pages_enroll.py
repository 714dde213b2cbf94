"""The enrollment pages: a link's landing page, the draft with one card per server, review, approval, the token."""

from __future__ import annotations

import contextlib
from urllib.parse import quote

from starlette.requests import Request
from starlette.responses import RedirectResponse, Response
from starlette.routing import BaseRoute, Route

from bastion.domain.identities import bearer_secret
from bastion.errors import Gone, NotFound, ValidationFailed
from bastion.services import enrollment
from bastion.services.enrollment import AlreadyApproved, DraftView
from bastion.web.ui.context import UiContext, redirect
from bastion.web.ui.pages_account import field


def routes(ctx: UiContext) -> list[BaseRoute]:
    async def landing(request: Request) -> Response:
        """Which host, which gateway, who invited, until when; then sign in or add the connection."""
        secret = request.path_params["secret"]
        info = await enrollment.open_link(ctx.store, ctx.hasher, secret)
        reason = info.gone_reason
        if reason is not None:
            return await ctx.message(request, "This link no longer works", reason, status=410)
        who = await ctx.signed_in(request)
        if who is not None and not info.link.admits(who.member.email):
            return await ctx.message(
                request,
                "This link is for someone else",
                f"This connection link is for invited people only, and {who.member.email} is not one of them. "
                "Sign out and sign in with the invited account, or ask for a link for this one.",
                status=403,
            )
        return await ctx.render(request, "link.html", info=info, secret=secret)

    async def start(request: Request) -> Response:
        who = await ctx.require(request)
        draft = await enrollment.start(ctx.store, ctx.hasher, who, request.path_params["secret"], revoker=ctx.revoker)
        return redirect(f"/enroll/drafts/{draft.id}")

    async def draft(request: Request) -> Response:
        who = await ctx.require(request)
        view = await enrollment.load(ctx.store, who, request.path_params["draft_id"], revoker=ctx.revoker)
        focus = request.query_params.get("changed")
        return await ctx.render(request, "draft.html", view=view, errors={}, focus=focus, oauth=ctx.connector)

    async def after_change(request: Request, draft_id: str, alias: str, error: str | None) -> Response:
        """Back to the draft (htmx swaps its new content in place); a refusal is shown on that server's card."""
        if error is None:
            return redirect(f"/enroll/drafts/{draft_id}?changed={quote(alias)}#server-{quote(alias)}")
        who = await ctx.require(request)
        view = await enrollment.load(ctx.store, who, draft_id, revoker=ctx.revoker)
        return await ctx.render(
            request, "draft.html", status=422, view=view, errors={alias: error}, focus=alias, oauth=ctx.connector
        )

    async def paste_token(request: Request) -> Response:
        who = await ctx.require(request)
        draft_id, alias = request.path_params["draft_id"], request.path_params["alias"]
        form = await request.form()
        try:
            secret = bearer_secret(field(form, "token"))
            await enrollment.set_token(
                ctx.store, ctx.vault, ctx.hasher, who, draft_id, alias, secret, revoker=ctx.revoker
            )
        except ValidationFailed as invalid:
            return await after_change(request, draft_id, alias, invalid.detail)
        return await after_change(request, draft_id, alias, None)

    async def use_existing(request: Request) -> Response:
        who = await ctx.require(request)
        draft_id, alias = request.path_params["draft_id"], request.path_params["alias"]
        form = await request.form()
        try:
            await enrollment.set_existing(ctx.store, who, draft_id, alias, field(form, "identity"), revoker=ctx.revoker)
        except ValidationFailed as invalid:
            return await after_change(request, draft_id, alias, invalid.detail)
        return await after_change(request, draft_id, alias, None)

    async def clear(request: Request) -> Response:
        who = await ctx.require(request)
        draft_id, alias = request.path_params["draft_id"], request.path_params["alias"]
        await enrollment.clear(ctx.store, who, draft_id, alias, revoker=ctx.revoker)
        return await after_change(request, draft_id, alias, None)

    async def connect_oauth(request: Request) -> Response:
        who = await ctx.require(request)
        if ctx.connector is None:
            raise NotFound("connecting with OAuth is not available on this Bastion")
        draft_id, alias = request.path_params["draft_id"], request.path_params["alias"]
        view = await enrollment.load(ctx.store, who, draft_id, revoker=ctx.revoker)
        slot = view.slot(alias)
        url = await ctx.connector.begin(
            workspace_id=who.member.workspace_id,
            member_id=who.member.id,
            server_id=slot.server.id,
            browser=ctx.session_browser(who),
            context={"draft": draft_id, "alias": alias},
        )
        return RedirectResponse(url, status_code=303)

    def _mcp_url(request: Request, view: DraftView) -> str:
        return f"{ctx.base_url(request)}/g/{view.info.gateway.slug}/mcp"

    async def review(request: Request) -> Response:
        who = await ctx.require(request)
        view = await enrollment.load(ctx.store, who, request.path_params["draft_id"], revoker=ctx.revoker)
        return await ctx.render(request, "review.html", view=view, error=None, mcp_url=_mcp_url(request, view))

    async def approve(request: Request) -> Response:
        who = await ctx.require(request)
        draft_id = request.path_params["draft_id"]
        try:
            enrolled = await enrollment.approve(ctx.store, ctx.hasher, who, draft_id, revoker=ctx.revoker)
        except AlreadyApproved as approved:
            return await ctx.message(
                request, approved.title, approved.detail, status=approved.status, links={"My connections": "/me"}
            )
        except ValidationFailed as invalid:
            view = await enrollment.load(ctx.store, who, draft_id, revoker=ctx.revoker)
            return await ctx.render(
                request, "review.html", status=422, view=view, error=invalid.detail, mcp_url=_mcp_url(request, view)
            )
        except Gone as gone:
            await _discard(request, draft_id)
            return await ctx.message(request, "This link no longer works", gone.detail, status=410)
        base = ctx.base_url(request)
        return await ctx.render(
            request,
            "token.html",
            enrolled=enrolled,
            mcp_url=f"{base}/g/{enrolled.gateway_slug}/mcp",
            env_name="BASTION_TOKEN",
        )

    async def _discard(request: Request, draft_id: str) -> None:
        """A draft whose link stopped working can never be approved: nothing of it is kept."""
        who = await ctx.require(request)
        try:
            await enrollment.cancel(ctx.store, who, draft_id, revoker=ctx.revoker)
        except (NotFound, Gone):
            return

    async def cancel(request: Request) -> Response:
        who = await ctx.require(request)
        with contextlib.suppress(Gone):  # expired: already discarded
            await enrollment.cancel(ctx.store, who, request.path_params["draft_id"], revoker=ctx.revoker)
        return await ctx.message(
            request,
            "Enrollment cancelled",
            "Nothing was saved: no identity, connection or token was created.",
            links={"My connections": "/me"},
        )

    draft_path = "/enroll/drafts/{draft_id}"
    server_path = draft_path + "/servers/{alias}"
    return [
        Route("/enroll/{secret}", ctx.page(landing), methods=["GET"]),
        Route("/enroll/{secret}/start", ctx.page(start), methods=["POST"]),
        Route(draft_path, ctx.page(draft), methods=["GET"]),
        Route(server_path + "/token", ctx.page(paste_token), methods=["POST"]),
        Route(server_path + "/existing", ctx.page(use_existing), methods=["POST"]),
        Route(server_path + "/oauth", ctx.page(connect_oauth), methods=["POST"]),
        Route(server_path + "/clear", ctx.page(clear), methods=["POST"]),
        Route(draft_path + "/review", ctx.page(review), methods=["GET"]),
        Route(draft_path + "/approve", ctx.page(approve), methods=["POST"]),
        Route(draft_path + "/cancel", ctx.page(cancel), methods=["POST"]),
    ]
