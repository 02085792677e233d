"""A request target in absolute form (``GET http://host:8081/v1/models``) is served as
its path, as RFC 9112 (3.2.2) asks of every server: a client sends it when llmux is
its proxy (``HTTP_PROXY`` pointing at llmux), and some proxies pass it on as they got
it. Hypercorn passes the whole URL on as the ASGI path, so without this wrapper every
such request was a 404.
"""

from __future__ import annotations

from urllib.parse import urlsplit

from llmux.http.disconnect import ASGIApp, Receive, Scope, Send

__all__ = ["OriginForm", "origin_form"]


def origin_form(target: str) -> str | None:
    """The path of an absolute-form target (``/`` when it has none); ``None`` for a
    target that is not one, whether already a path or something else (``*``)."""
    if not target[:8].lower().startswith(("http://", "https://")):
        return None
    return urlsplit(target).path or "/"


class OriginForm:
    """ASGI wrapper, outermost: rewrites an absolute-form target to its path before
    anything routes, counts or logs it. The Host header is not read by llmux, so the
    rule that the target's authority overrides it needs nothing more."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and (path := origin_form(scope["path"])) is not None:
            raw = origin_form((scope.get("raw_path") or b"").decode("latin-1"))
            raw_path = raw.encode("latin-1") if raw is not None else path.encode()
            scope = {**scope, "path": path, "raw_path": raw_path}
        await self.app(scope, receive, send)
