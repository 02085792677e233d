"""Notices a client going away, at once, for every HTTP request.

Falcon only looks for ``http.disconnect`` between SSE events, and not at all for
plain responses. This ASGI wrapper reads the request's ``receive`` channel in a
side task, passes messages on to the app, and calls the callbacks a resource
registered (``on_disconnect(req, ticket.cancel)``) the moment the client leaves,
so a queued job leaves its queue and a running one stops within a token.

It also bounds a request body that stalls: no body bytes for ``body_timeout_s`` count
as the client leaving mid-body (llmux.http.complete_body then refuses the request and
the connection closes). Once the body is complete, nothing is timed: a long reply to a
client that sends nothing more is never cut.

A response that starts before the body is complete (a 401 or 413 refusing an upload
unread) says ``connection: close``: Hypercorn closes such a connection after the
response, and a keep-alive client not told so would send its next request on the
closing socket and fail.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any

import anyio

log = logging.getLogger(__name__)

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]

CALLBACKS_KEY = "llmux.on_disconnect"
CLOSE = (b"connection", b"close")


class StreamAborted(Exception):
    """A response that already started cannot be completed (its job failed): the
    connection is closed without the body's end, so the client sees a broken download
    rather than a short, complete-looking one."""


def on_disconnect(scope: Scope, callback: Callable[[], None]) -> None:
    """Run ``callback`` if the client disconnects before the response ends."""
    scope.setdefault(CALLBACKS_KEY, []).append(callback)


def closing(start: Message) -> Message:
    """A copy of ``start`` (an ``http.response.start``) that says ``connection: close``."""
    return {**start, "headers": [*start.get("headers", ()), CLOSE]}


class DisconnectWatcher:
    def __init__(self, app: ASGIApp, body_timeout_s: float = math.inf) -> None:
        self.app = app
        self.body_timeout_s = body_timeout_s

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        scope[CALLBACKS_KEY] = []
        forward, inbox = anyio.create_memory_object_stream[Message](16)
        # NOTE: the server's view, not the app's: Hypercorn sends a body's end as a message
        # of its own, which an app refusing the request never reads, yet the connection
        # stays reusable once the server has it.
        body_received = False  # Hypercorn delivered the body's last chunk

        async def pump() -> None:
            nonlocal body_received
            async with forward:
                while True:
                    message = await receive()
                    if message["type"] == "http.request" and not message.get("more_body"):
                        body_received = True
                    if message["type"] == "http.disconnect":
                        for callback in scope[CALLBACKS_KEY]:
                            try:
                                callback()
                            except Exception:
                                log.exception("disconnect callback failed")
                        await forward.send(message)
                        return
                    await forward.send(message)

        body_done = False

        async def app_receive() -> Message:
            nonlocal body_done
            try:
                if body_done:  # nothing is timed any more (and a scope costs per message)
                    message = await inbox.receive()
                else:
                    with anyio.fail_after(self.body_timeout_s):
                        message = await inbox.receive()
            except (anyio.EndOfStream, anyio.ClosedResourceError):
                # The request is over (the pump ended, or the response was cut).
                return {"type": "http.disconnect"}
            except TimeoutError:
                log.info("%s %s: the request body stalled for %.0f s", scope.get("method"),
                         scope.get("path"), self.body_timeout_s)
                body_done = True
                return {"type": "http.disconnect"}
            if message["type"] != "http.request" or not message.get("more_body"):
                body_done = True
            return message

        async def app_send(message: Message) -> None:
            if message["type"] == "http.response.start" and not body_received:
                message = closing(message)
            await send(message)

        async with anyio.create_task_group() as tg, inbox:
            tg.start_soon(pump)
            try:
                await self.app(scope, app_receive, app_send)
            except StreamAborted as exc:
                log.warning("%s %s aborted mid-response: %s", scope.get("method"),
                            scope.get("path"), exc)
            finally:
                scope[CALLBACKS_KEY] = []
                tg.cancel_scope.cancel()
