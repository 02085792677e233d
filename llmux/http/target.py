"""The model a request names: resolved, allowed for its key, and of the right type."""

from __future__ import annotations

from typing import Any

import falcon.asgi

from llmux.config import PhysicalModel, VirtualModel, a_model_of_type
from llmux.errors import BadRequest
from llmux.http.auth import check_model, visible_models
from llmux.http.body import field, read_json
from llmux.http.metrics_route import note_model
from llmux.runtime import Runtime


def resolve_for(req: falcon.asgi.Request, runtime: Runtime, name: str,
                types: frozenset[str], refusal: str) -> tuple[VirtualModel, PhysicalModel]:
    """The virtual and physical model of ``name`` if the key may use it and its type is
    one of ``types``; ``refusal`` ends the 400's message ("cannot chat").

    Raises:
        ModelNotFound, Forbidden, BadRequest.
    """
    virtual, physical = runtime.resolve(name, visible_models(req))
    note_model(req, name)  # a configured name: the metrics' model label
    check_model(req, name)
    if physical.type not in types:
        raise BadRequest(f"'{name}' is {a_model_of_type(physical.type)} and {refusal}.",
                         param="model")
    return virtual, physical


async def json_request(req: falcon.asgi.Request, runtime: Runtime, types: frozenset[str],
                       refusal: str
                       ) -> tuple[dict[str, Any], str, VirtualModel, PhysicalModel]:
    """A JSON body with its ``model`` resolved by :func:`resolve_for`."""
    body = await read_json(req, runtime.config.server.max_body_bytes)
    name = field(body, "model", str, required=True)
    assert name is not None
    return (body, name, *resolve_for(req, runtime, name, types, refusal))
