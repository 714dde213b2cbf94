"""Settings from the environment (`BASTION_` prefix) and a TOML file, with secrets checked before start."""

from __future__ import annotations

import base64
import binascii
import ipaddress
import os
import re
import secrets
import tomllib
from pathlib import Path
from typing import Any, Final, Literal
from urllib.parse import urlsplit

from pydantic import Field, SecretStr, field_validator
from pydantic_settings import BaseSettings, PydanticBaseSettingsSource, SettingsConfigDict

from bastion.errors import ConfigError

CONFIG_FILE_NAME: Final = "bastion.toml"
SQLITE_FILE_NAME: Final = "bastion.db"
MIN_SECRET_CHARS: Final = 32
MIN_SECRET_DISTINCT_CHARS: Final = 10
VAULT_KEY_BYTES: Final = 32
# Key ids are written into every ciphertext header, so they stay short and printable.
_VAULT_KEY_ID: Final = re.compile(r"^[A-Za-z0-9_-]{1,32}$")
DEFAULT_MAX_REQUEST_BODY_BYTES: Final = 4 * 1024 * 1024

# Values people paste from examples; any secret that contains one of these (case-folded, punctuation
# dropped) is refused.
_PLACEHOLDERS: Final = (
    "changeme",
    "replaceme",
    "placeholder",
    "example",
    "secret",
    "password",
    "default",
    "xxxxxxxx",
    "00000000",
    "12345678",
    "todo",
    "insecure",
)

SECRET_SETTINGS: Final = ("secret_key", "token_pepper", "audit_key")


def _env_name(field_name: str) -> str:
    return "BASTION_" + field_name.upper()


class _TomlFileSource(PydanticBaseSettingsSource):
    """Reads ``BASTION_CONFIG_FILE`` or ``{data_dir}/bastion.toml`` when it exists."""

    def __init__(self, settings_cls: type[BaseSettings], path: Path | None) -> None:
        super().__init__(settings_cls)
        self._data: dict[str, Any] = {}
        if path is not None and path.is_file():
            try:
                self._data = tomllib.loads(path.read_text(encoding="utf-8"))
            except tomllib.TOMLDecodeError as exc:
                raise ConfigError(f"{path} is not valid TOML: {exc}") from None

    def get_field_value(self, field: Any, field_name: str) -> tuple[Any, str, bool]:
        return self._data.get(field_name), field_name, False

    def __call__(self) -> dict[str, Any]:
        return {k: v for k, v in self._data.items() if k in self.settings_cls.model_fields}


