"""Small helpers several test modules share: draining a backend's stream, scoring
transcripts, drawing text into images and PDFs, polling in-process state."""

from __future__ import annotations

import io
import re
from collections.abc import Callable
from typing import Any

import anyio
import pytest
from PIL import Image, ImageDraw, ImageFont

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


# -- images and documents ------------------------------------------------------------

WORDS = ("Invoice total paid", "Thank you kindly")
"""What text_image draws by default."""


def text_image(lines: tuple[str, ...] = WORDS, size: tuple[int, int] = (560, 180)
               ) -> Image.Image:
    image = Image.new("RGB", size, "white")
    draw = ImageDraw.Draw(image)
    font = ImageFont.load_default(size=32)
    for i, line in enumerate(lines):
        draw.text((24, 24 + 70 * i), line, fill="black", font=font)
    return image


def encoded(image: Image.Image, fmt: str, **params: Any) -> bytes:
    out = io.BytesIO()
    image.save(out, fmt, **params)
    return out.getvalue()


def pdf_of(*images: Image.Image) -> bytes:
    """A PDF with one page per image (72 dpi: a page has as many points as pixels)."""
    first, *rest = images
    return encoded(first, "PDF", save_all=True, append_images=rest)


async def until(check: Callable[[], object], what: str, within_s: float = 10.0) -> None:
    """Poll ``check`` (an actor's or the spare pool's state changes post no event a
    test could wait on); fail naming ``what`` after ``within_s``."""
    with anyio.move_on_after(within_s):
        while not check():  # noqa: ASYNC110
            await anyio.sleep(0.01)
        return
    pytest.fail(f"waited {within_s} s for {what}")
