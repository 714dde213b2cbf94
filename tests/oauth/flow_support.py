"""Running a ``FakeUpstream`` on a real port, and playing the browser between Bastion and it."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncGenerator
from urllib.parse import parse_qsl, urlsplit

import httpx2

from bastion.net.outbound import OutboundPolicy
from tests.mcp_support import serving
from tests.oauth.fake_upstream import FakeUpstream

LOOPBACK = OutboundPolicy(allow_loopback=True)


@contextlib.asynccontextmanager
async def running(fake: FakeUpstream) -> AsyncGenerator[FakeUpstream]:
    """``fake`` served on a free loopback port (its ``base`` set), stopped on exit."""
    async with serving(fake.app()) as base:
        fake.base = base
        yield fake


async def authorize(url: str) -> dict[str, str]:
    """GET an authorization URL as a browser would and return the query of the redirect it answers with."""
    async with httpx2.AsyncClient(follow_redirects=False) as browser:
        response = await browser.get(url)
    assert response.status_code == 302, response.text
    return dict(parse_qsl(urlsplit(response.headers["location"]).query, keep_blank_values=True))
