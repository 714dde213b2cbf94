"""Canary secrets through the pages: passwords, link and invitation secrets, session cookies, pasted tokens and the
minted token appear in no log line, no table and no page but the one meant to show them."""

from __future__ import annotations

import logging

import pytest
import sqlalchemy as sa

from bastion.db.schema import metadata
from bastion.db.store import Store
from bastion.domain.actor import Actor
from bastion.domain.specs import MemberSpec
from bastion.services import accounts, members
from bastion.services.accounts import TicketKind
from bastion.services.apikeys import KeyHasher
from tests.web.ui.support import Browser
from tests.web.ui.world import build_world, new_link, token_on

pytestmark = pytest.mark.anyio
CANARY_PASSWORD = "canary password 5e1f0a9b7c3d"
CANARY_UPSTREAM = "canary-upstream-token-1b2c3d4e5f60"


async def _dump(store: Store) -> str:
    parts: list[str] = []
    async with store.transaction() as conn:
        for table in metadata.sorted_tables:
            for row in (await conn.execute(sa.select(table))).all():
                parts.extend(value.decode("latin-1") if isinstance(value, bytes) else str(value) for value in row)
    return "\n".join(parts)


async def test_no_secret_of_sign_in_or_enrollment_leaks(
    browser: Browser, store: Store, hasher: KeyHasher, operator: Actor, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    owner = await build_world(store, operator, "http://127.0.0.1:9/mcp")
    link_secret = await new_link(store, hasher, owner)
    member = await members.create(store, operator, MemberSpec("ada@example.com", "Ada"))
    _ticket, ticket_secret = await accounts.issue_ticket(store, hasher, operator, member.id, TicketKind.INVITE)
    pages: list[str] = []

    async def keep(response_text: str) -> None:
        pages.append(response_text)

    await keep((await browser.get(f"/welcome/{ticket_secret}")).text)
    chosen = await browser.post(
        f"/welcome/{ticket_secret}", {"password": CANARY_PASSWORD, "password_again": CANARY_PASSWORD}
    )
    assert chosen.status_code == 303
    session_cookie = browser.http.cookies["bastion"]
    await keep((await browser.post("/signout")).text)
    await keep((await browser.sign_in("ada@example.com", "wrong " + CANARY_PASSWORD)).text)
    await keep((await browser.sign_in("ada@example.com", CANARY_PASSWORD)).text)
    await keep((await browser.get(f"/enroll/{link_secret}")).text)
    draft = (await browser.post(f"/enroll/{link_secret}/start")).headers["location"]
    await keep((await browser.get(draft)).text)
    await keep((await browser.post(f"{draft}/servers/crm/token", {"token": "has space " + CANARY_UPSTREAM})).text)
    await keep((await browser.post(f"{draft}/servers/crm/token", {"token": CANARY_UPSTREAM})).text)
    await keep((await browser.get(draft)).text)
    await keep((await browser.get(f"{draft}/review")).text)
    approved = await browser.post(f"{draft}/approve")
    minted = token_on(approved.text)
    await keep((await browser.get("/me")).text)

    secrets = {
        "password": CANARY_PASSWORD,
        "upstream token": CANARY_UPSTREAM,
        "link secret": link_secret,
        "invitation secret": ticket_secret,
        "session cookie": session_cookie,
        "minted token": minted,
    }
    # Everything Bastion and its libraries logged; the test's own HTTP client (the "browser") is not Bastion.
    server_side = [r for r in caplog.records if not r.name.startswith(("httpx2", "httpcore2"))]
    logs = "\n".join(f"{r.getMessage()} {r.__dict__}" for r in server_side)
    tables = await _dump(store)
    for name, value in secrets.items():
        assert value not in logs, f"the {name} reached the logs"
        assert value not in tables, f"the {name} is stored in plain text"
    for page in pages:
        for name in ("password", "upstream token", "minted token", "session cookie"):
            assert secrets[name] not in page, f"a page shows the {name}"
    assert minted in approved.text  # shown once, on its own page