class Settings(BaseSettings):
    """Every knob Bastion reads. Secrets are ``SecretStr`` so they never print."""

    model_config = SettingsConfigDict(env_prefix="BASTION_", extra="ignore", frozen=True)

    data_dir: Path = Path(".bastion")
    config_file: Path | None = None
    # A URL may carry the database password, so it stays out of repr() like the secrets.
    database_url: str | None = Field(default=None, repr=False)
    host: str = "127.0.0.1"
    port: int = Field(default=8080, ge=0, le=65535)
    public_url: str | None = None
    warm_cli: bool = Field(
        default=True,
        description="`serve` keeps a helper with the CLI imported, so `bastion` commands answer in a fraction of a "
        "second while it runs",
    )
    log_level: Literal["debug", "info", "warning", "error"] = "info"
    log_format: Literal["json", "text"] = "json"
    graceful_shutdown_s: float = Field(default=30.0, gt=0)
    max_request_body_bytes: int = Field(default=DEFAULT_MAX_REQUEST_BODY_BYTES, gt=0)
    head_timeout_s: float = Field(
        default=10.0,
        gt=0,
        description="Seconds a client has to send a request's head (request line and headers) once it has connected "
        "or begun the head; a slower one gets 408 and is closed",
    )
    max_connections: int = Field(
        default=1024,
        ge=1,
        description="Open client connections `serve` holds; at the bound the oldest one still sending its head (then "
        "the oldest idle one) makes room, and only when none can is a new one refused with 503",
    )
    allowed_hosts: list[str] = Field(
        default_factory=list[str],
        description="Host headers the MCP endpoint accepts besides loopback and BASTION_PUBLIC_URL's (`name:port`, "
        "`name:*`)",
    )
    allowed_origins: list[str] = Field(
        default_factory=list[str],
        description="Browser Origins the MCP endpoint accepts besides loopback and the public URL",
    )
    token_cache_ttl_s: float = Field(default=30.0, ge=0, le=3600)
    fast_path: bool = Field(
        default=True,
        description="Forward a tools/call to a Streamable HTTP upstream of the same era directly (same checks, "
        "same audit event) instead of through the SDK's server and client; `false` sends every call the full way",
    )
    upstream_idle_s: float = Field(default=300.0, gt=0)
    audit_mcp_calls: bool = Field(
        default=True,
        description="Write an audit event for every MCP request (fail closed). Turn off only to measure what the "
        "audit log costs (bench/): calls are then forwarded with no record of them",
    )
    audit_checkpoint_every: int = Field(
        default=1000, ge=1, description="A signed audit checkpoint each time the chain grows by this many events"
    )
    audit_stale_after_s: float = Field(
        default=7500.0,
        gt=0,
        description="A call still pending after this long was interrupted (its process died); longer than any call",
    )
    audit_open_timeout_s: float = Field(
        default=10.0,
        gt=0,
        description="How long a call waits for its audit event to be written before it is refused (fail closed)",
    )
    rate_limit_url: str = Field(
        default="memory://", description="Rate-limit counters: memory:// (one node) or redis://host:port/db (shared)"
    )
    upstream_max_sessions: int = Field(default=512, ge=1)
    upstream_concurrency: int = Field(default=64, ge=1, description="Concurrent calls per upstream server")
    upstream_queue: int = Field(
        default=256, ge=0, description="Calls that may wait for a slot per upstream server; more are refused at once"
    )
    token_max_lifetime_days: float | None = Field(
        default=None,
        gt=0,
        description="Longest lifetime of the access tokens (`bst_`) and host keys (`bsh_`) Bastion mints: one minted "
        "without an expiry gets this one, one asked to live longer is refused; unset, they live until revoked",
    )
    upstream_failures_to_open: int = Field(
        default=5,
        ge=1,
        description="Failures in a row (no connection, no session, timeout) after which an upstream server's calls "
        "are refused at once (-32052 upstream_failing with retryAfter) until a probe call succeeds",
    )
    upstream_open_s: float = Field(
        default=5.0, gt=0, description="How long a failing upstream's calls are refused before the first probe"
    )
    outbound_allow_loopback: bool = Field(
        default=False,
        description="Tests and local development only: let Bastion fetch http:// URLs and loopback addresses "
        "(upstreams, OAuth metadata and token endpoints)",
    )
    outbound_allowed_networks: list[str] = Field(
        default_factory=list[str],
        description="CIDR networks Bastion may fetch from although they are private (internal upstreams)",
    )

    session_idle_minutes: float = Field(
        default=120, ge=5, le=7 * 24 * 60, description="A web session unused this long is signed out"
    )
    session_max_hours: float = Field(
        default=24, ge=1, le=30 * 24, description="A web session ends this long after sign-in, used or not"
    )
    janitor_interval_s: float = Field(
        default=300.0,
        gt=0,
        le=24 * 3600,
        description="How often each process deletes expired enrollment drafts, OAuth states and web sessions",
    )
    oidc_issuer: str | None = Field(
        default=None, description="OpenID Connect provider for single sign-on (its issuer URL); unset: no SSO"
    )
    oidc_client_id: str | None = None
    oidc_client_secret: SecretStr | None = Field(default=None, description="Unset for a public client (PKCE only)")
    oidc_display_name: str = Field(default="single sign-on", max_length=60)
    oidc_allowed_domains: list[str] = Field(
        default_factory=list[str],
        description="People whose verified email is at one of these domains become members on first SSO sign-in",
    )

    secret_key: SecretStr | None = None
    token_pepper: SecretStr | None = None
    audit_key: SecretStr | None = None
    vault_keys: SecretStr | None = Field(default=None, description="key_id=base64(32 bytes), comma separated")
    vault_primary_key_id: str | None = None

    @field_validator("outbound_allowed_networks")
    @classmethod
    def _cidrs(cls, value: list[str]) -> list[str]:
        networks: list[str] = []
        for entry in value:
            try:
                networks.append(str(ipaddress.ip_network(entry.strip(), strict=True)))
            except ValueError:
                raise ValueError(
                    f"{entry!r} is not a network in CIDR form like 10.0.0.0/8 or fd00::/8 (host bits must be zero)"
                ) from None
        return networks

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        return (init_settings, env_settings, _TomlFileSource(settings_cls, config_path_from_env()))

    @property
    def resolved_config_file(self) -> Path:
        return self.config_file or self.data_dir / CONFIG_FILE_NAME

    @property
    def resolved_database_url(self) -> str:
        return self.database_url or f"sqlite+aiosqlite:///{(self.data_dir / SQLITE_FILE_NAME).resolve()}"

    @property
    def base_url(self) -> str:
        """Where people and agents reach Bastion, without a trailing slash: the base of every link it hands out.

        ``BASTION_PUBLIC_URL`` when set; otherwise the address ``serve`` listens on (loopback when it listens on
        every address), so a local Bastion's links and OAuth redirect URI work without configuration.
        """
        if self.public_url:
            return self.public_url.rstrip("/")
        host = {"0.0.0.0": "127.0.0.1", "::": "127.0.0.1", "": "127.0.0.1"}.get(self.host, self.host)  # noqa: S104
        if ":" in host:
            host = f"[{host}]"  # an IPv6 literal
        return f"http://{host}:{self.port}"

    def mcp_allowed_hosts(self) -> list[str]:
        hosts = ["127.0.0.1:*", "localhost:*", "[::1]:*", *self.allowed_hosts]
        if self.public_url:
            parts = urlsplit(self.public_url)
            if parts.hostname:
                hosts += [parts.netloc, f"{parts.hostname}:*", parts.hostname]
        return hosts

    def mcp_allowed_origins(self) -> list[str]:
        origins = ["http://127.0.0.1:*", "http://localhost:*", "http://[::1]:*", *self.allowed_origins]
        if self.public_url:
            parts = urlsplit(self.public_url)
            origins.append(f"{parts.scheme}://{parts.netloc}")
        return origins

    @property
    def embedded(self) -> bool:
        """True when the database is SQLite: one process, secrets may be generated on first start."""
        return self.resolved_database_url.startswith("sqlite")

    def vault_keyring(self) -> dict[str, bytes]:
        """Parsed keyring; call ``check_secrets`` first for friendly errors."""
        return _parse_keyring(self.vault_keys.get_secret_value() if self.vault_keys else "")


