"""The client the conformance suite's auth scenarios judge: Bastion enrolling a member at the suite's mock server.

``python -m tests.conformance.auth_client <mcp-url>`` (``scripts/conformance-client``; the suite appends the
URL and sets ``MCP_CONFORMANCE_SCENARIO`` and, for some scenarios, ``MCP_CONFORMANCE_CONTEXT``):

1. Bastion runs in this process on a free loopback port, on a fresh SQLite data directory, with
   ``outbound_allow_loopback`` (the mock listens on localhost). Its public URL is
   ``https://conformance-test.local``: the name the suite expects in a client ID metadata document. The
   member's browser reaches it through ``FrontDoor``, which plays the TLS-terminating proxy in front of a
   real install: requests for the public URL go to the loopback port, unchanged (Host, path, cookies).
2. The admin side, through the services as the admin API and CLI would: an owner, the mock as an OAuth
   server (with the pre-registered client the context names, if any; else the default registration, the
   MCP specification's order), a gateway, a host, a connection link, and a member with a password (set
   through an invitation).
3. The member enrolls through Bastion's own pages over HTTP, with a cookie-keeping client and no browser:
   sign in at ``/signin`` → the link's page → "Add a connection" → "Connect with OAuth" → Bastion's redirect
   to the authorization server, whose redirects are followed until one points at Bastion's callback → that
   callback opened with the member's cookies → review → approve → the ``bst_`` token read off the token page.
4. A tool is called through the gateway with the official MCP client and that token, so the mock sees the
   member's own access token. When the call fails and Bastion says reconnecting can help (the error's
   reconnect link, or "My connections" saying so), the member reconnects on the reconnect page (at most
   ``MAX_RECONNECTS`` times); after a 403 ``insufficient_scope`` that page asks for the step-up scope.

Exit status 0 when the tool call succeeded, 1 when Bastion refused or the call kept failing.
"""

from __future__ import annotations

import faulthandler
import json
import logging
import os
import sys
import tempfile
from collections.abc import AsyncGenerator, Mapping
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from html.parser import HTMLParser
from pathlib import Path
from typing import Any, Final, cast
from urllib.parse import urljoin, urlsplit

import anyio
import httpx2
from mcp import ClientSession
from mcp.client.streamable_http import streamable_http_client
from mcp.shared.exceptions import MCPError

from bastion import wiring
from bastion.db import migrate
from bastion.db.store import Store
from bastion.domain.actor import Actor
from bastion.domain.models import AuthKind, OAuthClientSettings, OAuthRegistration, Transport
from bastion.domain.specs import GatewayServerSpec, GatewaySpec, HostSpec, MemberSpec, ServerSpec
from bastion.services import accounts, gateways, hosts, links, members, oauth_clients, servers
from bastion.services import workspace as workspaces
from bastion.services.accounts import Passwords, TicketKind
from bastion.settings import Settings, generate_secrets
from bastion.vault.sealer import Vault
from bastion.web.app import create_app
from tests.mcp_support import serving

PUBLIC_URL: Final = "https://conformance-test.local"
MEMBER_EMAIL: Final = "member@example.com"
MEMBER_PASSWORD: Final = "conformance member passphrase"
MAX_RECONNECTS: Final = 2
MAX_AUTHORIZATION_HOPS: Final = 5
MAX_PAGE_HOPS: Final = 5
CALL_TIMEOUT_S: Final = 30.0
HANG_REPORT_AFTER_S: Final = 280.0  # before the suite's own scenario timeout (client_harness.SCENARIO_TIMEOUT_MS)
RECONNECT_CODES: Final = frozenset({"identity_needs_reauth", "identity_needs_scope"})
# What "My connections" says of an identity that reconnecting would help.
NEEDS_RECONNECTING: Final = ("needs to be connected again", "needs more access")

logger = logging.getLogger("conformance.client")


class Refused(Exception):
    """Bastion (or the authorization server) ended the member's journey; the message says where and why."""


