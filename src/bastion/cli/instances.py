"""Running instances: `serve` records where it listens, so a CLI run from anywhere finds its data and address.

Each running `bastion serve` keeps one small JSON file under ``$XDG_STATE_HOME/bastion/instances/`` (by default
``~/.local/state/bastion/instances/``), named after its data directory, removed when it stops. A record whose
process is gone is ignored and removed on the next read. Standard library only: `bastion --help` reads none.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import sys
import time
from collections.abc import Generator
from dataclasses import asdict, dataclass
from pathlib import Path


@dataclass(frozen=True, slots=True)
class Instance:
    pid: int
    data_dir: str  # absolute
    base_url: str  # where people and agents reach it (BASTION_PUBLIC_URL, else the address it listens on)
    listen: str  # host:port it is bound to
    database: str  # "sqlite" or "postgresql"
    started_at: float
    executable: str = ""  # the Python running it: a warm CLI helper serves launchers of the same one
    cli_socket: str = ""  # its warm CLI helper's socket, once the helper is ready (cli/warm.py)
    cli_stamp: str = ""  # the sources the helper runs (warm.source_stamp())


def state_dir() -> Path:
    base = os.environ.get("XDG_STATE_HOME") or str(Path.home() / ".local" / "state")
    return Path(base) / "bastion" / "instances"


def _path_for(data_dir: Path) -> Path:
    digest = hashlib.sha256(str(data_dir.resolve()).encode("utf-8")).hexdigest()[:16]
    return state_dir() / f"{digest}.json"


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # someone else's process, but alive
    return True


def write(instance: Instance) -> None:
    """Write (or replace) ``instance``'s record atomically, mode 0600."""
    path = _path_for(Path(instance.data_dir))
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    temp = path.with_suffix(f".{os.getpid()}.tmp")
    fd = os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w", encoding="utf-8") as out:
        json.dump(asdict(instance), out)
    temp.replace(path)


@contextlib.contextmanager
def recorded(instance: Instance) -> Generator[None]:
    """Keep ``instance``'s record while the block runs (removed afterwards)."""
    write(instance)
    path = _path_for(Path(instance.data_dir))
    try:
        yield
    finally:
        with contextlib.suppress(OSError):
            current = _read(path)
            if current is not None and current.pid == instance.pid:  # a later start may own it now
                path.unlink()


def _read(path: Path) -> Instance | None:
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
        return Instance(**raw)
    except (OSError, ValueError, TypeError):
        return None


def running() -> list[Instance]:
    """Every instance whose process is alive, oldest first; stale records are removed."""
    found: list[Instance] = []
    with contextlib.suppress(OSError):
        for path in state_dir().glob("*.json"):
            instance = _read(path)
            if instance is not None and _alive(instance.pid):
                found.append(instance)
            else:
                with contextlib.suppress(OSError):
                    path.unlink()
    return sorted(found, key=lambda i: i.started_at)


def for_data_dir(data_dir: Path) -> Instance | None:
    instance = _read(_path_for(data_dir))
    if instance is None or not _alive(instance.pid):
        return None
    return instance


def new(data_dir: Path, base_url: str, listen: str, database: str) -> Instance:
    return Instance(os.getpid(), str(data_dir.resolve()), base_url, listen, database, time.time(), sys.executable)