def config_path_from_env() -> Path | None:
    explicit = os.environ.get("BASTION_CONFIG_FILE")
    if explicit:
        return Path(explicit)
    return Path(os.environ.get("BASTION_DATA_DIR", ".bastion")) / CONFIG_FILE_NAME


def load_settings(**overrides: Any) -> Settings:
    """Build settings; a malformed value becomes a ConfigError that names the variable."""
    from pydantic import ValidationError

    try:
        return Settings(**overrides)
    except ValidationError as exc:
        problems = "; ".join(
            f"{_env_name(str(err['loc'][0]))}: {err['msg']}" if err["loc"] else err["msg"] for err in exc.errors()
        )
        raise ConfigError(f"invalid settings: {problems}") from None


def _parse_keyring(raw: str) -> dict[str, bytes]:
    keyring: dict[str, bytes] = {}
    for entry in (part.strip() for part in raw.split(",")):
        if not entry:
            continue
        key_id, sep, encoded = entry.partition("=")
        key_id = key_id.strip()
        if not sep or not key_id:
            raise ConfigError("BASTION_VAULT_KEYS entries must look like key_id=base64key")
        if not _VAULT_KEY_ID.fullmatch(key_id):
            raise ConfigError(f"BASTION_VAULT_KEYS key id {key_id!r} must be 1-32 letters, digits, '-' or '_'")
        if key_id in keyring:
            raise ConfigError(f"BASTION_VAULT_KEYS names key {key_id!r} twice")
        try:
            key = base64.b64decode(encoded.strip(), validate=True)
        except (binascii.Error, ValueError):
            raise ConfigError(f"BASTION_VAULT_KEYS key {key_id!r} is not valid base64") from None
        if len(key) != VAULT_KEY_BYTES:
            raise ConfigError(f"BASTION_VAULT_KEYS key {key_id!r} must be {VAULT_KEY_BYTES} bytes, got {len(key)}")
        if len(set(key)) < VAULT_KEY_BYTES // 4:
            raise ConfigError(f"BASTION_VAULT_KEYS key {key_id!r} is not random (too few distinct bytes)")
        if key in keyring.values():
            raise ConfigError(f"BASTION_VAULT_KEYS key {key_id!r} reuses the bytes of another key")
        keyring[key_id] = key
    return keyring


