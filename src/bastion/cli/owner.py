"""The first owner: created by `bastion init --owner-email`, with an API key printed once."""

from __future__ import annotations

from bastion import wiring
from bastion.domain.actor import Actor
from bastion.domain.capabilities import OWNER_ROLE
from bastion.domain.specs import MemberSpec
from bastion.errors import Conflict
from bastion.services import apikeys, members, workspace
from bastion.services.apikeys import KeyHasher
from bastion.settings import Settings


async def ensure_owner(settings: Settings, email: str, name: str | None) -> dict[str, object]:
    """Create the owner if absent and mint them a key; an existing member is left as is (no new key)."""
    store = wiring.store_from(settings)
    try:
        ws = await workspace.default_workspace(store)
        actor = Actor.local_operator(ws.id)
        try:
            member = await members.create(store, actor, MemberSpec(email, name or email.split("@")[0], OWNER_ROLE))
        except Conflict:
            existing = await members.get(store, actor, email)
            return {"id": existing.id, "email": existing.email, "created": False, "api_key": None}
        pepper = settings.token_pepper.get_secret_value() if settings.token_pepper else ""
        hasher = KeyHasher(pepper.encode("utf-8"))  # check_secrets has refused a missing pepper
        _key, secret = await apikeys.create(store, hasher, actor, name="bootstrap", member=member.id)
        return {"id": member.id, "email": member.email, "created": True, "api_key": secret}
    finally:
        await store.close()
