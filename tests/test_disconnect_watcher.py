"""The disconnect watcher's contract, driven the way Hypercorn drives an ASGI app: the
request's ``receive`` is an ``asyncio.Queue``'s ``get``, on which the server puts the body
and, once the response is sent or the client leaves, ``http.disconnect``.

The live behaviour (a client leaving a queued or running job, keep-alive after an early
refusal) is in tests/test_concurrency.py, tests/guarantees and tests/test_early_refusal.py.
"""

from __future__ import annotations

import asyncio
import gc
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from typing import Any

import anyio
import anyio.abc
import pytest
from anyio import wait_all_tasks_blocked
from anyio.lowlevel import checkpoint

from llmux.http.disconnect import (
    Channel,
    DisconnectWatcher,
    Message,
    Receive,
    Scope,
    Send,
    StreamAborted,
    Watchers,
    on_disconnect,
)

pytestmark = pytest.mark.anyio

DISCONNECT = {"type": "http.disconnect"}
App = Callable[[Scope, Receive, Send], Awaitable[None]]


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"  # Hypercorn's receive is an asyncio.Queue


@pytest.fixture
async def watchers() -> AsyncIterator[Watchers]:
    """The watcher tasks of a test; every one must have ended with its request."""
    watchers = Watchers()
    yield watchers
    await wait_all_tasks_blocked()
    left = len(watchers)
    watchers.cancel()
    assert left == 0, "a disconnect watcher outlived its request"


def body(data: bytes, more: bool = False) -> Message:
    return {"type": "http.request", "body": data, "more_body": more}


class Exchange:
    """One request as the server sees it: its channel, and what the app sent."""

    def __init__(self, *messages: Message) -> None:
        self.queue: asyncio.Queue[Message] = asyncio.Queue()
        for message in messages:
            self.queue.put_nowait(message)
        self.sent: list[Message] = []
        self.reads = 0

    async def receive(self) -> Message:
        self.reads += 1
        return await self.queue.get()

    async def send(self, message: Message) -> None:
        self.sent.append(message)
        if message["type"] == "http.response.body" and not message.get("more_body"):
            self.queue.put_nowait(DISCONNECT)  # Hypercorn: the stream closed

    def headers(self) -> list[tuple[bytes, bytes]]:
        return list(self.sent[0]["headers"])


async def respond(send: Send, status: int = 200) -> None:
    await send({"type": "http.response.start", "status": status, "headers": []})
    await send({"type": "http.response.body", "body": b"{}"})


async def serve(app: App, exchange: Exchange, watchers: Watchers, method: str = "POST",
                body_timeout_s: float = 30) -> None:
    scope: Scope = {"type": "http", "method": method, "path": "/v1/chat/completions"}
    await DisconnectWatcher(app, watchers, body_timeout_s)(scope, exchange.receive,
                                                            exchange.send)


@asynccontextmanager
async def served(app: App, exchange: Exchange,
                 watchers: Watchers) -> AsyncIterator[anyio.abc.TaskGroup]:
    """``app`` serving ``exchange``'s request, started and waiting: the block plays
    the client (it sends more, or leaves); the whole exchange ends within 1 s."""
    with anyio.fail_after(1):
        async with anyio.create_task_group() as tasks:
            tasks.start_soon(serve, app, exchange, watchers)
            await wait_all_tasks_blocked()
            yield tasks


async def read_body(receive: Receive) -> bytes:
    data = b""
    while True:
        message = await receive()
        if message["type"] != "http.request":
            raise AssertionError(f"the body ended with {message}")
        data += message["body"]
        if not message["more_body"]:
            return data


async def test_a_request_that_registers_nothing_starts_no_watcher(watchers: Watchers) -> None:
    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        assert await read_body(receive) == b"{}"
        await respond(send)

    exchange = Exchange(body(b"{}"))
    with anyio.fail_after(1):
        await serve(app, exchange, watchers)
        await wait_all_tasks_blocked()
    assert exchange.reads == 1  # the app's read only: nobody waits on the channel
    assert len(watchers) == 0
    assert "connection" not in dict(exchange.headers())


