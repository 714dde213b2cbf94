"""The `bastion` executable: hands the command to a running `serve`'s warm helper, else runs it here.

Standard library only, so that reaching the helper costs a few milliseconds (see ``cli/warm.py``). Any helper
of this user running this very code will do: the command resolves its data directory in the child exactly as
it would here. ``BASTION_CLI_START=cold`` always runs here; ``warm`` fails when no helper answers.
"""

from __future__ import annotations

import array
import json
import os
import signal
import socket
import struct
import sys
from typing import Final

_HEADER: Final = struct.Struct("!I")
CONNECT_TIMEOUT_S: Final = 2.0
FORWARDED: Final = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)


def _recv_exactly(conn: socket.socket, size: int) -> bytes | None:
    data = b""
    while len(data) < size:
        try:
            chunk = conn.recv(size - len(data))
        except InterruptedError:
            continue
        if not chunk:
            return None
        data += chunk
    return data


def _helpers() -> list[str]:
    """Sockets of running helpers of this code, newest instance first."""
    from bastion.cli import instances, warm

    found = [i for i in instances.running() if i.cli_socket and i.cli_stamp]
    if not found:
        return []
    stamp = warm.source_stamp()
    return [i.cli_socket for i in reversed(found) if i.cli_stamp == stamp and i.executable == sys.executable]


def run_via(path: str, argv: list[str]) -> int | None:
    """``argv`` run by the warm helper at ``path``: its exit status, or None when it could not be handed over.

    A Ctrl-C (or SIGTERM, SIGHUP) reaches the command: one that comes before the helper has said which process
    runs it waits, and is passed on as soon as it has."""
    child: int | None = None
    waiting: list[int] = []

    def forward(signum: int, _frame: object) -> None:
        if child is None:
            waiting.append(signum)
        else:
            os.kill(child, signum)

    previous = {signum: signal.signal(signum, forward) for signum in FORWARDED}
    conn = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        conn.settimeout(CONNECT_TIMEOUT_S)
        conn.connect(path)
        request = json.dumps({"argv": argv, "cwd": os.getcwd(), "env": dict(os.environ)}).encode("utf-8")
        conn.sendmsg([b"\0"], [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", [0, 1, 2]).tobytes())])
        conn.sendall(_HEADER.pack(len(request)) + request)
        started = _recv_exactly(conn, _HEADER.size)
    except OSError:
        started = None
    if started is None:
        conn.close()
        for signum, handler in previous.items():
            signal.signal(signum, handler)
        for signum in waiting:  # not handed over: the signal is this process's own again
            os.kill(os.getpid(), signum)
        return None
    (pid,) = _HEADER.unpack(started)
    child = pid
    for signum in waiting:
        os.kill(pid, signum)
    conn.settimeout(None)
    with conn:
        ended = _recv_exactly(conn, _HEADER.size)
    return 1 if ended is None else _HEADER.unpack(ended)[0]


def main() -> None:
    mode = os.environ.get("BASTION_CLI_START", "auto")
    # `serve` always starts as a process of its own, never as a child of another serve's helper.
    if mode != "cold" and sys.argv[1:2] != ["serve"]:
        for path in _helpers():
            code = run_via(path, sys.argv[1:])
            if code is not None:
                sys.exit(code)
        if mode == "warm":
            sys.stderr.write("no warm CLI helper answered (is `bastion serve` running with BASTION_WARM_CLI?)\n")
            sys.exit(1)
    from bastion.cli.main import main as cold

    cold()
