"""When a model that failed may load again: the ModelActor's bookkeeping of failures.

A load that fails, or a worker that crashes, is a failure; failures in a row wait
1 s, 2 s, 4 s ... up to ``MAX_BACKOFF_S`` before the next load, so a model that
cannot load (or keeps dying) does not spin. A lone crash is retried at once: a
worker that served ``STABLE_S`` since it was ready, or was unloaded, ends the run.
Pure: the time is an argument, and what a wait means (answer requests at once with
``Retry-After``, wake up to retry, log it) is the actor's.
"""

from __future__ import annotations

import math
from typing import Final

__all__ = ["MAX_BACKOFF_S", "STABLE_S", "LoadBackoff"]

MAX_BACKOFF_S: Final = 60.0
STABLE_S: Final = 60.0  # a worker up this long ends a run of failures: its crash is a lone one


class LoadBackoff:
    """Failures in a row, the last one's reason, and when the next load may start."""

    def __init__(self) -> None:
        self.in_a_row = 0  # loads that failed, workers that crashed
        self.retry_at = 0.0  # no load starts before this
        # A retry by itself that found no free room waits again; a request need not
        # (it may evict), so the deferral is kept apart from ``retry_at``.
        self.retry_by_itself_at = 0.0
        self.last_error: str | None = None
        # NOTE: only a ready worker can crash, so this is set before it is read.
        self._ready_at = -math.inf

    def due(self, now: float) -> bool:
        """A load may start at ``now``: the wait after the last failure is over."""
        return now >= self.retry_at

    def retry_by_itself_due(self, now: float) -> bool:
        """A retry nobody asked for may start at ``now``: the failure's wait and any
        deferral are over."""
        return now >= self.next_retry_by_itself()

    def next_retry_by_itself(self) -> float:
        """When the model's actor wakes to retry by itself."""
        return max(self.retry_at, self.retry_by_itself_at)

    def worker_ready(self, now: float) -> None:
        """A worker loaded: the next load (after an unload) need not wait, and a crash
        ``STABLE_S`` after ``now`` is a lone one."""
        self._ready_at = now
        # else a request after an unload waits out an old backoff
        self.retry_at = self.retry_by_itself_at = 0.0

    def worker_stopped(self) -> None:
        """The worker was unloaded: it served until then, so the run of failures ends."""
        self.in_a_row = 0

    def waive(self) -> None:
        """Let the next load start at once (the model moved to another device)."""
        self.retry_at = self.retry_by_itself_at = 0.0

    def defer(self, now: float) -> float:
        """A retry by itself that could not start now (no free room for it): the next
        one after the same wait as the last. Not a failure: the count and the reason
        stay, and a request may load it at once (a client that honours ``Retry-After``
        would otherwise meet each deferral and be refused for ever)."""
        self.retry_by_itself_at = now + self._wait()
        return self.retry_by_itself_at - now

    def load_failed(self, reason: str, now: float) -> float:
        """One more failure in a row; returns the wait before the next load: 1 s,
        doubling up to ``MAX_BACKOFF_S``."""
        return self._failed(reason, now, self._count())

    def crashed(self, reason: str, now: float) -> float:
        """The ready worker died; returns the wait before the next load. A lone crash
        (no failure before it, or the worker had been up ``STABLE_S``) is retried at
        once; one that follows other failures waits as a failed load would, so a
        crash loop cannot spin."""
        if now - self._ready_at >= STABLE_S:
            self.in_a_row = 0
        lone = self.in_a_row == 0
        backoff = self._count()
        return self._failed(reason, now, 0.0 if lone else backoff)

    def _count(self) -> float:
        self.in_a_row += 1
        return self._wait()

    def _wait(self) -> float:
        return min(MAX_BACKOFF_S, 2.0 ** max(self.in_a_row - 1, 0))

    def _failed(self, reason: str, now: float, wait: float) -> float:
        self.retry_at = now + wait
        self.last_error = reason
        return wait
