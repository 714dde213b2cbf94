"""Invitations and reset links: issued by an admin (API or CLI) and shown once, redeemed once in the browser."""

from __future__ import annotations

import httpx2
import pytest

from bastion.db.store import Store
from bastion.domain.actor import Actor
from bastion.domain.specs import MemberSpec
from bastion.services import members
from bastion.services.apikeys import KeyHasher
from bastion.settings import Settings
from bastion.web.app import create_app
from bastion.web.ui import throttle
from bastion.web.ui.throttle import Limit
from tests.cli.conftest import Cli, cli, cli_env  # noqa: F401  fixtures of the CLI tests
from tests.conftest import member_with_key, problem_of
from tests.web.ui.support import PASSWORD, Browser

API = "/api/v1"


async def _issue(browser: Browser, headers: dict[str, str], email: str, kind: str) -> str:
    response = await browser.http.post(f"{API}/members/{email}/{kind}", headers=headers)
    assert response.status_code == 201, response.text
    body = response.json()
    assert body["email"] == email
    url: str = body["url"]
    assert url.startswith("http://bastion.test/")
    return url.removeprefix("http://bastion.test")


async def _choose(browser: Browser, path: str, password: str = PASSWORD) -> httpx2.Response:
    page = await browser.get(path)
    assert page.status_code == 200, page.text
    return await browser.post(path, {"password": password, "password_again": password})


@pytest.mark.anyio
async def test_an_invitation_sets_a_password_once_and_signs_the_member_in(
    browser: Browser, store: Store, operator: Actor, owner_headers: dict[str, str]
) -> None:
    await members.create(store, operator, MemberSpec("ada@example.com", "Ada"))
    first = await _issue(browser, owner_headers, "ada@example.com", "invitation")
    path = await _issue(browser, owner_headers, "ada@example.com", "invitation")
    assert path.startswith("/welcome/bsi_")
    assert (await browser.get(first)).status_code == 410  # replaced by the newer one
    page = await browser.get(path)
    assert "Welcome, Ada" in page.text and "ada@example.com" in page.text
    short = await browser.post(path, {"password": "too short", "password_again": "too short"})
    assert short.status_code == 422
    assert "at least 12 characters" in short.text
    differ = await browser.post(path, {"password": PASSWORD, "password_again": PASSWORD + "!"})
    assert differ.status_code == 422 and "differ" in differ.text
    done = await browser.post(path, {"password": PASSWORD, "password_again": PASSWORD})
    assert done.status_code == 303 and done.headers["location"] == "/me"
    assert "ada@example.com" in (await browser.get("/me")).text
    used = await browser.get(path)
    assert used.status_code == 410
    assert "already used" in used.text
    assert (await browser.get("/welcome/bsi_forged")).status_code == 404


@pytest.mark.anyio
async def test_a_reset_link_replaces_the_password_and_signs_out_every_other_session(
    browser: Browser, settings: Settings, store: Store, operator: Actor, owner_headers: dict[str, str]
) -> None:
    await members.create(store, operator, MemberSpec("ada@example.com", "Ada"))
    await _choose(browser, await _issue(browser, owner_headers, "ada@example.com", "invitation"))
    async with httpx2.AsyncClient(
        transport=httpx2.ASGITransport(app=create_app(settings, store)), base_url="http://bastion.test"
    ) as other:
        elsewhere = Browser(other)
        assert (await elsewhere.sign_in("ada@example.com")).status_code == 303
        path = await _issue(browser, owner_headers, "ada@example.com", "password-reset")
        assert path.startswith("/reset-password/bsr_")
        assert "Choose a new password" in (await elsewhere.get(path)).text
        new_password = "a brand new passphrase here"
        assert (await _choose(elsewhere, path, new_password)).status_code == 303
        assert (await elsewhere.get("/me")).status_code == 200  # the session the reset made
    assert (await browser.get("/me")).status_code == 303  # the older session is over
    assert (await browser.sign_in("ada@example.com", PASSWORD)).status_code == 401
    assert (await browser.sign_in("ada@example.com", new_password)).status_code == 303


@pytest.mark.anyio
async def test_only_member_managers_issue_links_and_unknown_members_are_not_found(
    browser: Browser, store: Store, hasher: KeyHasher, operator: Actor, owner_headers: dict[str, str]
) -> None:
    plain = await member_with_key(store, hasher, operator, "bob@example.com", "member")
    refused = await browser.http.post(f"{API}/members/owner@example.com/password-reset", headers=plain)
    assert refused.status_code == 403
    assert problem_of(refused)["code"] == "forbidden"
    missing = await browser.http.post(f"{API}/members/nobody@example.com/invitation", headers=owner_headers)
    assert missing.status_code == 404
    assert problem_of(missing)["code"] == "not_found"


def test_the_cli_prints_an_invitation_and_a_reset_link_once(cli: Cli) -> None:  # noqa: F811
    invited = cli.json("member", "invite", "newcomer@example.com", "--name", "New Comer")
    assert invited["email"] == "newcomer@example.com" and invited["kind"] == "invite"
    assert invited["url"].startswith("http://127.0.0.1:8080/welcome/bsi_")
    assert cli.json("member", "show", "newcomer@example.com")["name"] == "New Comer"
    shown = cli("member", "reset-link", "newcomer@example.com")
    assert "/reset-password/bsr_" in shown.stdout
    assert "shown once" in shown.stderr
    cli("member", "invite", "ghost@example.com", "--no-create", code=3)


@pytest.mark.anyio
async def test_setting_a_password_through_a_link_is_throttled(
    browser: Browser, store: Store, operator: Actor, owner_headers: dict[str, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(throttle, "TICKET_PER_EMAIL", Limit("ticket:email", 2, 600))
    await members.create(store, operator, MemberSpec("ada@example.com", "Ada"))
    path = await _issue(browser, owner_headers, "ada@example.com", "invitation")
    await browser.get(path)
    for _ in range(2):
        assert (await browser.post(path, {"password": "too short", "password_again": "too short"})).status_code == 422
    refused = await browser.post(path, {"password": PASSWORD, "password_again": PASSWORD})
    assert refused.status_code == 429
    assert "Too many attempts" in refused.text and int(refused.headers["retry-after"]) >= 1
    assert (await browser.get(path)).status_code == 200  # the link was not used up by the refusal
