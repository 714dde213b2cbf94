"""WWW-Authenticate parsing: the RFC 9110 grammar, the RFC 6750 parameters, and hostile input."""

from __future__ import annotations

import re

import pytest
from hypothesis import given
from hypothesis import strategies as st

from bastion.oauth.challenge import Challenge, bearer_challenge, parse_www_authenticate


def test_a_bearer_challenge_gives_its_parameters_with_quotes_and_escapes_removed() -> None:
    header = (
        'Bearer realm="mcp", error="insufficient_scope", scope="files:read  files:write", '
        'resource_metadata="https://a.example/.well-known/oauth-protected-resource/mcp", '
        'error_description="say \\"please\\""'
    )
    (found,) = parse_www_authenticate([header])
    assert found.scheme == "bearer"
    assert found.error == "insufficient_scope"
    assert found.scope == "files:read files:write"
    assert found.resource_metadata == "https://a.example/.well-known/oauth-protected-resource/mcp"
    assert found.param("ERROR_DESCRIPTION") == 'say "please"'


def test_unquoted_values_and_odd_spacing_are_read() -> None:
    (found,) = parse_www_authenticate(["bearer   error = invalid_token ,scope=mcp:basic"])
    assert (found.error, found.scope) == ("invalid_token", "mcp:basic")


def test_several_challenges_in_one_header_and_across_headers_keep_their_order() -> None:
    found = parse_www_authenticate(
        ['Newauth realm="apps", type=1, title="Login to \\"apps\\"", Basic realm="simple"', "Bearer scope=a"]
    )
    assert [c.scheme for c in found] == ["newauth", "basic", "bearer"]
    assert found[0].params == {"realm": "apps", "type": "1", "title": 'Login to "apps"'}
    assert bearer_challenge(["Basic realm=x", 'Bearer scope="b c"']) == Challenge("bearer", {"scope": "b c"})


def test_a_token68_challenge_and_a_bare_scheme_are_challenges_without_parameters() -> None:
    found = parse_www_authenticate(["Negotiate abc123+/==, Bearer"])
    assert found == [Challenge("negotiate", {}, "abc123+/=="), Challenge("bearer", {})]


def test_a_repeated_parameter_keeps_its_first_value() -> None:
    (found,) = parse_www_authenticate(['Bearer scope="first", scope="second"'])
    assert found.scope == "first"


def test_commas_inside_quoted_strings_do_not_split_challenges() -> None:
    (found,) = parse_www_authenticate(['Bearer error_description="a, Basic b=c", scope="x"'])
    assert found.param("error_description") == "a, Basic b=c"
    assert found.scope == "x"


@pytest.mark.parametrize(
    "header",
    ['Bearer scope="unterminated', "Bearer ===", ", , ,", '"quoted" Bearer', "Bearer a=,b=c", "=", "Bearer \x00 x"],
)
def test_malformed_headers_are_read_as_far_as_they_go(header: str) -> None:
    for challenge in parse_www_authenticate([header]):
        assert re.fullmatch(r"[!#$%&'*+\-.^_`|~0-9a-z]+", challenge.scheme)


def test_no_bearer_challenge_is_none() -> None:
    assert bearer_challenge(['Basic realm="x"']) is None
    assert bearer_challenge([]) is None


_TOKEN = st.text(alphabet="abcdefghijklmnopqrstuvwxyz0123456789-_.", min_size=1, max_size=12)
_VALUE = st.text(alphabet=st.characters(min_codepoint=32, max_codepoint=126), max_size=40)


@given(st.text(max_size=300))
def test_any_text_parses_without_error(header: str) -> None:
    parse_www_authenticate([header])


@given(st.dictionaries(_TOKEN, _VALUE, min_size=1, max_size=6))
def test_quoted_parameters_come_back_as_written(params: dict[str, str]) -> None:
    def quoted(value: str) -> str:
        return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'

    header = "Bearer " + ", ".join(f"{name}={quoted(value)}" for name, value in params.items())
    (found,) = parse_www_authenticate([header])
    assert found.params == params