async def test_a_client_leaving_runs_the_callback_while_the_app_still_works(
        watchers: Watchers) -> None:
    left = anyio.Event()

    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        await read_body(receive)
        on_disconnect(scope, left.set)
        await left.wait()  # the job, cancelled by the callback

    exchange = Exchange(body(b"{}"))
    async with served(app, exchange, watchers):
        assert not left.is_set()
        exchange.queue.put_nowait(DISCONNECT)
    assert left.is_set()


async def test_the_watcher_ends_with_the_response_and_calls_nothing_then(
        watchers: Watchers) -> None:
    calls: list[str] = []

    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        await read_body(receive)
        on_disconnect(scope, lambda: calls.append("left"))
        await wait_all_tasks_blocked()  # the watcher waits on the channel
        await respond(send)

    exchange = Exchange(body(b"{}"))
    with anyio.fail_after(1):
        await serve(app, exchange, watchers)
        await wait_all_tasks_blocked()
        assert len(watchers) == 0  # it read the server's disconnect and ended
    assert calls == []
    assert exchange.queue.empty()  # the watcher read the server's disconnect


async def test_the_app_reads_its_body_whole_while_the_watcher_reads_the_channel(
        watchers: Watchers) -> None:
    left = anyio.Event()
    bodies: list[bytes] = []

    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        on_disconnect(scope, left.set)  # before the body: both read the channel
        await wait_all_tasks_blocked()
        bodies.append(await read_body(receive))
        await respond(send)

    exchange = Exchange(body(b"a", more=True))
    async with served(app, exchange, watchers):
        for part in (body(b"b", more=True), body(b"c")):
            exchange.queue.put_nowait(part)
            await checkpoint()
    assert bodies == [b"abc"]
    assert not left.is_set()


async def test_an_app_reading_after_its_body_sees_the_disconnect_the_watcher_read(
        watchers: Watchers) -> None:
    seen: list[Message] = []

    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        await read_body(receive)
        on_disconnect(scope, lambda: None)
        await wait_all_tasks_blocked()
        seen.append(await receive())  # as Falcon does between SSE events
        seen.append(await receive())  # and every later read answers at once

    exchange = Exchange(body(b"{}"))
    async with served(app, exchange, watchers):
        exchange.queue.put_nowait(DISCONNECT)
    assert seen == [DISCONNECT, DISCONNECT]


@pytest.mark.parametrize(("queued", "method", "closes"), [
    ((body(b"{}"),), "POST", False),  # the whole body arrived: the connection is reusable
    ((body(b"a", more=True), body(b""),), "POST", False),
    ((body(b""),), "GET", False),  # a GET's empty body
    ((body(b"a", more=True),), "POST", True),  # an upload still arriving
    ((), "POST", True),
])
async def test_a_refusal_before_the_body_is_read_closes_only_if_the_body_is_not_all_there(
        queued: tuple[Message, ...], method: str, closes: bool, watchers: Watchers) -> None:
    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        await respond(send, 401)  # the body unread

    exchange = Exchange(*queued)
    with anyio.fail_after(1):
        await serve(app, exchange, watchers, method=method)
    assert ((b"connection", b"close") in exchange.headers()) is closes


async def test_a_body_that_stalls_reads_as_a_disconnect(watchers: Watchers) -> None:
    seen: list[Message] = []

    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        seen.append(await receive())
        seen.append(await receive())  # nothing more comes
        seen.append(await receive())
        await respond(send, 400)

    exchange = Exchange(body(b"{", more=True))
    with anyio.fail_after(2):
        await serve(app, exchange, watchers, body_timeout_s=0.05)
    assert seen == [body(b"{", more=True), DISCONNECT, DISCONNECT]
    assert (b"connection", b"close") in exchange.headers()


async def test_once_the_body_is_complete_nothing_is_timed(watchers: Watchers) -> None:
    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        await read_body(receive)
        await anyio.sleep(0.15)  # a long reply; the client sends nothing more
        assert await receive() == DISCONNECT

    exchange = Exchange(body(b"{}"))
    with anyio.fail_after(2):
        async with anyio.create_task_group() as tasks:
            tasks.start_soon(serve, app, exchange, watchers, "POST", 0.05)
            await anyio.sleep(0.1)
            exchange.queue.put_nowait(DISCONNECT)


