"""Connecting an upstream with OAuth end to end: ``oauth_connect.begin`` → a real authorization server → ``complete``.

Checklist items 10-13: PKCE S256 always (and refused without it), ``state`` single-use, bound, short-lived,
``resource`` on both requests, and the mix-up defences (``iss``, metadata issuer, registrations per issuer).
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any
from urllib.parse import parse_qs, urlsplit

import anyio
import pytest
import sqlalchemy as sa
import time_machine

from bastion.db import schema
from bastion.db.store import Store
from bastion.domain.actor import Actor
from bastion.domain.identities import IdentityKind, IdentityStatus
from bastion.domain.models import AuthKind, OAuthClientSettings, OAuthRegistration, Transport
from bastion.domain.specs import MemberSpec, ServerSpec
from bastion.errors import ValidationFailed
from bastion.oauth import pkce
from bastion.services import identities, members, oauth_clients, oauth_connect, servers, step_up
from bastion.services.apikeys import KeyHasher
from bastion.services.oauth_connect import (
    AuthorizationDeclined,
    AuthorizationFailed,
    IssMismatch,
    IssuerMismatch,
    PkceUnsupported,
    RegistrationFailed,
    ResourceMismatch,
    StateExpired,
    StateOtherBrowser,
    StateUnknown,
    StateUsed,
)
from bastion.settings import Settings
from bastion.vault.sealer import Vault
from tests.oauth.fake_upstream import FakeUpstream
from tests.oauth.flow_support import authorize, running

pytestmark = pytest.mark.anyio
PUBLIC = "https://bastion.example"
BROWSER = "browser-session-1"


@dataclass
class World:
    store: Store
    vault: Vault
    settings: Settings
    operator: Actor
    fake: FakeUpstream
    server_id: str
    member_id: str

    async def begin(self, *, browser: str = BROWSER, scope: str | None = None) -> str:
        return await oauth_connect.begin(
            self.store,
            self.vault,
            self.settings,
            workspace_id=self.operator.workspace_id,
            member_id=self.member_id,
            server_id=self.server_id,
            browser=browser,
            context={"draft": "d1"},
            scope=scope,
        )

    async def complete(self, params: dict[str, str], *, browser: str = BROWSER) -> oauth_connect.Connected:
        return await oauth_connect.complete(self.store, self.vault, self.settings, browser=browser, params=params)

    async def connect(self) -> oauth_connect.Connected:
        return await self.complete(await authorize(await self.begin()))

    async def rows(self, table: sa.Table) -> list[Any]:
        async with self.store.transaction() as conn:
            return list((await conn.execute(sa.select(table))).all())


@pytest.fixture
async def world(store: Store, vault: Vault, settings: Settings, operator: Actor) -> AsyncIterator[World]:
    await members.create(store, operator, MemberSpec("ada@example.com", "Ada"))
    async with running(FakeUpstream()) as fake:
        yield await _world(store, vault, settings, operator, fake, None)


async def _world(
    store: Store,
    vault: Vault,
    settings: Settings,
    operator: Actor,
    fake: FakeUpstream,
    options: OAuthClientSettings | None,
    *,
    public_url: str = PUBLIC,
) -> World:
    """An OAuth server in front of ``fake`` (``options`` None: the defaults an admin gets) and a member, Ada."""
    server = await servers.create(
        store,
        operator,
        ServerSpec("crm", Transport.STREAMABLE_HTTP, url=f"{fake.base}/mcp", auth_kind=AuthKind.OAUTH, oauth=options),
    )
    member = await members.get(store, operator, "ada@example.com")
    public = settings.model_copy(update={"public_url": public_url})
    return World(store, vault, public, operator, fake, server.id, member.id)


def _query(url: str) -> dict[str, str]:
    return {k: v[0] for k, v in parse_qs(urlsplit(url).query).items()}


async def test_connecting_uses_pkce_s256_and_the_resource_on_both_requests(world: World) -> None:
    url = await world.begin()
    asked = _query(url)
    assert asked["code_challenge_method"] == "S256"
    assert asked["resource"] == f"{world.fake.base}/mcp"
    assert asked["redirect_uri"] == f"{PUBLIC}/oauth/callback"
    connected = await world.complete(await authorize(url))
    (token_request,) = world.fake.paths("/as1/token")
    assert token_request.fields["resource"] == asked["resource"]
    assert token_request.fields["code_verifier"] and world.fake.pkce_ok == [True]
    assert token_request.fields["code_verifier"] not in url
    assert connected.secret.access_token in world.fake.issued
    assert connected.secret.refresh_token
    assert connected.context == {"draft": "d1"}
    assert (connected.member_id, connected.server_id, connected.label) == (
        world.member_id,
        world.server_id,
        "crm (OAuth)",
    )
    details = connected.details
    assert details["issuer"] == world.fake.issuer()
    assert details["token_endpoint"] == f"{world.fake.issuer()}/token"
    assert details["revocation_endpoint"] == f"{world.fake.issuer()}/revoke"
    assert details["resource"] == asked["resource"]
    expires_at = details["expires_at"]
    assert isinstance(expires_at, str) and datetime.fromisoformat(expires_at) > datetime.now(UTC)
    (client,) = await world.rows(schema.oauth_clients)
    assert details["oauth_client"] == client.id and client.issuer == world.fake.issuer()
    assert "access_token" not in repr(connected) and connected.secret.access_token not in repr(connected)


async def test_the_state_is_stored_only_as_a_digest_with_the_issuer_recorded(world: World) -> None:
    url = await world.begin()
    state = _query(url)["state"]
    (row,) = await world.rows(schema.oauth_states)
    assert len(state) >= 43 and state.encode() not in row.digest and state not in str(row.context)
    assert row.issuer == world.fake.issuer()
    assert row.browser != BROWSER
    assert row.expires_at - row.created_at == timedelta(minutes=10)


async def test_an_authorization_server_without_s256_is_refused_before_the_browser_is_sent(world: World) -> None:
    world.fake.drop_metadata = ("code_challenge_methods_supported",)
    with pytest.raises(PkceUnsupported):
        await world.begin()
    world.fake.metadata = {"code_challenge_methods_supported": ["plain"]}
    world.fake.drop_metadata = ()
    with pytest.raises(PkceUnsupported):
        await world.begin()
    assert await world.rows(schema.oauth_states) == []
    assert world.fake.paths("/as1/register") == []


async def test_a_replayed_state_is_refused_and_the_code_is_exchanged_once(world: World) -> None:
    callback = await authorize(await world.begin())
    await world.complete(callback)
    with pytest.raises(StateUsed):
        await world.complete(callback)
    assert len(world.fake.paths("/as1/token")) == 1


async def test_a_missing_or_unknown_state_is_refused(world: World) -> None:
    callback = await authorize(await world.begin())
    with pytest.raises(StateUnknown):
        await world.complete({k: v for k, v in callback.items() if k != "state"})
    with pytest.raises(StateUnknown):
        await world.complete({**callback, "state": pkce.new_verifier()})
    assert world.fake.paths("/as1/token") == []


async def test_a_state_from_another_browser_is_refused_and_stays_usable_by_its_own(world: World) -> None:
    callback = await authorize(await world.begin())
    with pytest.raises(StateOtherBrowser):
        await world.complete(callback, browser="someone-else")
    assert world.fake.paths("/as1/token") == []
    assert (await world.complete(callback)).secret.access_token


async def test_a_state_older_than_ten_minutes_is_refused_and_cleaned_up_later(world: World) -> None:
    callback = await authorize(await world.begin())
    with time_machine.travel(datetime.now(UTC) + timedelta(minutes=10, seconds=1)), pytest.raises(StateExpired):
        await world.complete(callback)
    assert world.fake.paths("/as1/token") == []
    with time_machine.travel(datetime.now(UTC) + timedelta(hours=2)):
        assert await oauth_connect.purge_states(world.store) == 1
        with pytest.raises(StateUnknown):
            await world.complete(callback)


@pytest.mark.parametrize("mode", ["wrong", "slash", "omit"])
async def test_an_answer_from_another_issuer_never_reaches_a_token_endpoint(world: World, mode: str) -> None:
    world.fake.iss_mode = mode
    callback = await authorize(await world.begin())
    with pytest.raises(IssMismatch):
        await world.complete(callback)
    assert world.fake.paths("/as1/token") == []
    with pytest.raises(StateUsed):  # and the state is spent: no second try with a doctored answer
        await world.complete({**callback, "iss": world.fake.issuer()})


async def test_an_issuer_that_does_not_advertise_iss_may_leave_it_out(world: World) -> None:
    world.fake.metadata = {"authorization_response_iss_parameter_supported": False}
    world.fake.iss_mode = "omit"
    assert (await world.connect()).secret.access_token


async def test_metadata_naming_another_issuer_is_refused_before_registration(world: World) -> None:
    world.fake.metadata = {"issuer": "https://attacker.example.com"}
    with pytest.raises(IssuerMismatch):
        await world.begin()
    assert world.fake.paths("/as1/register") == [] and await world.rows(schema.oauth_clients) == []


async def test_a_resource_for_another_server_is_refused(world: World) -> None:
    world.fake.prm_resource = "https://evil.example.com/mcp"
    with pytest.raises(ResourceMismatch):
        await world.begin()
    assert world.fake.paths("/as1/authorize") == []


async def test_declining_at_the_authorization_server_says_so(world: World) -> None:
    world.fake.authorize_error = "access_denied"
    with pytest.raises(AuthorizationDeclined, match="you declined"):
        await world.connect()


async def test_registration_is_kept_per_issuer_and_a_new_issuer_gets_a_new_one(
    store: Store, vault: Vault, settings: Settings, operator: Actor
) -> None:
    await members.create(store, operator, MemberSpec("ada@example.com", "Ada"))
    async with running(FakeUpstream(issuers=("/as1", "/as2"))) as fake:
        world = await _world(store, vault, settings, operator, fake, None)
        first = await world.connect()
        await world.connect()
        assert len(fake.paths("/as1/register")) == 1  # the registration is used again
        fake.current = 1  # the upstream moves to another authorization server
        second = await world.connect()
    assert len(fake.paths("/as2/register")) == 1
    as1_clients = {client_id for client_id in fake.clients if client_id.startswith("client-as1")}
    assert as1_clients and all(s.fields.get("client_id") not in as1_clients for s in fake.seen if "/as2" in s.path)
    assert first.details["oauth_client"] != second.details["oauth_client"]
    assert second.details["issuer"] == fake.issuer(1)
    issuers = sorted(row.issuer for row in await world.rows(schema.oauth_clients))
    assert issuers == [fake.issuer(0), fake.issuer(1)]


async def test_the_registration_asks_for_what_the_server_supports_and_a_secret_is_sealed(world: World) -> None:
    world.fake.token_methods = ["client_secret_post"]
    await world.connect()
    (registered,) = world.fake.paths("/as1/register")
    assert '"token_endpoint_auth_method": "client_secret_post"' in registered.fields["json"]
    assert '"application_type": "web"' in registered.fields["json"]
    (token_request,) = world.fake.paths("/as1/token")
    (client,) = await world.rows(schema.oauth_clients)
    secret = world.fake.clients[client.client_id][0]
    assert secret is not None and token_request.fields["client_secret"] == secret
    assert secret.encode() not in client.secret_sealed and client.kek_id is not None


async def test_a_pre_registered_client_and_its_secret_are_used_with_basic_authentication(
    store: Store, vault: Vault, settings: Settings, operator: Actor
) -> None:
    await members.create(store, operator, MemberSpec("ada@example.com", "Ada"))
    async with running(FakeUpstream(token_methods=["client_secret_basic"])) as fake:
        options = OAuthClientSettings(OAuthRegistration.PRE_REGISTERED, "pre-client")
        world = await _world(store, vault, settings, operator, fake, options)
        fake.clients["pre-client"] = ("pre-secret", "client_secret_basic")
        await oauth_clients.set_client_secret(store, vault, operator, "crm", "pre-secret")
        connected = await world.connect()
    assert fake.paths("/as1/register") == []
    (token_request,) = fake.paths("/as1/token")
    assert token_request.headers["authorization"].startswith("Basic ")
    assert connected.secret.access_token in fake.issued
    async with store.transaction() as conn:
        credentials = await oauth_clients.credentials(
            conn, vault, operator.workspace_id, str(connected.details["oauth_client"])
        )
    assert (credentials.client_id, credentials.client_secret) == ("pre-client", "pre-secret")
    assert "pre-secret" not in repr(credentials)


CIMD = {"client_id_metadata_document_supported": True}


async def test_by_default_a_client_id_metadata_document_is_used_where_the_server_supports_it(
    store: Store, vault: Vault, settings: Settings, operator: Actor
) -> None:
    await members.create(store, operator, MemberSpec("ada@example.com", "Ada"))
    async with running(FakeUpstream(metadata=CIMD)) as fake:
        world = await _world(store, vault, settings, operator, fake, None)
        server = await servers.get(store, operator, "crm")
        assert server.oauth is not None and server.oauth.registration is OAuthRegistration.AUTO
        url = await world.begin()
        assert _query(url)["client_id"] == f"{PUBLIC}/oauth/client-metadata.json"
        await world.complete(await authorize(url))
    assert fake.paths("/as1/register") == []
    (token_request,) = fake.paths("/as1/token")
    assert token_request.fields["client_id"] == f"{PUBLIC}/oauth/client-metadata.json"
    assert "authorization" not in token_request.headers
    (client,) = await world.rows(schema.oauth_clients)
    assert client.registration == OAuthRegistration.CLIENT_METADATA_DOCUMENT.value


@pytest.mark.parametrize(
    ("options", "public_url", "metadata"),
    [
        (None, "http://127.0.0.1:8080", CIMD),  # an authorization server cannot fetch a document from plain http
        (None, PUBLIC, {}),  # the server does not take documents
        (OAuthClientSettings(OAuthRegistration.DYNAMIC), PUBLIC, CIMD),  # an admin's override
    ],
)
async def test_otherwise_bastion_registers_dynamically(
    store: Store,
    vault: Vault,
    settings: Settings,
    operator: Actor,
    options: OAuthClientSettings | None,
    public_url: str,
    metadata: dict[str, Any],
) -> None:
    await members.create(store, operator, MemberSpec("ada@example.com", "Ada"))
    async with running(FakeUpstream(metadata=metadata)) as fake:
        world = await _world(store, vault, settings, operator, fake, options, public_url=public_url)
        url = await world.begin()
        (registered,) = fake.paths("/as1/register")
        assert _query(url)["client_id"].startswith("client-as1-")
        await world.complete(await authorize(url))
    assert f'"redirect_uris": ["{public_url}/oauth/callback"]' in registered.fields["json"]
    (client,) = await world.rows(schema.oauth_clients)
    assert client.registration == OAuthRegistration.DYNAMIC.value


async def test_a_client_id_an_admin_set_comes_first_even_where_documents_work(
    store: Store, vault: Vault, settings: Settings, operator: Actor
) -> None:
    await members.create(store, operator, MemberSpec("ada@example.com", "Ada"))
    async with running(FakeUpstream(metadata=CIMD)) as fake:
        options = OAuthClientSettings(OAuthRegistration.AUTO, "admin-client")
        world = await _world(store, vault, settings, operator, fake, options)
        fake.clients["admin-client"] = (None, "none")
        url = await world.begin()
        assert _query(url)["client_id"] == "admin-client"
        await world.complete(await authorize(url))
    assert fake.paths("/as1/register") == []
    (client,) = await world.rows(schema.oauth_clients)
    assert (client.registration, client.client_id) == (OAuthRegistration.PRE_REGISTERED.value, "admin-client")


@pytest.mark.parametrize(
    ("options", "public_url", "metadata", "reason"),
    [
        (None, PUBLIC, {}, "does not accept client ID metadata documents, and it offers no dynamic"),
        (None, "http://127.0.0.1:8080", CIMD, "http://127.0.0.1:8080 is not https"),
        (OAuthClientSettings(OAuthRegistration.CLIENT_METADATA_DOCUMENT), PUBLIC, {}, "set it.* to auto"),
    ],
)
async def test_with_no_way_to_become_a_client_the_admin_is_told_what_to_do(
    store: Store,
    vault: Vault,
    settings: Settings,
    operator: Actor,
    options: OAuthClientSettings | None,
    public_url: str,
    metadata: dict[str, Any],
    reason: str,
) -> None:
    await members.create(store, operator, MemberSpec("ada@example.com", "Ada"))
    fake = FakeUpstream(metadata=metadata, drop_metadata=("registration_endpoint",))
    async with running(fake):
        world = await _world(store, vault, settings, operator, fake, options, public_url=public_url)
        with pytest.raises(RegistrationFailed, match=reason) as raised:
            await world.begin()
    if options is None:
        assert f"redirect URI {public_url}/oauth/callback" in str(raised.value)
        assert "register Bastion there" in str(raised.value)
    assert fake.paths("/as1/register") == [] and fake.paths("/as1/authorize") == []
    assert await world.rows(schema.oauth_clients) == [] and await world.rows(schema.oauth_states) == []


async def test_a_working_registration_is_kept_until_an_admin_chooses_another_way(
    store: Store, vault: Vault, settings: Settings, operator: Actor
) -> None:
    """Refresh tokens are bound to the client id: a stored dynamic registration is not swapped for a document
    just because the server now takes documents, only when an admin says so; and then the new way gets a row
    of its own, while the dynamic registration's row stays as it was for the identities that name it."""
    await members.create(store, operator, MemberSpec("ada@example.com", "Ada"))
    async with running(FakeUpstream()) as fake:
        world = await _world(store, vault, settings, operator, fake, None)
        first = await world.connect()
        fake.metadata = CIMD
        second = await world.connect()
        assert len(fake.paths("/as1/register")) == 1
        chosen = OAuthClientSettings(OAuthRegistration.CLIENT_METADATA_DOCUMENT)
        await servers.update(store, operator, "crm", {"oauth": chosen})
        third = await world.complete(await authorize(url := await world.begin()))
        assert _query(url)["client_id"] == f"{PUBLIC}/oauth/client-metadata.json"
    assert first.details["oauth_client"] == second.details["oauth_client"] != third.details["oauth_client"]
    old, new = [await _client(world, c.details["oauth_client"]) for c in (first, third)]
    (registered,) = (cid for cid in fake.clients if cid.startswith("client-as1-"))
    assert (old.registration, old.client_id, old.superseded) == (OAuthRegistration.DYNAMIC, registered, True)
    assert old.client_secret == fake.clients[registered][0] is not None  # its refresh tokens still work with it
    assert (new.registration, new.superseded) == (OAuthRegistration.CLIENT_METADATA_DOCUMENT, False)
    async with store.transaction() as conn:
        current = await oauth_clients.find(conn, vault, world.server_id, fake.issuer())
    assert current is not None and current.id == new.id


