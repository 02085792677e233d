"""CORS for the pages listed in ``server.cors_origins``: Falcon's middleware, plus
``Vary: Origin`` when the answer depends on the page that asks."""

from __future__ import annotations

from typing import Any

import falcon
import falcon.asgi

EXPOSED = ["Retry-After"]  # a page reads when to retry a 429 or 503


def cors_middleware(origins: list[str]
                    ) -> list[falcon.CORSMiddleware[Any, Any] | VaryOrigin]:
    """The middleware for ``origins``: none without origins; Falcon's alone for ``*``
    (every page gets the same answer); with :class:`VaryOrigin` for named pages."""
    if not origins:
        return []
    if origins == ["*"]:
        return [falcon.CORSMiddleware(allow_origins="*", expose_headers=EXPOSED)]
    return [falcon.CORSMiddleware(allow_origins=origins, expose_headers=EXPOSED),
            VaryOrigin()]


class VaryOrigin:
    """Adds ``Vary: Origin`` to every response, keeping the ``Vary`` values already set.

    With named origins, a response names the asking page in
    ``Access-Control-Allow-Origin``, or says nothing to another page: a shared cache
    that ignored ``Origin`` would give one page's answer to another (Fetch standard,
    "CORS protocol and HTTP caches"). Responses without the header vary too, for the
    same reason.
    """

    async def process_response(self, req: falcon.asgi.Request, resp: falcon.asgi.Response,
                               resource: object, req_succeeded: bool) -> None:
        vary = resp.get_header("Vary") or ""
        if not {v.strip().lower() for v in vary.split(",")} & {"origin", "*"}:
            resp.append_header("Vary", "Origin")