def _secret_problem(name: str, value: SecretStr | None) -> str | None:
    env = _env_name(name)
    if value is None or not value.get_secret_value().strip():
        return f"{env} is missing"
    raw = value.get_secret_value()
    # "Change_Me", "replace-me" and "changeme" are the same placeholder.
    folded = re.sub(r"[^a-z0-9]", "", raw.lower())
    if any(p in folded for p in _PLACEHOLDERS):
        return f"{env} looks like a placeholder (use a random value)"
    if len(raw) < MIN_SECRET_CHARS:
        return f"{env} is too short ({len(raw)} characters, at least {MIN_SECRET_CHARS})"
    if len(set(raw)) < MIN_SECRET_DISTINCT_CHARS:
        return f"{env} is not random enough (too few distinct characters)"
    return None


def check_secrets(settings: Settings) -> None:
    """Refuse missing, placeholder, short or reused secrets, naming each setting at fault.

    Raises:
        ConfigError: with one line per problem and how to fix it.
    """
    problems: list[str] = []  # joined with "; ", so none may contain one
    for name in SECRET_SETTINGS:
        problem = _secret_problem(name, getattr(settings, name))
        if problem:
            problems.append(problem)
    keyring: dict[str, bytes] = {}
    if settings.vault_keys is None or not settings.vault_keys.get_secret_value().strip():
        problems.append("BASTION_VAULT_KEYS is missing")
    else:
        try:
            keyring = settings.vault_keyring()
        except ConfigError as exc:
            problems.append(exc.detail)
    if keyring:
        if not settings.vault_primary_key_id:
            problems.append("BASTION_VAULT_PRIMARY_KEY_ID is missing")
        elif settings.vault_primary_key_id not in keyring:
            problems.append(
                f"BASTION_VAULT_PRIMARY_KEY_ID names key {settings.vault_primary_key_id!r}, "
                "which is not in BASTION_VAULT_KEYS"
            )
    # One leaked value must not unlock two purposes.
    seen: dict[bytes, str] = {}
    for name in SECRET_SETTINGS:
        value: SecretStr | None = getattr(settings, name)
        if value is None or not value.get_secret_value().strip():
            continue  # already reported as missing
        raw = value.get_secret_value().encode("utf-8")
        if raw in seen:
            problems.append(f"{_env_name(name)} reuses the value of {_env_name(seen[raw])} (each secret must differ)")
        seen.setdefault(raw, name)
    problems += _oidc_problems(settings)
    if problems:
        hint = "run `bastion init` to generate them into the data directory, or set them in the environment"
        raise ConfigError("refusing to start: " + "; ".join(problems) + f" ({hint})")


def _oidc_problems(settings: Settings) -> list[str]:
    """Single sign-on is all set or all unset, over https, with a client secret unlike Bastion's own secrets."""
    if not settings.oidc_issuer:
        stray = [n for n in ("oidc_client_id", "oidc_client_secret") if getattr(settings, n)]
        return [f"{_env_name(n)} is set but BASTION_OIDC_ISSUER is not" for n in stray]
    problems: list[str] = []
    issuer = urlsplit(settings.oidc_issuer)
    loopback = issuer.hostname in ("127.0.0.1", "localhost", "::1")
    if not issuer.hostname or not (issuer.scheme == "https" or (issuer.scheme == "http" and loopback)):
        problems.append("BASTION_OIDC_ISSUER must be an https URL")
    if not settings.oidc_client_id:
        problems.append("BASTION_OIDC_CLIENT_ID is missing (BASTION_OIDC_ISSUER is set)")
    secret = settings.oidc_client_secret.get_secret_value() if settings.oidc_client_secret else ""
    if secret:
        ours = [
            n for n in SECRET_SETTINGS if (v := getattr(settings, n)) is not None and v.get_secret_value() == secret
        ]
        if ours:
            problems.append(f"BASTION_OIDC_CLIENT_SECRET reuses the value of {_env_name(ours[0])}")
    return problems


def _random_secret() -> str:
    # A random value can spell a placeholder word ("todo", "secret") by chance; draw again rather than
    # write a file the next start refuses.
    while True:
        value = secrets.token_urlsafe(48)
        if _secret_problem("secret_key", SecretStr(value)) is None:
            return value


def generate_secrets() -> dict[str, str]:
    """Fresh values for every secret setting, as they are written to bastion.toml."""
    key_id = "k" + secrets.token_hex(4)
    return {
        "secret_key": _random_secret(),
        "token_pepper": _random_secret(),
        "audit_key": _random_secret(),
        "vault_keys": f"{key_id}={base64.b64encode(secrets.token_bytes(VAULT_KEY_BYTES)).decode('ascii')}",
        "vault_primary_key_id": key_id,
    }
