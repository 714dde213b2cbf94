"""Reading MCP client configs (Claude Desktop, Cursor, VS Code) into a plan of servers to create.

Pure: text in, plan out. Credentials found in the file are never carried into the plan; the plan says
where each one was, never what it was.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field, replace
from typing import Final, cast
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

from bastion.domain import credentials, naming
from bastion.domain.models import AuthKind, Transport
from bastion.domain.specs import ServerSpec, token_env_problem
from bastion.errors import ValidationFailed

LEFT_OUT_HINT: Final = "secret left out — add it as an identity once the vault exists"
MAX_REPORTED_VALUE_CHARS: Final = 40

_TRANSPORTS: Final = {
    "http": Transport.STREAMABLE_HTTP,
    "streamablehttp": Transport.STREAMABLE_HTTP,
    "sse": Transport.SSE,
    "stdio": Transport.STDIO,
}
_URL_KEYS: Final = ("url", "serverUrl", "httpUrl")


@dataclass(frozen=True, slots=True)
class Skipped:
    name: str
    reason: str


@dataclass(frozen=True, slots=True)
class SecretLeftOut:
    server: str
    where: str


@dataclass(frozen=True, slots=True)
class Renamed:
    original: str
    name: str


@dataclass(frozen=True, slots=True)
class Note:
    server: str
    message: str


@dataclass(frozen=True, slots=True)
class ImportPlan:
    """What an import would do: servers to create (validated specs) and everything it will not carry over."""

    servers: tuple[ServerSpec, ...] = ()
    skipped: tuple[Skipped, ...] = ()
    secrets_left_out: tuple[SecretLeftOut, ...] = ()
    renamed: tuple[Renamed, ...] = ()
    notes: tuple[Note, ...] = ()


@dataclass(slots=True)
class _Entry:
    """What one server entry yields while it is being read."""

    name: str
    secrets: list[str] = field(default_factory=list[str])
    notes: list[str] = field(default_factory=list[str])
    token_env: str | None = None


def _object(value: object) -> dict[str, object] | None:
    return cast(dict[str, object], value) if isinstance(value, dict) else None


def _shown(value: object) -> str:
    text = str(value)
    return text if len(text) <= MAX_REPORTED_VALUE_CHARS else text[: MAX_REPORTED_VALUE_CHARS - 1] + "…"


# --- JSON with comments -------------------------------------------------------------------------------------------


def _scan(text: str, *, comments: bool) -> str:
    """Drop // and /* */ comments (``comments``) or trailing commas (not ``comments``) outside strings."""
    out: list[str] = []
    i, n, in_string = 0, len(text), False
    while i < n:
        ch = text[i]
        if in_string:
            out.append(text[i : i + 2] if ch == "\\" else ch)
            i += 2 if ch == "\\" else 1
            in_string = ch != '"'
            continue
        if ch == '"':
            in_string = True
        elif comments and text.startswith("//", i):
            end = text.find("\n", i)
            i = n if end < 0 else end
            continue
        elif comments and text.startswith("/*", i):
            end = text.find("*/", i + 2)
            i = n if end < 0 else end + 2
            out.append(" ")
            continue
        elif not comments and ch == ",":
            rest = text[i + 1 :].lstrip()
            if rest[:1] in ("}", "]"):
                i += 1
                continue
        out.append(ch)
        i += 1
    return "".join(out)


def load_json(text: str) -> dict[str, object]:
    """Parse a config file; VS Code's JSON with comments and trailing commas is accepted.

    Raises:
        ValidationFailed: the text is not JSON, or not a JSON object.
    """
    text = text.removeprefix("\ufeff")
    try:
        doc: object = json.loads(text)
    except json.JSONDecodeError as strict_error:
        try:
            doc = json.loads(_scan(_scan(text, comments=True), comments=False))
        except json.JSONDecodeError:
            raise ValidationFailed(
                f"not valid JSON: {strict_error.msg} at line {strict_error.lineno} column {strict_error.colno}",
                field="file",
            ) from None
    found = _object(doc)
    if found is None:
        raise ValidationFailed("expected a JSON object at the top of the file", field="file")
    return found


