"""The enrollment journey in real headless Chromium (Playwright driving Debian's /usr/bin/chromium).

An admin (the CLI) creates a host, a gateway in front of an OAuth-protected upstream and a connection link,
and invites two members. Each member, in their own browser, accepts the invitation, opens the link, signs
in, connects the upstream with OAuth at a real standards authorization server (npm's oidc-provider) as
themselves, approves, and copies the access token Bastion mints. That token then calls the upstream's
``whoami`` through the gateway with the official MCP client: the upstream saw the member's own access
token, the one the authorization server issued to Bastion for that member, and nobody else's.
Screenshots of every step land in artifacts/browser/.
"""

from __future__ import annotations

import json
from collections.abc import AsyncGenerator, Generator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final

import httpx2
import pytest
from playwright.async_api import Browser, Page, expect

from bastion.settings import generate_secrets
from tests.browser.chromium import ACTION_TIMEOUT_MS, chromium
from tests.browser.peers import AS_USERS, REPO, Peer, authorization_server, protected_upstream, upstream_resource
from tests.fixtures.protected_upstream import fingerprint
from tests.mcp_support import gateway_client
from tests.processes import Server, clean_env, free_port, run_bastion, serving

pytestmark = [pytest.mark.anyio, pytest.mark.e2e, pytest.mark.timeout(300)]

SHOTS: Final = REPO / "artifacts" / "browser"
GATEWAY: Final = "research"
SERVER: Final = "notes"
HOST: Final = "research-agent"


@dataclass(frozen=True)
class Person:
    login: str  # the username at the authorization server
    email: str
    password: str  # their Bastion password, chosen when they accept the invitation


PEOPLE: Final = (
    Person("ada", "ada@example.com", "ada-bastion-passphrase"),
    Person("grace", "grace@example.com", "grace-bastion-passphrase"),
)


@dataclass(frozen=True)
class World:
    bastion: Server
    authorization_server: Peer
    upstream: Peer
    resource: str
    link_url: str
    invitations: dict[str, str]  # email -> invitation URL
    env: dict[str, str]  # for the admin's CLI

    @property
    def gateway_url(self) -> str:
        return f"{self.bastion.base_url}/g/{GATEWAY}/mcp"


def _cli(env: dict[str, str], cwd: Path, *args: str) -> Any:
    done = run_bastion(*args, "--json", env=env, cwd=cwd)
    assert done.returncode == 0, f"bastion {' '.join(args)} exited {done.returncode}\n{done.stdout}\n{done.stderr}"
    return json.loads(done.stdout)


@pytest.fixture
def world(tmp_path: Path) -> Generator[World]:
    """The authorization server, the protected upstream and `bastion serve`, set up by an admin (CLI and API)."""
    upstream_port, resource = upstream_resource()
    bastion_port = free_port()
    env = clean_env(
        BASTION_DATA_DIR=str(tmp_path / "data"),
        BASTION_PUBLIC_URL=f"http://127.0.0.1:{bastion_port}",
        BASTION_OUTBOUND_ALLOW_LOOPBACK="true",  # every peer here listens on http://127.0.0.1
        **{f"BASTION_{k.upper()}": v for k, v in generate_secrets().items()},
    )
    with authorization_server([resource]) as auth, protected_upstream(upstream_port, auth.ready["issuer"]) as upstream:
        admin_key = _cli(env, tmp_path, "init", "--owner-email", "admin@example.com")["owner"]["api_key"]
        with serving(env, tmp_path, port=bastion_port) as bastion:
            # The rest as an admin's script would do it, through the API of the running gateway (the CLI's own
            # commands have their tests; each one here would be a cold process start on a loaded machine).
            with httpx2.Client(base_url=f"{bastion.base_url}/api/v1", timeout=30,
                               headers={"Authorization": f"Bearer {admin_key}"}) as api:  # fmt: skip

                def create(path: str, body: dict[str, Any]) -> Any:
                    created = api.post(path, json=body)
                    assert created.status_code == 201, f"POST {path}: {created.status_code} {created.text}"
                    return created.json()

                create("/servers", {"name": SERVER, "transport": "streamable_http", "url": resource,
                                    "auth_kind": "oauth"})  # fmt: skip
                create("/gateways", {"slug": GATEWAY, "servers": [{"server": SERVER}]})
                create("/hosts", {"name": HOST, "description": "The research team's agent"})
                invitations: dict[str, str] = {}
                for person in PEOPLE:
                    create("/members", {"email": person.email, "name": person.login.title()})
                    invitations[person.email] = create(f"/members/{person.email}/invitation", {})["url"]
                link = create("/links", {"host": HOST, "gateway": GATEWAY, "note": "Research notes",
                                         "max_uses": len(PEOPLE)})  # fmt: skip
            yield World(bastion, auth, upstream, resource, link["url"], invitations, env)


