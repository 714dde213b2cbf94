"""A small workspace to enroll into: a bearer upstream behind gateway `sales`, host `agent`, and links to it."""

from __future__ import annotations

import html
import re
from collections.abc import Iterable
from datetime import timedelta
from typing import Final

from bastion.db.store import Store
from bastion.domain.actor import Actor
from bastion.domain.capabilities import OWNER_ROLE
from bastion.domain.models import AuthKind, Provisioning, ProvisionMode, Transport
from bastion.domain.specs import GatewayServerSpec, GatewaySpec, HostSpec, MemberSpec, ServerSpec
from bastion.services import gateways, hosts, links, members, roles, servers
from bastion.services.apikeys import KeyHasher

TOKEN_INPUT: Final = re.compile(r'id="token" type="text" readonly value="(bst_[A-Za-z0-9]+)"')
DRAFT_PATH: Final = re.compile(r"^/enroll/drafts/([0-9a-f-]{36})$")


async def build_world(store: Store, operator: Actor, upstream_url: str, auth_kind: AuthKind = AuthKind.BEARER) -> Actor:
    """Server `crm` (bearer, or OAuth) in gateway `sales`, host `agent`; returns the owner who creates links."""
    await servers.create(
        store, operator, ServerSpec("crm", Transport.STREAMABLE_HTTP, url=upstream_url, auth_kind=auth_kind)
    )
    tools = Provisioning(ProvisionMode.ALLOW_SELECTED, frozenset({"whoami", "echo"}))
    await gateways.create(
        store, operator, GatewaySpec("sales", "Sales tools", servers=(GatewayServerSpec("crm", tools=tools),))
    )
    await hosts.create(store, operator, HostSpec("agent", "The sales agent"))
    owner = await members.create(store, operator, MemberSpec("grace@example.com", "Grace Hopper", OWNER_ROLE))
    role = await roles.get(store, operator, owner.role_id)
    return Actor(workspace_id=owner.workspace_id, member_id=owner.id, capabilities=role.capabilities, label=owner.email)


async def new_link(
    store: Store,
    hasher: KeyHasher,
    owner: Actor,
    *,
    max_uses: int | None = links.DEFAULT_MAX_USES,
    allowed: Iterable[str] = (),
    expires_in: timedelta = links.DEFAULT_LINK_LIFETIME,
) -> str:
    _link, secret = await links.create(
        store,
        hasher,
        owner,
        host="agent",
        gateway="sales",
        max_uses=max_uses,
        allowed_emails=allowed,
        expires_in=expires_in,
        note="for the pilot",
    )
    return secret


def token_on(page: str) -> str:
    found = TOKEN_INPUT.search(page)
    assert found is not None, "the token page shows no token"
    return found.group(1)


def snippet(page: str, name: str) -> str:
    found = re.search(rf'<code id="snippet-{name}">(.*?)</code>', page, re.DOTALL)
    assert found is not None, f"no {name} snippet"
    return html.unescape(found.group(1))
