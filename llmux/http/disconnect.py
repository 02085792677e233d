"""Notices a client going away, at once, for requests that have something to stop.

Falcon only looks for ``http.disconnect`` between SSE events, and not at all for
plain responses. A resource that has something to stop when its client leaves registers
a callback (``on_disconnect(req.scope, ticket.cancel)``); from then on one watcher task
reads the request's ``receive`` channel and calls the callbacks the moment the client
leaves, so a queued job leaves its queue and a running one stops within a token.

NOTE: the watcher is a plain asyncio task (``Watchers``) that ends by itself: the
server delivers ``http.disconnect`` once the response is sent (the ASGI spec; Hypercorn
puts it on the channel when the stream closes). A request that registers nothing pays
for no task at all. The channel has one reader at a time: the app or the watcher, and a
message one of them reads for the other is kept for it (``Channel``).

It also bounds a request body that stalls: no body bytes for ``body_timeout_s`` count
as the client leaving mid-body (llmux.http.complete_body then refuses the request and
the connection closes). Once the body is complete, nothing is timed: a long reply to a
client that sends nothing more is never cut.

A response that starts before the server has the whole body (a 401 or 413 refusing an
upload unread) says ``connection: close``: Hypercorn closes such a connection after the
response, and a keep-alive client not told so would send its next request on the
closing socket and fail.
"""

from __future__ import annotations

import asyncio
import logging
import math
from collections import deque
from collections.abc import Awaitable, Callable, Coroutine, MutableMapping
from typing import Any

import anyio

from llmux.actors.arrival import Arrival

log = logging.getLogger(__name__)

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]

CHANNEL_KEY = "llmux.channel"
CLOSE = (b"connection", b"close")


class StreamAborted(Exception):
    """A response that already started cannot be completed (its job failed): the
    connection is closed without the body's end, so the client sees a broken download
    rather than a short, complete-looking one."""


def on_disconnect(scope: Scope, callback: Callable[[], None]) -> None:
    """Run ``callback`` if the client disconnects before the response ends (nothing
    outside ``DisconnectWatcher``)."""
    channel = scope.get(CHANNEL_KEY)
    if isinstance(channel, Channel):
        channel.on_disconnect(callback)


def closing(start: Message) -> Message:
    """A copy of ``start`` (an ``http.response.start``) that says ``connection: close``."""
    return {**start, "headers": [*start.get("headers", ()), CLOSE]}


def disconnect() -> Message:
    return {"type": "http.disconnect"}


class Watchers:
    """The disconnect watchers' tasks: plain asyncio tasks, not an anyio task group,
    because every job's request starts one and anyio's ``start_soon`` costs several
    times more (a task handle, a cancel scope and an event per task). Hypercorn, which
    calls the app, is asyncio too. Each task ends by itself at its request's disconnect;
    ``cancel`` stops what is left when the server stops."""

    def __init__(self) -> None:
        self._tasks: set[asyncio.Task[None]] = set()  # strong references, as asyncio asks

    def __len__(self) -> int:
        """How many are still running."""
        return sum(not task.done() for task in self._tasks)

    def start(self, watch: Callable[[], Coroutine[Any, Any, None]]) -> None:
        task = asyncio.get_running_loop().create_task(watch())
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def cancel(self) -> None:
        for task in self._tasks:
            task.cancel()