def sections(doc: dict[str, object]) -> list[tuple[str, dict[str, object]]]:
    """The server maps a config holds, with where each was found.

    Raises:
        ValidationFailed: no known server map, or one that is not an object.
    """
    candidates: list[tuple[str, object]] = [(key, doc[key]) for key in ("mcpServers", "servers") if key in doc]
    mcp = _object(doc.get("mcp"))
    if mcp is not None and "servers" in mcp:
        candidates.append(("mcp.servers", mcp["servers"]))
    if not candidates:
        raise ValidationFailed(
            'no MCP servers found: expected "mcpServers" (Claude Desktop, Cursor), "servers" (VS Code mcp.json) '
            'or "mcp": {"servers": …} (VS Code settings.json)',
            field="file",
        )
    out: list[tuple[str, dict[str, object]]] = []
    for where, value in candidates:
        entries = _object(value)
        if entries is None:
            raise ValidationFailed(f'"{where}" must be an object mapping names to servers', field=where)
        out.append((where, entries))
    return out


# --- names and transports -----------------------------------------------------------------------------------------


def sanitize_name(raw: str) -> str | None:
    """A valid server name made from ``raw`` (spaces and other characters become '-'), or None."""
    name = re.sub(r"\s+", "-", raw.strip())
    name = re.sub(r"[^A-Za-z0-9_.-]", "-", name)
    name = re.sub(r"_{2,}", "_", re.sub(r"-{2,}", "-", name))
    name = re.sub(r"^[^A-Za-z0-9]+|[^A-Za-z0-9]+$", "", name)
    name = re.sub(r"[^A-Za-z0-9]+$", "", name[: naming.SLUG_MAX_CHARS])
    if not name:
        return None
    try:
        return naming.server_name(name)
    except ValidationFailed:
        return None


def transport_of(entry: dict[str, object]) -> Transport:
    declared = entry.get("type", entry.get("transport"))
    if declared is None:
        has_url = any(key in entry for key in _URL_KEYS)
        if "command" in entry and has_url:
            raise ValidationFailed('has both a "command" and a "url"; say which with "type"')
        if "command" in entry:
            return Transport.STDIO
        if has_url:
            return Transport.STREAMABLE_HTTP
        raise ValidationFailed('has neither a "command" nor a "url"')
    if not isinstance(declared, str):
        raise ValidationFailed('"type" must be a string')
    transport = _TRANSPORTS.get(declared.strip().lower().replace("-", "").replace("_", ""))
    if transport is None:
        known = "http, streamable-http, streamableHttp, streamable_http, sse, stdio"
        raise ValidationFailed(f"unknown transport type {_shown(declared)!r} (known: {known})")
    return transport


def _text(value: object, what: str) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"  # JSON spelling, as the client would have passed it
    if value is None or isinstance(value, (dict, list)):
        raise ValidationFailed(f"{what} must be a string")
    return str(value)


# --- the parts that may carry secrets -----------------------------------------------------------------------------


def _env(entry: dict[str, object], found: _Entry) -> dict[str, str]:
    env = entry.get("env")
    if env is None:
        return {}
    values = _object(env)
    if values is None:
        raise ValidationFailed('"env" must be an object')
    kept: dict[str, str] = {}
    secret_keys: list[str] = []
    for key, raw in values.items():
        value = _text(raw, f"env.{key}")
        if credentials.secret_entry(key, value):
            found.secrets.append(f"env.{key}")
            secret_keys.append(key)
        else:
            kept[key] = value
    # One secret variable is where the server reads its token: each person's goes there. With several, which
    # one is the person's is a guess, so none is.
    if len(secret_keys) == 1 and token_env_problem(secret_keys[0]) is None:
        found.token_env = secret_keys[0]
        found.notes.append(f"{secret_keys[0]} will carry each person's token (token_env)")
    return kept


def _args(entry: dict[str, object], found: _Entry) -> tuple[str, ...]:
    raw = entry.get("args", [])
    if not isinstance(raw, list):
        raise ValidationFailed('"args" must be a list of strings')
    args = [_text(a, "every arg") for a in cast(list[object], raw)]
    drop: set[int] = set()
    for index, arg in enumerate(args):
        option, eq, value = arg.partition("=")
        named_secret = bool(eq) and credentials.secret_name(option)
        follows_secret_flag = (
            index > 0
            and args[index - 1].startswith("-")
            and "=" not in args[index - 1]
            and credentials.secret_name(args[index - 1])
            and not arg.startswith("-")
        )
        shaped = credentials.credential_value(arg) or (bool(eq) and credentials.credential_value(value))
        if shaped or named_secret or follows_secret_flag:
            found.secrets.append(f"args[{index}]")
            drop.add(index)
            # "--token ghp_…" or "-e TOKEN=…": the flag goes with its value.
            if index > 0 and args[index - 1].startswith("-") and "=" not in args[index - 1]:
                drop.add(index - 1)
    return tuple(a for i, a in enumerate(args) if i not in drop)


