"""Why connecting an upstream with OAuth stopped: one error type per refusal, each with a stable ``code``.

Messages speak to the person connecting (they end on a page) and never carry a token, code, verifier or
secret. Discovery and authorization-server problems are 502: the upstream's side is at fault; a stale or
foreign ``state`` is 400: the browser brought something Bastion will not accept.
"""

from __future__ import annotations

from bastion.errors import BastionError

__all__ = [
    "AuthorizationDeclined",
    "AuthorizationFailed",
    "DiscoveryFailed",
    "IssMismatch",
    "IssuerMismatch",
    "OAuthFlowError",
    "PkceUnsupported",
    "RegistrationFailed",
    "ResourceMismatch",
    "StateExpired",
    "StateOtherBrowser",
    "StateUnknown",
    "StateUsed",
]


class OAuthFlowError(BastionError):
    """Root of the refusals of the OAuth client flow."""

    code = "oauth_failed"
    status = 502
    title = "Could not connect with OAuth"


class DiscoveryFailed(OAuthFlowError):
    """The upstream's protected resource or authorization server metadata could not be found or read."""

    code = "oauth_discovery_failed"
    title = "OAuth discovery failed"


class ResourceMismatch(DiscoveryFailed):
    """The protected resource metadata names a resource other than the server's URL (RFC 9728 §3.3)."""

    code = "oauth_resource_mismatch"
    title = "OAuth resource mismatch"


class IssuerMismatch(DiscoveryFailed):
    """Authorization server metadata whose ``issuer`` is not the issuer it was looked up for (RFC 8414 §3.3)."""

    code = "oauth_metadata_mismatch"
    title = "OAuth metadata mismatch"


class PkceUnsupported(OAuthFlowError):
    """The authorization server does not advertise PKCE with S256; the MCP specification forbids going on."""

    code = "oauth_pkce_unsupported"
    title = "OAuth server without PKCE"


class RegistrationFailed(OAuthFlowError):
    """No way to be known to the authorization server: no pre-registered client, no CIMD, registration refused."""

    code = "oauth_registration_failed"
    title = "OAuth client registration failed"


class StateUnknown(OAuthFlowError):
    """The callback's ``state`` is missing or was never issued (or was cleaned up long ago)."""

    code = "oauth_state_unknown"
    status = 400
    title = "Unknown sign-in attempt"


class StateExpired(OAuthFlowError):
    code = "oauth_state_expired"
    status = 400
    title = "Sign-in attempt expired"


class StateUsed(OAuthFlowError):
    code = "oauth_state_used"
    status = 400
    title = "Sign-in attempt already used"


class StateOtherBrowser(OAuthFlowError):
    """The ``state`` was issued to another browser session: a forged or shared callback link."""

    code = "oauth_state_other_browser"
    status = 400
    title = "Sign-in attempt from another browser"


class IssMismatch(OAuthFlowError):
    """RFC 9207: the authorization response's ``iss`` is missing where required, or names another server."""

    code = "oauth_iss_mismatch"
    status = 400
    title = "Authorization response from the wrong server"


class AuthorizationDeclined(OAuthFlowError):
    """The person said no at the authorization server (``access_denied``)."""

    code = "oauth_declined"
    status = 400
    title = "Connection declined"


class AuthorizationFailed(OAuthFlowError):
    """The authorization server answered with an error, or the code could not be exchanged for tokens."""

    code = "oauth_authorization_failed"
    title = "Authorization failed"
