"""Connecting upstream identities with OAuth from the pages: ``services.oauth_connect`` bound to this app's parts."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

from bastion.db.store import Store
from bastion.services import oauth_connect
from bastion.services.oauth_connect import Connected
from bastion.settings import Settings
from bastion.types import JSONObject
from bastion.vault.sealer import Vault


@dataclass(frozen=True, slots=True)
class Connector:
    store: Store
    vault: Vault
    settings: Settings

    async def begin(
        self,
        *,
        workspace_id: str,
        member_id: str,
        server_id: str,
        browser: str,
        context: JSONObject,
        scope: str | None = None,
    ) -> str:
        """The authorization server's URL to send the browser to; the state is bound to ``browser``.

        ``scope``: ask for exactly this (a step-up); by default it comes from the server's challenge and metadata.
        """
        return await oauth_connect.begin(
            self.store,
            self.vault,
            self.settings,
            workspace_id=workspace_id,
            member_id=member_id,
            server_id=server_id,
            browser=browser,
            context=context,
            scope=scope,
        )

    async def complete(self, *, browser: str, params: Mapping[str, str]) -> Connected:
        return await oauth_connect.complete(self.store, self.vault, self.settings, browser=browser, params=params)