def _command(entry: dict[str, object]) -> str:
    command = _text(entry.get("command"), '"command"').strip()
    if not command:
        raise ValidationFailed('"command" is empty')
    if any(credentials.credential_value(part) for part in command.split()):
        raise ValidationFailed("its command line carries a credential; add the server by hand without it")
    return command


def _url(entry: dict[str, object], found: _Entry) -> str:
    raw = next((entry[key] for key in _URL_KEYS if key in entry), None)
    url = _text(raw, '"url"').strip()
    try:
        parts = urlsplit(url)
        has_userinfo = parts.username is not None or parts.password is not None
    except ValueError:
        raise ValidationFailed("its url is not a valid URL") from None
    if has_userinfo:
        raise ValidationFailed("its url carries a user name or password; add the server by hand without it")
    pairs = parse_qsl(parts.query, keep_blank_values=True)
    kept: list[tuple[str, str]] = []
    for key, value in pairs:
        if credentials.secret_entry(key, value):
            found.secrets.append(f"url?{key}")
        else:
            kept.append((key, value))
    if any(credentials.credential_value(segment) for segment in parts.path.split("/") if segment):
        raise ValidationFailed("its url carries a credential in the path; add the server by hand once identities exist")
    query = parts.query if len(kept) == len(pairs) else urlencode(kept)
    return urlunsplit((parts.scheme, parts.netloc, parts.path, query, parts.fragment))


def _headers(entry: dict[str, object], found: _Entry) -> None:
    headers = entry.get("headers")
    if headers is None:
        return
    values = _object(headers)
    if values is None:
        raise ValidationFailed('"headers" must be an object')
    for key, raw in values.items():
        value = _text(raw, f"headers.{key}")
        if credentials.secret_entry(key, value):
            found.secrets.append(f"headers.{key}")
        else:
            found.notes.append(f"header {key} not imported: servers carry no custom headers yet")


def _spec(name: str, entry: dict[str, object], found: _Entry) -> ServerSpec:
    transport = transport_of(entry)
    if transport is Transport.STDIO:
        if "command" not in entry:
            raise ValidationFailed('a stdio server needs a "command"')
        spec = ServerSpec(name, transport, command=_command(entry), args=_args(entry, found), env=_env(entry, found))
        if "envFile" in entry:
            found.notes.append("envFile not read; add what it holds as an identity once the vault exists")
        if "cwd" in entry:
            found.notes.append("cwd not imported: servers run from Bastion's working directory")
    else:
        if not any(key in entry for key in _URL_KEYS):
            raise ValidationFailed(f'a {transport.value} server needs a "url"')
        spec = ServerSpec(name, transport, url=_url(entry, found))
        _headers(entry, found)
    # A credential was left out, so the server needs one per identity: that is what a bearer server is.
    auth_kind = AuthKind.BEARER if found.secrets else AuthKind.NONE
    return replace(spec, auth_kind=auth_kind, token_env=found.token_env).validated()


# --- the plan -----------------------------------------------------------------------------------------------------


def plan(doc: dict[str, object]) -> ImportPlan:
    """Every server a parsed config describes, as specs to create or entries skipped with a reason."""
    servers: list[ServerSpec] = []
    skipped: list[Skipped] = []
    secrets: list[SecretLeftOut] = []
    renamed: list[Renamed] = []
    notes: list[Note] = []
    taken: dict[str, str] = {}
    for _where, entries in sections(doc):
        for original, value in entries.items():
            name = sanitize_name(original)
            if name is None:
                skipped.append(Skipped(original, "the name has no letters or digits to make a server name from"))
                continue
            folded = name.lower()
            if folded in taken:
                skipped.append(Skipped(original, f"another entry ({taken[folded]!r}) already takes the name {name!r}"))
                continue
            entry = _object(value)
            if entry is None:
                skipped.append(Skipped(original, "the entry is not an object"))
                continue
            found = _Entry(name)
            try:
                spec = _spec(name, entry, found)
            except ValidationFailed as error:
                skipped.append(Skipped(original, error.detail))
                continue
            taken[folded] = original
            servers.append(spec)
            if name != original:
                renamed.append(Renamed(original, name))
            secrets += [SecretLeftOut(name, where) for where in found.secrets]
            notes += [Note(name, message) for message in found.notes]
    return ImportPlan(tuple(servers), tuple(skipped), tuple(secrets), tuple(renamed), tuple(notes))


def parse(text: str) -> ImportPlan:
    """Plan an import from the text of a Claude Desktop, Cursor or VS Code config file.

    Raises:
        ValidationFailed: the file is not JSON or holds no MCP server map.
    """
    return plan(load_json(text))
