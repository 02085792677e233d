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
from llmux.chat import functions
from llmux.chat.virtual import apply_virtual
from llmux.config import PhysicalModel, Server, VirtualModel
from llmux.errors import BadRequest
from llmux.http import params
from llmux.http.body import field
from llmux.http.jobs import replies, run_whole, start_stream, unbuffered
from llmux.http.target import json_request
from llmux.imaging import with_image_bytes
from llmux.runtime import Runtime, Ticket

ROLES = frozenset({"system", "developer", "user", "assistant", "tool", "function"})
PART_TYPES = frozenset({"text", "image_url", "input_audio"})
CHAT_TYPES = frozenset({"llm", "vlm"})
TOOL_CHOICES = ("none", "auto", "required")
FUNCTION_CALLS = ("none", "auto")

log = logging.getLogger(__name__)


def _one_of(value: Any, names: frozenset[str]) -> bool:
    """``value in names`` for any JSON value (a list or an object is no name, and not
    hashable either)."""
    return isinstance(value, str) and value in names


def _check_part(part: Any, where: str) -> None:
    if not isinstance(part, dict) or not _one_of(part.get("type"), PART_TYPES):
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
        if not _one_of(message.get("role"), ROLES):
            raise BadRequest(f"'{where}.role' must be one of {', '.join(sorted(ROLES))}.",
                             param=f"{where}.role")
        content = message.get("content")
        if isinstance(content, list):
            for j, part in enumerate(content):
                _check_part(part, f"{where}.content[{j}]")
        elif content is not None and not isinstance(content, str):
            raise BadRequest(f"'{where}.content' must be a string or a list of parts.",
                             param=f"{where}.content")
        _check_legacy_message(message, where)
    return functions.as_tool_messages(messages)


def _check_legacy_message(message: dict[str, Any], where: str) -> None:
    """A function result names its function; an assistant's function call is whole."""
    if message["role"] == "function" and not isinstance(message.get("name"), str):
        raise BadRequest(f"'{where}.name' must name the function whose result this is.",
                         param=f"{where}.name")
    call = message.get("function_call")
    if message["role"] == "assistant" and call is not None and not (
            isinstance(call, dict) and isinstance(call.get("name"), str)
            and isinstance(call.get("arguments"), str)):
        raise BadRequest(f"'{where}.function_call' must be {{\"name\": ..., "
                         "\"arguments\": \"<JSON text>\"}.", param=f"{where}.function_call")


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


def parse_functions(body: dict[str, Any]) -> tuple[list[dict[str, Any]] | None, Any]:
    """The deprecated ``functions`` and ``function_call``, checked, as ``tools`` and
    ``tool_choice``."""
    legacy = next(name for name in functions.LEGACY_FIELDS if body.get(name) is not None)
    if any(body.get(name) is not None for name in functions.MODERN_FIELDS):
        raise BadRequest("Send either 'tools' and 'tool_choice' or the deprecated "
                         "'functions' and 'function_call', not both.", param=legacy)
    offered = field(body, "functions", list)
    for i, function in enumerate(offered or []):
        if not (isinstance(function, dict) and isinstance(function.get("name"), str)):
            raise BadRequest(f"'functions[{i}]' must be {{\"name\": ..., \"parameters\": "
                             "...}.", param=f"functions[{i}]")
    call: Any = body.get("function_call")
    named = isinstance(call, dict) and isinstance(call.get("name"), str)
    if call is not None and call not in FUNCTION_CALLS and not named:
        raise BadRequest("'function_call' must be none, auto or {\"name\": ...}.",
                         param="function_call")
    if named and call["name"] not in {f["name"] for f in offered or []}:
        raise BadRequest("'function_call' names a function that is not in 'functions'.",
                         param="function_call")
    return functions.as_tools(offered, call)


def tool_params(physical: PhysicalModel, body: dict[str, Any]) -> dict[str, Any]:
    """What the backend gets of ``tools`` (or the deprecated ``functions``). A model
    that cannot call tools answers normally when tools are merely offered (Open WebUI
    offers them with every chat) and refuses only a request that demands a call."""
    legacy = functions.requested(body)
    tools, choice = parse_functions(body) if legacy else parse_tools(body)
    if not tools or choice == "none":
        return {}
    if "tools" not in physical.capabilities:
        if call_demanded(choice):
            named = "function_call" if legacy else "tool_choice"
            raise BadRequest(f"The model '{body['model']}' cannot call tools, and "
                             f"'{named}' demands a tool call.", param=named)
        log.info("%s cannot call tools: answering without the %d offered", physical.id,
                 len(tools))
        return {}
    parallel = field(body, "parallel_tool_calls", bool)
    return {k: v for k, v in (("tools", tools), ("tool_choice", choice),
                              ("parallel_tool_calls", parallel)) if v is not None}


def refuse_audio_output(body: dict[str, Any]) -> None:
    """Refuse a request for spoken output: llmux chat answers in text, and a client
    asking for audio reads ``message.audio``, which would never come.

    Raises:
        BadRequest: ``modalities`` holds anything but "text", or ``audio`` is set.
    """
    modalities = field(body, "modalities", list)
    if modalities is not None and any(m != "text" for m in modalities):
        raise BadRequest("llmux chat answers in text only: 'modalities' may hold only "
                         "\"text\". To hear a reply, send its text to /v1/audio/speech.",
                         param="modalities")
    if body.get("audio") is not None:
        raise BadRequest("llmux chat answers in text only, so 'audio' (the spoken "
                         "output's voice and format) cannot be served. To hear a reply, "
                         "send its text to /v1/audio/speech.", param="audio")


