"""Single sign-on against a real (small, local) OpenID Connect provider: PKCE, state, nonce, id_token checks."""

from __future__ import annotations

from collections.abc import AsyncIterator
from urllib.parse import parse_qsl, urlsplit

import httpx2
import pytest
import sqlalchemy as sa

from bastion.db import schema
from bastion.db.store import Store
from bastion.domain.actor import Actor
from bastion.domain.specs import MemberSpec
from bastion.services import members
from bastion.services.apikeys import KeyHasher
from bastion.settings import Settings
from bastion.web.app import create_app
from bastion.web.ui.throttle import SSO_START_PER_ADDRESS
from tests.mcp_support import serving
from tests.web.ui.oidc_provider import CLIENT_ID, CLIENT_SECRET, OidcProvider
from tests.web.ui.support import Browser
from tests.web.ui.world import build_world, new_link

pytestmark = pytest.mark.anyio
BASE = "http://bastion.test"


@pytest.fixture
async def provider() -> AsyncIterator[OidcProvider]:
    found = OidcProvider()
    async with serving(found.app()) as base:
        found.base = base
        yield found


def _settings(settings: Settings, provider: OidcProvider) -> Settings:
    from pydantic import SecretStr

    return settings.model_copy(
        update={
            "public_url": BASE,
            "oidc_issuer": provider.issuer,
            "oidc_client_id": CLIENT_ID,
            "oidc_client_secret": SecretStr(CLIENT_SECRET),
            "oidc_display_name": "Example SSO",
            "oidc_allowed_domains": ["staff.example.com"],
        }
    )


@pytest.fixture
async def app_settings(settings: Settings, provider: OidcProvider) -> Settings:
    return _settings(settings, provider)


async def _browser(app_settings: Settings, store: Store) -> httpx2.AsyncClient:
    return httpx2.AsyncClient(transport=httpx2.ASGITransport(app=create_app(app_settings, store)), base_url=BASE)


@pytest.fixture
async def browser(app_settings: Settings, store: Store) -> AsyncIterator[Browser]:
    async with await _browser(app_settings, store) as client:
        yield Browser(client)


async def _to_provider(browser: Browser, next_path: str = "/me") -> tuple[str, dict[str, str]]:
    """Start SSO in ``browser``; the provider's answer (the callback path and its query), by real HTTP."""
    page = await browser.get("/signin", params={"next": next_path})
    assert "Sign in with Example SSO" in page.text
    started = await browser.get("/signin/sso", params={"next": next_path})
    assert started.status_code == 303, started.text
    async with httpx2.AsyncClient() as outside:
        answered = await outside.get(started.headers["location"])
    assert answered.status_code == 302
    back = urlsplit(answered.headers["location"])
    assert f"{back.scheme}://{back.netloc}" == BASE
    return back.path, dict(parse_qsl(back.query))


async def _sso(browser: Browser, next_path: str = "/me") -> httpx2.Response:
    path, query = await _to_provider(browser, next_path)
    return await browser.get(path, params=query)


async def test_an_existing_member_signs_in_with_sso_using_pkce_state_and_nonce(
    browser: Browser, provider: OidcProvider, store: Store, operator: Actor
) -> None:
    await members.create(store, operator, MemberSpec("ada@example.com", "Ada"))
    done = await _sso(browser, next_path="/me?tab=1")
    assert done.status_code == 303, done.text
    assert done.headers["location"] == "/me?tab=1"
    assert "ada@example.com" in (await browser.get("/me")).text
    (asked,) = provider.authorize_requests
    assert asked["code_challenge_method"] == "S256" and len(asked["code_challenge"]) == 43
    assert asked["state"] and asked["nonce"] and asked["scope"] == "openid email profile"
    assert asked["redirect_uri"] == f"{BASE}/signin/oidc/callback"
    assert provider.pkce_ok == [True]
    async with store.transaction() as conn:
        state = (await conn.execute(sa.select(schema.oauth_states))).one()
    assert state.purpose == "sign_in" and state.used_at is not None
    assert asked["state"].encode() not in state.digest  # stored as a digest only
    assert state.code_verifier is None  # spent with the state: no verifier outlives its use


async def test_sso_makes_members_for_allowed_domains_and_invited_emails_only(
    app_settings: Settings, provider: OidcProvider, store: Store, hasher: KeyHasher, operator: Actor
) -> None:
    owner = await build_world(store, operator, "http://127.0.0.1:9/mcp")
    await new_link(store, hasher, owner, allowed=["invited@elsewhere.example"])
    for email, allowed in (
        ("newcomer@staff.example.com", True),
        ("invited@elsewhere.example", True),
        ("stranger@elsewhere.example", False),
    ):
        provider.user = {"sub": email, "email": email, "email_verified": True, "name": "Some One"}
        async with await _browser(app_settings, store) as client:
            done = await _sso(Browser(client))
        if allowed:
            assert done.status_code == 303, done.text
            async with store.transaction() as conn:
                assert (await members.find(conn, operator.workspace_id, email)).name == "Some One"
        else:
            assert done.status_code == 403
            assert "not a member of this Bastion" in done.text
            assert "bastion=" not in done.headers.get("set-cookie", "")


