"""Small helpers several test modules share: draining a backend's stream, scoring
transcripts."""

from __future__ import annotations

import re
from typing import Any

from llmux.backends.base import Stream


def drain(stream: Stream) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """Every chunk a backend's ``infer`` yields, and the done data it returns."""
    chunks: list[dict[str, Any]] = []
    while True:
        try:
            chunks.append(next(stream))
        except StopIteration as stop:
            return chunks, stop.value


def words(text: str) -> list[str]:
    return re.findall(r"[a-z']+", text.lower())


def word_error_rate(reference: str, hypothesis: str) -> float:
    """Word-level Levenshtein distance over the reference's length."""
    ref, hyp = words(reference), words(hypothesis)
    row = list(range(len(hyp) + 1))
    for i, r in enumerate(ref, start=1):
        diagonal, row[0] = row[0], i
        for j, h in enumerate(hyp, start=1):
            diagonal, row[j] = row[j], min(row[j] + 1, row[j - 1] + 1, diagonal + (r != h))
    return row[-1] / max(1, len(ref))