async def _client(world: World, row_id: object) -> oauth_clients.ClientRow:
    async with world.store.transaction() as conn:
        return await oauth_clients.load(conn, world.vault, world.operator.workspace_id, str(row_id))


async def test_two_members_connecting_at_once_share_one_registration_and_both_finish(world: World) -> None:
    """Both register (neither sees a registration yet); the first saved wins, the other uses it, so each code
    is exchanged as the client its authorization URL named."""
    await members.create(world.store, world.operator, MemberSpec("bob@example.com", "Bob"))
    bob = await members.get(world.store, world.operator, "bob@example.com")
    world.fake.hold_registrations = 2
    urls: dict[str, str] = {}

    async def begin(member_id: str) -> None:
        urls[member_id] = await oauth_connect.begin(
            world.store,
            world.vault,
            world.settings,
            workspace_id=world.operator.workspace_id,
            member_id=member_id,
            server_id=world.server_id,
            browser=member_id,
            context={},
        )

    with anyio.fail_after(60):  # a guard against hanging, not a measure of speed
        async with anyio.create_task_group() as tg:
            for member_id in (world.member_id, bob.id):
                tg.start_soon(begin, member_id)
    assert len(world.fake.paths("/as1/register")) == 2
    assert _query(urls[world.member_id])["client_id"] == _query(urls[bob.id])["client_id"]
    callbacks = {member_id: await authorize(url) for member_id, url in urls.items()}
    done = [await world.complete(callback, browser=member_id) for member_id, callback in callbacks.items()]
    assert {c.member_id for c in done} == {world.member_id, bob.id}
    assert all(c.secret.access_token in world.fake.issued for c in done)
    assert done[0].details["oauth_client"] == done[1].details["oauth_client"]
    (client,) = await world.rows(schema.oauth_clients)
    assert client.client_id == _query(urls[bob.id])["client_id"] and client.superseded_at is None


