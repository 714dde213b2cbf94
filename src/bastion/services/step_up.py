"""Step-up authorization: an upstream's 403 ``insufficient_scope`` becomes a reconnection that asks for more.

The data plane reports a 403's ``WWW-Authenticate`` values here (``needs_scope``). When reconnecting can help,
the scope to ask for (what was granted plus what the challenge names, SEP-2350) is kept in the identity's
details under ``STEP_UP_KEY`` for the reconnect page, which passes it to ``oauth_connect.begin(scope=...)``,
and the call fails with ``IdentityNeedsScope`` carrying the reconnect link. When it cannot (the scope is already
granted, no scope is named), nothing happens: the upstream's refusal is the answer, and no loop starts.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from datetime import UTC, datetime
from typing import Any, Final

import sqlalchemy as sa

from bastion.db import schema
from bastion.db.store import Store
from bastion.domain.identities import IdentityKind
from bastion.oauth import flow
from bastion.oauth.challenge import parse_www_authenticate
from bastion.services.credentials import IdentityNeedsReauth

__all__ = ["STEP_UP_KEY", "IdentityNeedsScope", "needs_scope", "step_up_scope"]

IDENTITIES = schema.identities
# Where an identity's details keep the scope a reconnection should ask for after a 403 insufficient_scope.
STEP_UP_KEY: Final = "step_up_scope"


def step_up_scope(details: Mapping[str, Any], www_authenticate: Iterable[str]) -> str | None:
    """The scope to reconnect an identity with after an upstream's 403, or None when reconnecting cannot help.

    Args:
        details: the OAuth identity's details (``scope`` is what was granted).
        www_authenticate: the 403 answer's ``WWW-Authenticate`` header values.
    """
    granted = details.get("scope")
    challenges = [c for c in parse_www_authenticate(www_authenticate) if c.scheme == "bearer"]
    return flow.step_up_scope(challenges[0] if challenges else None, granted if isinstance(granted, str) else None)


class IdentityNeedsScope(IdentityNeedsReauth):
    """An upstream refused a call for want of scope (403 ``insufficient_scope``) that reconnecting can grant.

    The identity still works for what it was granted; its ``details["step_up_scope"]`` holds the scope to
    reconnect with (``begin(..., scope=...)``), ``reconnect`` where the member does it.
    """

    code = "identity_needs_scope"
    title = "Identity needs more access"


async def needs_scope(
    store: Store, workspace_id: str, identity_id: str | None, www_authenticate: Iterable[str], *, reconnect: str
) -> None:
    """After an upstream's 403 to an OAuth identity's call: remember the step-up scope and say so, or do nothing.

    Raises:
        IdentityNeedsScope: reconnecting with more scope can help (the scope is kept in the identity's details).
    """
    if identity_id is None:
        return
    async with store.transaction() as conn:
        # Locked, then written as a new version: a refresh committing at the same time (``oauth.refresh``) sees
        # the identity changed and keeps this scope, rather than writing the details it read before back.
        query = sa.select(IDENTITIES.c.kind, IDENTITIES.c.details, IDENTITIES.c.version).where(
            IDENTITIES.c.workspace_id == workspace_id, IDENTITIES.c.id == identity_id
        )
        row = (await conn.execute(query.with_for_update())).first()
        if row is None or row.kind != IdentityKind.OAUTH.value:
            return
        wanted = step_up_scope(row.details, www_authenticate)
        if wanted is None:
            return
        details = {**row.details, STEP_UP_KEY: wanted}
        await conn.execute(
            IDENTITIES.update()
            .where(IDENTITIES.c.id == identity_id, IDENTITIES.c.version == row.version)
            .values(details=details, version=row.version + 1, updated_at=datetime.now(UTC))
        )
    raise IdentityNeedsScope(
        f"this server needs more access than your identity was given ({wanted}): connect it again at {reconnect}",
        reconnect=reconnect,
    )
