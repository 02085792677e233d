"""Who may call what: the bearer key checked before any resource runs, and the access log.

Each resource says what it needs in a class attribute ``access``: ``"open"`` (no key:
health probes, the OpenAPI document, Open WebUI's voice lists), ``"key"`` (any valid
key; the model allowlist is checked where the model is named, by ``check_model``) or
``"admin"``. The key's *name* goes into ``req.context.key_name`` for the access log and
metrics; the key itself is never kept or logged.
"""

from __future__ import annotations

import logging
import time
from typing import Any, Literal

import falcon.asgi

from llmux.auth import ApiKey, KeyStore
from llmux.errors import Forbidden

Access = Literal["open", "key", "admin"]

access_log = logging.getLogger("llmux.access")

END_USER_HEADER = "X-OpenWebUI-User-Name"


def access_of(resource: object) -> Access:
    """What a resource needs; anything that does not say needs a key."""
    access: Access = getattr(resource, "access", "key")
    return access


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
    """Authenticates every routed request and writes one access-log line per request."""

    def __init__(self, keys: KeyStore) -> None:
        self.keys = keys

    async def process_request(self, req: falcon.asgi.Request,
                              resp: falcon.asgi.Response) -> None:
        req.context.started = time.monotonic()
        req.context.key = None
        req.context.key_name = "-"

    async def process_resource(self, req: falcon.asgi.Request, resp: falcon.asgi.Response,
                               resource: object, params: dict[str, Any]) -> None:
        if resource is None or access_of(resource) == "open" or not self.keys.enabled:
            return
        key = self.keys.authenticate(req.get_header("Authorization"))
        assert key is not None  # an enabled store returns a key or raises
        req.context.key = key
        req.context.key_name = key.name
        if access_of(resource) == "admin" and not key.admin:
            raise Forbidden(f"The API key '{key.name}' is not an admin key; "
                            f"{req.path} needs one.")

    async def process_response(self, req: falcon.asgi.Request, resp: falcon.asgi.Response,
                               resource: object, req_succeeded: bool) -> None:
        started: float = req.context.get("started") or time.monotonic()
        access_log.info(
            '%s "%s %s" %s key=%s user=%s %.1fms', req.remote_addr, req.method, req.path,
            resp.status[:3] if isinstance(resp.status, str) else resp.status,
            req.context.get("key_name", "-"), req.get_header(END_USER_HEADER) or "-",
            (time.monotonic() - started) * 1000,
        )
