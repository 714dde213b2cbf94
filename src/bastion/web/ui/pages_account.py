"""Signing in and out: local passwords, invitations and reset links, and single sign-on with OpenID Connect."""

from __future__ import annotations

from typing import Final

from starlette.datastructures import FormData
from starlette.requests import Request
from starlette.responses import RedirectResponse, Response
from starlette.routing import BaseRoute, Route

from bastion.domain.models import Member
from bastion.errors import NotFound, ValidationFailed
from bastion.services import accounts, enrollment, sessions, workspace
from bastion.services.accounts import SignInFailed, TicketKind
from bastion.services.sso import Sso
from bastion.web.ui import throttle
from bastion.web.ui.context import UiContext, redirect
from bastion.web.ui.security import safe_next

SSO_CALLBACK: Final = "/signin/oidc/callback"


def field(form: FormData, name: str) -> str:
    """A text field of a submitted form ("" when absent or a file)."""
    value = form.get(name)
    return value if isinstance(value, str) else ""


async def _start_session(ctx: UiContext, request: Request, member: Member, method: str, next_path: str) -> Response:
    """A fresh session (a new secret on every sign-in), its cookie, and on to where the person was going."""
    # Drafts of sessions that are over first: deleting the sessions would take them, OAuth grants unrevoked.
    await enrollment.sweep(ctx.store, ctx.revoker, ctx.lifetimes)
    await sessions.sweep(ctx.store, ctx.lifetimes)
    _session, secret = await sessions.start(
        ctx.store,
        ctx.hasher,
        member,
        method=method,
        user_agent=request.headers.get("user-agent", ""),
        lifetimes=ctx.lifetimes,
    )
    response = redirect(safe_next(next_path))
    max_age = int(ctx.lifetimes.absolute.total_seconds())
    ctx.set_cookie(request, response, ctx.session_cookie(request), secret, max_age=max_age)
    return response


def routes(ctx: UiContext) -> list[BaseRoute]:
    def sso() -> Sso:
        if ctx.sso is None:
            raise NotFound("single sign-on is not set up on this Bastion")
        found: Sso = ctx.sso
        return found

    async def home(request: Request) -> Response:
        return redirect("/me" if await ctx.signed_in(request) else "/signin")

    async def sign_in_page(request: Request) -> Response:
        next_path = safe_next(request.query_params.get("next"))
        if await ctx.signed_in(request):
            return redirect(next_path)
        return await ctx.render(request, "signin.html", next=next_path, email="", error=None, sso=ctx.sso)

    async def sign_in(request: Request) -> Response:
        form = await request.form()
        email, password = field(form, "email"), field(form, "password")
        next_path = safe_next(field(form, "next"))
        # Before any password work: a flood is refused here, not queued for argon2.
        await ctx.throttle.check(request, throttle.SIGN_IN_PER_ADDRESS, throttle.SIGN_IN_PER_EMAIL, email[:254])
        try:
            ws = await workspace.default_workspace(ctx.store)
            member = await accounts.check_password(ctx.store, ctx.passwords, ws.id, email, password)
        except SignInFailed as failed:
            return await ctx.render(
                request, "signin.html", status=401, next=next_path, email=email[:254], error=failed.detail, sso=ctx.sso
            )
        return await _start_session(ctx, request, member, "password", next_path)

    async def sign_out(request: Request) -> Response:
        who = await ctx.signed_in(request)
        if who is not None:
            await sessions.end(ctx.store, who)
            ctx.forget(request)
        response = await ctx.message(
            request, "Signed out", "You are signed out of Bastion.", links={"Sign in again": "/signin"}
        )
        response.delete_cookie(ctx.session_cookie(request), path="/", secure=ctx.https(request), httponly=True)
        return response

    async def sso_start(request: Request) -> Response:
        provider = sso()
        # Each start stores a state row: anonymous requests may not make them without bound.
        await ctx.throttle.check(request, throttle.SSO_START_PER_ADDRESS)
        next_path = safe_next(request.query_params.get("next"))
        browser = ctx.browser_secret(request)
        fresh = browser is None
        if browser is None:
            browser = sessions.new_browser_secret()
        ws = await workspace.default_workspace(ctx.store)
        url = await provider.begin(
            ws.id,
            browser=ctx.keys.browser(browser),
            redirect_uri=ctx.base_url(request) + SSO_CALLBACK,
            next_path=next_path,
        )
        response = RedirectResponse(url, status_code=303)
        if fresh:
            ctx.set_cookie(request, response, ctx.browser_cookie(request), browser, max_age=None)
        return response

    async def sso_callback(request: Request) -> Response:
        signed_on = await sso().complete(browser=ctx.browser_id(request), params=dict(request.query_params))
        return await _start_session(ctx, request, signed_on.member, "sso", signed_on.next_path)

    async def ticket_page(request: Request) -> Response:
        secret = request.path_params["secret"]
        ticket = await accounts.read_ticket(ctx.store, ctx.hasher, secret)
        return await ctx.render(
            request, "password.html", ticket=ticket, invite=ticket.kind is TicketKind.INVITE, error=None
        )

    async def ticket_redeem(request: Request) -> Response:
        secret = request.path_params["secret"]
        await ctx.throttle.check(request, throttle.TICKET_PER_ADDRESS)
        live = await accounts.read_ticket(ctx.store, ctx.hasher, secret)
        await ctx.throttle.check(request, None, throttle.TICKET_PER_EMAIL, live.email)
        form = await request.form()
        password, again = field(form, "password"), field(form, "password_again")
        try:
            if password != again:
                raise ValidationFailed("the two passwords differ", field="password")
            member = await accounts.redeem_ticket(ctx.store, ctx.hasher, ctx.passwords, secret, password)
        except ValidationFailed as invalid:
            ticket = await accounts.read_ticket(ctx.store, ctx.hasher, secret)
            return await ctx.render(
                request,
                "password.html",
                status=422,
                ticket=ticket,
                invite=ticket.kind is TicketKind.INVITE,
                error=invalid.detail,
            )
        return await _start_session(ctx, request, member, "password", "/me")

    return [
        Route("/", ctx.page(home), methods=["GET"]),
        Route("/signin", ctx.page(sign_in_page), methods=["GET"]),
        Route("/signin", ctx.page(sign_in), methods=["POST"]),
        Route("/signout", ctx.page(sign_out), methods=["POST"]),
        Route("/signin/sso", ctx.page(sso_start), methods=["GET"]),
        Route(SSO_CALLBACK, ctx.page(sso_callback), methods=["GET"]),
        Route("/welcome/{secret}", ctx.page(ticket_page), methods=["GET"]),
        Route("/welcome/{secret}", ctx.page(ticket_redeem), methods=["POST"]),
        Route("/reset-password/{secret}", ctx.page(ticket_page), methods=["GET"]),
        Route("/reset-password/{secret}", ctx.page(ticket_redeem), methods=["POST"]),
    ]
