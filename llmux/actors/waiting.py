"""The jobs waiting for a model's worker: the ModelActor's bounded queue of them.

First come, first served, at most ``limit`` (the model's ``max_queue``) at once.
Pure: the time is an argument, and what to do with a job that is refused, expired
or dropped (answer it, ask the arbiter for room) is the actor's.
"""

from __future__ import annotations

import collections
import math
from collections.abc import Iterator

from llmux.actors.messages import Job

__all__ = ["WaitingJobs"]


class WaitingJobs:
    """Jobs submitted and not started yet, oldest first."""

    def __init__(self, limit: int) -> None:
        """Raises:
            ValueError: ``limit`` is below 1.
        """
        if limit < 1:
            raise ValueError(f"limit must be at least 1, got {limit}")
        self.limit = limit
        self._jobs: collections.deque[Job] = collections.deque()

    def __len__(self) -> int:
        return len(self._jobs)

    def __iter__(self) -> Iterator[Job]:
        """The jobs, oldest first, over a copy: callers may drop jobs meanwhile."""
        return iter(list(self._jobs))

    @property
    def is_full(self) -> bool:
        """A new job must be refused (QueueFull) rather than appended."""
        return len(self._jobs) >= self.limit

    def append(self, job: Job) -> None:
        """Raises AssertionError when full: the actor checks ``is_full`` first, so
        this is its bug, never a client's."""
        if self.is_full:
            raise AssertionError(f"cannot queue job {job.id}: {self.limit} waiting already")
        self._jobs.append(job)

    def popleft(self) -> Job:
        """The oldest job, taken off the queue.

        Raises:
            IndexError: nothing waits.
        """
        return self._jobs.popleft()

    def remove(self, job_id: int) -> Job | None:
        """Take the job of that id off the queue (its client left); None if it is
        not waiting (it started already, or was never queued)."""
        for job in self._jobs:
            if job.id == job_id:
                self._jobs.remove(job)
                return job
        return None

    def clear(self) -> list[Job]:
        """Take every job off the queue (the load failed or was refused, or llmux
        stops); returns them oldest first."""
        jobs, self._jobs = list(self._jobs), collections.deque()
        return jobs

    def expire(self, now: float) -> list[Job]:
        """Take the jobs whose deadline is at or before ``now`` off the queue;
        returns them oldest first, for the actor to answer."""
        expired = [job for job in self._jobs if job.deadline <= now]
        self._jobs = collections.deque(job for job in self._jobs if job.deadline > now)
        return expired

    def latest_deadline(self) -> float:
        """The last deadline of any waiting job, to ask the arbiter for room until
        then; -inf if none waits."""
        return max((job.deadline for job in self._jobs), default=-math.inf)

    def next_deadline(self) -> float:
        """When the next waiting job expires; inf if none waits."""
        return min((job.deadline for job in self._jobs), default=math.inf)