class Journey:
    """One person's browser, with a numbered screenshot after each step."""

    def __init__(self, page: Page, person: Person, label: str) -> None:
        self.page = page
        self.person = person
        self.label = label
        self.step = 0

    async def shot(self, name: str) -> None:
        self.step += 1
        SHOTS.mkdir(parents=True, exist_ok=True)
        await self.page.screenshot(path=SHOTS / f"{self.label}-{self.step:02d}-{name}.png", full_page=True)

    async def accept_invitation(self, world: World) -> None:
        """The admin's invitation: choose a Bastion password (which signs in), then sign out."""
        page = self.page
        await page.goto(world.invitations[self.person.email])
        await expect(page.get_by_role("heading", name=f"Welcome, {self.person.login}")).to_be_visible()
        await page.get_by_label("New password").fill(self.person.password)
        await page.get_by_label("The same password again").fill(self.person.password)
        await self.shot("invitation")
        await page.get_by_role("button", name="Save password and sign in").click()
        await expect(page.get_by_role("navigation", name="Account")).to_contain_text(self.person.email)
        await self.shot("signed-in")
        await page.get_by_role("button", name="Sign out").click()
        await expect(page.get_by_role("heading", name="Signed out")).to_be_visible()

    async def open_link_and_sign_in(self, world: World) -> None:
        """The connection link says what it is for; sign in from there, come back, and add the connection."""
        page = self.page
        await page.goto(world.link_url)
        await expect(page.get_by_role("heading", name=f"Connect {HOST} to {GATEWAY}")).to_be_visible()
        await expect(page.get_by_text("Research notes")).to_be_visible()
        await self.shot("link")
        await page.get_by_role("link", name="Sign in to continue").click()
        await page.get_by_label("Email").fill(self.person.email)
        await page.get_by_label("Password").fill(self.person.password)
        await self.shot("sign-in")
        await page.get_by_role("button", name="Sign in").click()
        await expect(page.get_by_text(f"Signed in as {self.person.email}")).to_be_visible()
        await self.shot("link-signed-in")
        await page.get_by_role("button", name="Add a connection").click()
        await expect(page.get_by_role("heading", name="Add a connection")).to_be_visible()
        await self.shot("add-connection")

    async def connect_with_oauth(self, world: World, *, allow: bool) -> None:
        """ "Connect with OAuth": the authorization server's own sign-in and consent page, as this person."""
        page = self.page
        await page.get_by_role("button", name="Connect with OAuth").click()
        await expect(page.get_by_text("Test authorization server")).to_be_visible()
        assert page.url.startswith(world.authorization_server.ready["issuer"])
        await page.get_by_label("Username").fill(self.person.login)
        await page.get_by_label("Password").fill(AS_USERS[self.person.login])
        await self.shot("upstream-sign-in")
        await page.get_by_role("button", name="Sign in").click()
        await expect(page.get_by_role("heading", name="Authorize access")).to_be_visible()
        await expect(page.locator("#account")).to_have_text(self.person.login)
        await expect(page.get_by_text(world.resource)).to_be_visible()
        await self.shot("upstream-consent")
        await page.get_by_role("button", name="Allow" if allow else "Deny").click()

    async def approve_and_copy_token(self) -> str:
        """Back at Bastion: connected; review, approve, and copy the token shown once."""
        page = self.page
        await expect(page.get_by_role("heading", name="Add a connection")).to_be_visible()
        await expect(page.get_by_role("status").filter(has_text="signed in with OAuth")).to_be_visible()
        await self.shot("connected")
        await page.get_by_role("link", name="Review and approve").click()
        await expect(page.get_by_role("heading", name="Review and approve")).to_be_visible()
        await expect(page.get_by_role("cell", name="mcp:tools")).to_be_visible()
        await self.shot("review")
        await page.get_by_role("button", name="Approve and create the token").click()
        await expect(page.get_by_role("heading", name="Your access token")).to_be_visible()
        shown = await page.get_by_label("Access token").input_value()
        await page.get_by_role("button", name="Copy", exact=True).first.click()
        await expect(page.locator('[data-copied-for="token"]')).to_have_text("Copied.")
        await self.shot("token")
        copied = await page.evaluate("navigator.clipboard.readText()")
        assert isinstance(copied, str)
        assert copied == shown
        assert copied.startswith("bst_")
        return copied


