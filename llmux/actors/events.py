"""The recent-events log shown in ``/admin/state``: transitions, evictions and
refusals with their reasons. Actors append; nobody else mutates it. Listeners (the
``/admin/events`` stream, metrics) are called with each new event, synchronously, on
the event loop: they must not block.

A routine event (each request's ready -> busy -> ready) goes to the listeners but is
neither kept nor logged above DEBUG: two per request would push the loads, evictions
and failures an operator looks for out of the recent events within seconds, and the
request log already has each request."""

from __future__ import annotations

import collections
import logging
import time
from collections.abc import Callable, Iterator

import attrs

from llmux.logging_setup import FIELDS

log = logging.getLogger("llmux.events")


@attrs.frozen(kw_only=True)
class Event:
    at: float  # wall-clock seconds since the epoch
    model: str
    kind: str  # "transition", "evict", "refuse", "measure", "release", ...
    reason: str
    from_state: str | None = None
    to_state: str | None = None
    routine: bool = False  # for the listeners only: not kept, logged at DEBUG

    def to_dict(self) -> dict[str, object]:
        return attrs.asdict(self)


class EventLog:
    """A bounded ring of the latest events, plus counts by kind for metrics."""

    def __init__(self, size: int = 500) -> None:
        self._events: collections.deque[Event] = collections.deque(maxlen=size)
        self.counts: collections.Counter[str] = collections.Counter()
        self._listeners: list[Callable[[Event], None]] = []

    def subscribe(self, listener: Callable[[Event], None]) -> Callable[[], None]:
        """Call ``listener(event)`` for every event from now on; returns the function
        that unsubscribes it."""
        self._listeners.append(listener)
        return lambda: self._listeners.remove(listener) if listener in self._listeners \
            else None

    @property
    def subscribers(self) -> int:
        """How many listeners are subscribed (in /admin/state, where a leak would show)."""
        return len(self._listeners)

    def record(self, model: str, kind: str, reason: str, *, routine: bool = False,
               **states: str | None) -> Event:
        """Keep and log the event, and tell the listeners; a ``routine`` one is only
        told (and logged at DEBUG)."""
        event = Event(at=time.time(), model=model, kind=kind, reason=reason,
                      routine=routine, **states)
        if not routine:
            self._events.append(event)
        self.counts[kind] += 1
        level = logging.DEBUG if routine else logging.INFO
        moved = f" {event.from_state} -> {event.to_state}" if event.to_state else ""
        if log.isEnabledFor(level):
            log.log(level, "%s %s%s: %s", model, kind, moved, reason, extra={FIELDS: {
                "model": model, "kind": kind, "reason": reason,
                "from_state": event.from_state, "to_state": event.to_state}})
        for listener in list(self._listeners):
            try:
                listener(event)
            except Exception:
                log.exception("an event listener failed on %s %s", model, kind)
        return event

    def __iter__(self) -> Iterator[Event]:
        return iter(self._events)

    def recent(self, limit: int = 100) -> list[Event]:
        return list(self._events)[-limit:]
