"""Builds the long-lived parts from settings: the store, the key hasher, the vault and the token resolver."""

from __future__ import annotations

import functools
from dataclasses import dataclass
from datetime import timedelta
from typing import TYPE_CHECKING

from bastion.db.audit import ChainKeys
from bastion.db.store import Store
from bastion.services.apikeys import KeyHasher
from bastion.services.audit import AuditKeys
from bastion.settings import Settings, load_settings
from bastion.vault.crypto import Keyring
from bastion.vault.sealer import Vault

if TYPE_CHECKING:
    from bastion.net.outbound import OutboundPolicy

    # The data plane is imported by build() only: the CLI needs the store and the vault, not the proxy.
    from bastion.oauth.refresh import Refresher
    from bastion.oauth.revocation import Revoker
    from bastion.services.audit import Audit
    from bastion.services.directory import Directory
    from bastion.services.guard import Guard
    from bastion.services.principals import Resolver
    from bastion.services.proxy import Proxy
    from bastion.services.ratelimits import RateLimiter
    from bastion.upstream.pool import UpstreamPool


def keyring_from(settings: Settings) -> Keyring:
    if settings.vault_primary_key_id is None:
        raise ValueError("settings were not checked: vault_primary_key_id is missing")
    return Keyring(settings.vault_keyring(), settings.vault_primary_key_id)


def hasher_from(settings: Settings) -> KeyHasher:
    if settings.token_pepper is None:
        raise ValueError("settings were not checked: token_pepper is missing")
    return KeyHasher(settings.token_pepper.get_secret_value().encode("utf-8"))


def audit_keys_from(settings: Settings) -> AuditKeys:
    if settings.audit_key is None:
        raise ValueError("settings were not checked: audit_key is missing")
    return AuditKeys.from_secret(settings.audit_key.get_secret_value().encode("utf-8"))


def chain_keys_from(settings: Settings) -> ChainKeys:
    return audit_keys_from(settings).chain_keys(settings.audit_checkpoint_every)


def store_from(settings: Settings) -> Store:
    """The database handle, able to seal the audit events of what it commits and the secrets it keeps for later."""
    store = Store.from_url(settings.resolved_database_url, audit=chain_keys_from(settings), vault=vault_from(settings))

    @functools.cache
    def outbound() -> OutboundPolicy:  # built on first use: most CLI commands register no URL
        from bastion.net.outbound import OutboundPolicy

        return OutboundPolicy.from_settings(settings)

    store.outbound = outbound
    if settings.token_max_lifetime_days is not None:
        store.token_lifetime = timedelta(days=settings.token_max_lifetime_days)
    return store


def vault_from(settings: Settings) -> Vault:
    """A vault whose keyring is re-read from the environment and config file when it may have changed.

    Keys found there are added to the ones already known (none is ever dropped while running), and their
    primary takes over; settings given directly (tests, embedding) keep their keyring.
    """
    overrides = {
        k: getattr(settings, k) for k in settings.model_fields_set if k not in ("vault_keys", "vault_primary_key_id")
    }
    current = keyring_from(settings)

    def reload() -> Keyring:
        nonlocal current
        fresh = load_settings(**overrides)
        if fresh.vault_keys is None or fresh.vault_primary_key_id is None:
            return current
        keys = {**current.keys(), **fresh.vault_keyring()}
        current = Keyring(
            keys, fresh.vault_primary_key_id if fresh.vault_primary_key_id in keys else current.primary_id
        )
        return current

    return Vault(current, reload=reload)


@dataclass(frozen=True, slots=True)
class Parts:
    store: Store
    hasher: KeyHasher
    vault: Vault
    resolver: Resolver
    pool: UpstreamPool
    directory: Directory
    proxy: Proxy
    audit: Audit
    guard: Guard
    refresher: Refresher
    revoker: Revoker
    # Rate-limit counters shared by the gateway's rules and the sign-in pages' throttles (closed with the guard).
    limiter: RateLimiter

    async def close(self) -> None:
        self.proxy.close()
        await self.guard.close()
        self.directory.close()
        self.resolver.close()
        await self.store.close()


def build(settings: Settings, store: Store | None = None) -> Parts:
    from bastion.net.outbound import OutboundPolicy
    from bastion.oauth.refresh import Refresher
    from bastion.oauth.revocation import Revoker
    from bastion.services.audit import Audit
    from bastion.services.directory import Directory
    from bastion.services.guard import Guard
    from bastion.services.principals import Resolver
    from bastion.services.proxy import Proxy
    from bastion.services.ratelimits import RateLimiter
    from bastion.upstream.breaker import Breakers
    from bastion.upstream.pool import UpstreamPool

    if store is None:
        store = store_from(settings)
    elif store.audit is None:
        store.audit = chain_keys_from(settings)
    hasher = hasher_from(settings)
    vault = vault_from(settings)
    if store.vault is None:
        store.vault = vault  # webhook events seal the tokens they carry in the transaction that mints them
    pool = UpstreamPool(
        max_sessions=settings.upstream_max_sessions,
        idle_s=settings.upstream_idle_s,
        per_server_concurrency=settings.upstream_concurrency,
        per_server_queue=settings.upstream_queue,
        outbound=OutboundPolicy.from_settings(settings),
        breakers=Breakers(failures_to_open=settings.upstream_failures_to_open, open_s=settings.upstream_open_s),
    )
    directory = Directory(store)
    # Token endpoints and revocation endpoints are reached through the same outbound policy as upstreams.
    refresher = Refresher(store, vault, hasher, pool.outbound.client)
    audit_secret = audit_keys_from(settings)
    limiter = RateLimiter(settings.rate_limit_url)
    guard = Guard(store, limiter, audit_secret.content)
    return Parts(
        store,
        hasher,
        vault,
        Resolver(store, hasher, cache_ttl_s=settings.token_cache_ttl_s),
        pool,
        directory,
        Proxy(store, vault, pool, directory, guard, refresher=refresher, public_url=settings.base_url),
        Audit(
            store,
            audit_secret,
            checkpoint_every=settings.audit_checkpoint_every,
            stale_after_s=settings.audit_stale_after_s,
            open_timeout_s=settings.audit_open_timeout_s,
            enabled=settings.audit_mcp_calls,
        ),
        guard,
        refresher=refresher,
        revoker=Revoker(vault, pool.outbound.client),
        limiter=limiter,
    )
