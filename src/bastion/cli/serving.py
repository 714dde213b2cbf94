"""`bastion serve`: uvicorn (httptools behind the door's limits, uvloop when present) with draining on SIGTERM."""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import importlib.util
import json
import logging
import math
import os
import shutil
import socket
import subprocess
import sys
import threading
from collections.abc import Callable, Generator
from contextlib import contextmanager
from typing import Any

import anyio
import uvicorn

from bastion import __version__
from bastion.cli import boot, instances
from bastion.cli.output import err_console, fail
from bastion.errors import BastionError, ConfigError
from bastion.settings import Settings, load_settings
from bastion.web import edge
from bastion.web.app import Lifecycle, create_app
from bastion.web.logs import configure_logging

logger = logging.getLogger("bastion.serve")
HELPER_POLL_S = 0.05


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


def _settings(host: str | None, port: int | None) -> Settings:
    overrides: dict[str, Any] = {}
    if host is not None:
        overrides["host"] = host
    if port is not None:
        overrides["port"] = port
    return load_settings(**overrides)


def _listen(settings: Settings) -> socket.socket:
    """The listening socket, bound before anything is migrated or imported: a busy port fails at once, naming
    the Bastion that holds it when it is one; port 0 takes a free port (the banner and links say which)."""
    try:
        return socket.create_server((settings.host, settings.port), backlog=2048)
    except OSError as exc:
        if exc.errno != errno.EADDRINUSE:
            raise ConfigError(f"cannot listen on {settings.host}:{settings.port}: {exc.strerror}") from None
        holder = next((i for i in instances.running() if i.listen.endswith(f":{settings.port}")), None)
        who = f"bastion serve (pid {holder.pid}, data {holder.data_dir})" if holder else "another process"
        raise ConfigError(
            f"port {settings.port} on {settings.host} is in use by {who}; stop it or choose another port with "
            "--port or BASTION_PORT"
        ) from None


def _prepare(settings: Settings) -> Settings:
    # Before migrating, so what the first start does is logged in the format operators asked for.
    configure_logging(settings.log_level, settings.log_format)
    # Only the embedded database may invent its own secrets: replicas on PostgreSQL must share theirs.
    prepared = anyio.run(lambda: boot.prepare(settings, generate=settings.embedded))
    return prepared.settings


def banner(settings: Settings) -> str:
    """What a person starting `serve` in a terminal needs next: where it listens, where its data is, what to run."""
    # The command as it can be typed here: `bastion` when that is on PATH, else this executable's path.
    cli = "bastion" if shutil.which("bastion") == sys.argv[0] else sys.argv[0]
    where = f"{settings.data_dir.resolve()} (SQLite)" if settings.embedded else "PostgreSQL (BASTION_DATABASE_URL)"
    return "\n".join(
        [
            f"Bastion {__version__} is serving at {settings.base_url}",
            f"  data      {where}",
            f"  admin API {settings.base_url}/api/v1/docs",
            f"  gateways  {settings.base_url}/g/<gateway>/mcp",
            "  next      in another terminal, from this directory or any other:",
            f"              {cli} init --owner-email you@example.com   (an owner and an API key)",
            f"              {cli} host create my-agent; {cli} --help",
            "  stop      Ctrl-C (drains calls in flight)",
        ]
    )


def serve(*, host: str | None, port: int | None) -> None:
    try:
        settings = _settings(host, port)
        sock = _listen(settings)
    except BastionError as error:
        fail(error)
    with sock:
        _serve_on(sock, settings)


def _serve_on(sock: socket.socket, settings: Settings) -> None:
    try:
        settings = _prepare(settings)
    except BastionError as error:
        fail(error)
    bound_port: int = sock.getsockname()[1]
    if bound_port != settings.port:  # --port 0
        settings = settings.model_copy(update={"port": bound_port})
    app = create_app(settings)
    lifecycle: Lifecycle = app.state.lifecycle
    config = uvicorn.Config(
        app,
        host=settings.host,
        port=settings.port,
        loop="uvloop" if importlib.util.find_spec("uvloop") else "asyncio",
        # Request heads bounded in size, fields and time, and open connections bounded, before any app code runs.
        http=edge.protocol(edge.Limits(settings.head_timeout_s, settings.max_connections)),
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
    driver = settings.resolved_database_url.split(":", 1)[0]
    logger.info("bastion listening", extra={"host": settings.host, "port": settings.port, "database": driver})
    database = "sqlite" if settings.embedded else "postgresql"
    instance = instances.new(settings.data_dir, settings.base_url, f"{settings.host}:{settings.port}", database)

    def started() -> bool:
        return bool(server.started)

    with instances.recorded(instance), _warm_cli(instance, enabled=settings.warm_cli, serving=started):
        if sys.stderr.isatty():
            err_console.print(banner(settings), soft_wrap=True, highlight=False, markup=False)
        server.run(sockets=[sock])


@contextmanager
def _warm_cli(
    instance: instances.Instance, *, enabled: bool, serving: Callable[[], bool]
) -> Generator[None, None, None]:
    """The warm CLI helper (cli/warm.py) while serving: started once `serve` answers (its imports would otherwise
    compete with the server's own start), announced in the instance's record once it has imported the CLI,
    stopped with `serve`. A helper that fails only costs the CLI its speed."""
    if not enabled:
        yield
        return
    from bastion.cli import warm

    try:
        path = warm.runtime_dir() / f"cli-{os.getpid()}.sock"
    except OSError as exc:
        logger.warning("warm CLI disabled: %s", exc)
        yield
        return
    stopping = threading.Event()
    helpers: list[subprocess.Popen[bytes]] = []

    def start_and_announce() -> None:
        while not serving():
            if stopping.wait(HELPER_POLL_S):
                return
        helper = subprocess.Popen(  # noqa: S603 - this interpreter, our module, our socket and pid
            [sys.executable, "-m", "bastion.cli.warm", str(path), str(os.getpid())],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
        )
        helpers.append(helper)
        line = helper.stdout.readline() if helper.stdout is not None else b""
        with contextlib.suppress(ValueError, KeyError, OSError):
            stamp = json.loads(line)["stamp"]
            if not stopping.is_set():
                instances.write(dataclasses.replace(instance, cli_socket=str(path), cli_stamp=stamp))

    starter = threading.Thread(target=start_and_announce, name="warm-cli", daemon=True)
    starter.start()
    try:
        yield
    finally:
        stopping.set()
        for helper in helpers:
            helper.terminate()
            with contextlib.suppress(subprocess.TimeoutExpired):
                helper.wait(timeout=5)
            if helper.stdout is not None:
                helper.stdout.close()
        path.unlink(missing_ok=True)
