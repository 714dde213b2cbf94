"""bastion-agent: the agent side of Bastion.

- ``TokenMap`` (Map 1): person -> access token, in SQLite or PostgreSQL, tokens sealed with AES-256-GCM.
- ``WebhookReceiver``: an ASGI app that verifies Bastion's Standard Webhooks deliveries, deduplicates them, redeems
  claim codes and keeps the map up to date, in any delivery order.
- ``Agent.as_user(email)``: an official ``mcp`` client to the gateway, authenticated as that person.
"""

from __future__ import annotations

from bastion_agent._agent import Agent
from bastion_agent._claims import ClaimRedeemer
from bastion_agent._crypto import TokenCipher, generate_key
from bastion_agent._errors import (
    Ambiguous,
    BastionAgentError,
    ClaimFailed,
    Disabled,
    GatewayRefused,
    NotEnrolled,
    SealError,
    WebhookRejected,
)
from bastion_agent._events import Event, Member, parse_event
from bastion_agent._map import Applied, Credential, Delivered, Enrollment, TokenMap
from bastion_agent._receiver import EventHook, WebhookReceiver
from bastion_agent._signing import Verified, WebhookVerifier, sign

__version__ = "0.1.0"

__all__ = [
    "Agent",
    "Ambiguous",
    "Applied",
    "BastionAgentError",
    "ClaimFailed",
    "ClaimRedeemer",
    "Credential",
    "Delivered",
    "Disabled",
    "Enrollment",
    "Event",
    "EventHook",
    "GatewayRefused",
    "Member",
    "NotEnrolled",
    "SealError",
    "TokenCipher",
    "TokenMap",
    "Verified",
    "WebhookReceiver",
    "WebhookRejected",
    "WebhookVerifier",
    "__version__",
    "generate_key",
    "parse_event",
    "sign",
]
