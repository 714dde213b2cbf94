"""`next` never leads off the site: a property test of the rule, and the real sign-in redirects with hostile values."""

from __future__ import annotations

from typing import Final
from urllib.parse import SplitResult, quote, urljoin, urlsplit

import pytest
from hypothesis import example, given
from hypothesis import strategies as st

from bastion.db.store import Store
from bastion.domain.actor import Actor
from bastion.services.apikeys import KeyHasher
from bastion.web.ui.security import safe_next
from tests.web.ui.support import Browser, member_with_password

SITE: Final = "https://bastion.example"
HOSTILE: Final = (
    "//evil.example",
    "///evil.example",
    "/\\evil.example",
    "\\\\evil.example",
    "/\t/evil.example",
    "/\n/evil.example",
    " //evil.example",
    "https://evil.example/",
    "http:evil.example",
    "javascript:alert(1)",
    "data:text/html,hi",
    "//evil.example/%2F..",
    "/%09/evil.example",
    "/\u3002/evil.example",
    "@evil.example",
    "evil.example",
    "",
)
PREFIXES: Final = st.sampled_from(["", "/", "//", "/\\", "\\", "\\/", "/\t", "///", "http:", "https://", " ", "/%2F"])


def _as_a_browser_follows(location: str) -> SplitResult:
    """Where a browser goes for a Location header: it drops tabs and newlines, and reads backslashes as slashes."""
    cleaned = location.strip("\x00\x20").replace("\t", "").replace("\n", "").replace("\r", "").replace("\\", "/")
    return urlsplit(urljoin(SITE + "/signin", cleaned))


def _stays_on_site(location: str) -> bool:
    target = _as_a_browser_follows(location)
    return f"{target.scheme}://{target.netloc}" == SITE


@given(st.one_of(st.text(), st.builds(lambda p, t: p + t, PREFIXES, st.text())))
@example("//evil.example")
@example("/\\evil.example")
@example("/\t/evil.example")
def test_a_next_value_is_either_a_path_here_or_the_default(value: str) -> None:
    chosen = safe_next(value)
    assert chosen == "/me" or chosen == value
    assert _stays_on_site(chosen), (value, chosen)


def test_ordinary_paths_are_kept() -> None:
    for path in ("/me", "/enroll/bsl_abc", "/enroll/drafts/1?changed=crm#server-crm", "/me?x=//y"):
        assert safe_next(path) == path


@pytest.mark.anyio
async def test_sign_in_never_redirects_off_site(
    browser: Browser, store: Store, hasher: KeyHasher, operator: Actor
) -> None:
    await member_with_password(store, hasher, operator, "ada@example.com")
    for hostile in HOSTILE:
        signed_in = await browser.sign_in("ada@example.com", next_path=hostile)
        assert signed_in.status_code == 303
        # Percent-encoded or non-ASCII look-alikes are plain paths here; everything else falls back to /me.
        expected = hostile if hostile.startswith(("/%", "/\u3002")) else "/me"
        assert signed_in.headers["location"] in (expected, quote(expected, safe="/%")), hostile
        assert _stays_on_site(signed_in.headers["location"])
        again = await browser.get("/signin", params={"next": hostile})
        assert again.status_code == 303 and _stays_on_site(again.headers["location"]), hostile
        await browser.get("/me")
        assert (await browser.post("/signout")).status_code == 200
        bounced = await browser.get("/me")
        assert bounced.headers["location"] == "/signin?next=/me"
