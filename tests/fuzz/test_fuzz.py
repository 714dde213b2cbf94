"""The fuzz targets in the suite: every corpus input replays as a regression, and each target is fuzzed briefly.

The short fuzz runs a fixed number of inputs from a fixed seed, so a run is the same on every machine: it finds
what that many mutations of the corpus reach, and a longer run by hand (tests/fuzz/run.py) goes further.
"""

from __future__ import annotations

import base64
import subprocess
import sys
from pathlib import Path
from typing import Final

import pytest

from bastion.vault.sealer import Binding
from tests.fuzz.targets import TARGETS, VAULT

CORPUS: Final = Path(__file__).parent / "corpus"
ROOT: Final = Path(__file__).parents[2]
RUNS: Final = 4000  # per target: a few seconds each on this machine


def _inputs() -> list[tuple[str, Path]]:
    return [(target, path) for target in TARGETS for path in sorted((CORPUS / target).iterdir())]


def test_every_target_has_a_seed_corpus_and_every_corpus_a_target() -> None:
    assert sorted(p.name for p in CORPUS.iterdir()) == sorted(TARGETS)
    assert all(any((CORPUS / target).iterdir()) for target in TARGETS)


@pytest.mark.parametrize(("target", "path"), _inputs(), ids=[f"{t}/{p.name}" for t, p in _inputs()])
def test_every_corpus_input_is_handled(target: str, path: Path) -> None:
    TARGETS[target](path.read_bytes())


@pytest.mark.parametrize("target", sorted(TARGETS))
def test_a_short_fuzz_finds_no_crash(target: str, tmp_path: Path) -> None:
    found = tmp_path / "found"
    found.mkdir()
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "tests.fuzz.run",
            target,
            f"-runs={RUNS}",
            "-seed=1",
            f"-artifact_prefix={tmp_path}/",
            str(found),  # new inputs go here, never into the repository's corpus
            str(CORPUS / target),
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=False,
        timeout=300,
    )
    crashes = {p.name: base64.b64encode(p.read_bytes()).decode() for p in tmp_path.glob("crash-*")}
    assert done.returncode == 0 and not crashes, (
        f"{target}: crash inputs (base64) {crashes}; save them under tests/fuzz/corpus/{target}/\n{done.stderr[-3000:]}"
    )
    assert f"Done {RUNS} runs" in done.stderr


@pytest.mark.parametrize(("name", "binding"), [("sealed-unbound", None), ("sealed-bound", Binding("server", "owner"))])
def test_the_sealed_seeds_open_with_the_targets_vault(name: str, binding: Binding | None) -> None:
    """The ciphertext target reaches the opening code only if its seeds are real seals: they must open."""
    data = (CORPUS / "ciphertext" / name).read_bytes()
    cut = len(data) // 2
    assert cut * 2 == len(data)  # a wrapped data key and a sealed secret of the same length, as the target cuts
    assert VAULT.open("ws", "identity", data[:cut], data[cut:], binding).token is not None