async def test_the_code_is_exchanged_only_as_the_client_the_authorization_url_named(world: World) -> None:
    url = await world.begin()
    callback = await authorize(url)
    async with world.store.transaction() as conn:  # not something Bastion does: the check is there regardless
        await conn.execute(schema.oauth_clients.update().values(client_id="another-client"))
    with pytest.raises(AuthorizationFailed, match="registration at the authorization server changed"):
        await world.complete(callback)
    assert world.fake.paths("/as1/token") == []


async def test_a_used_state_keeps_no_verifier(world: World) -> None:
    await world.connect()
    world.fake.iss_mode = "wrong"
    callback = await authorize(await world.begin())
    with pytest.raises(IssMismatch):
        await world.complete(callback)
    states = await world.rows(schema.oauth_states)
    assert len(states) == 2 and all(row.used_at is not None and row.code_verifier is None for row in states)


async def test_a_pre_registered_client_is_bound_to_the_first_issuer_it_is_used_at(
    store: Store, vault: Vault, settings: Settings, operator: Actor
) -> None:
    """No authorization server named: the secret goes to the first issuer discovered, and to no other after
    that, whatever the upstream's metadata comes to say (checklist 13: credentials keyed by issuer)."""
    await members.create(store, operator, MemberSpec("ada@example.com", "Ada"))
    async with running(FakeUpstream(issuers=("/as1", "/as2"), token_methods=["client_secret_post"])) as fake:
        options = OAuthClientSettings(OAuthRegistration.PRE_REGISTERED, "pre-client")
        world = await _world(store, vault, settings, operator, fake, options)
        await oauth_clients.set_client_secret(store, vault, operator, "crm", "as1-secret")
        fake.clients["pre-client"] = ("as1-secret", "client_secret_post")
        first = await world.connect()
        fake.current = 1  # the upstream now names another authorization server
        with pytest.raises(RegistrationFailed, match=r"authorization server changed.*an admin must re-register"):
            await world.begin()
        assert [s for s in fake.seen if s.path.startswith("/as2/") and "metadata" not in s.path] == []
        (row,) = await world.rows(schema.oauth_clients)
        assert (row.id, row.issuer) == (first.details["oauth_client"], fake.issuer(0))  # the template, moved
        assert await oauth_clients.set_client_secret(store, vault, operator, "crm", "as1-rotated") is None
        with pytest.raises(RegistrationFailed, match="authorization server changed"):
            await world.begin()
        # The admin registers Bastion at the new server and says so.
        moved = OAuthClientSettings(OAuthRegistration.PRE_REGISTERED, "pre-client", authorization_server=fake.issuer(1))
        await servers.update(store, operator, "crm", {"oauth": moved})
        await oauth_clients.set_client_secret(store, vault, operator, "crm", "as2-secret")
        fake.clients["pre-client"] = ("as2-secret", "client_secret_post")
        second = await world.connect()
    assert second.details["issuer"] == fake.issuer(1)
    (token_request,) = fake.paths("/as2/token")
    assert token_request.fields["client_secret"] == "as2-secret"
    assert all("as1-" not in value for s in fake.seen if s.path.startswith("/as2/") for value in s.fields.values())
    as1, as2 = [await _client(world, c.details["oauth_client"]) for c in (first, second)]
    assert (as1.issuer, as1.client_secret) == (fake.issuer(0), "as1-rotated")  # never given as2's secret
    assert (as2.issuer, as2.client_secret) == (fake.issuer(1), "as2-secret")


