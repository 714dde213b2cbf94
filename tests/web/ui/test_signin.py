"""Signing in and out of the pages with a local password: sessions, wrong passwords, pauses, CSRF, headers."""

from __future__ import annotations

from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta

import httpx2
import pytest
import time_machine

from bastion.db.store import Store
from bastion.domain.actor import Actor
from bastion.services.accounts import MAX_FAILED_ATTEMPTS, WRONG_CREDENTIALS, Passwords, PasswordsBusy
from bastion.services.apikeys import KeyHasher
from bastion.settings import Settings
from bastion.web.app import create_app
from bastion.web.ui import throttle
from bastion.web.ui.throttle import Limit
from tests.web.ui.support import PASSWORD, Browser, member_with_password

pytestmark = pytest.mark.anyio


@pytest.fixture
async def ada(store: Store, hasher: KeyHasher, operator: Actor) -> str:
    await member_with_password(store, hasher, operator, "ada@example.com")
    return "ada@example.com"


async def test_the_right_password_signs_in_and_signing_out_ends_the_session(browser: Browser, ada: str) -> None:
    signed_in = await browser.sign_in(ada, next_path="/me")
    assert signed_in.status_code == 303
    assert signed_in.headers["location"] == "/me"
    cookie = signed_in.headers["set-cookie"]
    assert cookie.startswith("bastion=bsw_")
    assert "httponly" in cookie.lower() and "samesite=lax" in cookie.lower() and "path=/" in cookie.lower()
    me = await browser.get("/me")
    assert me.status_code == 200
    assert ada in me.text
    stolen = browser.http.cookies["bastion"]

    out = await browser.post("/signout")
    assert out.status_code == 200
    assert "You are signed out" in out.text
    # The page that says so no longer shows the person, nor a form to sign out again.
    assert ada not in out.text and 'action="/signout"' not in out.text and 'href="/signin"' in out.text
    after = await browser.get("/me")
    assert after.status_code == 303
    assert after.headers["location"] == "/signin?next=/me"
    # The old cookie value is dead on the server, not just forgotten by this browser.
    browser.http.cookies.set("bastion", stolen)
    replay = await browser.get("/me")
    assert replay.status_code == 303


async def test_a_wrong_password_and_an_unknown_email_get_the_same_answer(browser: Browser, ada: str) -> None:
    wrong = await browser.sign_in(ada, "not the password at all")
    unknown = await browser.sign_in("nobody@example.com", PASSWORD)
    for response in (wrong, unknown):
        assert response.status_code == 401
        assert WRONG_CREDENTIALS in response.text
        assert "set-cookie" not in response.headers or "bastion=" not in response.headers["set-cookie"]
    assert (await browser.get("/me")).status_code == 303


async def test_many_wrong_passwords_pause_sign_in_even_with_the_right_one(browser: Browser, ada: str) -> None:
    for _ in range(MAX_FAILED_ATTEMPTS):
        assert (await browser.sign_in(ada, "a wrong guess, again")).status_code == 401
    paused = await browser.sign_in(ada, PASSWORD)
    assert paused.status_code == 401
    assert WRONG_CREDENTIALS in paused.text
    with time_machine.travel(datetime.now(UTC) + timedelta(minutes=16), tick=True):
        assert (await browser.sign_in(ada, PASSWORD)).status_code == 303


async def test_posts_without_this_browsers_csrf_token_are_refused(browser: Browser, ada: str) -> None:
    await browser.get("/signin")
    missing = await browser.post("/signin", {"email": ada, "password": PASSWORD}, csrf=False)
    assert missing.status_code == 403
    forged = await browser.post("/signin", {"email": ada, "password": PASSWORD, "csrf_token": "forged"})
    assert forged.status_code == 403
    assert (await browser.sign_in(ada)).status_code == 303
    # Signed in, the token is the session's: the one from before sign-in no longer works, nor does none at all.
    refused = await browser.post("/signout", csrf=False)
    assert refused.status_code == 403
    assert (await browser.get("/me")).status_code == 200
    other_site = await browser.post("/signout", headers={"Origin": "https://evil.example"})
    assert other_site.status_code == 403
    assert (await browser.get("/me")).status_code == 200
    # htmx sends the token as a header instead of a field.
    assert browser.last_csrf is not None
    by_header = await browser.http.post("/signout", headers={"X-CSRF-Token": browser.last_csrf, "HX-Request": "true"})
    assert by_header.status_code == 200
    assert (await browser.get("/me")).status_code == 303


