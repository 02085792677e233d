"""``GET /admin/events``: the status page's live feed, as server-sent events.

The stream opens with the whole state (``event: state``, what ``/admin/state``
answers), then sends each new event of the runtime's event log (``event: event``, an
``Event.to_dict()``), a fresh state once events came (coalesced: at most one per
``STATE_INTERVAL_S``) and a comment line after ``KEEPALIVE_S`` of silence, so proxies
keep the connection open.

The event log calls our listener synchronously, on the event loop, from inside the
actors: the listener only puts the event into a bounded buffer and never waits. A
client too slow to keep up loses events (a comment says how many); the next state
holds the recent events, so the page catches up. The subscription ends when the
client leaves (the disconnect watcher calls ``Subscription.close``: Falcon would only
notice at the next event), when the server begins draining, or with the stream.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncGenerator, Callable
from typing import Final, Literal

import anyio
import attrs
import falcon.asgi
from falcon.asgi import SSEvent

from llmux.actors.events import Event, EventLog
from llmux.http.disconnect import on_disconnect
from llmux.http.jobs import unbuffered
from llmux.runtime import Runtime
from llmux.shutdown import draining

log = logging.getLogger(__name__)

BUFFER: Final = 256  # events held for one client before it starts losing them
STATE_INTERVAL_S: Final = 0.25  # at most this often a fresh state
KEEPALIVE_S: Final = 15.0  # a comment line after this much silence

Due = Literal["state", "keepalive"]


@attrs.define(kw_only=True)
class Pacing:
    """When a stream owes its client a fresh state or a keep-alive comment.

    Pure: the caller passes the time. A state is due once events were sent and the
    last state is ``state_interval_s`` old; a keep-alive after ``keepalive_s`` without
    writing anything.
    """

    last_write: float
    last_state: float
    stale: bool = False  # events were sent since the last state
    state_interval_s: float = STATE_INTERVAL_S
    keepalive_s: float = KEEPALIVE_S

    def due(self, now: float) -> Due | None:
        if self.stale and now - self.last_state >= self.state_interval_s:
            return "state"
        if now - self.last_write >= self.keepalive_s:
            return "keepalive"
        return None

    def wait_s(self, now: float) -> float:
        """How long to wait for an event before something is due."""
        if self.stale:
            return max(self.last_state + self.state_interval_s - now, 0.0)
        return max(self.last_write + self.keepalive_s - now, 0.0)

    def wrote(self, now: float, what: Literal["state", "event", "comment"]) -> None:
        self.last_write = now
        if what == "state":
            self.last_state, self.stale = now, False
        elif what == "event":
            self.stale = True


class Subscription:
    """One client's share of the event log: a bounded buffer that the log's listener
    fills without ever waiting."""

    def __init__(self, events: EventLog, buffer: int = BUFFER) -> None:
        self._send, self._receive = anyio.create_memory_object_stream[Event](buffer)
        self.dropped = 0  # events lost since the client last heard of it
        self._unsubscribe = events.subscribe(self._on_event)

    def _on_event(self, event: Event) -> None:
        try:
            self._send.send_nowait(event)
        except anyio.WouldBlock:
            self.dropped += 1
        except (anyio.ClosedResourceError, anyio.BrokenResourceError):
            pass  # closed: the client left

    def close(self) -> None:
        """Stop listening; a waiting ``next`` ends. Safe to call more than once."""
        self._unsubscribe()
        self._send.close()

    async def next(self, timeout_s: float, drain: anyio.Event | None) -> Event | None:
        """The next event, or None if none came within ``timeout_s``.

        Raises:
            anyio.EndOfStream: closed (client gone, or the server began draining) and
                nothing left in the buffer.
        """
        if drain is not None and drain.is_set():
            self.close()
        try:
            return self._receive.receive_nowait()
        except anyio.WouldBlock:
            pass
        event: Event | None = None
        ended = False
        async with anyio.create_task_group() as tg:
            if drain is not None and not drain.is_set():
                tg.start_soon(self._close_on, drain)
            # NOTE: an event handed over in the very moment the timeout fires is lost;
            # the next state holds it.
            with anyio.move_on_after(timeout_s):
                try:
                    event = await self._receive.receive()
                except anyio.EndOfStream:
                    ended = True
            tg.cancel_scope.cancel()
        if ended:
            raise anyio.EndOfStream
        return event

    async def _close_on(self, drain: anyio.Event) -> None:
        await drain.wait()
        self.close()

    def end(self) -> None:
        self.close()
        self._receive.close()


class AdminEvents:
    """``GET /admin/events``: the state, then every event as it happens."""

    access = "admin"

    def __init__(self, runtime: Runtime, *,
                 clock: Callable[[], float] = anyio.current_time) -> None:
        self.runtime = runtime
        self.clock = clock

    async def on_get(self, req: falcon.asgi.Request, resp: falcon.asgi.Response) -> None:
        subscription = Subscription(self.runtime.events)
        on_disconnect(req.scope, subscription.close)
        unbuffered(resp)
        resp.sse = self.stream(subscription, draining(req.scope))

    def state(self) -> SSEvent:
        return SSEvent(event="state", json=self.runtime.snapshot())

    async def stream(self, subscription: Subscription,
                     drain: anyio.Event | None) -> AsyncGenerator[SSEvent, None]:
        """The events of one client until it leaves or the server drains."""
        now = self.clock()
        pacing = Pacing(last_write=now, last_state=now)
        try:
            yield self.state()
            while True:
                now = self.clock()
                if subscription.dropped:
                    log.info("an /admin/events client fell behind: %d events dropped",
                             subscription.dropped)
                    yield SSEvent(comment=f"dropped {subscription.dropped} events: "
                                          "the next state has them")
                    subscription.dropped = 0
                    pacing.wrote(now, "event")
                match pacing.due(now):
                    case "state":
                        yield self.state()
                        pacing.wrote(now, "state")
                        continue
                    case "keepalive":
                        yield SSEvent(comment="keep-alive")
                        pacing.wrote(now, "comment")
                        continue
                try:
                    event = await subscription.next(pacing.wait_s(now), drain)
                except anyio.EndOfStream:
                    return
                if event is not None:
                    yield SSEvent(event="event", json=event.to_dict())
                    pacing.wrote(self.clock(), "event")
        finally:
            subscription.end()