@pytest.mark.parametrize(
    ("knobs", "expected"),
    [
        ({"challenge_scope": "mcp:basic"}, "mcp:basic"),
        ({"prm_scopes": ["a", "b"]}, "a b"),
        ({}, None),
        ({"prm_scopes": ["a"], "metadata": {"scopes_supported": ["a", "offline_access"]}}, "a offline_access"),
    ],
)
async def test_the_scope_comes_from_the_challenge_or_the_resource(
    world: World, knobs: dict[str, Any], expected: str | None
) -> None:
    for name, value in knobs.items():
        setattr(world.fake, name, value)
    assert _query(await world.begin()).get("scope") == expected


async def test_a_step_up_asks_for_the_union_of_granted_and_challenged_scopes(world: World) -> None:
    world.fake.challenge_scope = "mcp:basic"
    connected = await world.connect()
    assert connected.details["scope"] == "mcp:basic"
    challenge = 'Bearer error="insufficient_scope", scope="mcp:write", resource_metadata="x"'
    wanted = step_up.step_up_scope(connected.details, [challenge])
    assert wanted == "mcp:basic mcp:write"
    assert _query(await world.begin(scope=wanted))["scope"] == "mcp:basic mcp:write"
    assert step_up.step_up_scope({"scope": wanted}, [challenge]) is None


