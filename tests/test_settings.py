"""Settings: where they come from, and the secret checks that stop a weak install from starting."""

from __future__ import annotations

import base64
import json
import os
import secrets
import stat
from pathlib import Path
from typing import Any

import pytest

from bastion.cli import boot
from bastion.errors import ConfigError
from bastion.settings import Settings, check_secrets, generate_secrets, load_settings
from tests.processes import clean_env, run_bastion


@pytest.fixture(autouse=True)
def isolated_environment(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Path:
    """No BASTION_ variable leaks in from the outside; the data directory is this test's own."""
    for name in list(os.environ):
        if name.startswith("BASTION_"):
            monkeypatch.delenv(name)
    monkeypatch.chdir(tmp_path)
    data_dir = tmp_path / "data"
    monkeypatch.setenv("BASTION_DATA_DIR", str(data_dir))
    return data_dir


def _key(raw: bytes | None = None) -> str:
    return base64.b64encode(raw if raw is not None else secrets.token_bytes(32)).decode("ascii")


def _problems(error: ConfigError) -> list[str]:
    """The individual complaints inside one 'refusing to start: a; b (hint)' message."""
    detail = error.detail
    assert detail.startswith("refusing to start: "), detail
    body = detail.removeprefix("refusing to start: ").rsplit(" (run `bastion init`", 1)[0]
    return body.split("; ")


def _refusal(**overrides: Any) -> list[str]:
    values: dict[str, Any] = {**generate_secrets(), **overrides}
    with pytest.raises(ConfigError) as caught:
        check_secrets(load_settings(**values))
    return _problems(caught.value)


def test_generated_secrets_pass_the_checks() -> None:
    for _ in range(50):
        check_secrets(load_settings(**generate_secrets()))


def test_generated_secrets_differ_every_time() -> None:
    first, second = generate_secrets(), generate_secrets()
    assert all(first[k] != second[k] for k in ("secret_key", "token_pepper", "audit_key", "vault_keys"))


@pytest.mark.parametrize("setting", ["secret_key", "token_pepper", "audit_key"])
@pytest.mark.parametrize(
    ("value", "complaint"),
    [
        (None, "is missing"),
        ("", "is missing"),
        ("   ", "is missing"),
        ("changeme", "placeholder"),
        ("CHANGEME", "placeholder"),
        pytest.param("change-me-" + secrets.token_hex(20), "placeholder", id="change-me-random"),
        ("replace_me_with_something_long_and_random", "placeholder"),
        ("my-super-secret-value-for-production-use", "placeholder"),
        pytest.param(secrets.token_hex(8), "too short", id="random-short"),
        ("ab" * 32, "not random enough"),
        ("a" * 64, "not random enough"),
    ],
)
def test_a_missing_or_weak_secret_is_refused_naming_its_variable(
    setting: str, value: str | None, complaint: str
) -> None:
    problems = _refusal(**{setting: value})
    assert len(problems) == 1, problems
    assert problems[0].startswith(f"BASTION_{setting.upper()} ")
    assert complaint in problems[0]


@pytest.mark.parametrize(
    ("first", "second"), [("secret_key", "token_pepper"), ("token_pepper", "audit_key"), ("secret_key", "audit_key")]
)
def test_one_value_reused_for_two_purposes_is_refused(first: str, second: str) -> None:
    shared = secrets.token_urlsafe(48)
    problems = _refusal(**{first: shared, second: shared})
    assert problems == [
        f"BASTION_{second.upper()} reuses the value of BASTION_{first.upper()} (each secret must differ)"
    ]


def test_empty_secrets_are_reported_missing_not_reused() -> None:
    problems = _refusal(secret_key="", token_pepper="", audit_key="")
    assert problems == [
        "BASTION_SECRET_KEY is missing",
        "BASTION_TOKEN_PEPPER is missing",
        "BASTION_AUDIT_KEY is missing",
    ]


def test_two_vault_keys_with_the_same_bytes_are_refused() -> None:
    key = _key()
    problems = _refusal(vault_keys=f"k1={key},k2={key}", vault_primary_key_id="k1")
    assert len(problems) == 1
    assert problems[0].startswith("BASTION_VAULT_KEYS ") and "reuses the bytes" in problems[0]


def test_a_primary_key_id_outside_the_keyring_is_refused() -> None:
    problems = _refusal(vault_keys=f"k1={_key()}", vault_primary_key_id="k2")
    assert problems == ["BASTION_VAULT_PRIMARY_KEY_ID names key 'k2', which is not in BASTION_VAULT_KEYS"]


def test_a_keyring_without_a_primary_key_id_is_refused() -> None:
    assert _refusal(vault_primary_key_id=None) == ["BASTION_VAULT_PRIMARY_KEY_ID is missing"]


def test_a_missing_keyring_is_refused() -> None:
    assert _refusal(vault_keys=None) == ["BASTION_VAULT_KEYS is missing"]


@pytest.mark.parametrize(
    ("keyring", "complaint"),
    [
        ("just-some-text", "must look like key_id=base64key"),
        (f"={_key()}", "must look like key_id=base64key"),
        ("k1=not base64!", "is not valid base64"),
        (f"k1={_key(secrets.token_bytes(16))}", "must be 32 bytes, got 16"),
        (f"k1={_key(bytes(32))}", "is not random"),
        (f"k1={_key()},k1={_key()}", "names key 'k1' twice"),
        (f"k 1={_key()}", "must be 1-32 letters, digits"),
        (f"k|1={_key()}", "must be 1-32 letters, digits"),
    ],
    # Random keys in the values: stable ids, so every xdist worker collects the same tests.
    ids=["text", "empty-id", "not-base64", "16-bytes", "zero-key", "same-id-twice", "space-in-id", "bar-in-id"],
)
def test_a_malformed_keyring_entry_is_refused_naming_the_keyring(keyring: str, complaint: str) -> None:
    problems = _refusal(vault_keys=keyring, vault_primary_key_id="k1")
    assert len(problems) == 1, problems
    assert problems[0].startswith("BASTION_VAULT_KEYS ")
    assert complaint in problems[0]


def test_a_keyring_with_two_good_keys_and_a_primary_among_them_passes() -> None:
    settings = load_settings(
        **{**generate_secrets(), "vault_keys": f"old={_key()}, new={_key()}", "vault_primary_key_id": "new"}
    )
    check_secrets(settings)
    assert sorted(settings.vault_keyring()) == ["new", "old"]


def test_a_malformed_setting_names_its_variable(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("BASTION_PORT", "eighty")
    with pytest.raises(ConfigError, match="BASTION_PORT"):
        load_settings()


def test_the_config_file_is_read_from_the_data_directory(isolated_environment: Path) -> None:
    isolated_environment.mkdir()
    (isolated_environment / "bastion.toml").write_text('port = 9001\nlog_level = "debug"\n', encoding="utf-8")
    settings = load_settings()
    assert (settings.port, settings.log_level) == (9001, "debug")


def test_bastion_config_file_points_elsewhere_and_the_data_directory_file_is_ignored(
    isolated_environment: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    isolated_environment.mkdir()
    (isolated_environment / "bastion.toml").write_text("port = 9001\n", encoding="utf-8")
    elsewhere = tmp_path / "etc" / "bastion.toml"
    elsewhere.parent.mkdir()
    elsewhere.write_text("port = 9002\n", encoding="utf-8")
    monkeypatch.setenv("BASTION_CONFIG_FILE", str(elsewhere))
    settings = load_settings()
    assert settings.port == 9002
    assert settings.resolved_config_file == elsewhere


def test_the_environment_overrides_the_config_file(isolated_environment: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    isolated_environment.mkdir()
    generated = generate_secrets()
    (isolated_environment / "bastion.toml").write_text(
        f'port = 9001\nlog_level = "debug"\nsecret_key = "{generated["secret_key"]}"\n', encoding="utf-8"
    )
    from_env = secrets.token_urlsafe(48)
    monkeypatch.setenv("BASTION_PORT", "9100")
    monkeypatch.setenv("BASTION_SECRET_KEY", from_env)
    settings = load_settings()
    assert settings.port == 9100
    assert settings.log_level == "debug"
    assert settings.secret_key is not None and settings.secret_key.get_secret_value() == from_env


def test_a_config_file_that_is_not_toml_is_a_config_error_naming_the_file(isolated_environment: Path) -> None:
    isolated_environment.mkdir()
    (isolated_environment / "bastion.toml").write_text("port = = 1\n", encoding="utf-8")
    with pytest.raises(ConfigError, match=r"bastion\.toml is not valid TOML"):
        load_settings()


def test_secrets_and_the_database_password_stay_out_of_repr_and_str() -> None:
    generated = generate_secrets()
    settings = load_settings(**generated, database_url="postgresql://bastion:hunter2-db-password@db/bastion")
    for text in (repr(settings), str(settings)):
        for value in generated.values():
            if value != generated["vault_primary_key_id"]:
                assert value not in text
        assert base64.b64decode(generated["vault_keys"].split("=", 1)[1]).hex() not in text
        assert "hunter2-db-password" not in text
    assert "**********" in repr(settings)


def test_the_embedded_first_start_does_not_paper_over_a_weak_secret_from_the_environment(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("BASTION_TOKEN_PEPPER", "changeme")
    settings = load_settings()
    with pytest.raises(ConfigError, match="BASTION_TOKEN_PEPPER looks like a placeholder"):
        boot.prepare_files(settings, generate=True)


def test_init_writes_a_private_config_file_once_and_keeps_it(isolated_environment: Path, tmp_path: Path) -> None:
    env = clean_env(BASTION_DATA_DIR=str(isolated_environment))
    first = run_bastion("init", "--json", env=env, cwd=tmp_path)
    assert first.returncode == 0, first.stderr
    config = isolated_environment / "bastion.toml"
    assert json.loads(first.stdout)["config_file"] == str(config)
    assert stat.S_IMODE(config.stat().st_mode) == 0o600
    written = config.read_text(encoding="utf-8")

    second = run_bastion("init", "--json", env=env, cwd=tmp_path)
    assert second.returncode == 0, second.stderr
    assert json.loads(second.stdout)["config_file"] is None
    assert config.read_text(encoding="utf-8") == written
    assert stat.S_IMODE(config.stat().st_mode) == 0o600

    check_secrets(load_settings())  # what init wrote is what the next start reads, and it passes


def test_init_only_generates_what_the_environment_does_not_set(isolated_environment: Path) -> None:
    pepper = secrets.token_urlsafe(48)
    settings = load_settings(token_pepper=pepper)
    prepared, wrote = boot.prepare_files(settings, generate=True)
    assert wrote == isolated_environment / "bastion.toml"
    assert "token_pepper" not in wrote.read_text(encoding="utf-8")
    assert prepared.token_pepper is not None and prepared.token_pepper.get_secret_value() == pepper


_SHARED = secrets.token_urlsafe(48)


@pytest.mark.e2e
@pytest.mark.parametrize(
    ("weak", "expected"),
    [
        pytest.param(
            dict.fromkeys(("BASTION_SECRET_KEY", "BASTION_TOKEN_PEPPER", "BASTION_AUDIT_KEY"), "changeme"),
            ["BASTION_SECRET_KEY looks like a placeholder", "BASTION_AUDIT_KEY looks like a placeholder"],
            id="placeholders",
        ),
        pytest.param(
            dict.fromkeys(("BASTION_SECRET_KEY", "BASTION_TOKEN_PEPPER", "BASTION_AUDIT_KEY"), ""),
            ["BASTION_SECRET_KEY is missing", "BASTION_AUDIT_KEY is missing"],
            id="empty",
        ),
        pytest.param(
            {
                "BASTION_SECRET_KEY": _SHARED,
                "BASTION_TOKEN_PEPPER": _SHARED,
                "BASTION_AUDIT_KEY": secrets.token_urlsafe(48),
            },
            ["BASTION_TOKEN_PEPPER reuses the value of BASTION_SECRET_KEY"],
            id="duplicated",
        ),
    ],
)
def test_serve_on_postgres_with_weak_secrets_exits_non_zero_naming_the_variable(
    weak: dict[str, str], expected: list[str], pg_server_url: str, isolated_environment: Path, tmp_path: Path
) -> None:
    generated = generate_secrets()
    env = clean_env(
        BASTION_DATA_DIR=str(isolated_environment),
        BASTION_DATABASE_URL=pg_server_url,
        BASTION_VAULT_KEYS=generated["vault_keys"],
        BASTION_VAULT_PRIMARY_KEY_ID=generated["vault_primary_key_id"],
        **weak,
    )
    result = run_bastion("serve", "--port", "0", env=env, cwd=tmp_path)
    assert result.returncode != 0
    assert "Traceback" not in result.stderr
    message = " ".join(result.stderr.split())  # the console wraps long lines
    assert "refusing to start" in message
    for fragment in expected:
        assert fragment in message
    assert _SHARED not in result.stderr
    # Replicas on PostgreSQL share their secrets: none are invented on the spot.
    assert not (isolated_environment / "bastion.toml").exists()


@pytest.mark.parametrize(
    ("values", "expected"),
    [
        ({"public_url": "https://bastion.example.com/"}, "https://bastion.example.com"),
        ({"public_url": "https://bastion.example.com/base"}, "https://bastion.example.com/base"),
        ({}, "http://127.0.0.1:8080"),
        ({"host": "0.0.0.0", "port": 9000}, "http://127.0.0.1:9000"),  # noqa: S104
        ({"host": "::", "port": 9000}, "http://127.0.0.1:9000"),
        ({"host": "::1"}, "http://[::1]:8080"),
        ({"host": "bastion.internal", "port": 80}, "http://bastion.internal:80"),
    ],
)
def test_the_base_url_is_the_public_url_or_where_bastion_listens(values: dict[str, Any], expected: str) -> None:
    settings = Settings.model_construct(**values)  # these values alone: nothing from the environment
    assert settings.base_url == expected
    assert settings.public_url == values.get("public_url")  # the Host/Origin allowlists still read this alone