async def test_an_unverified_email_is_not_trusted(
    browser: Browser, provider: OidcProvider, store: Store, operator: Actor
) -> None:
    await members.create(store, operator, MemberSpec("ada@example.com", "Ada"))
    provider.user = {**provider.user, "email_verified": False}
    done = await _sso(browser)
    assert done.status_code == 403
    assert "did not vouch for your email" in done.text


@pytest.mark.parametrize(
    "tamper",
    ["nonce", "audience", "issuer", "expired", "unknown_key", "other_key_same_kid", "hmac", "none", "iss_parameter"],
)
async def test_an_untrustworthy_answer_signs_nobody_in(
    tamper: str, browser: Browser, provider: OidcProvider, store: Store, operator: Actor
) -> None:
    await members.create(store, operator, MemberSpec("ada@example.com", "Ada"))
    provider.tamper = tamper
    done = await _sso(browser)
    assert done.status_code == 502, (tamper, done.text)
    assert "Single sign-on failed" in done.text
    assert (await browser.get("/me")).status_code == 303
    if tamper == "iss_parameter":
        assert provider.token_requests == []  # a mixed-up answer's code is never sent anywhere


async def test_a_provider_claiming_another_issuer_is_refused(browser: Browser, provider: OidcProvider) -> None:
    provider.tamper = "discovery_issuer"
    refused = await browser.get("/signin/sso")
    assert refused.status_code == 502
    assert "names another issuer" in refused.text


async def test_the_state_works_once_and_only_in_the_browser_that_began(
    app_settings: Settings, browser: Browser, provider: OidcProvider, store: Store, operator: Actor
) -> None:
    await members.create(store, operator, MemberSpec("ada@example.com", "Ada"))
    path, query = await _to_provider(browser)
    async with await _browser(app_settings, store) as client:
        elsewhere = await Browser(client).get(path, params=query)
    assert elsewhere.status_code == 400
    assert "another browser" in elsewhere.text
    assert provider.token_requests == []
    # Refused elsewhere, the state was not spent: the right browser can still finish, once.
    assert (await browser.get(path, params=query)).status_code == 303
    replay = await browser.get(path, params=query)
    assert replay.status_code == 400
    assert (await browser.get(path, params={**query, "state": "forged"})).status_code == 400


async def test_declining_at_the_provider_ends_on_a_clear_page(browser: Browser, provider: OidcProvider) -> None:
    provider.deny = True
    done = await _sso(browser)
    assert done.status_code == 403
    assert "You did not allow Example SSO to sign you in" in done.text


async def test_a_member_is_bound_to_the_sso_account_of_their_first_sign_in(
    app_settings: Settings, browser: Browser, provider: OidcProvider, store: Store, operator: Actor
) -> None:
    ada = await members.create(store, operator, MemberSpec("ada@example.com", "Ada"))
    bob = await members.create(store, operator, MemberSpec("bob@example.com", "Bob"))
    assert (await _sso(browser)).status_code == 303
    async with store.transaction() as conn:
        bound = (await conn.execute(sa.select(schema.member_sso_identities))).one()
    assert (bound.member_id, bound.issuer, bound.subject) == (ada.id, provider.issuer, "u-1")

    # Another account at the provider that says it is ada@example.com (a reused or re-assigned address).
    provider.user = {"sub": "u-2", "email": "ada@example.com", "email_verified": True, "name": "Not Ada"}
    async with await _browser(app_settings, store) as client:
        other = await _sso(Browser(client))
        assert other.status_code == 403
        assert "different Example SSO account" in other.text
        assert "bastion=" not in other.headers.get("set-cookie", "")
        assert (await Browser(client).get("/me")).status_code == 303

    # Ada's own provider account, now claiming Bob's email: it signs in as nobody.
    provider.user = {"sub": "u-1", "email": "bob@example.com", "email_verified": True, "name": "Ada L"}
    async with await _browser(app_settings, store) as client:
        moved = await _sso(Browser(client))
        assert moved.status_code == 403
        assert "signs in to another Bastion account" in moved.text

    # Bob's first sign-in binds his own account; Ada's still works.
    provider.user = {"sub": "u-3", "email": "bob@example.com", "email_verified": True, "name": "Bob"}
    async with await _browser(app_settings, store) as client:
        assert (await _sso(Browser(client))).status_code == 303
    provider.user = {"sub": "u-1", "email": "ada@example.com", "email_verified": True, "name": "Ada L"}
    async with await _browser(app_settings, store) as client:
        assert (await _sso(Browser(client))).status_code == 303
    async with store.transaction() as conn:
        rows = (await conn.execute(sa.select(schema.member_sso_identities))).all()
    assert sorted((r.member_id, r.subject) for r in rows) == sorted([(ada.id, "u-1"), (bob.id, "u-3")])


async def test_starting_sso_is_throttled_per_address(browser: Browser, provider: OidcProvider, store: Store) -> None:
    await browser.get("/signin")
    allowed = SSO_START_PER_ADDRESS.amount
    for _ in range(allowed):
        assert (await browser.get("/signin/sso")).status_code == 303
    refused = await browser.get("/signin/sso")
    assert refused.status_code == 429
    assert "Too many attempts" in refused.text
    assert 1 <= int(refused.headers["retry-after"]) <= SSO_START_PER_ADDRESS.window_s
    async with store.transaction() as conn:
        states = (await conn.execute(sa.select(sa.func.count()).select_from(schema.oauth_states))).scalar_one()
    assert states == allowed  # the refused start stored nothing
