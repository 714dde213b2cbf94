"""What a person may set on each admin object, and the rules that make a set of values valid.

Create and update share one path: an update applies its changes onto the current spec with
``dataclasses.replace`` and the result is validated like a new object.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass, field, fields, replace
from enum import StrEnum
from typing import Any, Final, Protocol, Self, TypeVar

from bastion.domain import naming
from bastion.domain.capabilities import Capability
from bastion.domain.models import (
    AuthKind,
    IdentityScheme,
    MemberStatus,
    OAuthClientSettings,
    OAuthRegistration,
    ProtocolEra,
    Provisioning,
    ProvisionMode,
    Transport,
)
from bastion.errors import Conflict, ValidationFailed

DESCRIPTION_MAX_CHARS: Final = 1000
MAX_TIMEOUT_S: Final = 3600.0
MAX_ARGS: Final = 64
MAX_ARG_CHARS: Final = 4096
MAX_ENV: Final = 64
MAX_SELECTED: Final = 1000
MAX_GATEWAY_SERVERS: Final = 50
MAX_SCOPES: Final = 50
ENV_NAME_MAX_CHARS: Final = 64
_ENV_NAME_RE: Final = re.compile(rf"[A-Za-z_][A-Za-z0-9_]{{0,{ENV_NAME_MAX_CHARS - 1}}}")
# What a loader or runtime reads to decide what the command runs: a person's token never goes there.
RUNTIME_ENV: Final = frozenset({"PATH", "NODE_OPTIONS", "NODE_PATH", "PYTHONPATH", "PYTHONHOME", "PYTHONSTARTUP"})
RUNTIME_ENV_PREFIXES: Final = ("LD_", "DYLD_")

Spec = TypeVar("Spec")


class Checked(Protocol):
    def validated(self) -> Self: ...


Valid = TypeVar("Valid", bound=Checked)
E = TypeVar("E", bound=StrEnum)


def choice(enum: type[E], value: object, *, field: str) -> E:
    """``value`` as a member of ``enum``; anything else is a clear validation error listing the choices."""
    try:
        return enum(value)
    except ValueError:
        options = ", ".join(m.value for m in enum)
        raise ValidationFailed(f"{field} must be one of: {options}", field=field) from None


def apply_changes(spec: Spec, changes: Mapping[str, Any]) -> Spec:
    """``spec`` with ``changes`` applied; a name that is not a field of the spec is refused."""
    known = {f.name for f in fields(spec)}  # type: ignore[arg-type]
    for key in changes:
        if key not in known:
            raise ValidationFailed(f"unknown field {key!r}", field=key)
    return replace(spec, **changes)  # type: ignore[type-var]


def validated_change(spec: Valid, changes: Mapping[str, Any]) -> Valid:
    """``spec`` with ``changes`` applied and validated. A change that is fine by itself but does not fit a setting
    it leaves alone (a stdio transport for a server using OAuth) conflicts with the stored state: Conflict (409)
    naming that setting, rather than ValidationFailed (422), which is about the request's own input."""
    try:
        return apply_changes(spec, changes).validated()
    except ValidationFailed as exc:
        touched = exc.field is None or re.split(r"[.\[]", exc.field, maxsplit=1)[0] in changes
        if touched:
            raise
        raise Conflict(f"{exc.detail} (a setting this change leaves as it is)", field=exc.field) from None


def description(value: str, *, field: str = "description") -> str:
    cleaned = value.strip()
    if len(cleaned) > DESCRIPTION_MAX_CHARS:
        raise ValidationFailed(f"{field} must be at most {DESCRIPTION_MAX_CHARS} characters", field=field)
    return cleaned


@dataclass(frozen=True, slots=True)
class RoleSpec:
    name: str
    description: str = ""
    capabilities: frozenset[Capability] = frozenset()

    def validated(self) -> RoleSpec:
        return RoleSpec(naming.slug(self.name, field="name"), description(self.description), self.capabilities)


@dataclass(frozen=True, slots=True)
class MemberSpec:
    email: str
    name: str
    role: str = "member"
    status: MemberStatus = MemberStatus.ACTIVE

    def validated(self) -> MemberSpec:
        status = choice(MemberStatus, self.status, field="status")
        return MemberSpec(naming.email(self.email), naming.display_name(self.name), self.role, status)


