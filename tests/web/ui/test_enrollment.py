"""Enrollment in the browser: a link's landing page, sign-in, pasting a token, review, approval, the token once."""

from __future__ import annotations

import json
import os
import sys
from datetime import UTC, datetime, timedelta

import anyio
import httpx2
import pytest
import sqlalchemy as sa
import time_machine

from bastion.db import schema
from bastion.db.store import Store
from bastion.domain.actor import Actor
from bastion.domain.identities import bearer_secret
from bastion.services import identities, links
from bastion.services.apikeys import KeyHasher
from bastion.settings import Settings
from bastion.web.app import create_app
from tests.mcp_support import Recorder, gateway_client, recording_upstream, serving
from tests.web.ui.support import Browser, member_with_password
from tests.web.ui.world import DRAFT_PATH, build_world, new_link, snippet, token_on

pytestmark = pytest.mark.anyio


async def _count(store: Store, table: sa.Table) -> int:
    async with store.transaction() as conn:
        return int((await conn.execute(sa.select(sa.func.count()).select_from(table))).scalar_one())


async def _open_drafts(store: Store) -> int:
    """Drafts not approved (an approved one stays, emptied, until it expires: a second submit is told about it)."""
    drafts = schema.enrollment_drafts
    async with store.transaction() as conn:
        found = await conn.execute(sa.select(sa.func.count()).select_from(drafts).where(drafts.c.approved_at.is_(None)))
        return int(found.scalar_one())


async def _start(browser: Browser, secret: str, email: str) -> str:
    """Sign in from the link's page and start the enrollment; the draft's path."""
    landing = await browser.get(f"/enroll/{secret}")
    assert landing.status_code == 200
    signed_in = await browser.sign_in(email, next_path=f"/enroll/{secret}")
    assert signed_in.headers["location"] == f"/enroll/{secret}"
    page = await browser.follow(signed_in)
    assert "Add a connection" in page.text
    started = await browser.post(f"/enroll/{secret}/start")
    assert started.status_code == 303
    assert DRAFT_PATH.match(started.headers["location"])
    return str(started.headers["location"])


async def _paste(browser: Browser, draft: str, alias: str, token: str) -> None:
    saved = await browser.post(f"{draft}/servers/{alias}/token", {"token": token})
    assert saved.status_code == 303, saved.text
    assert "Connected:" in (await browser.follow(saved)).text


async def test_a_person_enrolls_by_pasting_a_token_and_the_token_calls_the_upstream_as_them(
    settings: Settings, store: Store, hasher: KeyHasher, operator: Actor
) -> None:
    recorder = Recorder()
    async with serving(recording_upstream(recorder)) as upstream:
        owner = await build_world(store, operator, f"{upstream}/mcp")
        secret = await new_link(store, hasher, owner, max_uses=1)
        await member_with_password(store, hasher, operator, "ada@example.com")
        async with serving(create_app(settings, store)) as bastion, httpx2.AsyncClient(base_url=bastion) as http:
            browser = Browser(http)
            landing = await browser.get(f"/enroll/{secret}")
            for fact in (
                "agent",
                "Sales tools",
                "Grace Hopper &lt;grace@example.com&gt;",
                "for the pilot",
                "Sign in to continue",
            ):
                assert fact in landing.text
            draft = await _start(browser, secret, "ada@example.com")
            page = await browser.get(draft)
            assert "Paste a token" in page.text and "crm" in page.text
            assert "Review and approve" not in page.text
            await _paste(browser, draft, "crm", "Bearer ada-own-upstream-credential")
            review = await browser.get(f"{draft}/review")
            review_facts = (
                "ada@example.com",
                "agent",
                "sales",
                "crm",
                "pasted token",
                "(ending tial)",
                f"{bastion}/g/sales/mcp",
            )
            for fact in review_facts:
                assert fact in review.text
            approved = await browser.post(f"{draft}/approve")
            assert approved.status_code == 200, approved.text
            assert approved.headers["cache-control"] == "no-store"
            token = token_on(approved.text)
            mcp_url = f"{bastion}/g/sales/mcp"
            assert f"curl -sS '{mcp_url}'" in snippet(approved.text, "curl")
            entry = json.loads(snippet(approved.text, "json"))
            assert entry["mcpServers"]["sales"]["url"] == mcp_url
            assert entry["mcpServers"]["sales"]["headers"]["Authorization"] == "Bearer ${BASTION_TOKEN}"
            assert token not in snippet(approved.text, "python") and token not in snippet(approved.text, "json")
            # It says what to install first; the pins are the project's own.
            assert snippet(approved.text, "python").splitlines()[0] == '# pip install httpx2 "mcp>=2.3"'

            async with gateway_client(mcp_url, token, "2026-07-28") as client:
                result = await client.call_tool("crm__whoami", {})
                assert result.content[0].text == "Bearer ada-own-upstream-credential"  # type: ignore[union-attr]
            # The Python snippet, as pasted by a person, lists the tools with the token from the environment.
            with anyio.fail_after(60):  # the server runs on this event loop: wait for the process without blocking it
                ran = await anyio.run_process(
                    [sys.executable, "-c", snippet(approved.text, "python")],
                    env={**os.environ, "BASTION_TOKEN": token},
                    check=False,
                )
            assert ran.returncode == 0, ran.stderr.decode()
            assert ran.stdout.decode().strip() == "['crm__whoami', 'crm__echo']"

            again = await browser.get(f"/enroll/{secret}")
            assert again.status_code == 410
            assert "used as many times as it allows" in again.text
            twice = await browser.post(f"{draft}/approve")
            assert twice.status_code == 409
            assert "already approved" in twice.text and 'href="/me"' in twice.text
            assert token not in twice.text
            me = await browser.get("/me")
            assert "agent" in me.text and "crm (token)" in me.text
    assert await _open_drafts(store) == 0
    assert await _count(store, schema.draft_identities) == 0
    assert recorder.authorizations.count("Bearer ada-own-upstream-credential") >= 1