@asynccontextmanager
async def journey(browser: Browser, person: Person, label: str) -> AsyncGenerator[Journey]:
    """A fresh browser context (cookies, clipboard) for ``person``: nobody shares a browser."""
    context = await browser.new_context(permissions=["clipboard-read", "clipboard-write"])
    context.set_default_timeout(ACTION_TIMEOUT_MS)
    try:
        yield Journey(await context.new_page(), person, label)
    finally:
        await context.close()


async def _whoami(world: World, token: str, mode: str) -> dict[str, Any]:
    async with gateway_client(world.gateway_url, token, mode) as client:
        result = await client.call_tool(f"{SERVER}__whoami", {})
    seen: dict[str, Any] = json.loads(result.content[0].text)  # type: ignore[union-attr]
    return seen


async def test_each_member_connects_with_oauth_in_the_browser_and_the_upstream_sees_their_own_token(
    world: World,
) -> None:
    tokens: dict[str, str] = {}
    async with chromium() as browser:
        for person in PEOPLE:
            async with journey(browser, person, person.login) as steps:
                await steps.accept_invitation(world)
                await steps.open_link_and_sign_in(world)
                await steps.connect_with_oauth(world, allow=True)
                tokens[person.login] = await steps.approve_and_copy_token()
    assert tokens["ada"] != tokens["grace"]

    # Each member's Bastion token, through the gateway, in both protocol eras.
    issued = [e for e in world.authorization_server.events() if e["event"] == "token"]
    by_fingerprint = {e["access_token_sha256"]: e for e in issued}
    seen: dict[str, dict[str, Any]] = {}
    for person in PEOPLE:
        for mode in ("legacy", "2026-07-28"):
            who = await _whoami(world, tokens[person.login], mode)
            assert who["sub"] == person.login
            # The very access token the authorization server issued for this member and this resource,
            # to the client Bastion registered — not the Bastion token, not the other member's.
            event = by_fingerprint[who["access_token_sha256"]]
            assert (event["sub"], event["resource"], event["grant_type"]) == (
                person.login,
                world.resource,
                "authorization_code",
            )
            assert event["client_id"] == who["client_id"]
            assert who["access_token_sha256"] != fingerprint(tokens[person.login])
            seen[person.login] = who
    assert seen["ada"]["access_token_sha256"] != seen["grace"]["access_token_sha256"]
    # One registration of Bastion at this authorization server serves every member.
    assert seen["ada"]["client_id"] == seen["grace"]["client_id"]

    # The upstream's own record: four calls, each with the caller's own token; Bastion never presented
    # anything but those (its unauthenticated first request is how it discovered the authorization server).
    calls = [(e["sub"], e["access_token_sha256"]) for e in world.upstream.events() if e["event"] == "call"]
    assert sorted(calls) == sorted(
        [(p.login, seen[p.login]["access_token_sha256"]) for p in PEOPLE for _mode in range(2)]
    )
    refused = {e["reason"] for e in world.upstream.events() if e["event"] == "refused"}
    assert refused <= {"no token"}


async def test_declining_at_the_authorization_server_ends_on_a_clear_page_and_keeps_nothing(
    world: World, tmp_path: Path
) -> None:
    ada = PEOPLE[0]
    async with chromium() as browser, journey(browser, ada, "declined") as steps:
        await steps.accept_invitation(world)
        await steps.open_link_and_sign_in(world)
        await steps.connect_with_oauth(world, allow=False)
        page = steps.page
        await expect(page.get_by_role("heading", name="Connection declined")).to_be_visible()
        await expect(page.get_by_text("you declined the connection")).to_be_visible()
        await steps.shot("declined")
        await page.get_by_role("link", name="Back to your enrollment").click()
        await expect(page.get_by_role("heading", name="Add a connection")).to_be_visible()
        await expect(page.get_by_role("button", name="Connect with OAuth")).to_be_visible()
        await expect(page.get_by_role("link", name="Review and approve")).to_have_count(0)
        await page.get_by_role("button", name="Cancel and discard").click()
        await expect(page.get_by_role("heading", name="Enrollment cancelled")).to_be_visible()
        await steps.shot("cancelled")

    # No identity, no connection, and the authorization server never issued a token.
    assert _cli(world.env, tmp_path, "identity", "list") == []
    assert _cli(world.env, tmp_path, "connection", "list") == []
    assert [e for e in world.authorization_server.events() if e["event"] == "token"] == []
