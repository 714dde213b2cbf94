"""Single sign-on settings are checked before start: all set or unset, https, and a secret of its own."""

from __future__ import annotations

from typing import Any

import pytest
from pydantic import SecretStr

from bastion.errors import ConfigError
from bastion.settings import Settings, check_secrets, generate_secrets


def _settings(**oidc: Any) -> Settings:
    return Settings(**generate_secrets(), **oidc)  # type: ignore[arg-type]


def test_a_complete_sso_configuration_passes() -> None:
    check_secrets(_settings(oidc_issuer="https://login.example.com", oidc_client_id="bastion"))
    check_secrets(_settings(oidc_issuer="http://127.0.0.1:8081", oidc_client_id="bastion"))  # loopback development


@pytest.mark.parametrize(
    ("oidc", "problem"),
    [
        ({"oidc_client_id": "bastion"}, "BASTION_OIDC_CLIENT_ID is set but BASTION_OIDC_ISSUER is not"),
        ({"oidc_issuer": "https://login.example.com"}, "BASTION_OIDC_CLIENT_ID is missing"),
        ({"oidc_issuer": "http://login.example.com", "oidc_client_id": "b"}, "must be an https URL"),
        ({"oidc_issuer": "login.example.com", "oidc_client_id": "b"}, "must be an https URL"),
    ],
)
def test_an_incomplete_or_insecure_sso_configuration_is_refused(oidc: dict[str, Any], problem: str) -> None:
    with pytest.raises(ConfigError, match=problem):
        check_secrets(_settings(**oidc))


def test_the_client_secret_may_not_reuse_one_of_bastions_own() -> None:
    secrets = generate_secrets()
    settings = Settings(
        **secrets,  # type: ignore[arg-type]
        oidc_issuer="https://login.example.com",
        oidc_client_id="bastion",
        oidc_client_secret=SecretStr(secrets["token_pepper"]),
    )
    with pytest.raises(ConfigError, match="BASTION_OIDC_CLIENT_SECRET reuses the value of BASTION_TOKEN_PEPPER"):
        check_secrets(settings)
    assert secrets["token_pepper"] not in repr(settings)
