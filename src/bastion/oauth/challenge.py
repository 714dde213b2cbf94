"""``WWW-Authenticate`` challenges (RFC 9110 §11.6.1, RFC 6750 §3) read the way the grammar says.

``Bearer error="insufficient_scope", scope="a b", resource_metadata="https://…"`` carries what the MCP
authorization flow starts from. Parameters may be tokens or quoted strings (with ``\\`` escapes), names are
case-insensitive, several challenges may share one header and a response may carry several headers. The
parser never raises: what it cannot read it skips, so a hostile header costs nothing but its length.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Final

__all__ = ["MAX_HEADER_CHARS", "Challenge", "bearer_challenge", "parse_www_authenticate"]

MAX_HEADER_CHARS: Final = 16 * 1024
_TOKEN: Final = re.compile(r"[!#$%&'*+\-.^_`|~0-9A-Za-z]+")
_TOKEN68: Final = re.compile(r"[A-Za-z0-9\-._~+/]+=*(?=[ \t]*(?:,|$))")
# A bare value is a token by the grammar; servers also send URLs and "a:b" scopes bare, which are read too.
_BARE: Final = re.compile(r'[^\s,"]+')
_QUOTED: Final = re.compile(r'"((?:[^"\\]|\\.)*)"', re.DOTALL)
_ESCAPE: Final = re.compile(r"\\(.)", re.DOTALL)
_OWS: Final = re.compile(r"[ \t]*")
_SEPARATORS: Final = re.compile(r"[ \t,]*")


@dataclass(frozen=True, slots=True)
class Challenge:
    """One challenge: its scheme (lower case), its parameters (names lower case) or its token68."""

    scheme: str
    params: Mapping[str, str] = field(default_factory=dict[str, str])
    token68: str | None = None

    def param(self, name: str) -> str | None:
        return self.params.get(name.lower())

    @property
    def error(self) -> str | None:
        return self.param("error")

    @property
    def scope(self) -> str | None:
        """The scope the server asks for, whitespace normalised; None when absent or blank."""
        value = self.param("scope")
        return " ".join(value.split()) or None if value is not None else None

    @property
    def resource_metadata(self) -> str | None:
        value = self.param("resource_metadata")
        return value.strip() or None if value is not None else None


def parse_www_authenticate(values: Iterable[str]) -> list[Challenge]:
    """Every challenge in the given header values, in order."""
    out: list[Challenge] = []
    for value in values:
        out.extend(_parse_one(value[:MAX_HEADER_CHARS]))
    return out


def bearer_challenge(values: Iterable[str]) -> Challenge | None:
    """The first ``Bearer`` challenge among the header values, if any."""
    return next((c for c in parse_www_authenticate(values) if c.scheme == "bearer"), None)


def _parse_one(text: str) -> list[Challenge]:
    challenges: list[Challenge] = []
    pos, end = 0, len(text)
    while pos < end:
        pos = _skip(_SEPARATORS, text, pos)
        scheme = _TOKEN.match(text, pos)
        if scheme is None:
            pos = _skip_item(text, pos)
            continue
        pos = scheme.end()
        params: dict[str, str] = {}
        token68: str | None = None
        if pos < end and text[pos] in " \t":
            pos = _skip(_OWS, text, pos)
            found = _TOKEN68.match(text, pos)
            if found is not None:
                token68, pos = found.group(), found.end()
            else:
                pos = _read_params(text, pos, params)
        challenges.append(Challenge(scheme.group().lower(), params, token68))
    return challenges


def _read_params(text: str, pos: int, params: dict[str, str]) -> int:
    """Read ``name=value`` pairs into ``params`` from ``pos``; where the next challenge (or the end) starts."""
    end = len(text)
    while pos < end:
        start = _skip(_SEPARATORS, text, pos)
        name = _TOKEN.match(text, start)
        if name is None:
            if start >= end:
                return end
            pos = _skip_item(text, start)
            continue
        after = _skip(_OWS, text, name.end())
        if after >= end or text[after] != "=":
            return start  # a token without "=": the next challenge's scheme
        pos = _skip(_OWS, text, after + 1)
        quoted = _QUOTED.match(text, pos)
        if quoted is not None:
            value, pos = _ESCAPE.sub(r"\1", quoted.group(1)), quoted.end()
        else:
            bare = _BARE.match(text, pos)
            if bare is None:
                pos = _skip_item(text, pos)
                continue
            value, pos = bare.group(), bare.end()
        # RFC 9110: a parameter name occurs once per challenge; a repeat is ambiguous, so the first one holds.
        params.setdefault(name.group().lower(), value)
    return pos


def _skip(pattern: re.Pattern[str], text: str, pos: int) -> int:
    """Past what ``pattern`` (which may match nothing) matches at ``pos``."""
    found = pattern.match(text, pos)
    return found.end() if found is not None else pos


def _skip_item(text: str, pos: int) -> int:
    """Past the next comma (outside quotes) from ``pos``: how unreadable input is stepped over."""
    end = len(text)
    while pos < end:
        if text[pos] == '"':
            quoted = _QUOTED.match(text, pos)
            pos = quoted.end() if quoted is not None else end
            continue
        if text[pos] == ",":
            return pos + 1
        pos += 1
    return end
