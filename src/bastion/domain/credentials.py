"""Heuristics that recognise credentials in configuration: by a variable's name or by the value's shape.

They err towards calling something a secret: leaving out a harmless value costs a person one command,
storing a real token in plain text cannot be undone.
"""

from __future__ import annotations

import math
import re
from collections import Counter
from typing import Final
from urllib.parse import parse_qsl, urlsplit

# Words that make a whole name secret wherever they appear in it ("GITHUBTOKEN", "x-apikey").
_STRONG_WORDS: Final = ("TOKEN", "SECRET", "PASSWORD", "PASSWD", "CREDENTIAL", "APIKEY", "PRIVATEKEY", "BEARER")
# Words that make a name secret only as a whole word ("API_KEY" yes, "KEYBOARD" no; "GITHUB_PAT" yes, "PATH" no).
_WORDS: Final = frozenset(
    {
        "KEY",
        "PASS",
        "PWD",
        "AUTH",
        "AUTHORIZATION",
        "CREDS",
        "PAT",
        "COOKIE",
        "COOKIES",
        "SESSION",
        "SESSIONID",
        "SID",
        "JWT",
        "SIGNATURE",
        "PRIVATE",
        "CERT",
        "OTP",
    }
)
_SECRET_HEADERS: Final = frozenset({"AUTHORIZATION", "PROXY-AUTHORIZATION", "COOKIE", "SET-COOKIE"})
_PREFIXES: Final = (
    "ghp_",
    "gho_",
    "ghu_",
    "ghs_",
    "ghr_",
    "github_pat_",
    "glpat-",
    "gldt-",
    "sk-",
    "sk_live_",
    "sk_test_",
    "rk_live_",
    "rk_test_",
    "xoxb-",
    "xoxp-",
    "xoxa-",
    "xoxs-",
    "xoxe-",
    "xapp-",
    "npm_",
    "pypi-",
    "hf_",
    "shpat_",
    "shpss_",
    "lin_api_",
    "ntn_",
    "secret_",
    "dop_v1_",
    "AIza",
    "ya29.",
    "eyJ",
    "bst_",
    "bsk_",
)
_AWS_KEY_RE: Final = re.compile(r"^(?:AKIA|ASIA|AGPA|AIDA|AROA|ANPA|ANVA)[A-Z0-9]{12,}$")
_SCHEME_RE: Final = re.compile(
    r"^(?:token|digest|apikey)\s+\S|\b(?:bearer|basic)\s+[A-Za-z0-9+/=._~${}:-]{8,}", re.IGNORECASE
)
_HEADER_LINE_RE: Final = re.compile(r"^([A-Za-z0-9_-]+)\s*:\s*\S")
_REFERENCE_RE: Final = re.compile(r"\$\{(?:input|env):[^}]*\}")
_TOKENISH_RE: Final = re.compile(r"^[A-Za-z0-9+/=_\-.~]+$")
_HEX_RE: Final = re.compile(r"^[0-9a-fA-F]{32,}$")
_CAMEL_RE: Final = re.compile(r"(?<=[a-z0-9])(?=[A-Z])")
MIN_PREFIXED_CHARS: Final = 16
MIN_ENTROPY_CHARS: Final = 24
MIN_ENTROPY_BITS_PER_CHAR: Final = 3.8


def _words(name: str) -> list[str]:
    return [w for w in re.split(r"[^A-Za-z0-9]+", _CAMEL_RE.sub("_", name).upper()) if w]


def secret_name(name: str) -> bool:
    """True when a variable or header name says it holds a credential (``GITHUB_TOKEN``, ``X-Api-Key``)."""
    if name.strip().upper() in _SECRET_HEADERS:
        return True
    squashed = re.sub(r"[^A-Z0-9]", "", name.upper())
    if any(word in squashed for word in _STRONG_WORDS):
        return True
    return any(word in _WORDS for word in _words(name))


def reference(value: str) -> bool:
    """True when the value names a secret kept elsewhere: VS Code/Cursor ``${input:…}`` or ``${env:…}``."""
    return _REFERENCE_RE.search(value) is not None


def _entropy(value: str) -> float:
    counts = Counter(value)
    return -sum(n / len(value) * math.log2(n / len(value)) for n in counts.values())


def _high_entropy(value: str) -> bool:
    if len(value) < MIN_ENTROPY_CHARS or not _TOKENISH_RE.fullmatch(value):
        return False
    if value.startswith(("/", "~", ".", "@")):
        return False  # paths and package names
    if _HEX_RE.fullmatch(value):
        return True
    mixed = any(c.isdigit() for c in value) and any(c.isupper() for c in value) and any(c.islower() for c in value)
    return mixed and _entropy(value) >= MIN_ENTROPY_BITS_PER_CHAR


def url_has_credential(value: str) -> bool:
    """True when a URL carries a password, a secret-named query parameter or a token-shaped path segment."""
    try:
        parts = urlsplit(value)
        has_password = parts.password is not None
    except ValueError:
        return True  # not parseable: do not guess that it is harmless
    if has_password or (parts.username is not None and credential_value(parts.username)):
        return True
    for key, item in parse_qsl(parts.query, keep_blank_values=True):
        if secret_name(key) or credential_value(item):
            return True
    return any(credential_value(segment) for segment in parts.path.split("/") if segment)


def credential_value(value: str) -> bool:
    """True when a value looks like a credential: a known token prefix, an auth scheme, or a long random string."""
    stripped = value.strip()
    if not stripped:
        return False
    if reference(stripped) or _SCHEME_RE.search(stripped):
        return True
    header = _HEADER_LINE_RE.match(stripped)
    if header is not None and secret_name(header.group(1)):
        return True  # "Authorization: …" passed as one argument
    if "://" in stripped:
        return url_has_credential(stripped)
    if stripped.startswith(_PREFIXES) and len(stripped) >= MIN_PREFIXED_CHARS:
        return True
    if _AWS_KEY_RE.fullmatch(stripped):
        return True
    return _high_entropy(stripped)


def secret_entry(name: str, value: str) -> bool:
    """True when a name/value pair (an env var, a header, a query parameter) must not be stored in plain text."""
    return secret_name(name) or credential_value(value)
