"""An example agent: answers questions for people by calling a tool through Bastion as each of them.

``POST /ask {"person": "ada@example.com", "question": "..."}`` calls the configured tool through the person's
gateway with their own access token, and answers with what the tool said. ``POST /webhooks/bastion`` is the
SDK's webhook receiver: Bastion delivers tokens there when people connect, and tells of revocations and
disabled hosts. Configured from the environment (see README.md); ``python examples/agent/app.py`` serves it.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import re
from collections.abc import AsyncGenerator, Mapping
from dataclasses import dataclass
from typing import Any, Final, cast

import uvicorn
from mcp import MCPError
from mcp_types import TextContent
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

from bastion_agent import Agent, BastionAgentError, Disabled, EventHook, NotEnrolled, TokenCipher, TokenMap

logger = logging.getLogger("example_agent")
MAX_QUESTION_CHARS: Final = 4_000


@dataclass(frozen=True)
class Config:
    """What the agent needs to know. Secrets come from the environment, never from the code."""

    bastion_url: str
    token_key: str  # base64 of 32 bytes: seals the tokens in the map
    webhook_secrets: tuple[str, ...]  # the endpoint's whsec_ secrets (two during a rotation)
    tool: str  # e.g. "crm__whoami": the gateway's namespaced tool to ask
    database_url: str = "sqlite:///example-agent.db"
    host_key: str | None = None  # bsh_…: redeems claim codes
    connect_link: str | None = None  # the link to send people who have not connected yet
    gateway: str | None = None
    tool_argument: str | None = None  # the tool argument that receives the question, if any

    def __repr__(self) -> str:
        return f"Config(bastion_url={self.bastion_url!r}, tool={self.tool!r}, database_url=<hidden>, secrets=<hidden>)"

    @classmethod
    def from_env(cls, env: Mapping[str, str] = os.environ) -> Config:
        """The configuration from ``AGENT_*`` variables (``BASTION_URL`` for Bastion's public URL).

        Raises:
            KeyError: a required variable is missing.
        """
        return cls(
            bastion_url=env["BASTION_URL"],
            token_key=env["AGENT_TOKEN_KEY"],
            webhook_secrets=tuple(re.split(r"[,\s]+", env["AGENT_WEBHOOK_SECRETS"].strip())),
            tool=env["AGENT_TOOL"],
            database_url=env.get("AGENT_DATABASE_URL", cls.database_url),
            host_key=env.get("AGENT_HOST_KEY") or None,
            connect_link=env.get("AGENT_CONNECT_LINK") or None,
            gateway=env.get("AGENT_GATEWAY") or None,
            tool_argument=env.get("AGENT_TOOL_ARGUMENT") or None,
        )


def _problem(status: int, error: str, detail: str, **extra: Any) -> JSONResponse:
    return JSONResponse({"error": error, "detail": detail, **extra}, status_code=status)


def create_app(config: Config, *, on_event: EventHook | None = None) -> Starlette:
    """The agent's web service: ``POST /ask``, ``POST /webhooks/bastion`` and ``GET /healthz``."""
    token_map = TokenMap(config.database_url, TokenCipher.from_base64(config.token_key))
    agent = Agent(
        token_map,
        bastion_url=config.bastion_url,
        connect_link=config.connect_link,
        host_key=config.host_key,
        gateway=config.gateway,
    )
    receiver = agent.webhook_receiver(config.webhook_secrets, on_event=on_event)

    async def ask(request: Request) -> JSONResponse:
        try:
            body: Any = await request.json()
        except ValueError:
            return _problem(400, "invalid_request", "send a JSON object")
        fields = cast("dict[str, Any]", body) if isinstance(body, dict) else {}
        person, question = fields.get("person"), fields.get("question", "")
        if not isinstance(person, str) or not isinstance(question, str) or len(question) > MAX_QUESTION_CHARS:
            return _problem(400, "invalid_request", 'send {"person": "<email>", "question": "<text>"}')
        arguments = {config.tool_argument: question} if config.tool_argument else {}
        try:
            async with agent.as_user(person) as client:
                result = await client.call_tool(config.tool, arguments)
        except NotEnrolled as exc:
            return _problem(404, exc.code, str(exc), reason=exc.reason, connect_link=exc.link)
        except Disabled as exc:
            return _problem(403, exc.code, str(exc), reason=exc.reason)
        except BastionAgentError as exc:
            return _problem(502, exc.code, str(exc))
        except MCPError as exc:
            return _problem(502, "tool_failed", f"the gateway answered with an error: {exc.error.message}")
        text = "\n".join(block.text for block in result.content if isinstance(block, TextContent))
        if result.is_error:
            return _problem(502, "tool_failed", f"the tool failed: {text}")
        return JSONResponse({"person": person, "tool": config.tool, "answer": text})

    async def healthz(_request: Request) -> JSONResponse:
        return JSONResponse({"status": "ok"})

    @contextlib.asynccontextmanager
    async def lifespan(_app: Starlette) -> AsyncGenerator[None]:
        await token_map.create_tables()
        try:
            yield
        finally:
            await token_map.close()

    app = Starlette(
        routes=[
            Route("/ask", ask, methods=["POST"]),
            Route("/healthz", healthz, methods=["GET"]),
            # A Route to the receiver instance (raw ASGI), not a Mount: no trailing-slash redirect, which Bastion
            # would count as a failed delivery.
            Route("/webhooks/bastion", receiver, methods=["POST"]),
        ],
        lifespan=lifespan,
    )
    app.state.agent = agent
    return app


def main() -> None:
    parser = argparse.ArgumentParser(description="The Bastion example agent")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8080)
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO)
    uvicorn.run(create_app(Config.from_env()), host=args.host, port=args.port)


if __name__ == "__main__":
    main()
