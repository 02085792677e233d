"""The jobs a model's worker serves at once: the ModelActor's bookkeeping of them.

At most ``limit`` (the model's ``max_concurrency``) run together, keyed by job id so
the worker's frames find their job. Pure: the time is an argument, and what to do
with a job that is overdue (fail it, cancel it, kill the worker) is the actor's.
"""

from __future__ import annotations

import math
from collections.abc import Iterator

from llmux.actors.messages import Job

__all__ = ["RunningJobs"]


class RunningJobs:
    """Jobs started in the worker and not yet finished, by id."""

    def __init__(self, limit: int, cancel_grace_s: float) -> None:
        """``cancel_grace_s``: how long past its deadline a cancelled job may take to
        stop before the worker counts as ignoring the cancel.

        Raises:
            ValueError: ``limit`` is below 1.
        """
        if limit < 1:
            raise ValueError(f"limit must be at least 1, got {limit}")
        self.limit = limit
        self._grace = cancel_grace_s
        self._jobs: dict[int, Job] = {}

    def __len__(self) -> int:
        return len(self._jobs)

    def __iter__(self) -> Iterator[Job]:
        """The jobs, oldest first, over a copy: callers may finish jobs meanwhile."""
        return iter(list(self._jobs.values()))

    @property
    def has_room(self) -> bool:
        return len(self._jobs) < self.limit

    def add(self, job: Job) -> None:
        """Raises AssertionError when full or for a job already running: the actor's
        bug, never a client's."""
        if job.id in self._jobs:
            raise AssertionError(f"job {job.id} is running already")
        if not self.has_room:
            raise AssertionError(f"cannot start job {job.id}: {self.limit} running already")
        self._jobs[job.id] = job

    def get(self, job_id: object) -> Job | None:
        """The running job of that id (a frame's ``id``, whatever it is), else None."""
        return self._jobs.get(job_id) if isinstance(job_id, int) else None

    def pop(self, job_id: int) -> Job | None:
        return self._jobs.pop(job_id, None)

    def clear(self) -> list[Job]:
        """Forget every job (the worker is gone); returns them."""
        jobs, self._jobs = list(self._jobs.values()), {}
        return jobs

    def next_deadline(self) -> float:
        """When the next job expires, or (cancelled) runs out of grace; inf if none."""
        return min((job.deadline + (self._grace if job.cancelled else 0.0)
                    for job in self._jobs.values()), default=math.inf)

    def expired(self, now: float) -> list[Job]:
        """Jobs past their deadline and not cancelled yet: to fail and cancel."""
        return [job for job in self._jobs.values() if not job.cancelled and job.deadline <= now]

    def stuck(self, now: float) -> list[Job]:
        """Cancelled jobs still running past deadline and grace: the worker ignores
        the cancel."""
        return [job for job in self._jobs.values()
                if job.cancelled and job.deadline + self._grace <= now]