class Harness:
    """Bastion's parts plus the admin objects one scenario needs."""

    def __init__(self, settings: Settings, store: Store, vault: Vault, upstream: str) -> None:
        self.settings = settings
        self.store = store
        self.vault = vault
        self.hasher = wiring.hasher_from(settings)
        self.upstream = upstream
        self.link_url = ""

    async def provision(self, context: Mapping[str, Any]) -> None:
        """Owner, upstream server (OAuth), gateway, host, connection link and member, as an admin sets them up."""
        workspace = await workspaces.ensure_workspace(self.store)
        operator = Actor.local_operator(workspace.id)
        await members.create(self.store, operator, MemberSpec("owner@example.com", "Owner", "owner"))
        client_id = context.get("client_id")
        options: OAuthClientSettings | None = None  # the default: the MCP specification's order
        if isinstance(client_id, str):
            issuer = context.get("issuer")
            options = OAuthClientSettings(
                OAuthRegistration.PRE_REGISTERED, client_id, authorization_server=str(issuer) if issuer else None
            )
        spec = ServerSpec(
            "upstream", Transport.STREAMABLE_HTTP, url=self.upstream, auth_kind=AuthKind.OAUTH, oauth=options
        )
        server = await servers.create(self.store, operator, spec)
        secret = context.get("client_secret")
        if isinstance(client_id, str) and isinstance(secret, str):
            await oauth_clients.set_client_secret(self.store, self.vault, operator, server.id, secret)
        await gateways.create(
            self.store, operator, GatewaySpec("conformance", servers=(GatewayServerSpec("upstream", namespaced=False),))
        )
        await hosts.create(self.store, operator, HostSpec("agent"))
        _link, link_secret = await links.create(self.store, self.hasher, operator, host="agent", gateway="conformance")
        self.link_url = f"{PUBLIC_URL}/enroll/{link_secret}"
        member = await members.create(self.store, operator, MemberSpec(MEMBER_EMAIL, "Member"))
        _ticket, invite = await accounts.issue_ticket(self.store, self.hasher, operator, member.id, TicketKind.INVITE)
        await accounts.redeem_ticket(self.store, self.hasher, Passwords(), invite, MEMBER_PASSWORD)


# --- the member's browser ---------------------------------------------------------------------------------------


class FrontDoor(httpx2.AsyncBaseTransport):
    """The TLS-terminating proxy at Bastion's public URL: its requests go to Bastion's loopback port as they
    are (Host header, path, cookies); every other request (the authorization server) goes out directly."""

    def __init__(self, public_url: str, backend: str) -> None:
        self._public = httpx2.URL(public_url)
        self._backend = httpx2.URL(backend)
        self._inner = httpx2.AsyncHTTPTransport()

    async def handle_async_request(self, request: httpx2.Request) -> httpx2.Response:
        url = request.url
        if (url.scheme, url.host, url.port) == (self._public.scheme, self._public.host, self._public.port):
            target = url.copy_with(scheme=self._backend.scheme, host=self._backend.host, port=self._backend.port)
            request = httpx2.Request(
                request.method, target, headers=request.headers, stream=request.stream, extensions=request.extensions
            )
        return await self._inner.handle_async_request(request)

    async def aclose(self) -> None:
        await self._inner.aclose()


@dataclass
class Form:
    """One ``<form>`` of a page: where it posts, its fields with their values, and its button's text."""

    action: str
    fields: dict[str, str] = field(default_factory=dict[str, str])
    button: str = ""


class _Reader(HTMLParser):
    """The parts of Bastion's pages a person acts on: forms, links, input values by id, and the text."""

    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.forms: list[Form] = []
        self.links: list[str] = []
        self.values: dict[str, str] = {}
        self.text: list[str] = []
        self._form: Form | None = None
        self._in_button = False
        self._skip = 0

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        found = {name: value or "" for name, value in attrs}
        if tag == "form":
            self._form = Form(found.get("action", ""))
            self.forms.append(self._form)
        elif tag == "input":
            if "id" in found:
                self.values[found["id"]] = found.get("value", "")
            if self._form is not None and "name" in found:
                self._form.fields[found["name"]] = found.get("value", "")
        elif tag == "a" and "href" in found:
            self.links.append(found["href"])
        elif tag == "button":
            self._in_button = True
        elif tag in ("script", "style"):
            self._skip += 1

    def handle_endtag(self, tag: str) -> None:
        if tag == "form":
            self._form = None
        elif tag == "button":
            self._in_button = False
        elif tag in ("script", "style"):
            self._skip = max(0, self._skip - 1)

    def handle_data(self, data: str) -> None:
        if self._skip:
            return
        if self._in_button and self._form is not None:
            self._form.button += data.strip()
        if data.strip():
            self.text.append(" ".join(data.split()))


@dataclass
class Page:
    """A page as the member's browser got it."""

    url: str
    status: int
    forms: list[Form]
    links: list[str]
    values: dict[str, str]
    text: str

    @classmethod
    def of(cls, response: httpx2.Response) -> Page:
        reader = _Reader()
        if response.headers.get("content-type", "").startswith("text/html"):
            reader.feed(response.text)
        return cls(
            str(response.url), response.status_code, reader.forms, reader.links, reader.values, " ".join(reader.text)
        )

    def form(self, *, button: str | None = None, action_ends: str | None = None) -> Form:
        """The form with this button text or whose action ends so; ``Refused`` when the page has none."""
        for form in self.forms:
            if (button is None or form.button == button) and (action_ends is None or form.action.endswith(action_ends)):
                return form
        raise Refused(f"{self.url} has no form {button or action_ends!r}: {self.text[:300]}")


