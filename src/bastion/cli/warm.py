"""The warm CLI: a helper `serve` starts, holding the CLI's modules imported, that forks one child per command.

A cold `bastion host list` spends most of its time importing (SQLAlchemy, pydantic, rich, the services). While
`serve` runs, `bastion` (``cli/launch.py``) hands the command to this helper instead: over a Unix socket in a
directory only the user can enter, it sends its arguments, working directory and environment, and passes its
stdin, stdout and stderr as file descriptors (SCM_RIGHTS). The helper forks; the child takes those descriptors,
directory and environment, runs the command exactly as a cold process would, and reports its exit status. The
helper checks the peer's uid (SO_PEERCRED), runs the code it was started with (the launcher compares a stamp of
the installed sources and runs cold on any difference), and exits with the `serve` that started it.
"""

from __future__ import annotations

import array
import contextlib
import importlib
import json
import os
import signal
import socket
import struct
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any, Final, NoReturn

MAX_REQUEST_BYTES: Final = 4 * 1024 * 1024
_HEADER: Final = struct.Struct("!I")
ACCEPT_POLL_S: Final = 1.0


def runtime_dir() -> Path:
    """Where the helpers' sockets live: $XDG_RUNTIME_DIR/bastion, else /tmp/bastion-<uid>; mode 0700, ours."""
    base = os.environ.get("XDG_RUNTIME_DIR")
    path = Path(base) / "bastion" if base else Path(f"/tmp/bastion-{os.getuid()}")  # noqa: S108 - checked below
    path.mkdir(mode=0o700, parents=True, exist_ok=True)
    info = path.lstat()
    if info.st_uid != os.getuid() or info.st_mode & 0o077 or not path.is_dir() or path.is_symlink():
        raise PermissionError(f"{path} must be a directory of this user's with mode 0700")
    return path


def source_stamp() -> str:
    """The installed sources' newest modification time and count: a helper started before an edit is stale."""
    newest, count = 0, 0
    for folder, _dirs, files in os.walk(Path(__file__).resolve().parents[1]):
        for name in files:
            if name.endswith(".py"):
                newest = max(newest, os.stat(os.path.join(folder, name)).st_mtime_ns)
                count += 1
    return f"{newest}:{count}"


CLI_ENTRY: Final = "bastion.cli.main:main"


def _preload(entry: str) -> Callable[[], object]:
    """Import what the commands import, so that a child only runs; the entry point to run in each child."""
    module, _, function = entry.partition(":")
    if entry == CLI_ENTRY:
        import bastion.cli.context
        from bastion.cli.groups import GROUPS, load

        for name in GROUPS:
            load(name)
        _ = bastion.cli.context
    run: Callable[[], object] = getattr(importlib.import_module(module), function)
    return run


def _read_exactly(conn: socket.socket, size: int) -> bytes:
    data = b""
    while len(data) < size:
        chunk = conn.recv(size - len(data))
        if not chunk:
            raise ConnectionError("the launcher hung up")
        data += chunk
    return data


def _receive(conn: socket.socket) -> tuple[list[int], dict[str, Any]]:
    fds = array.array("i")
    _msg, ancillary, _flags, _addr = conn.recvmsg(1, socket.CMSG_SPACE(3 * fds.itemsize))
    for level, kind, data in ancillary:
        if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
            fds.frombytes(data[: len(data) - (len(data) % fds.itemsize)])
    (size,) = _HEADER.unpack(_read_exactly(conn, _HEADER.size))
    if len(fds) != 3 or size > MAX_REQUEST_BYTES:
        for fd in fds:
            os.close(fd)
        raise ValueError("a request carries stdin, stdout and stderr and at most 4 MiB")
    request: dict[str, Any] = json.loads(_read_exactly(conn, size))
    return list(fds), request


def _run_child(conn: socket.socket, fds: list[int], request: dict[str, Any], run: Callable[[], object]) -> int:
    """In the forked child: become the launcher's process (descriptors, directory, environment) and run."""
    signal.signal(signal.SIGCHLD, signal.SIG_DFL)
    signal.signal(signal.SIGINT, signal.default_int_handler)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    for target, fd in enumerate(fds):
        os.dup2(fd, target)
        os.close(fd)
    sys.stdin = open(0, encoding="utf-8", closefd=False)  # noqa: SIM115 - the process's own stdin
    sys.stdout = open(1, "w", encoding="utf-8", closefd=False, buffering=1 if os.isatty(1) else -1)  # noqa: SIM115
    sys.stderr = open(2, "w", encoding="utf-8", closefd=False, buffering=1)  # noqa: SIM115
    os.chdir(request["cwd"])
    os.environ.clear()
    os.environ.update(request["env"])
    sys.argv = [sys.argv[0], *request["argv"]]
    conn.sendall(_HEADER.pack(os.getpid()))
    exit_now = os._exit

    def reported_exit(status: int) -> NoReturn:  # an entry point may end with os._exit: the launcher still hears
        with contextlib.suppress(OSError):
            conn.sendall(_HEADER.pack(status & 0xFF))
        exit_now(status)

    os._exit = reported_exit
    if "bastion.cli.output" in sys.modules:
        from bastion.cli import output

        output.reinitialise()
    code = 0
    try:
        run()
    except SystemExit as exit_:
        code = exit_.code if isinstance(exit_.code, int) else (0 if exit_.code is None else 1)
    except KeyboardInterrupt:
        code = 130
    finally:
        with contextlib.suppress(OSError, ValueError):
            sys.stdout.flush()
            sys.stderr.flush()
    return code


def serve_forever(path: Path, parent: int, run: Callable[[], object]) -> None:
    """Accept launchers on ``path`` until the process that started this helper is gone."""
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    path.unlink(missing_ok=True)
    listener.bind(str(path))
    os.chmod(path, 0o600)
    listener.listen(64)
    listener.settimeout(ACCEPT_POLL_S)
    signal.signal(signal.SIGCHLD, signal.SIG_IGN)  # children are reaped by the kernel
    sys.stdout.write(json.dumps({"stamp": source_stamp()}) + "\n")
    sys.stdout.flush()
    try:
        while os.getppid() == parent:
            try:
                conn, _addr = listener.accept()
            except TimeoutError:
                continue
            with conn:
                uid = struct.unpack("3i", conn.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, 12))[1]
                if uid != os.getuid():
                    continue
                conn.settimeout(5)
                try:
                    fds, request = _receive(conn)
                except (OSError, ValueError, ConnectionError):
                    continue
                conn.settimeout(None)
                if os.fork() == 0:
                    listener.close()
                    code = 1
                    try:
                        code = _run_child(conn, fds, request, run)
                    except KeyboardInterrupt:  # a Ctrl-C the launcher passed on before the command began
                        code = 130
                    finally:
                        os._exit(code & 0xFF)  # reports the status (see _run_child)
                for fd in fds:
                    os.close(fd)
    finally:
        listener.close()
        path.unlink(missing_ok=True)


def main() -> None:
    """`python -m bastion.cli.warm SOCKET PARENT_PID [MODULE:FUNCTION]`: preload, then serve launchers.

    The entry point is the CLI's by default; the tests use the same helper for their many short-lived clients.
    """
    path, parent = Path(sys.argv[1]), int(sys.argv[2])
    entry = sys.argv[3] if len(sys.argv) > 3 else CLI_ENTRY
    run = _preload(entry)
    sys.argv = [entry.partition(":")[0]]
    serve_forever(path, parent, run)


if __name__ == "__main__":
    main()
