"""A browser for the pages: cookies kept, forms filled with the CSRF token the page carried, redirects by hand."""

from __future__ import annotations

import re
from typing import Final

import httpx2

from bastion.db.store import Store
from bastion.domain.actor import Actor
from bastion.domain.models import Member
from bastion.domain.specs import MemberSpec
from bastion.services import accounts, members
from bastion.services.accounts import Passwords, TicketKind
from bastion.services.apikeys import KeyHasher

CSRF: Final = re.compile(r'name="csrf_token" value="([^"]+)"')
PASSWORD: Final = "correct horse battery staple"


def csrf_of(html: str) -> str:
    found = CSRF.search(html)
    assert found is not None, "the page has no form with a CSRF token"
    return found.group(1)


async def member_with_password(
    store: Store, hasher: KeyHasher, operator: Actor, email: str, password: str = PASSWORD, role: str = "member"
) -> Member:
    """A member who set ``password`` through an invitation, as a person would."""
    member = await members.create(store, operator, MemberSpec(email, email.split("@")[0].title(), role))
    _ticket, secret = await accounts.issue_ticket(store, hasher, operator, member.id, TicketKind.INVITE)
    await accounts.redeem_ticket(store, hasher, Passwords(), secret, password)
    return member


class Browser:
    """One person's browser: an httpx2 client with its cookie jar, never following redirects on its own."""

    def __init__(self, client: httpx2.AsyncClient) -> None:
        self.http = client
        self.last_csrf: str | None = None

    async def get(self, path: str, **kwargs: object) -> httpx2.Response:
        response = await self.http.get(path, **kwargs)  # type: ignore[arg-type]
        found = CSRF.search(response.text) if response.headers.get("content-type", "").startswith("text/html") else None
        if found:
            self.last_csrf = found.group(1)
        return response

    async def post(
        self, path: str, data: dict[str, str] | None = None, *, csrf: bool = True, **kwargs: object
    ) -> httpx2.Response:
        form = dict(data or {})
        if csrf:
            assert self.last_csrf is not None, "load a page with a form first"
            form.setdefault("csrf_token", self.last_csrf)
        response = await self.http.post(path, data=form, **kwargs)  # type: ignore[arg-type]
        found = CSRF.search(response.text) if response.headers.get("content-type", "").startswith("text/html") else None
        if found:
            self.last_csrf = found.group(1)
        return response

    async def follow(self, response: httpx2.Response) -> httpx2.Response:
        """GET the redirect target of ``response`` (a path on this site)."""
        assert response.status_code in (302, 303), response.text
        location = response.headers["location"]
        assert location.startswith("/"), location
        return await self.get(location)

    async def sign_in(self, email: str, password: str = PASSWORD, next_path: str = "/me") -> httpx2.Response:
        await self.get("/signin", params={"next": next_path})
        response = await self.post("/signin", {"email": email, "password": password, "next": next_path})
        return response
