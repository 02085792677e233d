"""A request body cut short is refused, never handled as if it were whole.

Falcon ends a request body at ``http.disconnect`` as if the client had finished it, so
a client that declared 100 bytes, sent 60 that happen to be a valid JSON object, and
closed (or was closed by Hypercorn's ``read_timeout`` after stalling) would have its
request run: a model loaded and a job done for a request nobody completed. This ASGI
wrapper turns a disconnect before the body's last chunk into a 400 raised inside the
app's ``receive``, where the resource is reading the body, so no job is ever started;
the client, if still listening (a half-closed socket), gets the OpenAI-shaped error.
"""

from __future__ import annotations

from llmux.errors import BadRequest
from llmux.http.disconnect import ASGIApp, Message, Receive, Scope, Send

INCOMPLETE: str = ("The request body ended before it was complete: the connection closed "
                   "(or went silent) before the last byte arrived.")


class CompleteBodies:
    """Wraps the Falcon app, inside the disconnect watcher (whose ``receive`` it checks)."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = False  # a first part of the body has arrived
        whole = False  # the body's last chunk (more_body false) has arrived

        async def checked_receive() -> Message:
            """The next message; raises when the client leaves in the middle of the body.

            NOTE: a disconnect before any part of the body passes: Falcon, which reads
            the first message itself, then drops the request without running anything.

            Raises:
                BadRequest: ``http.disconnect`` came after a first part of the body and
                    before its last chunk.
            """
            nonlocal started, whole
            message = await receive()
            if whole:
                return message
            if message["type"] == "http.request":
                started, whole = True, not message.get("more_body", False)
            elif message["type"] == "http.disconnect" and started:
                raise BadRequest(INCOMPLETE)
            return message

        await self.app(scope, checked_receive, send)