class Browser:
    """The member's browser: cookies kept, forms sent with the CSRF token they carry, redirects followed by hand
    while they stay on Bastion, and the authorization server's answer taken back to Bastion's callback."""

    def __init__(self, http: httpx2.AsyncClient) -> None:
        self.http = http

    async def _on_bastion(self, response: httpx2.Response) -> Page:
        """Follow ``response``'s redirects within Bastion; the page they end on (``Refused`` if it is an error)."""
        for _hop in range(MAX_PAGE_HOPS):
            location = response.headers.get("location")
            if not response.is_redirect or location is None:
                break
            target = urljoin(str(response.url), location)
            if not target.startswith(PUBLIC_URL + "/"):
                raise Refused(f"Bastion sent the browser off-site to {target.split('?', 1)[0]} unexpectedly")
            response = await self.http.get(target)
        page = Page.of(response)
        if page.status >= 400:
            raise Refused(f"Bastion answered {page.status} at {urlsplit(page.url).path}: {page.text[:500]}")
        return page

    async def open(self, url: str) -> Page:
        return await self._on_bastion(await self.http.get(url))

    async def submit(self, page: Page, form: Form, **values: str) -> httpx2.Response:
        """POST ``form`` as a browser would (hidden fields included), not following where it leads."""
        target = urljoin(page.url, form.action) if form.action else page.url
        return await self.http.post(target, data={**form.fields, **values})

    async def sign_in(self, next_path: str) -> Page:
        page = await self.open(f"{PUBLIC_URL}/signin?next={next_path}")
        form = page.form(button="Sign in")
        return await self._on_bastion(await self.submit(page, form, email=MEMBER_EMAIL, password=MEMBER_PASSWORD))

    async def through_the_authorization_server(self, started: httpx2.Response) -> Page:
        """From Bastion's redirect to the authorization server, to the page Bastion shows after its callback.

        The authorization server's redirects are followed until one points at Bastion's callback; that one is
        opened as the member, with their cookies (the callback belongs to the session that started).
        """
        location = started.headers.get("location")
        if not started.is_redirect or location is None:
            page = Page.of(started)
            raise Refused(f"Bastion did not send the browser to sign in ({page.status}): {page.text[:500]}")
        url = urljoin(str(started.url), location)
        callback = PUBLIC_URL + "/oauth/callback"
        for _hop in range(MAX_AUTHORIZATION_HOPS):
            if url.split("?", 1)[0] == callback:
                return await self.open(url)
            response = await self.http.get(url)
            location = response.headers.get("location")
            if not response.is_redirect or location is None:
                raise Refused(f"the authorization server answered {response.status_code} without redirecting")
            url = urljoin(url, location)
        raise Refused("the authorization server never redirected to Bastion's callback")

    async def enroll(self, link_url: str) -> str:
        """Open the link, sign in, connect the server with OAuth, approve; the token shown once."""
        landing = await self.open(link_url)
        if not any(f.button == "Add a connection" for f in landing.forms):
            landing = await self.sign_in(urlsplit(link_url).path)
        draft = await self._on_bastion(await self.submit(landing, landing.form(button="Add a connection")))
        connect = draft.form(button="Connect with OAuth")
        draft = await self.through_the_authorization_server(await self.submit(draft, connect))
        review_path = next((href for href in draft.links if href.endswith("/review")), None)
        if review_path is None:
            raise Refused(f"the enrollment is not ready for review after connecting: {draft.text[:500]}")
        review = await self.open(urljoin(draft.url, review_path))
        approved = await self._on_bastion(await self.submit(review, review.form(button="Approve and create the token")))
        token = approved.values.get("token", "")
        if not token.startswith("bst_"):
            raise Refused(f"no token on the page after approving: {approved.text[:500]}")
        return token

    async def reconnect_link(self) -> str | None:
        """The reconnect link "My connections" offers when it says an identity needs reconnecting."""
        mine = await self.open(f"{PUBLIC_URL}/me")
        if not any(said in mine.text for said in NEEDS_RECONNECTING):
            return None
        found = [href for href in mine.links if href.startswith("/me/identities/") and href.endswith("/reconnect")]
        return urljoin(mine.url, found[0]) if found else None

    async def reconnect(self, url: str) -> None:
        page = await self.open(url)
        done = await self.through_the_authorization_server(
            await self.submit(page, page.form(button="Reconnect with OAuth"))
        )
        if "Reconnected" not in done.text:
            raise Refused(f"reconnecting did not finish: {done.text[:500]}")


