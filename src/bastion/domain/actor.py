"""Who is acting: a member through the API, or the local operator through the CLI."""

from __future__ import annotations

from dataclasses import dataclass

from bastion.domain.capabilities import ALL_CAPABILITIES, Capability, require
from bastion.errors import Forbidden
from bastion.types import MemberId, WorkspaceId


@dataclass(frozen=True, slots=True)
class Actor:
    workspace_id: WorkspaceId
    member_id: MemberId | None
    capabilities: frozenset[Capability]
    label: str

    @classmethod
    def local_operator(cls, workspace_id: WorkspaceId) -> Actor:
        """The person at the server's shell: the CLI runs with every capability, like a database superuser."""
        return cls(workspace_id=workspace_id, member_id=None, capabilities=ALL_CAPABILITIES, label="local operator")

    def require(self, capability: Capability) -> None:
        require(self.capabilities, capability)

    def require_any(self, *capabilities: Capability) -> None:
        """Raise Forbidden unless at least one of ``capabilities`` is held."""
        if not self.capabilities.intersection(capabilities):
            names = " or ".join(repr(c.value) for c in capabilities)
            raise Forbidden(f"this action needs the capability {names}")

    def can(self, capability: Capability) -> bool:
        return capability in self.capabilities
