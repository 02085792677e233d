"""gpt-oss's harmony format: the reply is a series of messages, each a header and a body,
``<|channel|>analysis<|message|>…<|end|><|start|>assistant<|channel|>final<|message|>…``.

The ``analysis`` channel is reasoning, ``final`` is the answer; a ``commentary`` message
addressed ``to=functions.NAME`` is a tool call whose body is the JSON arguments (the
recipient may also stand in the role part: ``<|start|>assistant to=functions.NAME``).
Commentary without a recipient is a preamble the user may see: answer text. The model's
special tokens must reach the parser as text (detokenised with ``special``).
"""

from __future__ import annotations

import re
from typing import Final

from llmux.chat.parsing import (
    Delta,
    IdFactory,
    Segment,
    TagScanner,
    call_arguments,
    call_start,
    merged,
    new_call_id,
)

MESSAGE: Final = "<|message|>"
START: Final = "<|start|>"
BODY_ENDS: Final = ("<|end|>", "<|return|>", "<|call|>", START)
# A reply that never opens a message within this many characters is plain text.
MAX_HEADER: Final = 256

_CHANNEL: Final = re.compile(r"<\|channel\|>\s*([A-Za-z_]+)")
_RECIPIENT: Final = re.compile(r"\bto=([^\s<]+)")


class HarmonyParser(TagScanner):
    """``tools``: turn ``functions.*`` messages into tool calls (when tools were offered;
    otherwise they are reasoning the user does not see)."""

    def __init__(self, *, tools: bool, new_id: IdFactory = new_call_id) -> None:
        super().__init__()
        self.tools = tools
        self.called = False
        self._new_id = new_id
        self._header: str | None = ""  # None inside a body
        self._segment: Segment | None = None  # the body, unless it is a tool call
        self._call: int | None = None  # the index of the tool call being written
        self._calls = 0
        self._plain = False  # no harmony header came: everything is answer text
        self._opened = False  # a message has begun

    def _tags(self) -> tuple[str, ...]:
        return (MESSAGE, START) if self._header is not None else BODY_ENDS

    def _gave_up(self) -> bool:
        return self._plain

    def finish(self) -> list[Delta]:
        if self._plain:
            rest, self._buffer = self._buffer, ""
            return [{"text": rest}] if rest else []
        out = self._add(self._buffer)
        self._buffer = ""
        if self._header:  # an unfinished header: show what the model wrote
            out.append({"text": self._header})
            self._header = ""
        elif self._segment is not None:
            out += self._segment.close(at_tag=False)
        return merged(out)

    def _add(self, text: str) -> list[Delta]:
        if not text:
            return []
        if self._header is not None:
            self._header += text
            if len(self._header) > MAX_HEADER and not self._opened:
                self._plain = True
                header, self._header = self._header, None
                return [{"text": header}]
            return []
        if self._call is not None:
            return [call_arguments(self._call, text)]
        assert self._segment is not None
        return self._segment.add(text)

    def _switch(self, tag: str) -> list[Delta]:
        if self._header is not None:
            if tag == START:  # "<|start|>assistant": the role is part of the header
                self._header = ""
                return []
            return self._open(self._header)
        out = self._segment.close(at_tag=True) if self._segment is not None else []
        self._segment = None
        self._call = None
        self._header = ""
        return out

    def _open(self, header: str) -> list[Delta]:
        """Start the body of the message whose header is ``header``."""
        self._header = None
        self._opened = True
        channel = _CHANNEL.search(header)
        recipient = _RECIPIENT.search(header)
        if recipient and recipient.group(1).startswith("functions.") and self.tools:
            self._call = self._calls
            self._calls += 1
            self.called = True
            name = recipient.group(1).removeprefix("functions.")
            return [call_start(self._call, self._new_id(), name)]
        kind = "text"
        if recipient or (channel and channel.group(1) == "analysis"):
            kind = "reasoning"
        self._segment = Segment(kind, after_tag=True)
        return []
