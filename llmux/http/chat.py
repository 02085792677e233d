"""``POST /v1/chat/completions``: OpenAI chat, streamed as SSE or whole.

The resource parses and checks the body, resolves the virtual model, applies its
behaviour, submits a job to the physical model's actor and turns the worker's
pieces into OpenAI chunks. It holds the job's cancel handle: a client that leaves
cancels the job at once.
"""

from __future__ import annotations

import logging
import time
import uuid
from collections.abc import AsyncIterator
from typing import Any

import falcon.asgi
from falcon.asgi import SSEvent

from llmux.actors.messages import Failure, Finished, Piece, Reply, Status
from llmux.chat.virtual import apply_virtual
from llmux.config import PhysicalModel, Server, VirtualModel
from llmux.errors import BadRequest
from llmux.http import params
from llmux.http.body import field
from llmux.http.jobs import replies, run_whole, start_stream, unbuffered
from llmux.http.target import json_request
from llmux.imaging import with_image_bytes
from llmux.runtime import Runtime, Ticket

ROLES = frozenset({"system", "developer", "user", "assistant", "tool"})
PART_TYPES = frozenset({"text", "image_url", "input_audio"})
CHAT_TYPES = frozenset({"llm", "vlm"})
TOOL_CHOICES = ("none", "auto", "required")

log = logging.getLogger(__name__)


def _check_part(part: Any, where: str) -> None:
    if not isinstance(part, dict) or part.get("type") not in PART_TYPES:
        raise BadRequest(f"'{where}' must be an object whose type is one of "
                         f"{', '.join(sorted(PART_TYPES))}.", param=where)
    kind = part["type"]
    if kind == "text" and not isinstance(part.get("text"), str):
        raise BadRequest(f"'{where}.text' must be a string.", param=f"{where}.text")
    if kind == "image_url":
        image = part.get("image_url")
        url = image.get("url") if isinstance(image, dict) else image
        if not isinstance(url, str):
            raise BadRequest(f"'{where}.image_url.url' must be a string.",
                             param=f"{where}.image_url")


def parse_messages(body: dict[str, Any]) -> list[dict[str, Any]]:
    messages = field(body, "messages", list, required=True)
    assert messages is not None
    if not messages:
        raise BadRequest("'messages' must hold at least one message.", param="messages")
    for i, message in enumerate(messages):
        where = f"messages[{i}]"
        if not isinstance(message, dict):
            raise BadRequest(f"'{where}' must be an object.", param=where)
        if message.get("role") not in ROLES:
            raise BadRequest(f"'{where}.role' must be one of {', '.join(sorted(ROLES))}.",
                             param=f"{where}.role")
        content = message.get("content")
        if isinstance(content, list):
            for j, part in enumerate(content):
                _check_part(part, f"{where}.content[{j}]")
        elif content is not None and not isinstance(content, str):
            raise BadRequest(f"'{where}.content' must be a string or a list of parts.",
                             param=f"{where}.content")
    return messages


def has_images(messages: list[dict[str, Any]]) -> bool:
    return any(isinstance(m.get("content"), list)
               and any(p.get("type") == "image_url" for p in m["content"]) for m in messages)


def parse_tools(body: dict[str, Any]) -> tuple[list[dict[str, Any]] | None, Any]:
    """``tools`` and ``tool_choice``, checked."""
    tools = field(body, "tools", list)
    for i, tool in enumerate(tools or []):
        function = tool.get("function") if isinstance(tool, dict) else None
        if not (isinstance(function, dict) and isinstance(function.get("name"), str)
                and tool.get("type", "function") == "function"):
            raise BadRequest(f"'tools[{i}]' must be {{\"type\": \"function\", \"function\": "
                             "{\"name\": ..., \"parameters\": ...}}.", param=f"tools[{i}]")
    choice: Any = body.get("tool_choice")
    chosen: Any = choice.get("function") if isinstance(choice, dict) else None
    named = isinstance(chosen, dict) and isinstance(chosen.get("name"), str)
    if choice is not None and choice not in TOOL_CHOICES and not named:
        raise BadRequest("'tool_choice' must be none, auto, required or "
                         "{\"type\": \"function\", \"function\": {\"name\": ...}}.",
                         param="tool_choice")
    if named and chosen["name"] not in {t["function"]["name"] for t in tools or []}:
        raise BadRequest("'tool_choice' names a function that is not in 'tools'.",
                         param="tool_choice")
    if (choice == "required" or named) and not tools:
        raise BadRequest("'tool_choice' asks for a tool call but 'tools' is empty.",
                         param="tool_choice")
    return tools, choice


def tool_params(physical: PhysicalModel, body: dict[str, Any]) -> dict[str, Any]:
    """What the backend gets of ``tools``. A model that cannot call tools answers
    normally when tools are merely offered (Open WebUI offers them with every chat)
    and refuses only a request that demands a call."""
    tools, choice = parse_tools(body)
    if not tools or choice == "none":
        return {}
    if "tools" not in physical.capabilities:
        if choice == "required" or isinstance(choice, dict):
            raise BadRequest(f"The model '{body['model']}' cannot call tools, and "
                             "'tool_choice' demands a tool call.", param="tool_choice")
        log.info("%s cannot call tools: answering without the %d offered", physical.id,
                 len(tools))
        return {}
    parallel = field(body, "parallel_tool_calls", bool)
    return {k: v for k, v in (("tools", tools), ("tool_choice", choice),
                              ("parallel_tool_calls", parallel)) if v is not None}