@asynccontextmanager
async def browser(backend: str) -> AsyncGenerator[Browser]:
    transport = FrontDoor(PUBLIC_URL, backend)
    async with httpx2.AsyncClient(transport=transport, follow_redirects=False, timeout=CALL_TIMEOUT_S) as http:
        yield Browser(http)


# --- the agent --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Outcome:
    """How a tool call through the gateway went: ``code`` is Bastion's error code when it failed with one,
    ``reconnect`` the link its error named."""

    ok: bool
    said: str
    code: str | None = None
    reconnect: str | None = None


async def call_tool(gateway_url: str, token: str) -> Outcome:
    """List the gateway's tools and call the first one with the member's token."""
    headers = {"Authorization": f"Bearer {token}"}
    async with (
        httpx2.AsyncClient(headers=headers, timeout=CALL_TIMEOUT_S) as http,
        streamable_http_client(gateway_url, http_client=http) as (read, write, *_rest),
        ClientSession(read, write) as session,
    ):
        await session.initialize()
        try:
            listed = await session.list_tools()
            if not listed.tools:
                return Outcome(False, "the gateway lists no tool")
            result = await session.call_tool(listed.tools[0].name, {})
        except MCPError as exc:
            raw: object = exc.data
            data = cast("dict[str, Any]", raw) if isinstance(raw, dict) else {}
            code, link = data.get("code"), data.get("reconnect")
            return Outcome(
                False,
                f"error {exc.code}: {exc}",
                code if isinstance(code, str) else None,
                link if isinstance(link, str) else None,
            )
        text = " ".join(getattr(c, "text", "") for c in result.content)
        return Outcome(not result.is_error, text)


@asynccontextmanager
async def bastion(upstream: str) -> AsyncGenerator[tuple[Harness, str]]:
    """Bastion on a fresh data directory, served on loopback; yields the harness and its loopback base URL."""
    with tempfile.TemporaryDirectory(prefix="bastion-conformance-") as tmp:
        database = Path(tmp) / "bastion.db"
        migrate.upgrade(f"sqlite:///{database}")
        settings = Settings(
            data_dir=Path(tmp),
            database_url=f"sqlite+aiosqlite:///{database}",
            public_url=PUBLIC_URL,
            outbound_allow_loopback=True,
            **generate_secrets(),  # type: ignore[arg-type]
        )
        store = wiring.store_from(settings)
        try:
            harness = Harness(settings, store, wiring.vault_from(settings), upstream)
            async with serving(create_app(settings, store)) as base:
                yield harness, base
        finally:
            await store.close()


async def run(upstream: str, context: Mapping[str, Any]) -> int:
    async with bastion(upstream) as (harness, base), browser(base) as member:
        await harness.provision(context)
        gateway_url = f"{base}/g/conformance/mcp"
        try:
            token = await member.enroll(harness.link_url)
        except Refused as exc:
            print(f"enrollment refused: {exc}", file=sys.stderr)  # noqa: T201
            return 1
        for attempt in range(MAX_RECONNECTS + 1):
            outcome = await call_tool(gateway_url, token)
            print(f"tool call {attempt + 1}: {outcome}", file=sys.stderr)  # noqa: T201
            if outcome.ok:
                return 0
            # The member reconnects only when Bastion says it can help: in the error (a dead grant, a scope to
            # add), or on "My connections" (an empty listing hides why).
            link = outcome.reconnect if outcome.code in RECONNECT_CODES else None
            link = link or await member.reconnect_link()
            if attempt == MAX_RECONNECTS or link is None:
                break
            try:
                await member.reconnect(link)
            except Refused as exc:
                print(f"reconnection refused: {exc}", file=sys.stderr)  # noqa: T201
                return 1
    return 1


def main() -> None:
    logging.basicConfig(level=logging.WARNING, stream=sys.stderr)
    # A client that hangs is a failure the suite reports as a timeout; the stacks say where it hung.
    faulthandler.dump_traceback_later(HANG_REPORT_AFTER_S, exit=True)
    upstream = sys.argv[-1]
    raw = os.environ.get("MCP_CONFORMANCE_CONTEXT")
    context: dict[str, Any] = json.loads(raw) if raw else {}
    code = anyio.run(run, upstream, context)
    sys.stdout.flush()
    sys.stderr.flush()
    # Everything is closed by now (server, store, data directory); interpreter teardown is skipped because,
    # with dozens of these processes at once, it sometimes stalled in C code after the work was done.
    os._exit(code)


if __name__ == "__main__":
    main()
