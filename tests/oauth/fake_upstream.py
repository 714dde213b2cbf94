"""A protected MCP upstream and its authorization server in one real HTTP app, with knobs for what can go wrong.

Serve ``FakeUpstream().app()`` with ``tests.mcp_support.serving`` and set ``base`` to the URL it yields. The MCP
endpoint is ``{base}/mcp``; authorization servers are ``{base}{prefix}`` for each prefix in ``issuers``
(``/as1`` by default). Every request is recorded (``seen``); the token endpoint checks PKCE S256 and client
authentication like a real server and records whether the verifier matched.
"""

from __future__ import annotations

import base64
import hashlib
import json
import secrets
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import parse_qsl, unquote_plus, urlencode

import anyio
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, RedirectResponse, Response
from starlette.routing import Route
from starlette.types import ASGIApp, Receive, Scope, Send


@dataclass(frozen=True)
class Seen:
    """One request as received: method, path, query or form fields, headers."""

    method: str
    path: str
    fields: dict[str, str]
    headers: dict[str, str]


@dataclass
class FakeUpstream:
    """State and knobs; tests set them before the flow and read ``seen`` after."""

    base: str = ""
    issuers: tuple[str, ...] = ("/as1",)
    # Which of ``issuers`` the protected resource names now (an index into ``issuers``).
    current: int = 0
    prm_path: str | None = "/.well-known/oauth-protected-resource/mcp"
    prm_in_header: bool = True
    prm_resource: str | None = None  # default: {base}/mcp
    prm_scopes: list[str] | None = None
    challenge_scope: str | None = None
    # Where each issuer's metadata is served: "oauth" (RFC 8414 path-inserted), "oidc-inserted", "oidc-appended".
    metadata_style: str = "oauth"
    metadata: dict[str, Any] = field(default_factory=dict[str, Any])  # overrides of every issuer's document
    drop_metadata: tuple[str, ...] = ()  # keys removed from the documents
    iss_mode: str = "correct"  # correct | omit | wrong | slash
    authorize_error: str | None = None
    registration_method: str | None = None  # what /register answers; None: as asked
    # /register answers only once this many registrations have arrived (members connecting at the same time).
    hold_registrations: int = 0
    token_methods: list[str] = field(default_factory=lambda: ["client_secret_basic", "client_secret_post", "none"])
    clients: dict[str, tuple[str | None, str]] = field(default_factory=dict[str, tuple[str | None, str]])
    seen: list[Seen] = field(default_factory=list[Seen])
    requested: list[str] = field(default_factory=list[str])  # every path asked for, found or not
    pkce_ok: list[bool] = field(default_factory=list[bool])
    issued: dict[str, str] = field(default_factory=dict[str, str])  # access token -> issuer prefix
    _codes: dict[str, dict[str, str]] = field(default_factory=dict[str, dict[str, str]])
    _registrations_in: anyio.Event = field(default_factory=anyio.Event)

    def issuer(self, index: int | None = None) -> str:
        return f"{self.base}{self.issuers[self.current if index is None else index]}"

    def paths(self, path: str) -> list[Seen]:
        return [s for s in self.seen if s.path == path]

    def metadata_path(self, prefix: str) -> str:
        if self.metadata_style == "oidc-inserted":
            return f"/.well-known/openid-configuration{prefix}"
        if self.metadata_style == "oidc-appended":
            return f"{prefix}/.well-known/openid-configuration"
        return f"/.well-known/oauth-authorization-server{prefix}"

    def app(self) -> ASGIApp:
        inner = self._routes()

        async def recording(scope: Scope, receive: Receive, send: Send) -> None:
            if scope["type"] == "http":
                self.requested.append(scope["path"])
            await inner(scope, receive, send)

        return recording

    def _routes(self) -> Starlette:
        routes = [Route("/mcp", self._mcp, methods=["POST", "GET", "DELETE"])]
        if self.prm_path is not None:
            routes.append(Route(self.prm_path, self._prm))
        for index, prefix in enumerate(self.issuers):
            routes += [
                Route(self.metadata_path(prefix), self._metadata_of(index)),
                Route(f"{prefix}/authorize", self._authorize_of(index)),
                Route(f"{prefix}/token", self._token_of(index), methods=["POST"]),
                Route(f"{prefix}/register", self._register_of(index), methods=["POST"]),
            ]
        return Starlette(routes=routes)

    async def _record(self, request: Request) -> dict[str, str]:
        fields = dict(request.query_params)
        if request.method == "POST" and request.headers.get("content-type", "").startswith("application/x-www-form"):
            fields.update(parse_qsl((await request.body()).decode()))
        self.seen.append(Seen(request.method, request.url.path, fields, dict(request.headers)))
        return fields

    async def _mcp(self, request: Request) -> Response:
        await self._record(request)
        auth = request.headers.get("authorization", "")
        if auth.startswith("Bearer ") and self.issued.get(auth[7:]) == self.issuers[self.current]:
            return JSONResponse({"jsonrpc": "2.0", "id": 1, "result": {"tools": []}})
        params = [f'resource_metadata="{self.base}{self.prm_path}"'] if self.prm_in_header and self.prm_path else []
        if self.challenge_scope:
            params.append(f'scope="{self.challenge_scope}"')
        challenge = "Bearer" + (" " + ", ".join(params) if params else "")
        return JSONResponse({"error": "invalid_token"}, status_code=401, headers={"WWW-Authenticate": challenge})

    async def _prm(self, request: Request) -> Response:
        await self._record(request)
        doc: dict[str, Any] = {
            "resource": self.prm_resource or f"{self.base}/mcp",
            "authorization_servers": [self.issuer()],
        }
        if self.prm_scopes is not None:
            doc["scopes_supported"] = self.prm_scopes
        return JSONResponse(doc)

    def _metadata_of(self, index: int) -> Any:
        async def metadata(request: Request) -> Response:
            await self._record(request)
            issuer = self.issuer(index)
            doc: dict[str, Any] = {
                "issuer": issuer,
                "authorization_endpoint": f"{issuer}/authorize",
                "token_endpoint": f"{issuer}/token",
                "registration_endpoint": f"{issuer}/register",
                "revocation_endpoint": f"{issuer}/revoke",
                "response_types_supported": ["code"],
                "code_challenge_methods_supported": ["S256"],
                "token_endpoint_auth_methods_supported": self.token_methods,
                "authorization_response_iss_parameter_supported": True,
                **self.metadata,
            }
            for key in self.drop_metadata:
                doc.pop(key, None)
            return JSONResponse(doc)

        return metadata

    def _authorize_of(self, index: int) -> Any:
        async def authorize(request: Request) -> Response:
            query = await self._record(request)
            answer: dict[str, str] = {"state": query.get("state", "")}
            if self.authorize_error:
                answer["error"] = self.authorize_error
            else:
                code = secrets.token_urlsafe(16)
                self._codes[code] = query
                answer["code"] = code
            issuer = self.issuer(index)
            iss = {"correct": issuer, "wrong": "https://evil.example.com", "slash": issuer + "/"}.get(self.iss_mode)
            if iss is not None:
                answer["iss"] = iss
            return RedirectResponse(f"{query['redirect_uri']}?{urlencode(answer)}", status_code=302)

        return authorize

    def _token_of(self, index: int) -> Any:
        async def token(request: Request) -> Response:
            form = await self._record(request)
            asked = self._codes.pop(form.get("code", ""), None)
            if asked is None:
                return JSONResponse({"error": "invalid_grant"}, status_code=400)
            client_id = _authenticated(request, form, self.clients)
            if client_id is None or client_id != asked["client_id"]:
                return JSONResponse({"error": "invalid_client"}, status_code=401)
            verifier = form.get("code_verifier", "")
            digest = base64.urlsafe_b64encode(hashlib.sha256(verifier.encode()).digest()).decode().rstrip("=")
            self.pkce_ok.append(digest == asked.get("code_challenge") and asked.get("code_challenge_method") == "S256")
            access = secrets.token_urlsafe(24)
            self.issued[access] = self.issuers[index]
            body: dict[str, Any] = {"access_token": access, "token_type": "Bearer", "expires_in": 3600}
            body["refresh_token"] = secrets.token_urlsafe(24)
            if asked.get("scope"):
                body["scope"] = asked["scope"]
            return JSONResponse(body)

        return token

    def _register_of(self, index: int) -> Any:
        async def register(request: Request) -> Response:
            body = await request.json()
            self.seen.append(Seen("POST", request.url.path, {"json": json.dumps(body)}, dict(request.headers)))
            if len([s for s in self.seen if s.path.endswith("/register")]) >= self.hold_registrations:
                self._registrations_in.set()
            await self._registrations_in.wait()
            method = self.registration_method or body.get("token_endpoint_auth_method", "client_secret_basic")
            client_id = f"client-{self.issuers[index].strip('/')}-{secrets.token_hex(4)}"
            secret = None if method == "none" else secrets.token_urlsafe(16)
            self.clients[client_id] = (secret, method)
            answer: dict[str, Any] = {"client_id": client_id, "token_endpoint_auth_method": method, **body}
            answer["client_id"] = client_id
            if secret is not None:
                answer["client_secret"] = secret
            return JSONResponse(answer, status_code=201)

        return register


def _authenticated(request: Request, form: dict[str, str], clients: dict[str, tuple[str | None, str]]) -> str | None:
    """The client id the request authenticates as, the way its registration says, or None."""
    header = request.headers.get("authorization", "")
    if header.startswith("Basic "):
        client_id, _, secret = base64.b64decode(header[6:]).decode().partition(":")
        client_id, secret = unquote_plus(client_id), unquote_plus(secret)
        known = clients.get(client_id)
        return client_id if known and known[1] == "client_secret_basic" and known[0] == secret else None
    client_id = form.get("client_id", "")
    if client_id.startswith("https://"):
        return client_id  # a client ID metadata document URL: a public client
    known = clients.get(client_id)
    if known is None:
        return None
    if known[1] == "client_secret_post":
        return client_id if form.get("client_secret") == known[0] else None
    return client_id if known[1] == "none" else None
