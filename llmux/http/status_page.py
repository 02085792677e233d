"""``GET /`` and ``GET /status``: the live status page, one self-contained HTML file.

The page holds no data (it fetches ``/admin/events`` and ``/admin/state`` with the
admin key the operator types in), so it is open. It ships inside the package
(``llmux/http/static/status.html``), needs nothing from the internet, and is served
with a Content-Security-Policy that allows exactly its own inline script and style
blocks (by hash) and requests to this server: an event reason or model name that
slipped into the DOM as markup still could not run.
"""

from __future__ import annotations

import base64
import hashlib
import re
from importlib.resources import files
from typing import Final

import falcon
import falcon.asgi

PAGE: Final = "status.html"
NONE: Final = "'none'"
_INLINE: Final = re.compile(r"<(script|style)>(.*?)</\1>", re.DOTALL)


def load_page() -> str:
    return (files("llmux.http") / "static" / PAGE).read_text(encoding="utf-8")


def content_security_policy(html: str) -> str:
    """A policy that allows the page's own inline blocks, by their SHA-256, and
    nothing from elsewhere."""
    hashes: dict[str, list[str]] = {"script": [], "style": []}
    for tag, body in _INLINE.findall(html):
        digest = base64.b64encode(hashlib.sha256(body.encode()).digest()).decode()
        hashes[tag].append(f"'sha256-{digest}'")
    return "; ".join([
        "default-src 'none'",
        f"script-src {' '.join(hashes['script']) or NONE}",
        f"style-src {' '.join(hashes['style']) or NONE}",
        "connect-src 'self'",
        "img-src data:",
        "base-uri 'none'",
        "form-action 'none'",
        "frame-ancestors 'none'",
    ])


class StatusPage:
    """The page, read once at start-up."""

    access = "open"

    def __init__(self, html: str | None = None) -> None:
        self.html = load_page() if html is None else html
        self.policy = content_security_policy(self.html)

    async def on_get(self, req: falcon.asgi.Request, resp: falcon.asgi.Response) -> None:
        resp.content_type = falcon.MEDIA_HTML
        resp.text = self.html
        resp.set_header("Content-Security-Policy", self.policy)
        resp.set_header("Cache-Control", "no-cache")
        resp.set_header("X-Content-Type-Options", "nosniff")
        resp.set_header("Referrer-Policy", "no-referrer")

    on_head = on_get
