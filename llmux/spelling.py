"""The name a misspelt one was probably meant to be, for config messages (pure)."""

from __future__ import annotations

import difflib
from collections.abc import Iterable
from typing import Final

__all__ = ["closest", "did_you_mean"]

_CUTOFF: Final = 0.75  # "max_lenght" -> "max_length"; "lang" is no "language"


def closest(name: str, known: Iterable[str]) -> str | None:
    """The one known name close to ``name``, if there is one."""
    close = difflib.get_close_matches(name, list(known), n=1, cutoff=_CUTOFF)
    return close[0] if close else None


def did_you_mean(name: str, known: Iterable[str]) -> str:
    """``" (did you mean NAME?)"`` for the known name close to ``name``, else ``""``."""
    close = closest(name, known)
    return f" (did you mean {close}?)" if close else ""
