"""What every page handler shares: the parts, cookies, the signed-in person, rendering, and the one page wrapper.

``page()`` wraps every handler: POSTs must carry this browser's CSRF token (checked here and nowhere else) and
come from this site; errors become readable HTML pages; every response gets the security headers.
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from importlib import resources
from typing import Any, Final
from urllib.parse import quote, urlsplit

import jinja2
from starlette.requests import Request
from starlette.responses import HTMLResponse, RedirectResponse, Response

from bastion.db.store import Store
from bastion.errors import BastionError
from bastion.oauth.revocation import Revoker
from bastion.services import sessions
from bastion.services.accounts import Passwords, PasswordsBusy
from bastion.services.apikeys import KeyHasher
from bastion.services.sessions import Lifetimes, SessionKeys, SignedIn
from bastion.services.sso import Sso
from bastion.vault.sealer import Vault
from bastion.web.ui.connect import Connector
from bastion.web.ui.security import CSRF_FIELD, CSRF_HEADER, safe_next, secure
from bastion.web.ui.throttle import Throttle, Throttled

logger = logging.getLogger("bastion.ui")

Handler = Callable[[Request], Awaitable[Response]]
STATIC_TYPES: Final = {".css": "text/css; charset=utf-8", ".js": "text/javascript; charset=utf-8"}
_STATE_SIGNED_IN: Final = "bastion_signed_in"


@dataclass(frozen=True, slots=True)
class StaticFile:
    body: bytes
    content_type: str
    version: str


def load_static() -> dict[str, StaticFile]:
    """The files under ``static/``, read once; each URL carries a content hash so they can be cached for ever."""
    out: dict[str, StaticFile] = {}
    for entry in resources.files("bastion.web.ui").joinpath("static").iterdir():
        suffix = "." + entry.name.rsplit(".", 1)[-1]
        if entry.is_file() and suffix in STATIC_TYPES:
            body = entry.read_bytes()
            out[entry.name] = StaticFile(body, STATIC_TYPES[suffix], hashlib.sha256(body).hexdigest()[:12])
    return out


class SignInRequired(Exception):
    """Raised by a handler that needs a signed-in person; the wrapper sends them to sign in and back."""

    def __init__(self, next_path: str) -> None:
        super().__init__("sign in first")
        self.next_path = next_path


@dataclass(slots=True)
class UiContext:
    """The parts the pages use. ``sso`` and ``connector`` are None when not configured or not available."""

    store: Store
    hasher: KeyHasher
    vault: Vault
    passwords: Passwords
    keys: SessionKeys
    lifetimes: Lifetimes
    public_url: str | None
    throttle: Throttle
    revoker: Revoker
    sso: Sso | None = None
    connector: Connector | None = None
    templates: jinja2.Environment = field(init=False)
    static: dict[str, StaticFile] = field(init=False)

    def __post_init__(self) -> None:
        self.static = load_static()
        self.templates = jinja2.Environment(
            loader=jinja2.PackageLoader("bastion.web.ui", "templates"),
            autoescape=jinja2.select_autoescape(default=True, default_for_string=True),
            undefined=jinja2.StrictUndefined,
            trim_blocks=True,
            lstrip_blocks=True,
        )

    def static_url(self, name: str) -> str:
        return f"/static/{name}?v={self.static[name].version}"

    # --- addresses and cookies ---------------------------------------------------------------------------------

    def base_url(self, request: Request) -> str:
        """``BASTION_PUBLIC_URL``, or the address this request came to: the base of every link Bastion hands out."""
        return (self.public_url or str(request.base_url)).rstrip("/")

    def https(self, request: Request) -> bool:
        return urlsplit(self.base_url(request)).scheme == "https"

    def session_cookie(self, request: Request) -> str:
        # __Host-: only over https, never shared with a subdomain, always Path=/. Plain http is loopback development.
        return "__Host-bastion" if self.https(request) else "bastion"

    def browser_cookie(self, request: Request) -> str:
        return "__Host-bastion-browser" if self.https(request) else "bastion-browser"

    def set_cookie(self, request: Request, response: Response, name: str, value: str, *, max_age: int | None) -> None:
        response.set_cookie(
            name, value, max_age=max_age, path="/", secure=self.https(request), httponly=True, samesite="lax"
        )

    def browser_secret(self, request: Request) -> str | None:
        value = request.cookies.get(self.browser_cookie(request))
        return value if value and sessions.well_formed_browser_secret(value) else None

    def browser_id(self, request: Request) -> str | None:
        """This browser's opaque handle (for OAuth states begun before sign-in), if it has its cookie."""
        secret = self.browser_secret(request)
        return self.keys.browser(secret) if secret else None

    # --- who is signed in ----------------------------------------------------------------------------------------

    async def signed_in(self, request: Request) -> SignedIn | None:
        if _STATE_SIGNED_IN not in request.scope.setdefault("state", {}):
            secret = request.cookies.get(self.session_cookie(request))
            found = await sessions.resolve(self.store, self.hasher, secret, self.lifetimes) if secret else None
            request.scope["state"][_STATE_SIGNED_IN] = found
        who: SignedIn | None = request.scope["state"][_STATE_SIGNED_IN]
        return who

    def forget(self, request: Request) -> None:
        """After signing out: the rest of this request (the page it renders) sees nobody signed in."""
        request.scope.setdefault("state", {})[_STATE_SIGNED_IN] = None

    async def require(self, request: Request) -> SignedIn:
        who = await self.signed_in(request)
        if who is None:
            # After signing in the browser GETs ``next``: a form's address is no page to land on.
            raise SignInRequired(request.url.path if request.method == "GET" else "/me")
        return who

    def session_browser(self, who: SignedIn) -> str:
        """The handle OAuth states begun by a signed-in person are bound to: their session's, not the cookie's."""
        return self.keys.browser(who.secret)

    # --- rendering ---------------------------------------------------------------------------------------------

    async def render(self, request: Request, template: str, *, status: int = 200, **values: Any) -> HTMLResponse:
        """A page, with the CSRF token of this browser (its session's once signed in) for its forms."""
        who = await self.signed_in(request)
        new_browser: str | None = None
        if who is not None:
            csrf = self.keys.csrf_token(who.secret)
        else:
            browser = self.browser_secret(request)
            if browser is None:
                browser = new_browser = sessions.new_browser_secret()
            csrf = self.keys.csrf_token(browser)
        body = self.templates.get_template(template).render(
            who=who, csrf=csrf, static=self.static_url, request_path=request.url.path, **values
        )
        response = HTMLResponse(body, status_code=status)
        if new_browser is not None:
            self.set_cookie(request, response, self.browser_cookie(request), new_browser, max_age=None)
        return response

    async def message(
        self, request: Request, title: str, text: str, *, status: int = 200, links: Mapping[str, str] | None = None
    ) -> HTMLResponse:
        """A page that says one thing (an error, an ending) with links onwards."""
        return await self.render(request, "message.html", status=status, title=title, text=text, links=links or {})

    # --- the one wrapper -----------------------------------------------------------------------------------------

    async def _check_post(self, request: Request) -> str | None:
        """None when the POST may proceed, else why not. Forms send the token as a field, htmx as a header."""
        origin = request.headers.get("origin")
        if origin is not None and origin != "null":
            expected = urlsplit(self.base_url(request))
            if origin.rstrip("/") != f"{expected.scheme}://{expected.netloc}":
                return "this form was sent from another site"
        who = await self.signed_in(request)
        cookie_secret = who.secret if who is not None else self.browser_secret(request)
        presented = request.headers.get(CSRF_HEADER)
        if presented is None:
            content_type = request.headers.get("content-type", "")
            if content_type.startswith(("application/x-www-form-urlencoded", "multipart/form-data")):
                value = (await request.form()).get(CSRF_FIELD)
                presented = value if isinstance(value, str) else None
        if cookie_secret is None or presented is None or not self.keys.csrf_ok(cookie_secret, presented):
            return "this form has expired or did not come from this site"
        return None

    def page(self, handler: Handler) -> Handler:
        async def wrapped(request: Request) -> Response:
            try:
                if request.method == "POST":
                    refused = await self._check_post(request)
                    if refused is not None:
                        return secure(
                            await self.message(
                                request,
                                "Please try again",
                                f"Bastion did not accept this: {refused}. Go back, reload the page and try again.",
                                status=403,
                            )
                        )
                response = await handler(request)
            except SignInRequired as needed:
                response = RedirectResponse(f"/signin?next={quote(safe_next(needed.next_path), safe='/')}", 303)
            except BastionError as error:
                if error.status >= 500:
                    logger.error("page failed: %s", error.code, extra={"code": error.code})
                response = await self.message(request, error.title, error.detail, status=error.status)
                retry_after = _retry_after(error)
                if retry_after is not None:
                    response.headers["Retry-After"] = str(retry_after)
            except Exception:
                logger.exception("page failed")
                response = await self.message(
                    request, "Something went wrong", "Bastion could not finish this. Try again shortly.", status=500
                )
            return secure(response)

        wrapped.__name__ = handler.__name__
        wrapped.__doc__ = handler.__doc__
        return wrapped


def _retry_after(error: BastionError) -> int | None:
    """Seconds to wait before trying again, for refusals that say (too many attempts, too busy)."""
    if isinstance(error, Throttled):
        return error.retry_after_s
    if isinstance(error, PasswordsBusy):
        return error.retry_after_s
    return None


def redirect(path: str) -> RedirectResponse:
    """A 303 to a path on this site (after a POST, the browser GETs it)."""
    return RedirectResponse(path, status_code=303)
