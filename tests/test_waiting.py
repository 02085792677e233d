"""WaitingJobs, the ModelActor's bounded queue: pure, so tested without an actor."""

from __future__ import annotations

import math
from collections.abc import Iterable

import pytest
from hypothesis import given
from hypothesis import strategies as st

from llmux.actors.messages import Job
from llmux.actors.replies import reply_channel
from llmux.actors.waiting import WaitingJobs


def job(job_id: int, deadline: float = 100.0) -> Job:
    send, receive = reply_channel()
    receive.close()
    return Job(id=job_id, op="chat", payload={}, deadline=deadline, reply=send,
               enqueued_at=0.0)


def ids(jobs: Iterable[Job]) -> list[int]:
    return [queued.id for queued in jobs]


def test_a_limit_below_one_is_refused() -> None:
    with pytest.raises(ValueError, match=r"^limit must be at least 1, got 0$"):
        WaitingJobs(0)


def test_jobs_leave_in_the_order_they_came() -> None:
    waiting = WaitingJobs(3)
    for job_id in (1, 2, 3):
        waiting.append(job(job_id))
    assert ids(waiting) == [1, 2, 3]
    assert [waiting.popleft().id for _ in range(3)] == [1, 2, 3]
    assert len(waiting) == 0
    assert not waiting


def test_popleft_on_an_empty_queue_raises() -> None:
    with pytest.raises(IndexError):
        WaitingJobs(1).popleft()


def test_the_queue_is_full_at_its_limit() -> None:
    waiting = WaitingJobs(2)
    waiting.append(job(1))
    assert not waiting.is_full
    waiting.append(job(2))
    assert waiting.is_full


def test_appending_to_a_full_queue_is_the_actors_bug() -> None:
    waiting = WaitingJobs(1)
    waiting.append(job(1))
    with pytest.raises(AssertionError, match=r"^cannot queue job 2: 1 waiting already$"):
        waiting.append(job(2))
    assert ids(waiting) == [1]


def test_remove_takes_that_job_and_keeps_the_order_of_the_rest() -> None:
    waiting = WaitingJobs(3)
    second = job(2)
    for queued in (job(1), second, job(3)):
        waiting.append(queued)
    assert waiting.remove(2) is second
    assert ids(waiting) == [1, 3]
    assert not waiting.is_full


def test_removing_a_job_not_waiting_answers_none() -> None:
    waiting = WaitingJobs(2)
    waiting.append(job(1))
    assert waiting.remove(7) is None
    assert ids(waiting) == [1]


def test_iterating_allows_removal_meanwhile() -> None:
    waiting = WaitingJobs(3)
    for job_id in (1, 2, 3):
        waiting.append(job(job_id))
    seen = []
    for queued in waiting:
        seen.append(queued.id)
        waiting.remove(queued.id)
    assert seen == [1, 2, 3]
    assert len(waiting) == 0


def test_clear_returns_every_job_oldest_first_and_empties_the_queue() -> None:
    waiting = WaitingJobs(2)
    waiting.append(job(1))
    waiting.append(job(2))
    assert ids(waiting.clear()) == [1, 2]
    assert len(waiting) == 0
    assert waiting.clear() == []


def test_expire_takes_jobs_at_or_past_their_deadline() -> None:
    waiting = WaitingJobs(4)
    for job_id, deadline in ((1, 30.0), (2, 10.0), (3, 20.0), (4, 20.5)):
        waiting.append(job(job_id, deadline))
    assert ids(waiting.expire(20.0)) == [2, 3]
    assert ids(waiting) == [1, 4]
    assert waiting.expire(20.0) == []


def test_deadlines_of_an_empty_queue_are_infinite() -> None:
    waiting = WaitingJobs(1)
    assert waiting.next_deadline() == math.inf
    assert waiting.latest_deadline() == -math.inf


def test_next_and_latest_deadline_span_the_waiting_jobs() -> None:
    waiting = WaitingJobs(3)
    for job_id, deadline in ((1, 30.0), (2, 10.0), (3, 20.0)):
        waiting.append(job(job_id, deadline))
    assert waiting.next_deadline() == 10.0
    assert waiting.latest_deadline() == 30.0


deadlines = st.lists(st.floats(0.0, 1000.0), min_size=1, max_size=20)


@given(deadlines=deadlines, now=st.floats(0.0, 1000.0))
def test_expire_splits_the_queue_at_now_keeping_order(
    deadlines: list[float], now: float
) -> None:
    waiting = WaitingJobs(len(deadlines))
    for job_id, deadline in enumerate(deadlines):
        waiting.append(job(job_id, deadline))
    expired = waiting.expire(now)
    assert ids(expired) == [i for i, d in enumerate(deadlines) if d <= now]
    assert ids(waiting) == [i for i, d in enumerate(deadlines) if d > now]
    assert waiting.next_deadline() > now
    assert waiting.latest_deadline() == max((d for d in deadlines if d > now),
                                            default=-math.inf)
