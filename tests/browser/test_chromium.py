"""Playwright drives Debian's Chromium at all: a page renders, a click runs its script, the clipboard works.

If this fails, the journey's failures are about the browser, not about Bastion.
"""

from __future__ import annotations

import pytest

from tests.browser.chromium import chromium

pytestmark = [pytest.mark.anyio, pytest.mark.e2e]

PAGE = """<!doctype html><title>smoke</title><input id="t" value="bst_smoke"><button id="b">Copy</button>
<script>document.getElementById('b').onclick = () => navigator.clipboard.writeText(document.getElementById('t').value)
  .then(() => { document.getElementById('b').textContent = 'Copied'; });</script>"""


async def test_playwright_drives_debian_chromium_and_its_clipboard() -> None:
    async with chromium() as browser:
        assert browser.version.split(".")[0].isdigit()
        context = await browser.new_context(permissions=["clipboard-read", "clipboard-write"])
        page = await context.new_page()
        # A secure context (https or loopback) is what the clipboard API needs; route a loopback URL to the page.
        await page.route("http://127.0.0.1:9/", lambda route: route.fulfill(body=PAGE, content_type="text/html"))
        await page.goto("http://127.0.0.1:9/")
        await page.get_by_role("button", name="Copy").click()
        await page.get_by_role("button", name="Copied").wait_for()
        assert await page.evaluate("navigator.clipboard.readText()") == "bst_smoke"
        await context.close()
