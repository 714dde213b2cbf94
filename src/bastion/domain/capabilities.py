"""The capability catalogue and built-in roles. Deny by default."""

from __future__ import annotations

from enum import StrEnum
from typing import Final

from bastion.errors import Forbidden, ValidationFailed


class Capability(StrEnum):
    HOSTS_MANAGE = "hosts.manage"
    HOSTS_DISABLE_ENABLE = "hosts.disable_enable"
    TOKENS_MANAGE = "tokens.manage"
    CONNECTIONS_DISABLE_ENABLE = "connections.disable_enable"
    SERVERS_MANAGE = "servers.manage"
    GATEWAYS_MANAGE = "gateways.manage"
    IDENTITIES_MANAGE = "identities.manage"
    MEMBERS_MANAGE = "members.manage"
    ROLES_MANAGE = "roles.manage"
    AUDIT_VIEW_EXPORT = "audit.view_export"
    POLICIES_MANAGE = "policies.manage"
    ADMIN_VIEW = "admin.view"


CAPABILITY_LABELS: Final[dict[Capability, str]] = {
    Capability.HOSTS_MANAGE: "Create, edit and delete hosts",
    Capability.HOSTS_DISABLE_ENABLE: "Disable and enable hosts",
    Capability.TOKENS_MANAGE: "Create and manage API tokens",
    Capability.CONNECTIONS_DISABLE_ENABLE: "Disable and enable connections",
    Capability.SERVERS_MANAGE: "Create and manage MCP servers",
    Capability.GATEWAYS_MANAGE: "Create and manage gateways",
    Capability.IDENTITIES_MANAGE: "Manage other members' and global identities",
    Capability.MEMBERS_MANAGE: "Invite and manage members",
    Capability.ROLES_MANAGE: "Create and manage roles",
    Capability.AUDIT_VIEW_EXPORT: "View and export the audit log",
    Capability.POLICIES_MANAGE: "Manage policies, content rules and rate limits",
    Capability.ADMIN_VIEW: "View the workspace configuration (servers, gateways, hosts, members, roles)",
}

ALL_CAPABILITIES: Final = frozenset(Capability)

OWNER_ROLE: Final = "owner"
ADMIN_ROLE: Final = "admin"
MEMBER_ROLE: Final = "member"

BUILTIN_ROLES: Final[dict[str, tuple[str, frozenset[Capability]]]] = {
    OWNER_ROLE: ("Everything, including roles and other owners. Cannot be edited or removed.", ALL_CAPABILITIES),
    ADMIN_ROLE: (
        "Runs the gateway: servers, gateways, hosts, tokens, connections, members, audit.",
        ALL_CAPABILITIES - {Capability.ROLES_MANAGE},
    ),
    MEMBER_ROLE: ("Enrolls, manages their own identities and tokens.", frozenset()),
}

LOCKED_ROLES: Final = frozenset({OWNER_ROLE})


def parse_capabilities(values: list[str] | tuple[str, ...]) -> frozenset[Capability]:
    """Turn names into capabilities; an unknown name is an error, never ignored."""
    out: set[Capability] = set()
    for value in values:
        try:
            out.add(Capability(value))
        except ValueError:
            known = ", ".join(sorted(c.value for c in Capability))
            raise ValidationFailed(f"unknown capability {value!r}; known: {known}", field="capabilities") from None
    return frozenset(out)


def require(held: frozenset[Capability], needed: Capability) -> None:
    """Raise Forbidden unless ``needed`` is held."""
    if needed not in held:
        raise Forbidden(f"this action needs the capability {needed.value!r} ({CAPABILITY_LABELS[needed]})")
