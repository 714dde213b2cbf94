"""The naming patterns are the API document's too: they must mean in a JSON Schema (ECMA) what they mean here."""

from __future__ import annotations

import re
import sys

from hypothesis import given
from hypothesis import strategies as st

from bastion.domain import naming


def test_the_spelled_out_white_space_is_exactly_what_python_strips() -> None:
    spaces = re.compile(f"[{naming.SPACES}]")
    every = (chr(c) for c in range(sys.maxunicode + 1))
    assert {ch for ch in every if ch.isspace()} == {
        ch for ch in map(chr, range(sys.maxunicode + 1)) if spaces.match(ch)
    }


@given(st.text(max_size=12))
def test_any_case_matches_the_text_in_every_letter_case_and_nothing_else(text: str) -> None:
    pattern = re.compile(naming.any_case("ld_preload"))
    assert (pattern.fullmatch(text) is not None) == (text.lower() == "ld_preload" and text.isascii())
    assert re.compile(naming.any_case("Ld_PreLoad")).fullmatch("LD_preload")