async def chat_payload(virtual: VirtualModel, physical: PhysicalModel,
                       body: dict[str, Any], server: Server) -> dict[str, Any]:
    """The worker payload of a chat request, every field checked; ``image_url`` parts
    become image parts holding the checked image file (see llmux.imaging)."""
    messages = parse_messages(body)
    if has_images(messages):
        if physical.type != "vlm" and "vision" not in physical.capabilities:
            raise BadRequest(f"The model '{body['model']}' cannot read images; send text only "
                             "or use a vision model.", param="messages")
        messages = await with_image_bytes(messages, server)
    response_format = field(body, "response_format", dict)
    if response_format is not None and response_format.get("type") not in (
            "text", "json_object", "json_schema"):
        raise BadRequest("'response_format.type' must be text, json_object or json_schema.",
                         param="response_format")
    payload = apply_virtual(virtual, messages, params.sampling(body),
                            field(body, "chat_template_kwargs", dict))
    payload.update(tool_params(physical, body))
    if response_format is not None:
        payload["response_format"] = response_format
    return payload


class ChatCompletions:
    def __init__(self, runtime: Runtime) -> None:
        self.runtime = runtime

    async def on_post(self, req: falcon.asgi.Request, resp: falcon.asgi.Response) -> None:
        body, name, virtual, physical = await json_request(req, self.runtime, CHAT_TYPES,
                                                           "cannot chat")
        params.only_one_choice(body)
        stream = field(body, "stream", bool, default=False)
        usage = params.include_usage(body)
        payload = await chat_payload(virtual, physical, body, self.runtime.config.server)
        ticket = self.runtime.submit(physical.id, "chat", payload)
        meta = Completion(model=name)
        if not stream:
            pieces, final = await run_whole(req, ticket)
            resp.media = meta.whole(pieces, final)
            return
        first = await start_stream(req, ticket)
        unbuffered(resp)
        resp.sse = meta.events(ticket, first, usage)


def merge_tool_calls(pieces: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Streamed tool-call deltas (by ``index``) as whole calls."""
    calls: dict[int, dict[str, Any]] = {}
    for piece in pieces:
        for delta in piece.get("tool_calls", ()):
            call = calls.setdefault(delta.get("index", 0), {
                "id": "", "type": "function", "function": {"name": "", "arguments": ""}})
            call["id"] = delta.get("id") or call["id"]
            function = delta.get("function") or {}
            call["function"]["name"] += function.get("name") or ""
            call["function"]["arguments"] += function.get("arguments") or ""
    return [calls[i] for i in sorted(calls)]


class Completion:
    """Builds the OpenAI objects of one chat completion."""

    def __init__(self, model: str) -> None:
        self.id = f"chatcmpl-{uuid.uuid4().hex}"
        self.model = model
        self.created = int(time.time())

    def _base(self, kind: str) -> dict[str, Any]:
        return {"id": self.id, "object": kind, "created": self.created, "model": self.model,
                "system_fingerprint": None}

    def whole(self, pieces: list[dict[str, Any]], final: dict[str, Any]) -> dict[str, Any]:
        text = "".join(p.get("text", "") for p in pieces)
        message: dict[str, Any] = {"role": "assistant", "content": text}
        reasoning = "".join(p.get("reasoning", "") for p in pieces)
        if reasoning:
            message["reasoning_content"] = reasoning
        tool_calls = merge_tool_calls(pieces)
        if tool_calls:
            message["tool_calls"] = tool_calls
            message["content"] = text or None
        return {
            **self._base("chat.completion"),
            "choices": [{"index": 0, "message": message, "logprobs": None,
                         "finish_reason": final.get("finish_reason", "stop")}],
            "usage": usage_of(final),
        }

    def chunk(self, delta: dict[str, Any], finish_reason: str | None = None,
              usage: dict[str, Any] | None = None) -> SSEvent:
        body = {**self._base("chat.completion.chunk"),
                "choices": [{"index": 0, "delta": delta, "logprobs": None,
                             "finish_reason": finish_reason}]}
        if usage is not None:
            body["usage"] = usage
        return SSEvent(json=body)

    async def events(self, ticket: Ticket, first: Reply,
                     include_usage: bool) -> AsyncIterator[SSEvent]:
        """SSE events until ``[DONE]``; an error after the start is one error event.

        ``usage`` is sent once: with ``include_usage``, on OpenAI's separate usage-only
        chunk after the finish chunk (a client that adds up every chunk's usage counts
        it once); without it, on the finish chunk (Open WebUI reads it there and does
        not always ask for it).
        """
        yield self.chunk({"role": "assistant", "content": ""})
        async for reply in replies(ticket, first):
            match reply:
                case Status(text=text):
                    yield SSEvent(comment=text)
                case Piece(data=data):
                    delta = {k2: data[k1] for k1, k2 in DELTA_KEYS if k1 in data}
                    if delta:
                        yield self.chunk(delta)
                case Finished(data=data):
                    usage = usage_of(data)
                    yield self.chunk({}, data.get("finish_reason", "stop"),
                                     None if include_usage else usage)
                    if include_usage:
                        yield SSEvent(json={**self._base("chat.completion.chunk"),
                                            "choices": [], "usage": usage})
                    yield SSEvent(data=b"[DONE]")
                case Failure(error=error):
                    yield SSEvent(json=error.to_dict())


DELTA_KEYS = (("text", "content"), ("reasoning", "reasoning_content"),
              ("tool_calls", "tool_calls"))


def usage_of(final: dict[str, Any]) -> dict[str, int]:
    """The job's token counts, zeros where the backend gave none."""
    usage = final.get("usage") or {}
    prompt = int(usage.get("prompt_tokens", 0))
    completion = int(usage.get("completion_tokens", 0))
    return {"prompt_tokens": prompt, "completion_tokens": completion,
            "total_tokens": prompt + completion}
