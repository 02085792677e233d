"""A misspelt config name is answered with the name it was probably meant to be."""

from __future__ import annotations

import pytest

from llmux.spelling import closest, did_you_mean

OPTIONS = ["max_length", "batch_size", "language", "flash_attn", "n_ctx"]


@pytest.mark.parametrize(("name", "meant"), [
    ("max_lenght", "max_length"),  # letters swapped
    ("batchsize", "batch_size"),  # one left out
    ("flash_atn", "flash_attn"),
    ("bach_sise", "batch_size"),  # two slips (ratio 0.84) still have a match
    ("lang", None),  # a fragment is not a typo
    ("temperature", None),  # nothing like it
    ("n_ctx", "n_ctx"),  # a known name is its own closest (callers ask for unknown ones)
])
def test_the_closest_known_name(name: str, meant: str | None) -> None:
    assert closest(name, OPTIONS) == meant


def test_the_hint_is_a_phrase_or_nothing() -> None:
    assert did_you_mean("max_lenght", OPTIONS) == " (did you mean max_length?)"
    assert did_you_mean("xyz", OPTIONS) == ""
