"""``POST /apply-template`` (llama.cpp server's name for it): the prompt text a chat
request becomes under its virtual model: prefix, template kwargs, tools and all.
For checking what a model is really told, without generating anything."""

from __future__ import annotations

import falcon.asgi

from llmux.http.chat import CHAT_TYPES, chat_payload
from llmux.http.jobs import run_whole
from llmux.http.target import json_request
from llmux.runtime import Runtime


class ApplyTemplate:
    def __init__(self, runtime: Runtime) -> None:
        self.runtime = runtime

    async def on_post(self, req: falcon.asgi.Request, resp: falcon.asgi.Response) -> None:
        body, name, virtual, physical = await json_request(req, self.runtime, CHAT_TYPES,
                                                           "has no chat template")
        payload = await chat_payload(virtual, physical, body, self.runtime.config.server)
        _, final = await run_whole(req, self.runtime.submit(physical.id, "template", payload))
        resp.media = {"model": name, "prompt": final.get("prompt", ""),
                      "prompt_tokens": final.get("prompt_tokens", 0)}
