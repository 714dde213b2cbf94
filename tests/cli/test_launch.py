"""The warm CLI: `bastion` hands commands to the helper a running `serve` keeps, with the same results as cold.

Real processes throughout: `bastion serve` with its helper, and the `bastion` executable as a person runs it.
BASTION_CLI_START=warm makes a command fail rather than run cold, so each check below proves the helper ran it.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path

import pytest

from bastion.cli import instances, launch, warm
from tests.processes import BASTION, START_TIMEOUT_S, clean_env, instance_record, run_bastion, serving

pytestmark = pytest.mark.e2e


STDIN_JSON = ("--bearer-token-stdin", "--json")


def _warm_env(tmp_path: Path) -> dict[str, str]:
    return clean_env(
        BASTION_WARM_CLI="true", XDG_STATE_HOME=str(tmp_path / "state"), XDG_RUNTIME_DIR=str(tmp_path / "run")
    )


def _command_running(socket_path: str) -> None:
    """Until the helper listening on ``socket_path`` has forked a child (the command runs)."""
    deadline = time.monotonic() + START_TIMEOUT_S
    while time.monotonic() < deadline:
        for proc in Path("/proc").iterdir():
            try:
                helper = proc.name.isdigit() and socket_path.encode() in (proc / "cmdline").read_bytes()
                if helper and (proc / "task" / proc.name / "children").read_text().split():
                    return
            except OSError:
                continue  # a process that has just ended
        time.sleep(0.05)
    raise AssertionError("the warm helper never forked the command")


@pytest.fixture
def warm_serve(tmp_path: Path) -> Iterator[tuple[dict[str, str], Path]]:
    env = _warm_env(tmp_path)
    served = tmp_path / "served"
    served.mkdir()
    with serving(env, served):
        instance_record(Path(env["XDG_STATE_HOME"]), naming="cli_socket")
        yield env, served


def test_commands_run_in_the_helper_with_the_callers_arguments_streams_directory_and_exit_code(
    warm_serve: tuple[dict[str, str], Path], tmp_path: Path
) -> None:
    env, served = warm_serve
    warm_env = {**env, "BASTION_CLI_START": "warm"}
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    made = run_bastion("host", "create", "agent", "--json", env=warm_env, cwd=elsewhere)
    assert made.returncode == 0, made.stderr
    assert json.loads(made.stdout)["name"] == "agent"
    assert f"using {served / '.bastion'}" in made.stderr  # resolved from the caller's directory, not the helper's

    missing = run_bastion("host", "show", "nope", env=warm_env, cwd=elsewhere)
    assert (missing.returncode, missing.stdout) == (3, "")
    assert "no such host 'nope'" in missing.stderr

    # stdin is the caller's too: a token piped in is sealed for the member.
    run_bastion("server", "create", "crm", "--url", "https://crm.example.com/mcp", env=warm_env, cwd=served)
    run_bastion("member", "create", "ada@example.com", env=warm_env, cwd=served)
    piped = subprocess.run(
        [str(BASTION), "identity", "create", "--server", "crm", "--member", "ada@example.com", *STDIN_JSON],
        input="ada-token-from-stdin-0001\n",
        env=warm_env,
        cwd=served,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert piped.returncode == 0, piped.stderr
    assert json.loads(piped.stdout)["server"] == "crm"

    # The caller's environment is the command's: another data directory is another (new, empty) instance.
    other = run_bastion("host", "list", "--json", env={**warm_env, "BASTION_DATA_DIR": str(tmp_path / "x")}, cwd=served)
    assert other.returncode == 6 and json.loads(other.stdout)["code"] == "config_invalid"

    # Cold and warm agree.
    cold = run_bastion("host", "list", "--json", env={**env, "BASTION_CLI_START": "cold"}, cwd=served)
    warm_list = run_bastion("host", "list", "--json", env=warm_env, cwd=served)
    assert json.loads(cold.stdout) == json.loads(warm_list.stdout)


def test_ctrl_c_reaches_the_command_and_a_gone_helper_leaves_the_cli_cold(tmp_path: Path) -> None:
    env = _warm_env(tmp_path)
    with serving(env, tmp_path) as server:
        record = instance_record(Path(env["XDG_STATE_HOME"]), naming="cli_socket")
        waiting = subprocess.Popen(
            [str(BASTION), "member", "create", "bob@example.com", "--json"],
            env={**env, "BASTION_CLI_START": "warm", "BASTION_DATABASE_URL": "postgresql://nobody@10.255.255.1/x"},
            cwd=tmp_path,
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
            text=True,
        )
        _command_running(str(record["cli_socket"]))  # forked by the helper, connecting to an address that never answers
        waiting.send_signal(signal.SIGINT)
        waiting.communicate(timeout=20)
        # The command itself was interrupted and its status came back; the launcher did not die of the signal (-2).
        assert waiting.returncode > 0
        # serve killed outright: its helper notices and exits; the CLI runs cold.
        server.process.kill()
        server.process.wait(timeout=10)
        deadline = time.monotonic() + 10
        while Path(str(record["cli_socket"])).exists() and time.monotonic() < deadline:
            time.sleep(0.1)
        assert not Path(str(record["cli_socket"])).exists()
    refused = run_bastion("host", "list", env={**env, "BASTION_CLI_START": "warm"}, cwd=tmp_path)
    assert refused.returncode == 1 and "no warm CLI helper answered" in refused.stderr
    cold = run_bastion("host", "list", "--json", env=env, cwd=tmp_path)
    assert cold.returncode == 0 and json.loads(cold.stdout) == []


def test_a_helper_running_other_sources_or_another_python_is_not_used(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("XDG_STATE_HOME", str(tmp_path / "state"))
    stamp = warm.source_stamp()
    base = instances.new(tmp_path / "a", "http://127.0.0.1:1", "127.0.0.1:1", "sqlite")
    instances.write(replace(base, cli_socket="/current.sock", cli_stamp=stamp))
    for n, changes in enumerate(({"cli_stamp": "0:0"}, {"executable": "/usr/bin/python3"}, {"cli_socket": ""})):
        other = replace(base, data_dir=str(tmp_path / f"other{n}"), cli_socket=f"/{n}.sock", cli_stamp=stamp)
        instances.write(replace(other, **changes))
    # Every record names this live process; only the one of this code and this Python is a helper to use.
    assert base.pid == os.getpid()
    assert launch._helpers() == ["/current.sock"]  # pyright: ignore[reportPrivateUsage]
