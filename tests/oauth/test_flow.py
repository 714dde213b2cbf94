"""The flow's pure decisions: scope selection, step-up, the authorization URL and the RFC 9207 callback check."""

from __future__ import annotations

from urllib.parse import parse_qs, urlsplit

import pytest

from bastion.oauth import pkce
from bastion.oauth.challenge import Challenge
from bastion.oauth.errors import AuthorizationDeclined, AuthorizationFailed, IssMismatch
from bastion.oauth.flow import authorization_url, code_from_callback, select_scope, step_up_scope, union_scopes
from bastion.oauth.metadata import AuthServerMetadata

AS = AuthServerMetadata("https://as.example", "https://as.example/authorize?tenant=1", "https://as.example/token")
AS_OFFLINE = AuthServerMetadata(
    "https://as.example", "https://as.example/a", "https://as.example/t", scopes_supported=("x", "offline_access")
)


def test_scope_comes_from_the_challenge_then_configuration_then_scopes_supported_else_is_left_out() -> None:
    challenge = Challenge("bearer", {"scope": "from:challenge"})

    def chosen(
        challenge: Challenge | None, configured: tuple[str, ...], resource: tuple[str, ...] | None
    ) -> str | None:
        return select_scope(
            requested=None, challenge=challenge, configured=configured, resource_scopes=resource, server=AS
        )

    assert chosen(challenge, ("c",), ("r",)) == "from:challenge"
    assert chosen(None, ("c1", "c2"), ("r",)) == "c1 c2"
    assert chosen(Challenge("bearer"), (), ("r", "s")) == "r s"
    assert chosen(None, (), None) is None
    assert select_scope(requested="explicit", challenge=challenge, configured=(), resource_scopes=None, server=AS) == (
        "explicit"
    )


def test_offline_access_is_added_only_when_the_server_lists_it_and_a_scope_is_asked_for() -> None:
    assert select_scope(requested=None, challenge=None, configured=(), resource_scopes=("x",), server=AS_OFFLINE) == (
        "x offline_access"
    )
    assert select_scope(requested=None, challenge=None, configured=(), resource_scopes=None, server=AS_OFFLINE) is None
    assert select_scope(requested=None, challenge=None, configured=(), resource_scopes=("x",), server=AS) == "x"


def test_step_up_asks_for_the_union_and_never_again_for_what_was_granted() -> None:
    wanted = Challenge("bearer", {"error": "insufficient_scope", "scope": "mcp:write"})
    assert step_up_scope(wanted, "mcp:basic") == "mcp:basic mcp:write"
    assert step_up_scope(wanted, None) == "mcp:write"
    assert step_up_scope(wanted, "mcp:write mcp:basic") is None
    assert step_up_scope(Challenge("bearer", {"error": "invalid_token", "scope": "x"}), "y") is None
    assert step_up_scope(Challenge("bearer", {"error": "insufficient_scope"}), "y") is None
    assert step_up_scope(None, "y") is None
    assert union_scopes("a b", "b c a d") == "a b c d"
    assert union_scopes(None, " ") is None


def test_the_authorization_url_carries_pkce_s256_resource_and_state_and_keeps_the_endpoint_query() -> None:
    verifier = pkce.new_verifier()
    url = authorization_url(
        AS,
        client_id="cid",
        redirect_uri="https://b.example/oauth/callback",
        state="st",
        code_verifier=verifier,
        scope="a b",
        resource="https://h.example/mcp",
    )
    parts = urlsplit(url)
    query = {k: v[0] for k, v in parse_qs(parts.query).items()}
    assert (parts.scheme, parts.netloc, parts.path) == ("https", "as.example", "/authorize")
    assert query == {
        "tenant": "1",
        "response_type": "code",
        "client_id": "cid",
        "redirect_uri": "https://b.example/oauth/callback",
        "state": "st",
        "code_challenge": pkce.challenge_of(verifier),
        "code_challenge_method": "S256",
        "resource": "https://h.example/mcp",
        "scope": "a b",
    }
    assert verifier not in url


def test_pkce_challenge_is_the_rfc_7636_example() -> None:
    # RFC 7636 appendix B.
    assert (
        pkce.challenge_of("dBjftJeZ4CVP-mB92K27uhbUJU1p1r_wW1gFWFOEjXk")
        == "E9Melhoa2OwvFrEMTJguCHaoeK1t8URWbuGJSstw-cM"
    )
    assert len(pkce.new_verifier()) == 43 and pkce.new_verifier() != pkce.new_verifier()


ISSUER = "https://as.example"


@pytest.mark.parametrize(
    ("params", "required"),
    [
        ({"code": "c", "iss": ISSUER}, True),
        ({"code": "c", "iss": ISSUER}, False),
        ({"code": "c"}, False),
    ],
)
def test_a_callback_from_the_recorded_issuer_gives_its_code(params: dict[str, str], required: bool) -> None:
    assert code_from_callback(params, issuer=ISSUER, iss_required=required) == "c"


@pytest.mark.parametrize(
    ("params", "required"),
    [
        ({"code": "c"}, True),  # advertised but missing
        ({"code": "c", "iss": "https://evil.example"}, True),
        ({"code": "c", "iss": "https://evil.example"}, False),  # present though not advertised: still compared
        ({"code": "c", "iss": ISSUER + "/"}, True),  # no normalisation
        ({"code": "c", "iss": "HTTPS://AS.EXAMPLE"}, False),
        ({"error": "access_denied", "iss": "https://evil.example"}, False),  # checked before the error
    ],
)
def test_a_callback_from_anywhere_else_is_refused(params: dict[str, str], required: bool) -> None:
    with pytest.raises(IssMismatch):
        code_from_callback(params, issuer=ISSUER, iss_required=required)


def test_errors_of_the_authorization_server_are_told_apart() -> None:
    with pytest.raises(AuthorizationDeclined, match="you declined"):
        code_from_callback({"error": "access_denied"}, issuer=ISSUER, iss_required=False)
    with pytest.raises(AuthorizationFailed, match="server_error \\(down\\)"):
        code_from_callback({"error": "server_error", "error_description": "down\n"}, issuer=ISSUER, iss_required=False)
    with pytest.raises(AuthorizationFailed, match="no authorization code"):
        code_from_callback({"iss": ISSUER}, issuer=ISSUER, iss_required=True)
