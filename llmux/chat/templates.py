"""OpenAI chat messages shaped the way Jinja chat templates (GGUF and Hugging Face)
expect them. Pure; shared by the LLM backends."""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from typing import Any

from llmux.backends.base import InvalidInput


def template_messages(messages: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """OpenAI messages as chat templates expect them: string contents (text parts
    joined by newlines, None as ""), tool call arguments as objects, not JSON text.

    Raises:
        InvalidInput: a content part that is not text (this backend reads text only).
    """
    out = []
    for message in messages:
        item = dict(message)
        content = item.get("content")
        if content is None:
            item["content"] = ""
        elif isinstance(content, list):
            texts = []
            for part in content:
                kind = part.get("type") if isinstance(part, Mapping) else None
                if kind != "text":
                    raise InvalidInput(f"This model reads text only; a {kind!r} content part "
                                       "cannot be sent to it.")
                texts.append(str(part.get("text", "")))
            item["content"] = "\n".join(texts)
        if isinstance(item.get("tool_calls"), list):
            item["tool_calls"] = [_with_object_arguments(c) for c in item["tool_calls"]]
        out.append(item)
    return out


def _with_object_arguments(call: Any) -> Any:
    """A tool call whose ``function.arguments`` JSON text is decoded, as templates
    render arguments with ``| tojson`` (text that is not a JSON object stays)."""
    function = call.get("function") if isinstance(call, Mapping) else None
    if not isinstance(function, Mapping) or not isinstance(function.get("arguments"), str):
        return call
    arguments = function["arguments"]
    try:
        decoded = json.loads(arguments)
    except ValueError:
        return call
    if not isinstance(decoded, dict):
        return call
    return {**call, "function": {**function, "arguments": decoded}}
