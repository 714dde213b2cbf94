"""Debian's Chromium (/usr/bin/chromium) driven by Playwright, headless: the browser every browser test uses.

Playwright's own browser builds are never downloaded; .ci/run installs Debian's package when it is missing.
"""

from __future__ import annotations

from collections.abc import AsyncGenerator
from contextlib import asynccontextmanager
from typing import Final

from playwright.async_api import Browser, async_playwright, expect

CHROMIUM: Final = "/usr/bin/chromium"
CHROMIUM_ARGS: Final = ["--no-sandbox", "--disable-gpu", "--disable-background-networking"]
# Generous waits: CI is a shared 2-core machine, and a step may include discovery and registration upstream.
ACTION_TIMEOUT_MS: Final = 30_000
EXPECT_TIMEOUT_MS: Final = 15_000


@asynccontextmanager
async def chromium() -> AsyncGenerator[Browser]:
    """A headless Chromium, closed on exit; give each person their own ``browser.new_context()``."""
    async with async_playwright() as playwright:
        expect.set_options(timeout=EXPECT_TIMEOUT_MS)
        browser = await playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS, headless=True)
        try:
            yield browser
        finally:
            await browser.close()