@dataclass(frozen=True, slots=True)
class ServerSpec:
    name: str
    transport: Transport
    url: str | None = None
    command: str | None = None
    args: tuple[str, ...] = ()
    env: Mapping[str, str] = field(default_factory=dict[str, str])
    description: str = ""
    auth_kind: AuthKind = AuthKind.NONE
    oauth: OAuthClientSettings | None = None
    era: ProtocolEra = ProtocolEra.AUTO
    connect_timeout_s: float = 5.0
    call_timeout_s: float = 60.0
    token_env: str | None = None

    def validated(self) -> ServerSpec:
        name = naming.server_name(self.name)
        self = replace(
            self,
            transport=choice(Transport, self.transport, field="transport"),
            auth_kind=choice(AuthKind, self.auth_kind, field="auth_kind"),
            era=choice(ProtocolEra, self.era, field="era"),
        )
        if self.transport is Transport.STDIO:
            if not self.command or not self.command.strip():
                raise ValidationFailed("a stdio server needs a command", field="command")
            if self.url is not None:
                raise ValidationFailed("a stdio server has no url", field="url")
            if len(self.command) > 1024 or "\x00" in self.command:
                raise ValidationFailed("command must be at most 1024 characters", field="command")
            if self.auth_kind is AuthKind.OAUTH:
                raise ValidationFailed("stdio servers take bearer or no auth, not OAuth", field="auth_kind")
        else:
            if not self.url:
                raise ValidationFailed(f"a {self.transport.value} server needs a url", field="url")
            naming.http_url(self.url)
            if self.command is not None or self.args:
                raise ValidationFailed("only stdio servers have a command and args", field="command")
        if len(self.args) > MAX_ARGS or any(len(a) > MAX_ARG_CHARS or "\x00" in a for a in self.args):
            raise ValidationFailed(f"at most {MAX_ARGS} args of at most {MAX_ARG_CHARS} characters", field="args")
        if len(self.env) > MAX_ENV:
            raise ValidationFailed(f"at most {MAX_ENV} environment variables", field="env")
        for key, value in self.env.items():
            if not key or not key.replace("_", "a").isalnum() or key[0].isdigit() or len(key) > 128:
                raise ValidationFailed(f"environment variable name {key!r} is not valid", field="env")
            if len(value) > MAX_ARG_CHARS or "\x00" in value:
                raise ValidationFailed(f"environment variable {key} is too long", field="env")
        if self.token_env is not None:
            _check_token_env(self.token_env, self.transport, self.env)
        oauth = self.oauth
        if self.auth_kind is AuthKind.OAUTH:
            oauth = _validated_oauth(oauth or OAuthClientSettings(registration=OAuthRegistration.AUTO))
        elif oauth is not None:
            raise ValidationFailed("oauth settings need auth_kind 'oauth'", field="oauth")
        for name_, value in (("connect_timeout_s", self.connect_timeout_s), ("call_timeout_s", self.call_timeout_s)):
            if not 0 < value <= MAX_TIMEOUT_S:
                raise ValidationFailed(f"{name_} must be above 0 and at most {MAX_TIMEOUT_S:g} seconds", field=name_)
        return replace(self, name=name, env=dict(self.env), description=description(self.description), oauth=oauth)


def changes_how_commands_run(name: str) -> bool:
    """True for PATH, LD_PRELOAD, NODE_OPTIONS and the like: a variable that changes what a spawned command runs."""
    return name.upper() in RUNTIME_ENV or name.upper().startswith(RUNTIME_ENV_PREFIXES)


def token_env_problem(name: str) -> str | None:
    """Why ``name`` cannot carry a person's token to a stdio server, or None when it can."""
    if not _ENV_NAME_RE.fullmatch(name):
        return (
            "token_env must be an environment variable name: a letter or '_', then letters, digits or '_' "
            f"(at most {ENV_NAME_MAX_CHARS} characters)"
        )
    if changes_how_commands_run(name):
        return f"token_env {name!r} changes how the command runs; choose the variable the server reads its token from"
    return None


def _check_token_env(name: str, transport: Transport, env: Mapping[str, str]) -> None:
    if transport is not Transport.STDIO:
        raise ValidationFailed(
            "token_env is for stdio servers; HTTP servers get the token in a header", field="token_env"
        )
    problem = token_env_problem(name)
    if problem is not None:
        raise ValidationFailed(problem, field="token_env")
    if name in env:
        raise ValidationFailed(
            f"{name} is both token_env and a variable in env; the person's token would replace it", field="token_env"
        )


