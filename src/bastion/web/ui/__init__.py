"""The web pages people use: sign-in, enrollment over connection links, their own connections.

Server-rendered (Jinja2) with htmx for small in-place updates; no inline script or style, so the
Content-Security-Policy can forbid both. Every page goes through ``UiContext.page``.
"""

from __future__ import annotations

from datetime import timedelta

from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import BaseRoute, Route

from bastion.db.store import Store
from bastion.net.outbound import OutboundPolicy
from bastion.oauth.revocation import Revoker
from bastion.services.accounts import Passwords
from bastion.services.apikeys import KeyHasher
from bastion.services.ratelimits import RateLimiter
from bastion.services.sessions import Lifetimes, SessionKeys
from bastion.services.sso import OidcConfig, Sso
from bastion.settings import Settings
from bastion.vault.sealer import Vault
from bastion.web.ui import pages_account, pages_enroll, pages_me
from bastion.web.ui.connect import Connector
from bastion.web.ui.context import UiContext
from bastion.web.ui.security import secure
from bastion.web.ui.throttle import Throttle

__all__ = ["UiContext", "build"]

STATIC_CACHE = "public, max-age=31536000, immutable"


def _sso(store: Store, hasher: KeyHasher, settings: Settings, policy: OutboundPolicy) -> Sso | None:
    if not settings.oidc_issuer or not settings.oidc_client_id:
        return None
    config = OidcConfig(
        issuer=settings.oidc_issuer,
        client_id=settings.oidc_client_id,
        display_name=settings.oidc_display_name,
        allowed_domains=frozenset(d.strip().lower().lstrip("@") for d in settings.oidc_allowed_domains if d.strip()),
        client_secret=settings.oidc_client_secret.get_secret_value() if settings.oidc_client_secret else None,
    )
    return Sso(store, hasher, config, policy)


def build(
    settings: Settings,
    store: Store,
    hasher: KeyHasher,
    vault: Vault,
    *,
    passwords: Passwords | None = None,
    limiter: RateLimiter | None = None,
    revoker: Revoker | None = None,
) -> tuple[UiContext, list[BaseRoute]]:
    """The pages' context and routes.

    ``limiter``: the rate-limit store the sign-in throttles count in (the app's, shared with the gateway's rules);
    ``revoker``: revokes the OAuth grants a discarded enrollment held. Made here from the settings when not given.
    """
    if settings.secret_key is None:
        raise ValueError("settings were not checked: secret_key is missing")
    policy = OutboundPolicy.from_settings(settings)
    ctx = UiContext(
        store=store,
        hasher=hasher,
        vault=vault,
        passwords=passwords or Passwords(),
        keys=SessionKeys(settings.secret_key.get_secret_value().encode("utf-8")),
        lifetimes=Lifetimes(
            idle=timedelta(minutes=settings.session_idle_minutes), absolute=timedelta(hours=settings.session_max_hours)
        ),
        public_url=settings.public_url,
        sso=_sso(store, hasher, settings, policy),
        connector=Connector(store, vault, settings),
        throttle=Throttle(limiter or RateLimiter(settings.rate_limit_url), hasher),
        revoker=revoker or Revoker(vault, policy.client),
    )

    async def static(request: Request) -> Response:
        found = ctx.static.get(request.path_params["name"])
        if found is None:
            return secure(Response("not found", status_code=404, media_type="text/plain"))
        return secure(Response(found.body, media_type=found.content_type), cache=STATIC_CACHE)

    routes: list[BaseRoute] = [
        Route("/static/{name}", static, methods=["GET"]),
        *pages_account.routes(ctx),
        *pages_enroll.routes(ctx),
        *pages_me.routes(ctx),
    ]
    return ctx, routes