async def test_an_aborted_stream_ends_the_request_without_raising(watchers: Watchers) -> None:
    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        await read_body(receive)
        await send({"type": "http.response.start", "status": 200, "headers": []})
        raise StreamAborted("the job failed")

    exchange = Exchange(body(b"{}"))
    with anyio.fail_after(1):
        await serve(app, exchange, watchers)
    assert [message["type"] for message in exchange.sent] == ["http.response.start"]


async def test_on_disconnect_outside_the_watcher_does_nothing() -> None:
    scope: dict[str, Any] = {"type": "http"}
    on_disconnect(scope, lambda: None)
    assert scope == {"type": "http"}


async def test_a_failing_callback_does_not_keep_the_others_from_running(
        watchers: Watchers) -> None:
    """Each callback runs even if one before it raises: the job is still cancelled."""
    left = anyio.Event()

    def broken() -> None:
        raise RuntimeError("a callback that fails")

    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        await read_body(receive)
        on_disconnect(scope, broken)
        on_disconnect(scope, left.set)
        await left.wait()

    exchange = Exchange(body(b"{}"))
    async with served(app, exchange, watchers):
        exchange.queue.put_nowait(DISCONNECT)
    assert left.is_set()


async def test_one_watcher_serves_every_callback_of_a_request(watchers: Watchers) -> None:
    """A request that registers several callbacks still has one watcher task."""
    calls: list[int] = []

    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        await read_body(receive)
        for i in range(3):
            on_disconnect(scope, lambda i=i: calls.append(i))
        await wait_all_tasks_blocked()
        assert len(watchers) == 1
        await anyio.sleep_forever()  # the job, until the client leaves

    exchange = Exchange(body(b"{}"))
    async with served(app, exchange, watchers) as tasks:
        exchange.queue.put_nowait(DISCONNECT)
        await wait_all_tasks_blocked()
        tasks.cancel_scope.cancel()
    assert calls == [0, 1, 2]


async def test_a_stalled_body_is_not_waited_for_twice(watchers: Watchers) -> None:
    """Once the body stalled, later reads answer the disconnect at once: the channel is
    not read again."""
    seen: list[Message] = []

    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        seen.extend([await receive() for _ in range(3)])
        await respond(send, 400)

    exchange = Exchange(body(b"{", more=True))
    with anyio.fail_after(2):
        await serve(app, exchange, watchers, body_timeout_s=0.05)
    assert seen == [body(b"{", more=True), DISCONNECT, DISCONNECT]
    assert exchange.reads == 2  # the body's chunk, then the read that stalled


async def test_a_read_after_the_body_waits_for_the_client_as_long_as_it_takes(
        watchers: Watchers) -> None:
    """Past the body, a read is not timed: the disconnect the app sees is the client's,
    however long it comes after ``body_timeout_s``."""
    queued = anyio.Event()

    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        await read_body(receive)
        assert await receive() == DISCONNECT  # as Falcon does between SSE events
        assert queued.is_set(), "the read timed out instead of waiting for the client"

    exchange = Exchange(body(b"{}"))
    with anyio.fail_after(2):
        async with anyio.create_task_group() as tasks:
            tasks.start_soon(serve, app, exchange, watchers, "POST", 0.05)
            await anyio.sleep(0.2)  # the client is silent for 4 body timeouts
            queued.set()
            exchange.queue.put_nowait(DISCONNECT)


async def test_after_the_last_body_part_a_disconnect_calls_nothing(
        watchers: Watchers) -> None:
    """The server's disconnect that follows the response's end is no client leaving,
    even while the app is still finishing up."""
    calls: list[str] = []

    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        await read_body(receive)
        on_disconnect(scope, lambda: calls.append("left"))
        await respond(send)
        await wait_all_tasks_blocked()  # the watcher reads the server's disconnect
        assert len(watchers) == 0
        assert calls == []

    exchange = Exchange(body(b"{}"))
    with anyio.fail_after(1):
        await serve(app, exchange, watchers)
    assert calls == []