async def test_every_page_carries_the_security_headers(browser: Browser, ada: str) -> None:
    pages = [await browser.get("/signin"), await browser.get("/enroll/bsl_nothing"), await browser.get("/me")]
    await browser.sign_in(ada)
    pages += [await browser.get("/me"), await browser.post("/signout", csrf=False)]
    for response in pages:
        csp = response.headers["content-security-policy"]
        assert "frame-ancestors 'none'" in csp
        assert "script-src 'self'" in csp and "unsafe-inline" not in csp and "unsafe-eval" not in csp
        assert response.headers["x-frame-options"] == "DENY"
        assert response.headers["referrer-policy"] == "no-referrer"
        assert response.headers["cache-control"] == "no-store"
        assert response.headers["x-content-type-options"] == "nosniff"
    html = pages[0].text
    assert "<script>" not in html and " style=" not in html and " onclick=" not in html
    for src in ("bastion.css", "htmx-2.0.11.min.js", "bastion.js"):
        assert f"/static/{src}?v=" in html
    static = await browser.get("/static/htmx-2.0.11.min.js")
    assert static.status_code == 200
    assert static.headers["cache-control"] == "public, max-age=31536000, immutable"
    assert static.text.startswith("/*! htmx 2.0.11")
    assert (await browser.get("/static/nope.js")).status_code == 404


@pytest.fixture
async def https_browser(settings: Settings, store: Store) -> AsyncIterator[Browser]:
    secure_settings = settings.model_copy(update={"public_url": "https://bastion.example"})
    app = create_app(secure_settings, store)
    async with httpx2.AsyncClient(
        transport=httpx2.ASGITransport(app=app), base_url="https://bastion.example"
    ) as client:
        yield Browser(client)


async def test_over_https_the_session_cookie_is_host_prefixed_and_secure(https_browser: Browser, ada: str) -> None:
    signed_in = await https_browser.sign_in(ada)
    assert signed_in.status_code == 303
    cookies = signed_in.headers.get_list("set-cookie")
    session = next(c for c in cookies if c.startswith("__Host-bastion="))
    assert "; secure" in session.lower() and "path=/" in session.lower() and "domain" not in session.lower()
    assert (await https_browser.get("/me")).status_code == 200


async def test_a_session_ends_after_idling_and_after_its_lifetime(browser: Browser, ada: str) -> None:
    start = datetime.now(UTC)
    with time_machine.travel(start, tick=True) as clock:
        assert (await browser.sign_in(ada)).status_code == 303
        clock.move_to(start + timedelta(minutes=100))
        assert (await browser.get("/me")).status_code == 200
        clock.move_to(start + timedelta(minutes=100 + 121))
        assert (await browser.get("/me")).status_code == 303  # idle for longer than 2 hours
        assert (await browser.sign_in(ada)).status_code == 303
        for hours in range(1, 24):
            clock.move_to(start + timedelta(minutes=221) + timedelta(hours=hours))
            assert (await browser.get("/me")).status_code == 200
        clock.move_to(start + timedelta(minutes=221) + timedelta(hours=24, minutes=1))
        assert (await browser.get("/me")).status_code == 303  # used all along, but a day old


async def test_sign_in_is_throttled_per_email_and_per_address(
    browser: Browser, ada: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(throttle, "SIGN_IN_PER_EMAIL", Limit("sign_in:email", 3, 600))
    monkeypatch.setattr(throttle, "SIGN_IN_PER_ADDRESS", Limit("sign_in:ip", 5, 60))
    for _ in range(3):
        assert (await browser.sign_in(ada, "a wrong guess, again")).status_code == 401
    refused = await browser.sign_in(ada, PASSWORD)  # even the right password waits: no password is checked
    assert refused.status_code == 429
    assert "Too many attempts" in refused.text and "try again" in refused.text
    assert 1 <= int(refused.headers["retry-after"]) <= 600
    assert "bastion=" not in refused.headers.get("set-cookie", "")
    # Another email from this address has room until the address's allowance (5) is spent; refusals cost none.
    for _ in range(2):
        assert (await browser.sign_in("bob@example.com", "some guess or other")).status_code == 401
    assert (await browser.sign_in("carol@example.com", "some guess or other")).status_code == 429
    with time_machine.travel(datetime.now(UTC) + timedelta(minutes=11), tick=True):
        assert (await browser.sign_in(ada, PASSWORD)).status_code == 303


async def test_when_passwords_are_busy_sign_in_says_so_at_once_with_retry_after(
    browser: Browser, ada: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    async def busy(_self: Passwords, _stored: str | None, _password: str) -> bool:
        raise PasswordsBusy("Bastion is checking too many passwords at once; try again in a few seconds.")

    monkeypatch.setattr(Passwords, "verify", busy)
    refused = await browser.sign_in(ada, PASSWORD)
    assert refused.status_code == 503
    assert refused.headers["retry-after"] == str(PasswordsBusy.retry_after_s)
    assert "too many passwords at once" in refused.text