async def test_cancelling_discards_the_draft_and_keeps_nothing(
    browser: Browser, store: Store, hasher: KeyHasher, operator: Actor
) -> None:
    owner = await build_world(store, operator, "http://127.0.0.1:9/mcp")
    secret = await new_link(store, hasher, owner, max_uses=1)
    await member_with_password(store, hasher, operator, "ada@example.com")
    draft = await _start(browser, secret, "ada@example.com")
    await _paste(browser, draft, "crm", "a-token-nobody-will-keep")
    assert await _count(store, schema.draft_identities) == 1
    cancelled = await browser.post(f"{draft}/cancel")
    assert cancelled.status_code == 200
    assert "Nothing was saved" in cancelled.text
    assert await _count(store, schema.enrollment_drafts) == 0
    assert await _count(store, schema.draft_identities) == 0
    assert await _count(store, schema.identities) == 0
    assert await _count(store, schema.connections) == 0
    async with store.transaction() as conn:
        assert (await links.find_by_secret(conn, hasher, secret)).uses == 0
    assert (await browser.get(draft)).status_code == 404
    assert (await browser.get(f"/enroll/{secret}")).status_code == 200  # the link is still unused


async def test_links_that_no_longer_work_end_on_a_clear_page(
    browser: Browser, store: Store, hasher: KeyHasher, operator: Actor
) -> None:
    owner = await build_world(store, operator, "http://127.0.0.1:9/mcp")
    await member_with_password(store, hasher, operator, "bob@example.com")
    expiring = await new_link(store, hasher, owner, expires_in=timedelta(minutes=5))
    revoked = await new_link(store, hasher, owner)
    invited_only = await new_link(store, hasher, owner, allowed=["ada@example.com"])
    async with store.transaction() as conn:
        revoked_id = (await links.find_by_secret(conn, hasher, revoked)).id
    await links.revoke(store, owner, revoked_id)

    assert (await browser.get("/enroll/bsl_not_a_link")).status_code == 404
    gone = await browser.get(f"/enroll/{revoked}")
    assert gone.status_code == 410 and "revoked" in gone.text
    with time_machine.travel(datetime.now(UTC) + timedelta(minutes=6), tick=True):
        expired = await browser.get(f"/enroll/{expiring}")
        assert expired.status_code == 410 and "expired" in expired.text
    assert (await browser.sign_in("bob@example.com")).status_code == 303
    uninvited = await browser.get(f"/enroll/{invited_only}")
    assert uninvited.status_code == 403
    assert "bob@example.com is not one of them" in uninvited.text
    assert (await browser.post(f"/enroll/{invited_only}/start")).status_code == 403
    assert await _count(store, schema.enrollment_drafts) == 0


async def test_a_draft_is_only_its_owners_and_expires(
    settings: Settings, store: Store, hasher: KeyHasher, operator: Actor, browser: Browser
) -> None:
    owner = await build_world(store, operator, "http://127.0.0.1:9/mcp")
    secret = await new_link(store, hasher, owner)
    await member_with_password(store, hasher, operator, "ada@example.com")
    await member_with_password(store, hasher, operator, "bob@example.com")
    draft = await _start(browser, secret, "ada@example.com")
    async with httpx2.AsyncClient(
        transport=httpx2.ASGITransport(app=create_app(settings, store)), base_url="http://bastion.test"
    ) as other:
        bob = Browser(other)
        assert (await bob.sign_in("bob@example.com")).status_code == 303
        assert (await bob.get(draft)).status_code == 404
        await bob.get("/me")
        assert (await bob.post(f"{draft}/servers/crm/token", {"token": "bobs-token-in-adas-draft"})).status_code == 404
    with time_machine.travel(datetime.now(UTC) + timedelta(minutes=61), tick=True):
        expired = await browser.get(draft)
        assert expired.status_code == 410
    assert await _count(store, schema.enrollment_drafts) == 0


