"""A small, real OpenID Connect provider for tests: discovery, authorize (auto-consent), token with PKCE, JWKS.

Serve ``OidcProvider().app()`` with ``tests.mcp_support.serving`` on loopback and set ``base``. The person it
signs in is ``user``; knobs make it misbehave the ways a provider (or an attacker in the middle) might.
"""

from __future__ import annotations

import base64
import hashlib
import json
import secrets
import time
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlencode

import jwt
from cryptography.hazmat.primitives.asymmetric import rsa
from jwt.algorithms import RSAAlgorithm
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, RedirectResponse, Response
from starlette.routing import Route

CLIENT_ID = "bastion-web"
CLIENT_SECRET = "provider-issued-client-secret-7f3a9c"


@dataclass
class OidcProvider:
    base: str = ""
    user: dict[str, Any] = field(
        default_factory=lambda: {"sub": "u-1", "email": "ada@example.com", "email_verified": True, "name": "Ada L"}
    )
    deny: bool = False
    # What to get wrong in the id_token or the discovery document (one of the keys of ``_tamper``), or None.
    tamper: str | None = None
    authorize_requests: list[dict[str, str]] = field(default_factory=list[dict[str, str]])
    token_requests: list[dict[str, str]] = field(default_factory=list[dict[str, str]])
    pkce_ok: list[bool] = field(default_factory=list[bool])
    _codes: dict[str, dict[str, str]] = field(default_factory=dict[str, dict[str, str]])
    _key: rsa.RSAPrivateKey = field(
        default_factory=lambda: rsa.generate_private_key(public_exponent=65537, key_size=2048)
    )
    _kid: str = field(default_factory=lambda: secrets.token_hex(4))

    @property
    def issuer(self) -> str:
        return self.base

    def app(self) -> Starlette:
        return Starlette(
            routes=[
                Route("/.well-known/openid-configuration", self._discovery),
                Route("/authorize", self._authorize),
                Route("/token", self._token, methods=["POST"]),
                Route("/jwks", self._jwks),
            ]
        )

    async def _discovery(self, _request: Request) -> Response:
        return JSONResponse(
            {
                "issuer": "https://elsewhere.example" if self.tamper == "discovery_issuer" else self.issuer,
                "authorization_endpoint": f"{self.base}/authorize",
                "token_endpoint": f"{self.base}/token",
                "jwks_uri": f"{self.base}/jwks",
                "response_types_supported": ["code"],
                "subject_types_supported": ["public"],
                "id_token_signing_alg_values_supported": ["RS256"],
                "code_challenge_methods_supported": ["S256"],
                "token_endpoint_auth_methods_supported": ["client_secret_basic"],
            }
        )

    async def _authorize(self, request: Request) -> Response:
        query = dict(request.query_params)
        self.authorize_requests.append(query)
        answer = {"state": query.get("state", "")}
        if self.deny:
            answer["error"] = "access_denied"
        else:
            code = secrets.token_urlsafe(16)
            self._codes[code] = query
            answer["code"] = code
        answer["iss"] = "https://evil.example" if self.tamper == "iss_parameter" else self.issuer
        return RedirectResponse(f"{query['redirect_uri']}?{urlencode(answer)}", status_code=302)

    async def _token(self, request: Request) -> Response:
        form = {k: v for k, v in (await request.form()).items() if isinstance(v, str)}
        self.token_requests.append(form)
        expected = "Basic " + base64.b64encode(f"{CLIENT_ID}:{CLIENT_SECRET}".encode()).decode()
        if request.headers.get("authorization") != expected:
            return JSONResponse({"error": "invalid_client"}, status_code=401)
        asked = self._codes.pop(form.get("code", ""), None)
        if asked is None or form.get("redirect_uri") != asked["redirect_uri"]:
            return JSONResponse({"error": "invalid_grant"}, status_code=400)
        digest = base64.urlsafe_b64encode(hashlib.sha256(form.get("code_verifier", "").encode()).digest()).rstrip(b"=")
        ok = digest.decode() == asked.get("code_challenge") and asked.get("code_challenge_method") == "S256"
        self.pkce_ok.append(ok)
        if not ok:
            return JSONResponse(
                {"error": "invalid_grant", "error_description": "PKCE verification failed"}, status_code=400
            )
        return JSONResponse(
            {
                "access_token": secrets.token_urlsafe(16),
                "token_type": "Bearer",
                "expires_in": 300,
                "id_token": self._id_token(asked),
            }
        )

    def _id_token(self, asked: dict[str, str]) -> str:
        now = int(time.time())
        claims: dict[str, Any] = {
            "iss": self.issuer,
            "aud": CLIENT_ID,
            "iat": now,
            "exp": now + 300,
            "nonce": asked.get("nonce"),
            **self.user,
        }
        headers: dict[str, Any] = {"kid": self._kid}
        key: Any = self._key
        algorithm = "RS256"
        if self.tamper == "nonce":
            claims["nonce"] = "not-the-nonce-bastion-sent"
        elif self.tamper == "audience":
            claims["aud"] = "some-other-client"
        elif self.tamper == "issuer":
            claims["iss"] = "https://evil.example"
        elif self.tamper == "expired":
            claims["iat"], claims["exp"] = now - 3600, now - 600
        elif self.tamper == "unknown_key":
            key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
            headers["kid"] = "not-published"
        elif self.tamper == "other_key_same_kid":
            key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
        elif self.tamper == "hmac":
            algorithm, key = "HS256", CLIENT_SECRET.encode()
        elif self.tamper == "none":
            unsigned = jwt.encode(claims, None, algorithm="none", headers=headers)
            return unsigned
        return jwt.encode(claims, key, algorithm=algorithm, headers=headers)

    async def _jwks(self, _request: Request) -> Response:
        jwk = json.loads(RSAAlgorithm.to_jwk(self._key.public_key()))
        jwk.update(kid=self._kid, use="sig", alg="RS256")
        return JSONResponse({"keys": [jwk]})
