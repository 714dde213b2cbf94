"""Fuzz one target with atheris: ``python -m tests.fuzz.run TARGET [libFuzzer options] [corpus directories]``.

For example ``.venv/bin/python -m tests.fuzz.run webhook -max_total_time=600 /tmp/webhook-corpus
tests/fuzz/corpus/webhook``: new inputs go into the first directory. A crash is written next to the working
directory (``-artifact_prefix=`` moves it); copy it into ``tests/fuzz/corpus/TARGET/`` so the suite replays it.
"""

from __future__ import annotations

import sys

import atheris

with atheris.instrument_imports(include=["bastion", "bastion_agent"]):
    from tests.fuzz.targets import TARGETS


def main() -> None:
    if len(sys.argv) < 2 or sys.argv[1] not in TARGETS:
        sys.exit(f"usage: python -m tests.fuzz.run {{{','.join(TARGETS)}}} [libFuzzer options] [corpus dirs]")
    target = TARGETS[sys.argv[1]]
    atheris.Setup([sys.argv[0], *sys.argv[2:]], target)
    atheris.Fuzz()


if __name__ == "__main__":
    main()
