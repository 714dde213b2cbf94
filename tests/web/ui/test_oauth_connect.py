"""Connecting with OAuth from the pages: the callback fills the draft, a refusal ends on a clear page, reconnecting."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any
from urllib.parse import parse_qs, urlsplit

import httpx2
import pytest
import sqlalchemy as sa

from bastion.db import schema
from bastion.db.seals import binding_for
from bastion.db.store import Store
from bastion.domain.actor import Actor
from bastion.domain.identities import IdentityKind, IdentityStatus
from bastion.domain.models import AuthKind
from bastion.services import identities, step_up
from bastion.services.apikeys import KeyHasher
from bastion.settings import Settings
from bastion.web.app import create_app
from tests.oauth.fake_upstream import FakeUpstream
from tests.oauth.flow_support import authorize, running
from tests.web.ui.support import Browser, member_with_password
from tests.web.ui.world import build_world, new_link, token_on

pytestmark = pytest.mark.anyio
BASE = "http://bastion.test"


@pytest.fixture
async def fake() -> AsyncIterator[FakeUpstream]:
    async with running(FakeUpstream()) as upstream:
        yield upstream


@pytest.fixture
async def browser(settings: Settings, store: Store) -> AsyncIterator[Browser]:
    app = create_app(settings.model_copy(update={"public_url": BASE}), store)
    async with httpx2.AsyncClient(transport=httpx2.ASGITransport(app=app), base_url=BASE) as client:
        yield Browser(client)


async def _draft(browser: Browser, store: Store, hasher: KeyHasher, operator: Actor, fake: FakeUpstream) -> str:
    owner = await build_world(store, operator, f"{fake.base}/mcp", AuthKind.OAUTH)
    secret = await new_link(store, hasher, owner)
    await member_with_password(store, hasher, operator, "ada@example.com")
    await browser.sign_in("ada@example.com", next_path=f"/enroll/{secret}")
    await browser.get(f"/enroll/{secret}")
    started = await browser.post(f"/enroll/{secret}/start")
    draft = str(started.headers["location"])
    page = await browser.get(draft)
    assert "Connect with OAuth" in page.text
    return draft


async def _through_the_authorization_server(browser: Browser, started: httpx2.Response) -> httpx2.Response:
    """Follow Bastion's redirect to the authorization server, and its answer back to Bastion's callback."""
    assert started.status_code == 303, started.text
    answer = await authorize(started.headers["location"])
    return await browser.get("/oauth/callback", params=answer)


async def _secret_of(store: Store, vault: Any, identity_id: str) -> Any:
    async with store.transaction() as conn:
        row = (await conn.execute(sa.select(schema.identities).where(schema.identities.c.id == identity_id))).one()
        binding = await binding_for(conn, row)
    return vault.open(row.workspace_id, row.id, row.dek_wrapped, row.secret_sealed, binding)


async def test_connecting_with_oauth_fills_the_draft_and_approval_makes_an_oauth_identity(
    browser: Browser, store: Store, hasher: KeyHasher, operator: Actor, vault: Any, fake: FakeUpstream
) -> None:
    draft = await _draft(browser, store, hasher, operator, fake)
    back = await _through_the_authorization_server(browser, await browser.post(f"{draft}/servers/crm/oauth"))
    assert back.status_code == 303, back.text
    assert back.headers["location"] == f"{draft}?changed=crm#server-crm"
    page = await browser.follow(back)
    assert "signed in with OAuth" in page.text
    assert fake.pkce_ok == [True]
    review = await browser.get(f"{draft}/review")
    assert "OAuth" in review.text and "crm (OAuth)" in review.text
    approved = await browser.post(f"{draft}/approve")
    assert approved.status_code == 200, approved.text
    assert token_on(approved.text).startswith("bst_")
    async with store.transaction() as conn:
        (identity_id,) = (await conn.execute(sa.select(schema.identities.c.id))).scalars().all()
        found = await identities.find(conn, operator.workspace_id, identity_id)
    assert found.kind is IdentityKind.OAUTH and found.status is IdentityStatus.ACTIVE
    assert found.details["issuer"] == fake.issuer() and found.details["resource"] == f"{fake.base}/mcp"
    opened = await _secret_of(store, vault, identity_id)
    assert opened.access_token in fake.issued and opened.refresh_token


async def test_declining_at_the_authorization_server_ends_on_a_page_that_leads_back(
    browser: Browser, store: Store, hasher: KeyHasher, operator: Actor, fake: FakeUpstream
) -> None:
    draft = await _draft(browser, store, hasher, operator, fake)
    fake.authorize_error = "access_denied"
    refused = await _through_the_authorization_server(browser, await browser.post(f"{draft}/servers/crm/oauth"))
    assert refused.status_code == 400
    assert "Connection declined" in refused.text
    assert f'href="{draft}"' in refused.text
    assert fake.paths("/as1/token") == []  # no code was ever exchanged
    page = await browser.get(draft)
    assert page.status_code == 200 and "Connect with OAuth" in page.text  # nothing half-connected
    # The same answer twice: the state was used up by the first.
    again = await browser.get("/oauth/callback", params={"state": "made-up", "code": "x"})
    assert again.status_code == 400


async def test_an_identity_that_needs_it_is_reconnected_from_my_connections(
    browser: Browser, store: Store, hasher: KeyHasher, operator: Actor, vault: Any, fake: FakeUpstream
) -> None:
    draft = await _draft(browser, store, hasher, operator, fake)
    await _through_the_authorization_server(browser, await browser.post(f"{draft}/servers/crm/oauth"))
    await browser.get(draft)
    assert (await browser.post(f"{draft}/approve")).status_code == 200
    async with store.transaction() as conn:
        (identity_id,) = (await conn.execute(sa.select(schema.identities.c.id))).scalars().all()
    before = await _secret_of(store, vault, identity_id)
    await identities.update(store, vault, hasher, operator, identity_id, status=IdentityStatus.NEEDS_REAUTH)

    mine = await browser.get("/me")
    assert "needs to be connected again" in mine.text
    path = f"/me/identities/{identity_id}/reconnect"
    assert f'href="{path}"' in mine.text
    assert "no longer accepts this sign-in" in (await browser.get(path)).text
    done = await _through_the_authorization_server(browser, await browser.post(path))
    assert done.status_code == 200, done.text
    assert "Reconnected" in done.text
    async with store.transaction() as conn:
        now = await identities.find(conn, operator.workspace_id, identity_id)
    assert now.status is IdentityStatus.ACTIVE
    after = await _secret_of(store, vault, identity_id)
    assert after.access_token != before.access_token and after.access_token in fake.issued
    # The grant it replaced was revoked (RFC 7009): its refresh token, then its access token.
    assert fake.requested.count("/as1/revoke") == 2


async def test_someone_elses_identity_cannot_be_reconnected(
    browser: Browser, store: Store, hasher: KeyHasher, operator: Actor, vault: Any, fake: FakeUpstream
) -> None:
    from bastion.domain.identities import bearer_secret

    await build_world(store, operator, f"{fake.base}/mcp", AuthKind.OAUTH)
    await member_with_password(store, hasher, operator, "ada@example.com")
    await member_with_password(store, hasher, operator, "bob@example.com")
    bobs = await identities.create(
        store,
        vault,
        hasher,
        operator,
        server="crm",
        owner="bob@example.com",
        secret=bearer_secret("bob-secret-1"),
        kind=IdentityKind.OAUTH,
    )
    await browser.sign_in("ada@example.com")
    assert (await browser.get(f"/me/identities/{bobs.id}/reconnect")).status_code == 404
    await browser.get("/me")
    assert (await browser.post(f"/me/identities/{bobs.id}/reconnect")).status_code == 404


async def test_reconnecting_after_a_403_for_want_of_scope_asks_for_the_step_up_scope(
    browser: Browser, store: Store, hasher: KeyHasher, operator: Actor, fake: FakeUpstream
) -> None:
    fake.challenge_scope = "mcp:read"
    draft = await _draft(browser, store, hasher, operator, fake)
    first = await browser.post(f"{draft}/servers/crm/oauth")
    assert parse_qs(urlsplit(first.headers["location"]).query)["scope"] == ["mcp:read"]
    await _through_the_authorization_server(browser, first)
    await browser.get(draft)
    assert (await browser.post(f"{draft}/approve")).status_code == 200
    async with store.transaction() as conn:
        (identity_id,) = (await conn.execute(sa.select(schema.identities.c.id))).scalars().all()
    with pytest.raises(step_up.IdentityNeedsScope):
        challenge = ['Bearer error="insufficient_scope", scope="mcp:write"']
        await step_up.needs_scope(store, operator.workspace_id, identity_id, challenge, reconnect="r")

    assert "needs more access" in (await browser.get("/me")).text
    path = f"/me/identities/{identity_id}/reconnect"
    assert "<code>mcp:read mcp:write</code>" in (await browser.get(path)).text
    started = await browser.post(path)
    assert parse_qs(urlsplit(started.headers["location"]).query)["scope"] == ["mcp:read mcp:write"]
    done = await _through_the_authorization_server(browser, started)
    assert "Reconnected" in done.text
    async with store.transaction() as conn:
        now = await identities.find(conn, operator.workspace_id, identity_id)
    assert now.details["scope"] == "mcp:read mcp:write" and step_up.STEP_UP_KEY not in now.details
    assert "needs more access" not in (await browser.get("/me")).text


async def test_cancelling_a_draft_revokes_the_oauth_grant_it_held(
    browser: Browser, store: Store, hasher: KeyHasher, operator: Actor, fake: FakeUpstream
) -> None:
    draft = await _draft(browser, store, hasher, operator, fake)
    await _through_the_authorization_server(browser, await browser.post(f"{draft}/servers/crm/oauth"))
    await browser.get(draft)
    assert "/as1/revoke" not in fake.requested
    cancelled = await browser.post(f"{draft}/cancel")
    assert cancelled.status_code == 200 and "Nothing was saved" in cancelled.text
    assert fake.requested.count("/as1/revoke") == 2


async def test_without_a_public_url_oauth_redirects_to_the_address_bastion_listens_on(
    settings: Settings, store: Store, hasher: KeyHasher, operator: Actor, fake: FakeUpstream
) -> None:
    local = settings.model_copy(update={"public_url": None, "host": "0.0.0.0", "port": 8123})  # noqa: S104
    assert local.base_url == "http://127.0.0.1:8123"
    app = create_app(local, store)
    async with httpx2.AsyncClient(transport=httpx2.ASGITransport(app=app), base_url=local.base_url) as client:
        browser = Browser(client)
        draft = await _draft(browser, store, hasher, operator, fake)
        started = await browser.post(f"{draft}/servers/crm/oauth")
        assert started.status_code == 303, started.text
        asked = parse_qs(urlsplit(started.headers["location"]).query)
        assert asked["redirect_uri"] == ["http://127.0.0.1:8123/oauth/callback"]
        back = await _through_the_authorization_server(browser, started)
        assert back.status_code == 303, back.text
        assert "signed in with OAuth" in (await browser.follow(back)).text
