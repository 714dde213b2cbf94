"""The SDK's errors: one root, a stable ``code`` on each, messages a person can act on and that never carry secrets."""

from __future__ import annotations

from typing import ClassVar, Literal

DisabledReason = Literal["connection_disabled", "host_disabled", "member_disabled", "gateway_disabled"]
NotEnrolledReason = Literal["unknown", "revoked", "no_token"]


class BastionAgentError(Exception):
    """Root of every error the SDK raises on purpose."""

    code: ClassVar[str] = "bastion_agent_error"


class NotEnrolled(BastionAgentError):
    """The person has no usable access token in the map: send them ``link`` to connect (again).

    ``reason`` is ``unknown`` (never enrolled here), ``revoked`` (their token was revoked) or ``no_token``
    (enrolled, but the token never reached the agent, e.g. its claim code could not be redeemed).
    """

    code: ClassVar[str] = "not_enrolled"

    def __init__(self, person: str, link: str | None, reason: NotEnrolledReason = "unknown") -> None:
        self.person = person
        self.link = link
        self.reason: NotEnrolledReason = reason
        why = {
            "unknown": "has not connected this agent",
            "revoked": "has no live access token any more (it was revoked)",
            "no_token": "connected, but their access token never reached this agent",
        }[reason]
        ask = f"; send them the connection link: {link}" if link else "; send them a connection link"
        super().__init__(f"{person} {why}{ask}")


class Disabled(BastionAgentError):
    """Bastion refuses calls for this person for now; their token stays in the map and works once re-enabled.

    ``reason`` says what an administrator disabled: the person's connection, the agent's host, the member or the
    gateway.
    """

    code: ClassVar[str] = "disabled"

    def __init__(self, person: str, reason: DisabledReason, detail: str | None = None) -> None:
        self.person = person
        self.reason: DisabledReason = reason
        what = {
            "connection_disabled": "their connection to this agent is disabled",
            "host_disabled": "this agent (its host) is disabled in Bastion",
            "member_disabled": "their Bastion account is disabled",
            "gateway_disabled": "the gateway is disabled",
        }[reason]
        tail = f" ({detail})" if detail else ""
        super().__init__(f"Bastion refuses calls for {person}: {what}{tail}; an administrator can re-enable it")


class Ambiguous(BastionAgentError):
    """The person is enrolled through several gateways and the call did not say which one."""

    code: ClassVar[str] = "ambiguous"

    def __init__(self, person: str, gateways: list[str]) -> None:
        self.person = person
        self.gateways = gateways
        super().__init__(f"{person} is enrolled through several gateways ({', '.join(gateways)}): name one")


class GatewayRefused(BastionAgentError):
    """The gateway refused the token for a reason the SDK has no better error for."""

    code: ClassVar[str] = "gateway_refused"

    def __init__(self, person: str, status: int, error: str | None) -> None:
        self.person = person
        self.status = status
        self.error = error
        super().__init__(f"the gateway refused the call for {person}: HTTP {status} {error or ''}".rstrip())


class ClaimFailed(BastionAgentError):
    """A claim code could not be redeemed. ``retryable`` tells a temporary failure from a final refusal."""

    code: ClassVar[str] = "claim_failed"

    def __init__(self, message: str, *, retryable: bool) -> None:
        self.retryable = retryable
        super().__init__(message)


class WebhookRejected(BastionAgentError):
    """A webhook delivery that does not verify: bad or missing signature, timestamp out of tolerance, bad headers."""

    code: ClassVar[str] = "webhook_rejected"


class SealError(BastionAgentError):
    """A sealed token that does not open: tampered, moved to another row, or sealed under a key not configured."""

    code: ClassVar[str] = "seal_error"