async def chat_payload(virtual: VirtualModel, physical: PhysicalModel,
                       body: dict[str, Any], server: Server) -> dict[str, Any]:
    """The worker payload of a chat request, every field checked; ``image_url`` parts
    become image parts holding the checked image file (see llmux.imaging)."""
    refuse_audio_output(body)
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
        meta = Completion(model=name, legacy=functions.requested(body),
                          include_usage=usage, calls_at_once=demands_call(payload))
        if not stream:
            pieces, final = await run_whole(req, ticket)
            resp.media = meta.whole(pieces, final)
            return
        first = await start_stream(req, ticket)
        unbuffered(resp)
        resp.sse = meta.events(ticket, first)


def call_demanded(choice: Any) -> bool:
    """``tool_choice`` demands a call: "required", or a named function."""
    return choice == "required" or isinstance(choice, dict)


def demands_call(payload: dict[str, Any]) -> bool:
    """The model was given tools and told to call one: its reply is a tool call from
    the first token (a grammar or a prefill holds it to that)."""
    return bool(payload.get("tools")) and call_demanded(payload.get("tool_choice"))


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
    """Builds the OpenAI objects of one chat completion.

    ``legacy``: the request used the deprecated ``functions``, so a tool call is
    answered as ``function_call``. ``include_usage``: the client asked for the usage
    chunk (see :meth:`events`). ``calls_at_once``: the reply is known to be a tool call.
    """

    def __init__(self, model: str, *, legacy: bool = False, include_usage: bool = False,
                 calls_at_once: bool = False) -> None:
        self.id = f"chatcmpl-{uuid.uuid4().hex}"
        self.model = model
        self.created = int(time.time())
        self.legacy = legacy
        self.include_usage = include_usage
        self.calls_at_once = calls_at_once

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
            message["content"] = text or None
        if tool_calls and self.legacy:
            message["function_call"] = functions.function_call(tool_calls)
        elif tool_calls:
            message["tool_calls"] = tool_calls
        return {
            **self._base("chat.completion"),
            "choices": [{"index": 0, "message": message, "logprobs": None,
                         "finish_reason": self._finish_reason(final)}],
            "usage": usage_of(final),
        }

    def _finish_reason(self, final: dict[str, Any]) -> str:
        reason: str = final.get("finish_reason", "stop")
        return functions.finish_reason(reason) if self.legacy else reason

    def _delta(self, data: dict[str, Any]) -> dict[str, Any]:
        """A worker piece as an OpenAI delta."""
        if self.legacy:
            data = functions.function_call_piece(data)
        return {k2: data[k1] for k1, k2 in DELTA_KEYS if k1 in data}

    def chunk(self, delta: dict[str, Any], finish_reason: str | None = None,
              usage: dict[str, Any] | None = None) -> SSEvent:
        body = {**self._base("chat.completion.chunk"),
                "choices": [{"index": 0, "delta": delta, "logprobs": None,
                             "finish_reason": finish_reason}]}
        # NOTE: with include_usage, OpenAI gives every chunk a usage field, null but
        # on the last; the SDK documents it.
        if usage is not None or self.include_usage:
            body["usage"] = usage
        return SSEvent(json=body)

    async def events(self, ticket: Ticket, first: Reply) -> AsyncIterator[SSEvent]:
        """SSE events until ``[DONE]``; an error after the start is one error event.

        ``usage`` is sent once: with ``include_usage``, on OpenAI's separate usage-only
        chunk after the finish chunk (a client that adds up every chunk's usage counts
        it once); without it, on the finish chunk (Open WebUI reads it there and does
        not always ask for it).
        """
        # NOTE: OpenAI opens a tool call with null content; a reply that may be text
        # opens with "", since whether it calls a tool is known only later.
        yield self.chunk({"role": "assistant", "content": None if self.calls_at_once else ""})
        async for reply in replies(ticket, first):
            match reply:
                case Status(text=text):
                    yield SSEvent(comment=text)
                case Piece(data=data):
                    if delta := self._delta(data):
                        yield self.chunk(delta)
                case Finished(data=data):
                    usage = usage_of(data)
                    yield self.chunk({}, self._finish_reason(data),
                                     None if self.include_usage else usage)
                    if self.include_usage:
                        yield SSEvent(json={**self._base("chat.completion.chunk"),
                                            "choices": [], "usage": usage})
                    yield SSEvent(data=b"[DONE]")
                case Failure(error=error):
                    yield SSEvent(json=error.to_dict())


DELTA_KEYS = (("text", "content"), ("reasoning", "reasoning_content"),
              ("tool_calls", "tool_calls"), ("function_call", "function_call"))


def usage_of(final: dict[str, Any]) -> dict[str, int]:
    """The job's token counts, zeros where the backend gave none."""
    usage = final.get("usage") or {}
    prompt = int(usage.get("prompt_tokens", 0))
    completion = int(usage.get("completion_tokens", 0))
    return {"prompt_tokens": prompt, "completion_tokens": completion,
            "total_tokens": prompt + completion}
