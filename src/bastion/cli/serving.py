"""`bastion serve`: uvicorn (uvloop and httptools when present) with draining on SIGTERM."""

from __future__ import annotations

import importlib.util
import logging
import math
from collections.abc import Generator
from contextlib import contextmanager
from typing import Any

import anyio
import uvicorn

from bastion.cli import boot
from bastion.cli.output import fail
from bastion.errors import BastionError
from bastion.settings import Settings, load_settings
from bastion.web.app import Lifecycle, create_app
from bastion.web.logs import configure_logging

logger = logging.getLogger("bastion.serve")


class _DrainingServer(uvicorn.Server):
    """Flips readiness to false the moment a stop signal arrives, before uvicorn drains connections."""

    def __init__(self, config: uvicorn.Config, lifecycle: Lifecycle) -> None:
        super().__init__(config)
        self._lifecycle = lifecycle

    def handle_exit(self, sig: int, frame: Any) -> None:
        self._lifecycle.draining = True
        logger.info("stop signal received; draining in-flight requests", extra={"signal": sig})
        super().handle_exit(sig, frame)

    @contextmanager
    def capture_signals(self) -> Generator[None, None, None]:
        with super().capture_signals():
            yield
            # uvicorn re-raises the stop signal once drained, so the process would die "killed by SIGTERM"
            # (exit 143 to a supervisor). A completed drain is a clean stop: exit 0.
            self._captured_signals.clear()


def _prepare(host: str | None, port: int | None) -> Settings:
    overrides: dict[str, Any] = {}
    if host is not None:
        overrides["host"] = host
    if port is not None:
        overrides["port"] = port
    settings = load_settings(**overrides)
    # Before migrating, so what the first start does is logged in the format operators asked for.
    configure_logging(settings.log_level, settings.log_format)
    # Only the embedded database may invent its own secrets: replicas on PostgreSQL must share theirs.
    prepared = anyio.run(lambda: boot.prepare(settings, generate=settings.embedded))
    return prepared.settings


def serve(*, host: str | None, port: int | None) -> None:
    try:
        settings = _prepare(host, port)
    except BastionError as error:
        fail(error)
    app = create_app(settings)
    lifecycle: Lifecycle = app.state.lifecycle
    config = uvicorn.Config(
        app,
        host=settings.host,
        port=settings.port,
        loop="uvloop" if importlib.util.find_spec("uvloop") else "asyncio",
        http="httptools" if importlib.util.find_spec("httptools") else "h11",
        lifespan="on",
        log_config=None,
        access_log=False,
        # uvicorn takes whole seconds; rounding 0.5 s down to 0 would cancel requests instead of draining them.
        # Longer than the usual client/LB idle timeouts, so the server is not the side that closes a
        # connection a client is about to reuse.
        timeout_keep_alive=75,
        timeout_graceful_shutdown=max(1, math.ceil(settings.graceful_shutdown_s)),
        proxy_headers=False,
        server_header=False,
    )
    server = _DrainingServer(config, lifecycle)
    logger.info(
        "bastion listening",
        extra={
            "host": settings.host,
            "port": settings.port,
            "database": settings.resolved_database_url.split(":", 1)[0],
        },
    )
    server.run()