def _validated_oauth(oauth: OAuthClientSettings) -> OAuthClientSettings:
    if oauth.registration is OAuthRegistration.PRE_REGISTERED and not oauth.client_id:
        raise ValidationFailed("a pre-registered OAuth client needs a client_id", field="oauth.client_id")
    if oauth.client_id is not None and not 0 < len(oauth.client_id) <= 512:
        raise ValidationFailed("oauth client_id must be 1-512 characters", field="oauth.client_id")
    if len(oauth.scopes) > MAX_SCOPES or any(not s or " " in s or len(s) > 200 for s in oauth.scopes):
        raise ValidationFailed("oauth scopes must be up to 50 single words", field="oauth.scopes")
    if oauth.authorization_server is not None:
        naming.http_url(oauth.authorization_server, field="oauth.authorization_server")
    return oauth


@dataclass(frozen=True, slots=True)
class GatewayServerSpec:
    server: str
    alias: str | None = None
    identity_scheme: IdentityScheme = IdentityScheme.PER_USER
    shared_identity_id: str | None = None
    tools: Provisioning = field(default_factory=Provisioning)
    prompts: Provisioning = field(default_factory=Provisioning)
    resources: Provisioning = field(default_factory=Provisioning)
    namespaced: bool = True


def _validated_provisioning(value: Provisioning, kind: str, index: int) -> Provisioning:
    where = f"servers[{index}].{kind}"
    if value.mode is not ProvisionMode.ALLOW_SELECTED and value.selected:
        raise ValidationFailed(f"{where}: names are only given with allow_selected", field=where)
    if len(value.selected) > MAX_SELECTED or any(not n or len(n) > 1024 for n in value.selected):
        raise ValidationFailed(f"{where}: at most {MAX_SELECTED} names of 1-1024 characters", field=where)
    return value


@dataclass(frozen=True, slots=True)
class GatewaySpec:
    slug: str
    name: str = ""
    description: str = ""
    enabled: bool = True
    servers: tuple[GatewayServerSpec, ...] = ()

    def validated(self) -> GatewaySpec:
        if len(self.servers) > MAX_GATEWAY_SERVERS:
            raise ValidationFailed(f"a gateway has at most {MAX_GATEWAY_SERVERS} servers", field="servers")
        servers: list[GatewayServerSpec] = []
        aliases: set[str] = set()
        for index, entry in enumerate(self.servers):
            alias = naming.server_name(entry.alias or entry.server, field=f"servers[{index}].alias")
            if alias in aliases:
                raise ValidationFailed(
                    f"servers[{index}]: alias {alias!r} is used twice; give the second an alias",
                    field=f"servers[{index}].alias",
                )
            aliases.add(alias)
            if not entry.namespaced and any(not other.namespaced for other in self.servers[:index]):
                raise ValidationFailed(
                    f"servers[{index}]: only one server per gateway may offer its names without a prefix",
                    field=f"servers[{index}].namespaced",
                )
            if entry.identity_scheme is IdentityScheme.SHARED and not entry.shared_identity_id:
                raise ValidationFailed(
                    f"servers[{index}]: a shared scheme needs shared_identity_id (a global identity)",
                    field=f"servers[{index}].shared_identity_id",
                )
            if entry.identity_scheme is IdentityScheme.PER_USER and entry.shared_identity_id:
                raise ValidationFailed(
                    f"servers[{index}]: shared_identity_id goes with the shared scheme only",
                    field=f"servers[{index}].shared_identity_id",
                )
            servers.append(
                replace(
                    entry,
                    alias=alias,
                    tools=_validated_provisioning(entry.tools, "tools", index),
                    prompts=_validated_provisioning(entry.prompts, "prompts", index),
                    resources=_validated_provisioning(entry.resources, "resources", index),
                )
            )
        slug = naming.slug(self.slug)
        name = naming.display_name(self.name or slug)
        return GatewaySpec(slug, name, description(self.description), self.enabled, tuple(servers))


@dataclass(frozen=True, slots=True)
class HostSpec:
    name: str
    description: str = ""
    webhook_url: str | None = None

    def validated(self) -> HostSpec:
        webhook = naming.http_url(self.webhook_url, field="webhook_url") if self.webhook_url else None
        return HostSpec(naming.slug(self.name, field="name"), description(self.description), webhook)
