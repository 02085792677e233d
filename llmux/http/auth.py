"""Who may call what: the bearer key checked before any resource runs.

Each resource says what it needs in a class attribute ``access``: ``"open"`` (no key:
health probes, the OpenAPI document, Open WebUI's voice lists), ``"key"`` (any valid
key; the model allowlist is checked where the model is named, by ``check_model``) or
``"admin"``. The key's *name* goes into ``req.context.key_name`` for the request log
and metrics (``llmux.http.request_log``, written once the response has ended); the key
itself is never kept or logged. ``req.context.keys_enabled`` records whether the server
has keys at all, for :func:`visible_models`.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Literal

import falcon.asgi

from llmux.auth import ApiKey, KeyStore
from llmux.errors import Forbidden

Access = Literal["open", "key", "admin"]


def access_of(resource: object) -> Access:
    """What a resource needs; anything that does not say needs a key."""
    access: Access = getattr(resource, "access", "key")
    return access


def visible_models(req: falcon.asgi.Request) -> Callable[[str], bool]:
    """Which model names a request may be told of (a 404 lists them): its key's models;
    every model on a server without keys; none to a caller without a key (an open
    route) on a server with keys, who may not even see ``/v1/models``."""
    key: ApiKey | None = req.context.get("key")
    if key is not None:
        return key.allows
    if req.context.get("keys_enabled", True):
        return _no_model
    return _any_model


def _no_model(name: str) -> bool:
    return False


def _any_model(name: str) -> bool:
    return True


def check_model(req: falcon.asgi.Request, model: str) -> None:
    """Refuse a key whose allowlist does not name ``model`` (403).

    Raises:
        Forbidden: the request's key may not use this model.
    """
    key: ApiKey | None = req.context.get("key")
    if key is not None and not key.allows(model):
        raise Forbidden(f"The API key '{key.name}' may not use the model '{model}'.",
                        param="model")


class AuthMiddleware:
    """Authenticates every routed request and names its key for the log and metrics."""

    def __init__(self, keys: KeyStore) -> None:
        self.keys = keys

    async def process_request(self, req: falcon.asgi.Request,
                              resp: falcon.asgi.Response) -> None:
        req.context.key = None
        req.context.key_name = "-"
        req.context.keys_enabled = self.keys.enabled

    async def process_resource(self, req: falcon.asgi.Request, resp: falcon.asgi.Response,
                               resource: object, params: dict[str, Any]) -> None:
        # NOTE: a browser's CORS preflight (OPTIONS) never carries the key; Falcon's
        # answer to it names the allowed methods and runs nothing.
        if (resource is None or access_of(resource) == "open" or not self.keys.enabled
                or req.method == "OPTIONS"):
            return
        key = self.keys.authenticate(req.get_header("Authorization"))
        assert key is not None  # an enabled store returns a key or raises
        req.context.key = key
        req.context.key_name = key.name
        if access_of(resource) == "admin" and not key.admin:
            raise Forbidden(f"The API key '{key.name}' is not an admin key; "
                            f"{req.path} needs one.")
