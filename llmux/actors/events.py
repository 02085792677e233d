"""The recent-events log shown in ``/admin/state``: transitions, evictions and
refusals with their reasons. Actors append; nobody else mutates it."""

from __future__ import annotations

import collections
import logging
import time
from collections.abc import Iterator

import attrs

log = logging.getLogger("llmux.events")


@attrs.frozen(kw_only=True)
class Event:
    at: float  # wall-clock seconds since the epoch
    model: str
    kind: str  # "transition", "evict", "refuse", "measure", "release", ...
    reason: str
    from_state: str | None = None
    to_state: str | None = None

    def to_dict(self) -> dict[str, object]:
        return attrs.asdict(self)


class EventLog:
    """A bounded ring of the latest events, plus counts by kind for metrics."""

    def __init__(self, size: int = 500) -> None:
        self._events: collections.deque[Event] = collections.deque(maxlen=size)
        self.counts: collections.Counter[str] = collections.Counter()

    def record(self, model: str, kind: str, reason: str, **states: str | None) -> Event:
        event = Event(at=time.time(), model=model, kind=kind, reason=reason, **states)
        self._events.append(event)
        self.counts[kind] += 1
        log.info("%s %s: %s", model, kind, reason)
        return event

    def __iter__(self) -> Iterator[Event]:
        return iter(self._events)

    def recent(self, limit: int = 100) -> list[Event]:
        return list(self._events)[-limit:]