async def test_a_server_that_is_not_an_oauth_server_cannot_be_connected(world: World) -> None:
    await servers.update(world.store, world.operator, "crm", {"auth_kind": AuthKind.BEARER, "oauth": None})
    with pytest.raises(ValidationFailed):
        await world.begin()


async def test_a_403_for_want_of_scope_keeps_the_step_up_scope_for_the_reconnect_page(
    world: World, hasher: KeyHasher
) -> None:
    world.fake.challenge_scope = "mcp:basic"
    connected = await world.connect()
    identity = await identities.create(
        world.store,
        world.vault,
        hasher,
        world.operator,
        server="crm",
        secret=connected.secret,
        kind=IdentityKind.OAUTH,
        owner="ada@example.com",
        details=connected.details,
    )
    challenge = ['Bearer error="insufficient_scope", scope="mcp:write"']
    with pytest.raises(step_up.IdentityNeedsScope, match="mcp:basic mcp:write") as raised:
        await step_up.needs_scope(
            world.store, world.operator.workspace_id, identity.id, challenge, reconnect="https://b.example/re"
        )
    assert raised.value.reconnect == "https://b.example/re" and raised.value.code == "identity_needs_scope"
    stored = await identities.get(world.store, world.operator, identity.id)
    assert stored.details[step_up.STEP_UP_KEY] == "mcp:basic mcp:write"
    assert stored.version == identity.version + 1  # a change a refresh committing meanwhile notices
    assert stored.status is IdentityStatus.ACTIVE  # what was granted still works
    # Nothing to gain: a challenge for what is granted, another error, or no identity at all.
    for values, target in (
        (['Bearer error="insufficient_scope", scope="mcp:basic"'], identity.id),
        (['Bearer error="invalid_token"'], identity.id),
        (challenge, None),
    ):
        await step_up.needs_scope(world.store, world.operator.workspace_id, target, values, reconnect="r")