async def test_an_identity_already_held_can_be_used_and_a_bad_token_is_refused_on_its_card(
    browser: Browser, store: Store, hasher: KeyHasher, operator: Actor, vault: object
) -> None:
    owner = await build_world(store, operator, "http://127.0.0.1:9/mcp")
    secret = await new_link(store, hasher, owner)
    await member_with_password(store, hasher, operator, "ada@example.com")
    held = await identities.create(
        store,
        vault,
        hasher,
        operator,
        server="crm",
        owner="ada@example.com",
        secret=bearer_secret("ada-held-credential"),
        label="Ada's CRM key",  # type: ignore[arg-type]
    )
    draft = await _start(browser, secret, "ada@example.com")
    page = await browser.get(draft)
    assert "Use an identity you already have" in page.text and "Ada&#39;s CRM key" in page.text
    refused = await browser.post(f"{draft}/servers/crm/token", {"token": "has spaces in it"})
    assert refused.status_code == 422
    assert 'role="alert"' in refused.text and "printable characters without spaces" in refused.text
    chosen = await browser.post(f"{draft}/servers/crm/existing", {"identity": held.id})
    assert chosen.status_code == 303
    approved = await browser.post(f"{draft}/approve")
    assert approved.status_code == 200
    async with store.transaction() as conn:
        mapped = (await conn.execute(sa.select(schema.connection_identities.c.identity_id))).scalars().all()
    assert mapped == [held.id]
    assert await _count(store, schema.identities) == 1


async def test_a_link_used_up_while_someone_enrolls_discards_their_draft(
    settings: Settings, store: Store, hasher: KeyHasher, operator: Actor, browser: Browser
) -> None:
    owner = await build_world(store, operator, "http://127.0.0.1:9/mcp")
    secret = await new_link(store, hasher, owner, max_uses=1)
    await member_with_password(store, hasher, operator, "ada@example.com")
    await member_with_password(store, hasher, operator, "bob@example.com")
    ada_draft = await _start(browser, secret, "ada@example.com")
    await _paste(browser, ada_draft, "crm", "ada-token-0001")
    async with httpx2.AsyncClient(
        transport=httpx2.ASGITransport(app=create_app(settings, store)), base_url="http://bastion.test"
    ) as other:
        bob = Browser(other)
        bob_draft = await _start(bob, secret, "bob@example.com")
        await _paste(bob, bob_draft, "crm", "bob-token-0001")
        assert (await bob.post(f"{bob_draft}/approve")).status_code == 200
    late = await browser.post(f"{ada_draft}/approve")
    assert late.status_code == 410
    assert "used as many times as it allows" in late.text
    assert await _open_drafts(store) == 0
    assert await _count(store, schema.draft_identities) == 0
    assert await _count(store, schema.identities) == 1  # Bob's only


async def test_approving_twice_makes_one_connection_and_a_used_link_ends_on_a_clear_page(
    settings: Settings, store: Store, hasher: KeyHasher, operator: Actor, browser: Browser
) -> None:
    owner = await build_world(store, operator, "http://127.0.0.1:9/mcp")
    secret = await new_link(store, hasher, owner, max_uses=1)  # a link for one person
    await member_with_password(store, hasher, operator, "ada@example.com")
    await member_with_password(store, hasher, operator, "bob@example.com")
    draft = await _start(browser, secret, "ada@example.com")
    await _paste(browser, draft, "crm", "ada-token-0001")
    await browser.get(f"{draft}/review")
    first = await browser.post(f"{draft}/approve")
    assert first.status_code == 200, first.text
    second = await browser.post(f"{draft}/approve")  # the button pressed again, or the form sent from another tab
    assert second.status_code == 409
    assert "Already approved" in second.text and "already approved" in second.text
    for table in (schema.connections, schema.access_tokens, schema.identities):
        assert await _count(store, table) == 1, table.name
    # The link was for one person: the next one to open it is told so, on the landing page and on starting.
    async with httpx2.AsyncClient(
        transport=httpx2.ASGITransport(app=create_app(settings, store)), base_url="http://bastion.test"
    ) as other:
        bob = Browser(other)
        landing = await bob.get(f"/enroll/{secret}")
        assert landing.status_code == 410 and "used as many times as it allows" in landing.text
        signed_in = await bob.sign_in("bob@example.com", next_path=f"/enroll/{secret}")
        assert (await bob.follow(signed_in)).status_code == 410
        started = await bob.post(f"/enroll/{secret}/start")
        assert started.status_code == 410 and "used as many times as it allows" in started.text
    assert await _open_drafts(store) == 0
