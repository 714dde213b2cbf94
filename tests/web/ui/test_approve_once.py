"""In a real browser (headless Chromium), "Approve" is sent once: its button is disabled as the form goes."""

from __future__ import annotations

import json

import anyio
import httpx2
import pytest
import sqlalchemy as sa
from playwright.async_api import expect

from bastion.db import schema
from bastion.db.store import Store
from bastion.domain.actor import Actor
from bastion.services.apikeys import KeyHasher
from bastion.settings import Settings
from bastion.web.app import create_app
from tests.browser.chromium import ACTION_TIMEOUT_MS, chromium
from tests.mcp_support import serving
from tests.web.ui.support import Browser, member_with_password
from tests.web.ui.world import build_world, new_link

pytestmark = [pytest.mark.anyio, pytest.mark.e2e]

# Once the form is on its way, what a second press finds: is the button disabled? Then the press itself (a disabled
# button does not submit). Kept in window.name, which outlives the navigation to the token page.
PRESS_AGAIN = """() => document.addEventListener("submit", () => setTimeout(() => {
  const button = document.querySelector("form[data-submit-once] button");
  window.name = JSON.stringify({disabled: button.disabled});
  button.click();
}, 0), {once: true})"""


async def _count(store: Store, table: sa.Table) -> int:
    async with store.transaction() as conn:
        return int((await conn.execute(sa.select(sa.func.count()).select_from(table))).scalar_one())


async def test_pressing_approve_again_while_the_first_press_is_sent_does_nothing(
    settings: Settings, store: Store, hasher: KeyHasher, operator: Actor
) -> None:
    owner = await build_world(store, operator, "http://127.0.0.1:9/mcp")
    secret = await new_link(store, hasher, owner)
    await member_with_password(store, hasher, operator, "ada@example.com")
    app = create_app(settings, store)
    approvals: list[str] = []

    async def counting(scope: dict[str, object], receive: object, send: object) -> None:
        if scope["type"] == "http" and str(scope["path"]).endswith("/approve"):
            approvals.append(str(scope["method"]))
        await app(scope, receive, send)  # type: ignore[arg-type]

    with anyio.fail_after(120):
        async with serving(counting) as bastion, httpx2.AsyncClient(base_url=bastion) as http:  # type: ignore[arg-type]
            # Up to the review page over plain HTTP; the browser takes over with the same session.
            person = Browser(http)
            assert (await person.sign_in("ada@example.com", next_path=f"/enroll/{secret}")).status_code == 303
            await person.get(f"/enroll/{secret}")
            draft = (await person.post(f"/enroll/{secret}/start")).headers["location"]
            await person.get(draft)
            assert (await person.post(f"{draft}/servers/crm/token", {"token": "ada-token-0001"})).status_code == 303

            async with chromium() as browser:
                context = await browser.new_context()
                context.set_default_timeout(ACTION_TIMEOUT_MS)
                await context.add_cookies([{"name": "bastion", "value": http.cookies["bastion"], "url": bastion}])
                page = await context.new_page()
                await page.goto(f"{bastion}{draft}/review")
                await page.evaluate(PRESS_AGAIN)
                await page.get_by_role("button", name="Approve and create the token").click()
                await expect(page.get_by_role("heading", name="Your access token")).to_be_visible()
                second_press = json.loads(await page.evaluate("window.name"))
                await context.close()
    assert second_press == {"disabled": True}
    assert approvals == ["POST"]
    assert await _count(store, schema.connections) == 1