async def test_a_new_pre_registered_secret_reaches_every_copy_and_can_be_taken_away(
    store: Store, vault: Vault, settings: Settings, operator: Actor
) -> None:
    await members.create(store, operator, MemberSpec("ada@example.com", "Ada"))
    async with running(FakeUpstream(token_methods=["client_secret_post"])) as fake:
        options = OAuthClientSettings(OAuthRegistration.PRE_REGISTERED, "pre-client")
        world = await _world(store, vault, settings, operator, fake, options)
        await oauth_clients.set_client_secret(store, vault, operator, "crm", "first")
        fake.clients["pre-client"] = ("first", "client_secret_post")
        row_id = str((await world.connect()).details["oauth_client"])

        async def secret_now() -> str | None:
            async with store.transaction() as conn:
                return (await oauth_clients.load(conn, vault, operator.workspace_id, row_id)).client_secret

        await oauth_clients.set_client_secret(store, vault, operator, "crm", "second")
        assert await secret_now() == "second"  # the copy an identity names changed in place
        await oauth_clients.set_client_secret(store, vault, operator, "crm", None)
        assert await secret_now() is None
        fake.clients["pre-client"] = (None, "none")
        await world.connect()  # now a public client
    (_first, second) = fake.paths("/as1/token")
    assert "client_secret" not in second.fields and second.fields["client_id"] == "pre-client"


async def test_a_client_secret_needs_a_pre_registered_client_id_and_printable_text(world: World) -> None:
    with pytest.raises(ValidationFailed, match="client id"):
        await oauth_clients.set_client_secret(world.store, world.vault, world.operator, "crm", "s")
    with pytest.raises(ValidationFailed, match="printable"):
        await oauth_clients.set_client_secret(world.store, world.vault, world.operator, "crm", "bad\nsecret")