class Channel:
    """One request's ``receive``, shared by the app and the watcher task.

    Whoever reads first keeps a body message for the app (``pending``); a disconnect
    is remembered, and every later read answers it at once.
    """

    def __init__(self, scope: Scope, receive: Receive, watchers: Watchers,
                 body_timeout_s: float) -> None:
        # NOTE: what the log names, not the scope, which holds the channel: that cycle
        # left each request's objects (its scope, channel, record and job watch, ~30 in
        # all) to the garbage collector, a pass every ~26 requests costing ~20 µs of CPU
        # a request, instead of freeing them as the request ends.
        self._method = scope.get("method")
        self._path = scope.get("path")
        self._receive = receive
        self._watchers = watchers
        self._body_timeout_s = body_timeout_s
        self._callbacks: list[Callable[[], None]] = []
        self._pending: deque[Message] = deque()  # body messages the watcher read
        self._read_ended = Arrival()  # the other of app and watcher waits for it
        self._reading = False
        self._watching = False
        # NOTE: the server's view, not the app's: an app refusing a request never reads
        # its body, yet the connection stays reusable once the server has it all.
        self.body_received = False  # the body's last chunk was read off the channel
        self.disconnected = False

    def on_disconnect(self, callback: Callable[[], None]) -> None:
        if self.disconnected:  # the client left already: what comes now (the next
            _run([callback])   # prompt of a list) is for nobody, and stops at once
            return
        self._callbacks.append(callback)
        if not self._watching:
            self._watching = True
            self._watchers.start(self._watch)

    def response_ending(self) -> None:
        """The response's last part is being sent: a disconnect from now on is the
        server's end of the request, not the client leaving."""
        self._callbacks = []

    async def app_receive(self) -> Message:
        """The app's next message; the body's reads are bounded by ``body_timeout_s``."""
        body_timeout_s = self._body_timeout_s
        while True:
            if self._pending:
                return self._pending.popleft()
            if self.disconnected:
                return disconnect()
            if not self._reading:
                if self.body_received or body_timeout_s == math.inf:
                    return await self._read(keep=False)
                # NOTE: asyncio's timeout, not anyio's move_on_after, which costs ~4 µs
                # more: every request reads its body here (Hypercorn, which calls the
                # app, is asyncio too).
                stall = asyncio.timeout(body_timeout_s)
                try:
                    async with stall:
                        return await self._read(keep=False)
                except TimeoutError:
                    if not stall.expired():
                        raise
                log.info("%s %s: the request body stalled for %.0f s",
                         self._method, self._path, body_timeout_s)
                self.disconnected = True  # the client is as good as gone
                return disconnect()
            await self._read_ended.wait()

    async def take_ready(self) -> None:
        """Read, without waiting, what the server already has of the body (a response
        that starts before the app read it: the connection stays reusable if it is all
        there)."""
        while not (self.body_received or self.disconnected or self._reading):
            # NOTE: a ready message returns without a checkpoint, so an expired scope
            # only stops a read that would wait.
            with anyio.move_on_after(0) as scope:
                await self._read(keep=True)
            if scope.cancelled_caught:
                return

    async def _watch(self) -> None:
        """Read until the disconnect (which the server sends after the response too)."""
        try:
            while not self.disconnected:
                if self._reading:
                    await self._read_ended.wait()
                else:
                    await self._read(keep=True)
        except Exception:  # nobody awaits this task: say it here
            log.exception("the disconnect watcher failed")

    async def _read(self, *, keep: bool) -> Message:
        """One message off the channel (the only reader meanwhile); ``keep`` saves a
        body message for the app."""
        self._reading = True
        try:
            message = await self._receive()
        finally:
            self._reading = False
            self._read_ended.wake()
        if message["type"] == "http.request":
            self.body_received = not message.get("more_body", False)
            if keep:
                self._pending.append(message)
        elif message["type"] == "http.disconnect":
            self.disconnected = True
            callbacks, self._callbacks = self._callbacks, []
            _run(callbacks)
        return message


def _run(callbacks: list[Callable[[], None]]) -> None:
    """Each callback, whatever the others do."""
    for callback in callbacks:
        try:
            callback()
        except Exception:
            log.exception("disconnect callback failed")


class DisconnectWatcher:
    """ASGI wrapper; ``watchers`` holds the watcher tasks (the server cancels what is
    left of them when it stops)."""

    def __init__(self, app: ASGIApp, watchers: Watchers,
                 body_timeout_s: float = math.inf) -> None:
        self.app = app
        self.watchers = watchers
        self.body_timeout_s = body_timeout_s

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        channel = scope[CHANNEL_KEY] = Channel(scope, receive, self.watchers,
                                               self.body_timeout_s)

        async def app_send(message: Message) -> None:
            kind = message["type"]
            if kind == "http.response.start" and not channel.body_received:
                await channel.take_ready()
                if not channel.body_received:
                    message = closing(message)
            elif kind == "http.response.body" and not message.get("more_body", False):
                channel.response_ending()
            await send(message)

        try:
            await self.app(scope, channel.app_receive, app_send)
        except StreamAborted as exc:
            log.warning("%s %s aborted mid-response: %s", scope.get("method"),
                        scope.get("path"), exc)
        finally:
            channel.response_ending()
