"""The pieces every incremental chat-output parser shares: finding tags in text that
arrives in arbitrary chunks, trimming the whitespace models put around tags, and the
OpenAI tool-call deltas. Pure; the worker runs the parsers on the model's raw text.

A parser turns raw model text into chunk data of the worker protocol:
``{"text": ...}`` (answer), ``{"reasoning": ...}`` and ``{"tool_calls": [delta]}``.
Whatever the chunk boundaries, the concatenated result is the same (a property test
holds every parser to that).
"""

from __future__ import annotations

import uuid
from collections.abc import Callable, Iterable
from typing import Any, Protocol

Delta = dict[str, Any]
IdFactory = Callable[[], str]


def new_call_id() -> str:
    """An OpenAI-style tool call id."""
    return f"call_{uuid.uuid4().hex[:24]}"


class OutputParser(Protocol):
    """Raw model text in, chunk data out."""

    called: bool  # a tool call was emitted: the finish reason becomes "tool_calls"

    def feed(self, text: str) -> list[Delta]:
        """The chunk data that ``text`` (after what came before) certainly makes."""

    def finish(self) -> list[Delta]:
        """The rest, at the end of the output."""


class PlainText:
    """No reasoning, no tool calls: the text is the answer."""

    called = False

    def feed(self, text: str) -> list[Delta]:
        return [{"text": text}] if text else []

    def finish(self) -> list[Delta]:
        return []


def find_tag(text: str, tags: Iterable[str]) -> tuple[int, str] | None:
    """The earliest complete tag in ``text`` (the longest at a tie), or None."""
    best: tuple[int, str] | None = None
    for tag in tags:
        index = text.find(tag)
        if index >= 0 and (best is None or index < best[0]
                           or (index == best[0] and len(tag) > len(best[1]))):
            best = (index, tag)
    return best


def partial_tag_length(text: str, tags: Iterable[str]) -> int:
    """How many characters at the end of ``text`` could be the start of a tag, and so
    must wait for more text before they can be called plain text."""
    return max((n for tag in tags for n in range(1, len(tag)) if text.endswith(tag[:n])),
               default=0)


class Segment:
    """The text of one stretch of output between tags, of one kind ("text" or
    "reasoning"). Whitespace next to a tag is dropped (models write ``<think>\\n``);
    whitespace inside is kept, held back until it is known not to be at the end."""

    def __init__(self, kind: str, *, after_tag: bool) -> None:
        self.kind = kind
        self._strip_leading = after_tag
        self._spaces = ""

    def add(self, text: str) -> list[Delta]:
        if self._strip_leading:
            text = text.lstrip()
            if not text:
                return []
            self._strip_leading = False
        body = text.rstrip()
        if not body:
            self._spaces += text
            return []
        out = self._spaces + body
        self._spaces = text[len(body):]
        return [{self.kind: out}]

    def close(self, *, at_tag: bool) -> list[Delta]:
        """The held whitespace, unless the segment ends at a tag."""
        spaces, self._spaces = self._spaces, ""
        return [] if at_tag or not spaces else [{self.kind: spaces}]


class TagScanner:
    """The loop both tag-based parsers share: buffered text is cut at the tags of the
    current state (``_tags``); text between tags goes to ``_add``, each tag to
    ``_switch``. Text that may be the start of a tag waits for more. A parser that
    gives up on its format (``_gave_up``) lets the rest through as answer text."""

    def __init__(self) -> None:
        self._buffer = ""

    def _tags(self) -> tuple[str, ...]:
        raise NotImplementedError

    def _add(self, text: str) -> list[Delta]:
        raise NotImplementedError

    def _switch(self, tag: str) -> list[Delta]:
        raise NotImplementedError

    def _gave_up(self) -> bool:
        return False

    def feed(self, text: str) -> list[Delta]:
        self._buffer += text
        out: list[Delta] = []
        while not self._gave_up():
            tags = self._tags()
            hit = find_tag(self._buffer, tags)
            if hit is None:
                keep = partial_tag_length(self._buffer, tags)
                ready = self._buffer[:len(self._buffer) - keep]
                self._buffer = self._buffer[len(ready):]
                out += self._add(ready)
                if not self._gave_up():
                    return merged(out)
                break
            index, tag = hit
            before, self._buffer = self._buffer[:index], self._buffer[index:]
            out += self._add(before)
            if self._gave_up():  # the text before the tag ended the format: the tag on
                break  # is answer text
            self._buffer = self._buffer[len(tag):]
            out += self._switch(tag)
        rest, self._buffer = self._buffer, ""
        return merged(out + ([{"text": rest}] if rest else []))


def call_start(index: int, call_id: str, name: str) -> Delta:
    """The first delta of a tool call: its id and name, no arguments yet."""
    return {"tool_calls": [{"index": index, "id": call_id, "type": "function",
                            "function": {"name": name, "arguments": ""}}]}


def call_arguments(index: int, fragment: str) -> Delta:
    return {"tool_calls": [{"index": index, "function": {"arguments": fragment}}]}


def merged(deltas: list[Delta]) -> list[Delta]:
    """Adjacent text or reasoning deltas joined (fewer, larger chunks)."""
    out: list[Delta] = []
    for delta in deltas:
        if out and "tool_calls" not in delta and out[-1].keys() == delta.keys():
            key = next(iter(delta))
            out[-1] = {key: out[-1][key] + delta[key]}
        else:
            out.append(delta)
    return out