async def test_a_watcher_started_during_a_read_keeps_the_body_in_order(
        watchers: Watchers) -> None:
    """A watcher that starts while the app waits for body bytes reads only in turn: the
    body's parts reach the app in the order they came."""
    bodies: list[bytes] = []

    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        async def register_soon() -> None:
            await wait_all_tasks_blocked()  # the app's read waits on the channel
            on_disconnect(scope, lambda: None)

        async with anyio.create_task_group() as tasks:
            tasks.start_soon(register_soon)
            bodies.append(await read_body(receive))
        await respond(send)

    exchange = Exchange()
    async with served(app, exchange, watchers):
        for part in (b"a", b"b", b"c", b"d"):
            exchange.queue.put_nowait(body(part, more=True))
            await wait_all_tasks_blocked()
        exchange.queue.put_nowait(body(b"e"))
    assert bodies == [b"abcde"]


async def test_a_request_that_ended_without_its_last_part_calls_nothing_later(
        watchers: Watchers) -> None:
    """An aborted stream ends the request too: the server's disconnect after it is no
    client leaving."""
    calls: list[str] = []

    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        await read_body(receive)
        on_disconnect(scope, lambda: calls.append("left"))
        await send({"type": "http.response.start", "status": 200, "headers": []})
        raise StreamAborted("the job failed")

    exchange = Exchange(body(b"{}"))
    with anyio.fail_after(1):
        await serve(app, exchange, watchers)
        exchange.queue.put_nowait(DISCONNECT)  # Hypercorn: the stream closed
        await wait_all_tasks_blocked()
    assert calls == []


async def test_a_body_read_as_the_response_starts_is_kept_for_the_app(
        watchers: Watchers) -> None:
    """The start of a response reads what the server has of the body; the app still
    gets all of it."""
    bodies: list[bytes] = []

    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        await send({"type": "http.response.start", "status": 200, "headers": []})
        bodies.append(await read_body(receive))
        await send({"type": "http.response.body", "body": b"{}"})

    exchange = Exchange(body(b"a", more=True), body(b"b"))
    with anyio.fail_after(1):
        await serve(app, exchange, watchers)
    assert bodies == [b"ab"]
    assert "connection" not in dict(exchange.headers())  # all of it was there


async def test_a_refusal_while_the_watcher_waits_for_the_body_reads_no_more(
        watchers: Watchers) -> None:
    """The channel has one reader: a response starting while the watcher waits for the
    body leaves the read to it (and says ``connection: close``)."""

    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        on_disconnect(scope, lambda: None)
        await wait_all_tasks_blocked()  # the watcher read the part, and waits for more
        await respond(send, 413)

    exchange = Exchange(body(b"a", more=True))
    with anyio.fail_after(1):
        await serve(app, exchange, watchers)
        await wait_all_tasks_blocked()
    assert (b"connection", b"close") in exchange.headers()
    assert exchange.reads == 2  # the watcher's: the part, then the wait the disconnect ends


async def test_a_callback_registered_after_the_client_left_runs_at_once(
        watchers: Watchers) -> None:
    """The client left before the response ended: a job submitted after that (the next
    prompt of a list) is cancelled at once too."""
    calls: list[str] = []

    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        await read_body(receive)
        on_disconnect(scope, lambda: calls.append("first job"))
        while not calls:  # the first job runs until the watcher reads the disconnect
            await wait_all_tasks_blocked()
        on_disconnect(scope, lambda: calls.append("next job"))
        await wait_all_tasks_blocked()

    exchange = Exchange(body(b"{}"))
    async with served(app, exchange, watchers):
        exchange.queue.put_nowait(DISCONNECT)
    assert calls == ["first job", "next job"]


async def test_a_request_s_channel_is_freed_as_the_request_ends(watchers: Watchers) -> None:
    """Nothing of a request is left for the garbage collector: a channel that held its
    scope (which holds the channel) made every request a cycle of ~30 objects, which cost
    the server a collector pass every few dozen requests."""

    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        on_disconnect(scope, lambda: None)  # a watcher task too
        await read_body(receive)
        await respond(send)

    gc.collect()
    gc.set_debug(gc.DEBUG_SAVEALL)  # what a collection finds stays in gc.garbage
    try:
        with anyio.fail_after(1):
            await serve(app, Exchange(body(b"{}")), watchers)
            await wait_all_tasks_blocked()  # the watcher read the disconnect and ended
        gc.collect()
        left = [found for found in gc.garbage if isinstance(found, Channel)]
    finally:
        gc.set_debug(0)
        gc.garbage.clear()
    assert left == []
