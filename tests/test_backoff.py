"""LoadBackoff, when a model that failed may load again: pure, so tested without an actor."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from llmux.actors.backoff import MAX_BACKOFF_S, STABLE_S, LoadBackoff


def crashed_after(backoff: LoadBackoff, up_s: float, now: float = 1000.0) -> float:
    """A worker ready at ``now`` crashes ``up_s`` later; returns the wait."""
    backoff.worker_ready(now)
    return backoff.crashed("worker died: SIGKILL", now + up_s)


def test_a_model_that_never_failed_may_load_at_once() -> None:
    backoff = LoadBackoff()
    assert backoff.due(0.0)
    assert (backoff.in_a_row, backoff.last_error) == (0, None)


def test_failed_loads_in_a_row_wait_doubling_up_to_the_cap() -> None:
    backoff = LoadBackoff()
    waits = [backoff.load_failed("no room", 0.0) for _ in range(9)]
    assert waits == [1.0, 2.0, 4.0, 8.0, 16.0, 32.0, MAX_BACKOFF_S, MAX_BACKOFF_S, MAX_BACKOFF_S]
    assert MAX_BACKOFF_S == 60.0  # README: "1 s, doubling up to 60 s" (not the next power of 2)
    assert backoff.in_a_row == 9


def test_a_failed_load_is_not_retried_before_its_wait_is_over() -> None:
    backoff = LoadBackoff()
    backoff.load_failed("no room", 100.0)
    backoff.load_failed("out of memory", 100.0)
    assert backoff.retry_at == 102.0
    assert not backoff.due(101.9)
    assert backoff.due(102.0)
    assert backoff.last_error == "out of memory"


def test_a_lone_crash_is_retried_at_once_but_counts_as_a_failure() -> None:
    backoff = LoadBackoff()
    assert crashed_after(backoff, 5.0) == 0.0
    assert backoff.due(1005.0)
    assert (backoff.in_a_row, backoff.last_error) == (1, "worker died: SIGKILL")


def test_a_crash_soon_after_another_failure_backs_off_like_a_failed_load() -> None:
    backoff = LoadBackoff()
    crashed_after(backoff, 5.0)
    assert crashed_after(backoff, STABLE_S - 1.0) == 2.0
    assert not backoff.due(1000.0 + STABLE_S)
    assert backoff.load_failed("no room", 2000.0) == 4.0


@pytest.mark.parametrize("up_s", [0.0, STABLE_S - 0.001])
def test_a_crash_within_stable_s_of_ready_continues_the_run(up_s: float) -> None:
    backoff = LoadBackoff()
    backoff.load_failed("no room", 0.0)
    backoff.load_failed("no room", 0.0)
    assert crashed_after(backoff, up_s) == 4.0
    assert backoff.in_a_row == 3


def test_a_worker_up_for_stable_s_ends_the_run_so_its_crash_is_a_lone_one() -> None:
    backoff = LoadBackoff()
    for _ in range(5):
        backoff.load_failed("no room", 0.0)
    assert crashed_after(backoff, STABLE_S) == 0.0
    assert backoff.in_a_row == 1


def test_an_unloaded_worker_ends_the_run_of_failures() -> None:
    backoff = LoadBackoff()
    backoff.load_failed("no room", 0.0)
    backoff.load_failed("no room", 0.0)
    backoff.worker_stopped()
    assert backoff.in_a_row == 0
    assert backoff.load_failed("no room", 10.0) == 1.0


def test_an_unloaded_worker_leaves_the_wait_and_the_reason() -> None:
    backoff = LoadBackoff()
    backoff.load_failed("no room", 10.0)
    backoff.worker_stopped()
    assert (backoff.retry_at, backoff.last_error) == (11.0, "no room")


def test_a_worker_that_loaded_lets_the_next_load_start_at_once() -> None:
    # A preload or admin load may start during a backoff; once it succeeded, a request
    # after its unload must not wait out the old backoff.
    backoff = LoadBackoff()
    for _ in range(4):
        backoff.load_failed("no room", 100.0)
    backoff.worker_ready(101.0)
    assert backoff.due(101.0)
    assert backoff.in_a_row == 4  # a crash soon after still continues the run


def test_waive_lets_the_next_load_start_at_once_but_keeps_the_count() -> None:
    backoff = LoadBackoff()
    for _ in range(4):
        backoff.load_failed("no room", 100.0)
    backoff.waive()
    assert backoff.due(100.0)
    assert backoff.in_a_row == 4
    assert backoff.load_failed("no room", 100.0) == 16.0


# One step of a model's life: a failed load, or a worker that is ready and crashes
# this long after.
failures = st.lists(
    st.one_of(st.just("load failed"), st.floats(0.0, STABLE_S - 1.0)),
    min_size=1, max_size=40,
)


@given(steps=failures, start=st.floats(0.0, 1e6))
def test_the_wait_never_exceeds_the_cap_nor_shrinks_while_failures_continue(
    steps: list[str | float], start: float
) -> None:
    backoff = LoadBackoff()
    now, waits = start, []
    for step in steps:
        if step == "load failed":
            waits.append(backoff.load_failed("no room", now))
        else:
            assert isinstance(step, float)
            backoff.worker_ready(now)
            now += step
            waits.append(backoff.crashed("worker died", now))
        assert backoff.retry_at == now + waits[-1]
        now = backoff.retry_at
    assert all(0.0 <= wait <= MAX_BACKOFF_S for wait in waits)
    assert waits == sorted(waits)
    assert backoff.in_a_row == len(steps)


@given(
    steps=st.lists(st.sampled_from(["load failed", "crash", "stable crash", "stopped"]),
                   max_size=40),
    now=st.floats(0.0, 1e6),
    later=st.integers(0, 2 * int(MAX_BACKOFF_S)),
)
def test_a_load_is_due_exactly_once_the_wait_after_the_last_failure_is_over(
    steps: list[str], now: float, later: int
) -> None:
    backoff = LoadBackoff()
    wait = 0.0
    for step in steps:
        if step == "load failed":
            wait = backoff.load_failed("no room", now)
        elif step == "stopped":
            backoff.worker_stopped()
        else:
            wait = crashed_after(backoff, STABLE_S if step == "stable crash" else 1.0, now)
            now += STABLE_S if step == "stable crash" else 1.0
    assert backoff.due(now + later) == (later >= wait)



def test_a_deferred_retry_waits_as_long_again_and_is_no_failure() -> None:
    backoff = LoadBackoff()
    backoff.load_failed("bad weights", 0.0)
    backoff.load_failed("bad weights", 1.0)  # waits 2 s
    assert backoff.defer(3.0) == 2.0
    assert not backoff.retry_by_itself_due(4.9) and backoff.retry_by_itself_due(5.0)
    assert backoff.next_retry_by_itself() == 5.0
    assert (backoff.in_a_row, backoff.last_error) == (2, "bad weights")


def test_a_deferred_retry_by_itself_does_not_hold_back_a_request() -> None:
    """The failure's own wait (1 s) is over at 1.0: a request may load (and evict)
    then, whatever the retries by themselves found; a client honouring Retry-After
    once met each deferral and was refused again."""
    backoff = LoadBackoff()
    backoff.load_failed("bad weights", 0.0)
    assert not backoff.due(0.9) and not backoff.retry_by_itself_due(0.9)
    backoff.defer(1.0)
    assert backoff.due(1.0) and not backoff.retry_by_itself_due(1.5)
    backoff.load_failed("bad weights", 1.5)  # a request's load failed: waits 2 s
    assert not backoff.due(3.4) and not backoff.retry_by_itself_due(3.4)
    assert backoff.due(3.5) and backoff.retry_by_itself_due(3.5)


@pytest.mark.parametrize("clear", ["worker_ready", "waive"])
def test_a_load_or_a_move_clears_a_deferral(clear: str) -> None:
    backoff = LoadBackoff()
    backoff.load_failed("bad weights", 0.0)
    backoff.defer(1.0)
    getattr(backoff, clear)(*([1.2] if clear == "worker_ready" else []))
    assert backoff.due(1.2) and backoff.retry_by_itself_due(1.2)
