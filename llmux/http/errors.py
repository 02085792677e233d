"""Renders every error as OpenAI's ``{"error": {message, type, param, code}}``.

Only rendering lives here: statuses and types come from ``llmux.errors``. Falcon's
own errors (unknown route, wrong method) are mapped to the same shape, and any
other exception is logged with its traceback and answered with a generic 500.
"""

from __future__ import annotations

import logging
from typing import Any

import falcon
import falcon.asgi

from llmux.errors import InternalError, LlmuxError

log = logging.getLogger(__name__)

_FALCON_TYPES = {401: "authentication_error", 403: "permission_error", 429: "rate_limit_error"}


def render(resp: falcon.asgi.Response, error: LlmuxError) -> None:
    resp.status = error.status
    resp.media = error.to_dict()
    if error.retry_after_s is not None:
        resp.set_header("Retry-After", str(max(1, round(error.retry_after_s))))
    if error.should_retry is not None:
        resp.set_header("x-should-retry", "true" if error.should_retry else "false")
    if error.status == 401:
        resp.set_header("WWW-Authenticate", "Bearer")


async def handle_llmux_error(
    req: falcon.asgi.Request, resp: falcon.asgi.Response, error: LlmuxError, params: Any
) -> None:
    render(resp, error)


async def handle_falcon_error(
    req: falcon.asgi.Request, resp: falcon.asgi.Response, error: falcon.HTTPError, params: Any
) -> None:
    status = error.status_code
    message = error.description or error.title or "request failed"
    if status == 404:
        message = f"No route {req.method} {req.path}. See /openapi.json for the API."
    elif status == 405:
        message = f"{req.method} is not allowed on {req.path}."
    resp.status = status
    resp.media = {
        "error": {
            "message": message,
            "type": _FALCON_TYPES.get(status, "invalid_request_error" if status < 500
                                      else "server_error"),
            "param": None,
            "code": error.code if isinstance(error.code, str) else None,
        }
    }
    if error.headers:
        resp.set_headers(error.headers)


async def handle_unexpected(
    req: falcon.asgi.Request, resp: falcon.asgi.Response, error: Exception, params: Any
) -> None:
    log.exception("unhandled error on %s %s", req.method, req.path, exc_info=error)
    render(resp, InternalError("llmux hit an internal error; it is logged on the server"))


def install(app: falcon.asgi.App[falcon.asgi.Request, falcon.asgi.Response]) -> None:
    """Register the handlers; the most specific one wins."""
    app.add_error_handler(Exception, handle_unexpected)
    app.add_error_handler(falcon.HTTPError, handle_falcon_error)
    app.add_error_handler(LlmuxError, handle_llmux_error)
