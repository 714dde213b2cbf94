"""Fixtures for the pages: the app served in process, and a browser talking to it."""

from __future__ import annotations

from collections.abc import AsyncIterator

import httpx2
import pytest

from bastion.db.store import Store
from bastion.settings import Settings
from bastion.web.app import create_app
from tests.web.ui.support import Browser


@pytest.fixture
async def browser(settings: Settings, store: Store) -> AsyncIterator[Browser]:
    app = create_app(settings, store)
    transport = httpx2.ASGITransport(app=app)
    async with httpx2.AsyncClient(transport=transport, base_url="http://bastion.test") as client:
        yield Browser(client)
