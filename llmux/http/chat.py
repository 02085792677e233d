"""``POST /v1/chat/completions``: OpenAI chat, streamed as SSE or whole.

The resource parses and checks the body, resolves the virtual model, applies its
behaviour, submits a job to the physical model's actor and turns the worker's
pieces into OpenAI chunks. It holds the job's cancel handle: a client that leaves
cancels the job at once.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import AsyncIterator
from typing import Any

import falcon.asgi
from falcon.asgi import SSEvent

from llmux.actors.messages import Failure, Finished, Piece, Reply, Started, Status
from llmux.chat.virtual import apply_virtual
from llmux.errors import BadRequest
from llmux.http.body import field, number_in, read_json
from llmux.http.disconnect import on_disconnect
from llmux.runtime import Runtime, Ticket

ROLES = frozenset({"system", "developer", "user", "assistant", "tool"})
CHAT_TYPES = frozenset({"llm", "vlm"})
PREFLIGHT_S = 0.5  # wait this long for a fast refusal before committing to a 200 stream
KEEPALIVE_S = 1.0  # an SSE comment at least this often while nothing else is sent


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
        if not (content is None or isinstance(content, str | list)):
            raise BadRequest(f"'{where}.content' must be a string or a list of parts.",
                             param=f"{where}.content")
    return messages


def sampling_params(body: dict[str, Any]) -> dict[str, Any]:
    """The sampling parameters the client set, checked."""
    max_tokens = field(body, "max_completion_tokens", int) or field(body, "max_tokens", int)
    if max_tokens is not None and max_tokens < 1:
        raise BadRequest("'max_tokens' must be at least 1.", param="max_tokens")
    stop = body.get("stop")
    if isinstance(stop, str):
        stop = [stop]
    if stop is not None and not (isinstance(stop, list) and all(isinstance(s, str) for s in stop)):
        raise BadRequest("'stop' must be a string or a list of strings.", param="stop")
    return {
        "max_tokens": max_tokens,
        "temperature": number_in(body, "temperature", 0.0, 2.0),
        "top_p": number_in(body, "top_p", 0.0, 1.0),
        "min_p": number_in(body, "min_p", 0.0, 1.0),
        "presence_penalty": number_in(body, "presence_penalty", -2.0, 2.0),
        "frequency_penalty": number_in(body, "frequency_penalty", -2.0, 2.0),
        "seed": field(body, "seed", int),
        "stop": stop,
        "tools": field(body, "tools", list),
        "tool_choice": body.get("tool_choice"),
        "response_format": field(body, "response_format", dict),
    }


async def preflight(ticket: Ticket) -> Reply | None:
    """The first reply if it comes quickly: a refusal then becomes a proper HTTP error
    instead of an error inside a 200 stream."""
    try:
        reply = await ticket.next(PREFLIGHT_S)
    except TimeoutError:
        return Status("waiting")
    if isinstance(reply, Failure):
        raise reply.error
    return reply


class ChatCompletions:
    def __init__(self, runtime: Runtime) -> None:
        self.runtime = runtime

    async def on_post(self, req: falcon.asgi.Request, resp: falcon.asgi.Response) -> None:
        body = await read_json(req, self.runtime.config.server.max_body_bytes)
        name = field(body, "model", str, required=True)
        assert name is not None
        virtual, physical = self.runtime.resolve(name)
        if physical.type not in CHAT_TYPES:
            raise BadRequest(f"'{name}' is a {physical.type} model and cannot chat.",
                             param="model")
        n = field(body, "n", int)
        if n not in (None, 1):
            raise BadRequest("Only n=1 is supported: one choice per request.", param="n")
        stream = field(body, "stream", bool, default=False)
        options = field(body, "stream_options", dict) or {}
        messages = parse_messages(body)
        payload = apply_virtual(virtual, messages, sampling_params(body),
                                field(body, "chat_template_kwargs", dict))
        ticket = self.runtime.submit(physical.id, "chat", payload)
        on_disconnect(req.scope, ticket.cancel)
        meta = Completion(model=name)
        if not stream:
            try:
                pieces, final = await ticket.collect()
            finally:
                ticket.cancel()
            resp.media = meta.whole(pieces, final)
            return
        first = await preflight(ticket)
        resp.set_header("Cache-Control", "no-cache")
        resp.set_header("X-Accel-Buffering", "no")
        resp.sse = meta.events(ticket, first, bool(options.get("include_usage")))


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
        message: dict[str, Any] = {
            "role": "assistant",
            "content": "".join(p.get("text", "") for p in pieces),
        }
        reasoning = "".join(p.get("reasoning", "") for p in pieces)
        if reasoning:
            message["reasoning_content"] = reasoning
        return {
            **self._base("chat.completion"),
            "choices": [{"index": 0, "message": message, "logprobs": None,
                         "finish_reason": final.get("finish_reason", "stop")}],
            "usage": final.get("usage"),
        }

    def chunk(self, delta: dict[str, Any], finish_reason: str | None = None,
              usage: dict[str, Any] | None = None) -> SSEvent:
        body = {**self._base("chat.completion.chunk"),
                "choices": [{"index": 0, "delta": delta, "logprobs": None,
                             "finish_reason": finish_reason}]}
        if usage is not None:
            body["usage"] = usage
        return SSEvent(json=body)

    async def events(self, ticket: Ticket, first: Reply | None,
                     include_usage: bool) -> AsyncIterator[SSEvent]:
        """SSE events until ``[DONE]``; an error after the start is one error event."""
        try:
            yield self.chunk({"role": "assistant", "content": ""})
            reply = first
            while reply is not None:
                match reply:
                    case Status(text=text):
                        yield SSEvent(comment=text)
                    case Started():
                        pass
                    case Piece(data=data):
                        delta = {k2: data[k1] for k1, k2 in
                                 (("text", "content"), ("reasoning", "reasoning_content"))
                                 if k1 in data}
                        if delta:
                            yield self.chunk(delta)
                    case Finished(data=data):
                        usage = data.get("usage")
                        yield self.chunk({}, data.get("finish_reason", "stop"), usage)
                        if include_usage:
                            yield SSEvent(json={**self._base("chat.completion.chunk"),
                                                "choices": [], "usage": usage})
                        yield SSEvent(data=b"[DONE]")
                        return
                    case Failure(error=error):
                        yield SSEvent(json=error.to_dict())
                        return
                try:
                    reply = await ticket.next(KEEPALIVE_S)
                except TimeoutError:
                    reply = Status("waiting")
        finally:
            ticket.cancel()
