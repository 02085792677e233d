"""Which parser reads a model's output, and a stream wrapper that applies it.

The format comes from the backend's options (``reasoning_format``, ``tool_format``) or,
by default ("auto"), from the chat template: harmony special tokens mean gpt-oss,
``<think>`` means think blocks, ``<tool_call>`` means Hermes tool calls. Tool calls are
parsed only when the request offered tools.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Final

from llmux.backends.base import Stream
from llmux.chat.harmony import HarmonyParser
from llmux.chat.parsing import OutputParser, PlainText
from llmux.chat.tagged import CALL_OPEN, THINK_OPEN, TaggedParser

REASONING_FORMATS: Final = ("auto", "none", "think", "harmony")
TOOL_FORMATS: Final = ("auto", "none", "hermes", "harmony")
HARMONY_MARK: Final = "<|channel|>"


def output_formats(template: str, options: Mapping[str, Any]) -> tuple[str, str]:
    """(reasoning format, tool format) for a model with this chat template.

    Raises:
        ValueError: an option that is not one of the known formats.
    """
    reasoning = options.get("reasoning_format", "auto")
    tools = options.get("tool_format", "auto")
    if reasoning not in REASONING_FORMATS:
        raise ValueError(f"option reasoning_format must be one of "
                         f"{', '.join(REASONING_FORMATS)}, got {reasoning!r}")
    if tools not in TOOL_FORMATS:
        raise ValueError(f"option tool_format must be one of {', '.join(TOOL_FORMATS)}, "
                         f"got {tools!r}")
    harmony = HARMONY_MARK in template
    if reasoning == "auto":
        reasoning = "harmony" if harmony else "think" if THINK_OPEN in template else "none"
    if tools == "auto":
        tools = "harmony" if harmony else "hermes" if CALL_OPEN in template else "none"
    return reasoning, tools


def output_parser(formats: tuple[str, str], prompt: str, payload: Mapping[str, Any]
                  ) -> OutputParser:
    """A fresh parser for one reply to ``prompt``."""
    reasoning, tools = formats
    offered = bool(payload.get("tools")) and payload.get("tool_choice") != "none"
    if "harmony" in formats:
        return HarmonyParser(tools=offered and tools == "harmony")
    think = reasoning == "think"
    hermes = offered and tools == "hermes"
    if think or hermes:
        return TaggedParser(think=think, tools=hermes, prompt=prompt)
    return PlainText()


def parsed(stream: Stream, parser: OutputParser) -> Stream:
    """``stream`` with its ``text`` chunks run through ``parser``; a reply that called a
    tool finishes with "tool_calls"."""
    try:
        while True:
            try:
                chunk = next(stream)
            except StopIteration as end:
                done: dict[str, Any] = dict(end.value or {})
                break
            if "text" in chunk:
                yield from parser.feed(str(chunk["text"]))
            else:
                yield chunk
        yield from parser.finish()
    finally:
        stream.close()
    if parser.called and done.get("finish_reason") in ("stop", None):
        done["finish_reason"] = "tool_calls"
    return done
