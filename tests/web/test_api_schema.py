"""Schemathesis against the admin API of a real `bastion serve`, on both databases.

It generates requests from /api/v1/openapi.json (examples, edge cases, fuzzing and stateful sequences) as the
owner, and holds every answer to the document: no server error, only documented status codes and content types,
bodies and headers as their schemas say; every request the document calls valid is accepted (or meets a missing
resource or a conflict) and every one it calls invalid is refused. A fixed seed makes the run the same on every
machine.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Final

import httpx2
import pytest

from bastion.settings import generate_secrets
from tests.processes import HEAVY_TIMEOUT_S, clean_env, run_bastion, serving, uncovered_env

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(HEAVY_TIMEOUT_S)]

SCHEMATHESIS: Final = Path(sys.executable).parent / "schemathesis"
REPO: Final = Path(__file__).resolve().parents[2]
# What the document cannot say, and so what is not generated: see the module.
HOOKS: Final = "tests.web.schemathesis_hooks"
CHECKS: Final = (
    "not_a_server_error",
    "status_code_conformance",
    "content_type_conformance",
    "response_schema_conformance",
    "response_headers_conformance",
    "positive_data_acceptance",
    "negative_data_rejection",
)
# Operations that could take the run's own access away (its key revoked, its owner deleted, disabled or given a
# lesser role) would turn every later answer into a 401 or 403, which the document allows: the run would pass
# without testing anything. The test checks the key still works at the end.
EXCLUDED: Final = ("revoke_my_api_key", "revoke_member_api_key", "delete_member", "update_member")


@pytest.fixture(params=["sqlite", "postgresql"])
def database_env(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[dict[str, str]]:
    if request.param == "sqlite":
        yield {}
        return
    yield {"BASTION_DATABASE_URL": request.getfixturevalue("fresh_pg_url")}


def test_every_answer_of_the_admin_api_is_the_one_its_openapi_document_describes(
    database_env: dict[str, str], tmp_path: Path
) -> None:
    # The server runs untraced: thousands of generated requests check answers against the document, not lines
    # (the API's tests cover those), and tracing each made this test three times slower.
    env = {
        k: v
        for k, v in clean_env(
            BASTION_DATA_DIR=str(tmp_path / "data"),
            **database_env,
            **{f"BASTION_{k.upper()}": v for k, v in generate_secrets().items()},
        ).items()
        if not k.startswith("COVERAGE_")
    }
    done = run_bastion("init", "--owner-email", "owner@example.com", "--json", env=env, cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    key = json.loads(done.stdout)["owner"]["api_key"]
    with serving(env, tmp_path) as bastion:
        run = subprocess.run(
            [
                str(SCHEMATHESIS),
                "run",
                f"{bastion.base_url}/api/v1/openapi.json",
                "--header",
                f"Authorization: Bearer {key}",
                "--checks",
                ",".join(CHECKS),
                *(arg for operation in EXCLUDED for arg in ("--exclude-operation-id", operation)),
                "--max-examples",
                "5",
                "--seed",
                "1",
                "--no-color",
            ],
            capture_output=True,
            text=True,
            timeout=HEAVY_TIMEOUT_S,
            check=False,
            cwd=tmp_path,
            env=uncovered_env() | {"SCHEMATHESIS_HOOKS": HOOKS, "PYTHONPATH": str(REPO)},
        )
        me = httpx2.get(f"{bastion.base_url}/api/v1/me", headers={"Authorization": f"Bearer {key}"}, timeout=30)
    assert me.status_code == 200, f"the run lost its own access, so its answers prove little: {me.text}"
    summary = run.stdout[run.stdout.rfind("SUMMARY") :]
    assert run.returncode == 0, f"schemathesis found failures:\n{run.stdout[-6000:]}"
    selected, tested = re.search(r"Selected: (\d+)/", summary), re.search(r"Tested: (\d+)", summary)
    assert selected is not None and tested is not None, summary
    assert int(tested.group(1)) == int(selected.group(1)) > 80, summary  # every operation but the excluded
