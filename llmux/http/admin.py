"""``/admin``: the state dump and explicit load/unload."""

from __future__ import annotations

import falcon
import falcon.asgi

from llmux.errors import ModelNotFound
from llmux.http.body import field, read_json
from llmux.runtime import Runtime


class AdminState:
    access = "admin"
    def __init__(self, runtime: Runtime) -> None:
        self.runtime = runtime

    async def on_get(self, req: falcon.asgi.Request, resp: falcon.asgi.Response) -> None:
        resp.media = self.runtime.snapshot()

    on_head = on_get


class AdminModels:
    """``POST /admin/models/{id}/load`` and ``/unload`` on a physical (or virtual) model.
    Both answer 202 at once: the actor does the work; ``/admin/state`` shows it."""

    access = "admin"

    def __init__(self, runtime: Runtime) -> None:
        self.runtime = runtime

    def _physical(self, model_id: str) -> str:
        if model_id in self.runtime.actors:
            return model_id
        if model_id in self.runtime.config.virtual_models:
            return self.runtime.resolve(model_id)[1].id
        names = ", ".join(sorted(self.runtime.actors))
        raise ModelNotFound(f"No physical model '{model_id}'. Physical models: {names}")

    async def on_post_load(self, req: falcon.asgi.Request, resp: falcon.asgi.Response,
                           model_id: str) -> None:
        physical = self._physical(model_id)
        self.runtime.load(physical)
        resp.status = falcon.HTTP_202
        resp.media = {"model": physical, "action": "load", "accepted": True}

    async def on_post_device(self, req: falcon.asgi.Request, resp: falcon.asgi.Response,
                             model_id: str) -> None:
        """``{"device": "cpu" | "cuda:N"}``: reload the model there (GPU-vs-CPU checks)."""
        physical = self._physical(model_id)
        body = await read_json(req, self.runtime.config.server.max_body_bytes)
        device = field(body, "device", str, required=True)
        assert device is not None
        self.runtime.move(physical, device)
        resp.status = falcon.HTTP_202
        resp.media = {"model": physical, "action": "move", "device": device, "accepted": True}

    async def on_post_unload(self, req: falcon.asgi.Request, resp: falcon.asgi.Response,
                             model_id: str) -> None:
        physical = self._physical(model_id)
        self.runtime.unload(physical)
        resp.status = falcon.HTTP_202
        resp.media = {"model": physical, "action": "unload", "accepted": True}
