"""Shared type aliases: the vocabulary every layer speaks."""

from __future__ import annotations

import json
from typing import Any, NewType, TypeAlias, cast

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


def json_object(raw: str | bytes) -> dict[str, Any] | None:
    """``raw`` parsed, when it is a JSON object; None for anything else (not JSON, too deep, another type)."""
    try:
        parsed: Any = json.loads(raw)
    except (ValueError, RecursionError):
        return None
    return cast("dict[str, Any]", parsed) if isinstance(parsed, dict) else None
