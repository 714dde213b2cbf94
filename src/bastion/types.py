"""Shared type aliases: the vocabulary every layer speaks."""

from __future__ import annotations

from typing import NewType, TypeAlias

WorkspaceId = NewType("WorkspaceId", str)
MemberId = NewType("MemberId", str)
RoleId = NewType("RoleId", str)
ServerId = NewType("ServerId", str)
GatewayId = NewType("GatewayId", str)
HostId = NewType("HostId", str)
ApiKeyId = NewType("ApiKeyId", str)

JSONScalar: TypeAlias = str | int | float | bool | None
JSONValue: TypeAlias = JSONScalar | list["JSONValue"] | dict[str, "JSONValue"]
JSONObject: TypeAlias = dict[str, JSONValue]
