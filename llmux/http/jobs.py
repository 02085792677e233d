"""What every inference resource does with a job: run it whole, or stream its replies.

A job's ticket is cancelled when the client disconnects (the disconnect watcher calls
``ticket.cancel``) and, in any case, when the response ends, so a worker never keeps
generating for nobody.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import anyio
import falcon.asgi

from llmux.actors.messages import Failure, Finished, Reply, Started, Status
from llmux.errors import ShuttingDown
from llmux.http.disconnect import on_disconnect
from llmux.http.metrics_route import watch_job
from llmux.runtime import Ticket

PREFLIGHT_S = 0.5  # wait this long in all for a fast refusal before a 200 stream
KEEPALIVE_S = 1.0  # a Status reply at least this often while nothing else comes


def unbuffered(resp: falcon.asgi.Response) -> None:
    """No caching and no proxy buffering: each token or audio chunk reaches the client
    as it is made."""
    resp.set_header("Cache-Control", "no-cache")
    resp.set_header("X-Accel-Buffering", "no")


async def run_whole(req: falcon.asgi.Request, ticket: Ticket
                    ) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """The whole reply of a job (non-streaming): its pieces and its final data.

    Raises:
        LlmuxError: the job failed.
    """
    on_disconnect(req.scope, ticket.cancel)
    watch_job(req, ticket)
    try:
        return await ticket.collect()
    finally:
        ticket.cancel()


async def start_stream(req: falcon.asgi.Request, ticket: Ticket) -> Reply:
    """The first reply if it comes within ``PREFLIGHT_S``, so a refusal (queue full, load
    refused, bad input) is a proper HTTP error instead of an error inside a 200 stream;
    ``Status("waiting")`` when none came in time (the 200 stream then begins).

    Raises:
        LlmuxError: the job failed at once.
    """
    on_disconnect(req.scope, ticket.cancel)
    watch_job(req, ticket)
    try:
        with anyio.fail_after(PREFLIGHT_S):
            reply = await first_answer(ticket)
    except TimeoutError:
        return Status("waiting")
    except BaseException:
        ticket.cancel()
        raise
    if isinstance(reply, Failure):
        ticket.cancel()
        raise reply.error
    return reply or Status("ended")


async def first_answer(ticket: Ticket) -> Reply | None:
    """The first reply that is not ``Started``: the actor sends ``Started`` as it hands
    the job to the worker, before the worker has looked at the input, so only the reply
    after it tells whether the worker refused the input. None: the stream has ended.

    Cancelling it loses no reply (the ticket keeps what it has not handed out).
    """
    while isinstance(reply := await ticket.next(), Started):
        pass
    return reply


async def replies(ticket: Ticket, first: Reply) -> AsyncIterator[Reply]:
    """Every reply of a streaming job from ``first`` on, with a ``Status`` whenever
    nothing came for ``KEEPALIVE_S``; always ends with ``Finished`` or ``Failure``."""
    try:
        reply: Reply | None = first
        while reply is not None:
            yield reply
            if isinstance(reply, Finished | Failure):
                return
            try:
                reply = await ticket.next(KEEPALIVE_S)
            except TimeoutError:
                reply = Status("waiting")
        yield Failure(ShuttingDown("the request ended without an answer; retry it",
                                   retry_after_s=1.0))
    finally:
        ticket.cancel()
