"""The README's Quick start, run top to bottom as written against a real `bastion serve`.

Two substitutions only: the gateway listens on a free port rather than 8080, and curl is given `-f` so that an
HTTP error fails the script instead of printing a problem document. The commands run from a directory of their
own, so the CLI finds the running instance's data directory by itself, as a person's second terminal would, and
they run in `serve`'s warm CLI helper, as they do for a person (the default).
"""

from __future__ import annotations

import json
import re
import subprocess
from pathlib import Path

import pytest

from tests.processes import clean_env, instance_record, serving

pytestmark = pytest.mark.e2e

ROOT = Path(__file__).resolve().parents[2]


def quick_start_blocks() -> list[str]:
    """The shell blocks of the README's Quick start section, in order."""
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    section = readme.split("\n## Quick start\n", 1)[1].split("\n## ", 1)[0]
    return re.findall(r"```sh\n(.*?)```", section, flags=re.DOTALL)


def test_the_quick_start_runs_top_to_bottom_as_written(tmp_path: Path) -> None:
    blocks = quick_start_blocks()
    assert len(blocks) >= 2 and all("./scripts/bastion" in b or "curl" in b for b in blocks[:2])
    served, terminal = tmp_path / "served", tmp_path / "terminal"
    served.mkdir()
    terminal.mkdir()
    env = clean_env(BASTION_WARM_CLI="true", XDG_RUNTIME_DIR=str(tmp_path / "run"))
    with serving(env, served) as server:
        instance_record(Path(env["XDG_STATE_HOME"]), naming="cli_socket")
        port = server.base_url.rsplit(":", 1)[1]
        script = "\n".join(blocks)
        script = script.replace("./scripts/bastion", str(ROOT / "scripts" / "bastion"))
        script = script.replace("localhost:8080", f"127.0.0.1:{port}").replace("curl -s ", "curl -sf ")
        ran = subprocess.run(
            ["bash", "-euo", "pipefail", "-c", script],
            cwd=terminal,
            env=env,
            capture_output=True,
            text=True,
            timeout=180,
            check=False,
        )
        assert ran.returncode == 0, f"stdout:\n{ran.stdout}\nstderr:\n{ran.stderr}"
        assert f"served at {server.base_url}" in ran.stderr  # the CLI said whose data it used
        assert f"{server.base_url}/enroll/bsl_" in ran.stdout  # the link carries the address served on
        # Both blocks' changes landed: the CLI's host enabled again, the API's disabled.
        listed = subprocess.run(
            [str(ROOT / "scripts" / "bastion"), "host", "list", "--json"],
            cwd=served,
            env=env,
            capture_output=True,
            text=True,
            timeout=60,
            check=True,
        )
        assert {h["name"]: h["enabled"] for h in json.loads(listed.stdout)} == {
            "sales-agent": True,
            "support-agent": False,
        }
    assert not (terminal / ".bastion").exists()
