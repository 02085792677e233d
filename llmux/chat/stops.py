"""Stop strings over streamed text: the answer ends before the first one. Pure."""

from __future__ import annotations

from collections.abc import Sequence


class StopText:
    """Cuts a stream of text pieces at the first of ``stops``.

    Text that could still become a stop string is held back until it cannot; once a
    stop string is complete, ``hit`` is true and nothing more comes out.
    """

    def __init__(self, stops: Sequence[str]) -> None:
        self.stops = [s for s in stops if s]
        self.hit = False
        self._held = ""

    def feed(self, piece: str) -> str:
        """The text of ``piece`` (and what was held) that is certainly answer text."""
        if self.hit:
            return ""
        text = self._held + piece
        # NOTE: the stop string that ends first is the one a token-by-token generator
        # meets first ("b" in "aba" for stops "b" and "aba"), however the text was cut.
        found = [(at + len(s), at) for s in self.stops if (at := text.find(s)) >= 0]
        if found:
            self.hit = True
            self._held = ""
            return text[:min(found)[1]]
        keep = max((n for s in self.stops for n in range(1, len(s))
                    if text.endswith(s[:n])), default=0)
        self._held = text[len(text) - keep:] if keep else ""
        return text[:len(text) - keep]

    def flush(self) -> str:
        """What was held back, at the end of a stream that met no stop string."""
        held, self._held = self._held, ""
        return "" if self.hit else held
