"""What a virtual model adds to a request: template kwargs (``enable_thinking``),
a system prompt prefix, and default sampling parameters the request may override.
Pure: the chat resource calls it, the worker receives the result."""

from __future__ import annotations

from typing import Any

import attrs

from llmux.config import VirtualModel


def merge_system_prefix(messages: list[dict[str, Any]], prefix: str) -> list[dict[str, Any]]:
    """One system message, the prefix first, whether or not the client sent one."""
    if messages and messages[0].get("role") in ("system", "developer"):
        first = dict(messages[0])
        content = first.get("content")
        if isinstance(content, list):
            first["content"] = [{"type": "text", "text": prefix}, *content]
        elif content:
            first["content"] = f"{prefix}\n\n{content}"
        else:
            first["content"] = prefix
        return [first, *messages[1:]]
    return [{"role": "system", "content": prefix}, *messages]


def apply_virtual(
    virtual: VirtualModel, messages: list[dict[str, Any]], params: dict[str, Any],
    template_kwargs: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """The worker payload for a chat request through ``virtual``.

    ``params`` holds the sampling parameters the client set (None = unset); the
    virtual model's defaults fill the gaps. The client's own ``chat_template_kwargs``
    win over the virtual model's.
    """
    sampling = {k: v for k, v in attrs.asdict(virtual.sampling).items() if v is not None}
    sampling.update({k: v for k, v in params.items() if v is not None})
    kwargs = dict(virtual.chat_template_kwargs)
    if virtual.enable_thinking is not None:
        kwargs["enable_thinking"] = virtual.enable_thinking
    kwargs.update(template_kwargs or {})
    if virtual.system_prompt_prefix:
        messages = merge_system_prefix(messages, virtual.system_prompt_prefix)
    return {"messages": messages, **sampling, "chat_template_kwargs": kwargs}
