"""A worker's stray output (what its libraries print) becomes one log record a line
naming the worker: the splitting rules are pure and tested exhaustively; the relay is
tested on a real pipe. The live tests of the request log check it end to end."""

from __future__ import annotations

import logging
import os
import re
import time

import pytest
from hypothesis import given
from hypothesis import strategies as st

from llmux.logging_setup import fields_of
from llmux.workers import output
from llmux.workers.output import BURST_LINES, LINES_PER_S, LineBudget, OutputLines, OutputRelay
from tests.conftest import wait_until


def lines_of(data: bytes, max_chars: int = 4096) -> list[str]:
    splitter = OutputLines(max_chars)
    return splitter.feed(data) + splitter.close()


@pytest.mark.parametrize(("data", "lines"), [
    (b"one\ntwo\n", ["one", "two"]),
    (b"no newline at the end", ["no newline at the end"]),
    (b"\n\n  \n\t\nblank lines go\n\n", ["blank lines go"]),
    (b"trailing blanks   \t\n", ["trailing blanks"]),
    (b"windows\r\nlines\r\n", ["windows", "lines"]),
    # A progress bar rewrites its line: only where it got to is kept.
    (b"\rLoading: 0%\rLoading: 50%\rLoading: 100%\n", ["Loading: 100%"]),
    # ... also when it clears itself, or is cut short by the worker's end.
    (b"\rLoading: 40%\r            \r", ["Loading: 40%"]),
    (b"\rbar 10%\r      \rnext line\n", ["next line"]),
    (b"\rstuck at 70%", ["stuck at 70%"]),
    # A rewrite with blanks only does not count, however it ends.
    (b"\rLoading: 60%\r            \n", ["Loading: 60%"]),
    ("caf\u00e9 \u2713\n".encode(), ["caf\u00e9 \u2713"]),
    (b"bad \xff byte\n", ["bad \ufffd byte"]),
])
def test_lines_as_a_terminal_would_end_up_showing_them(data: bytes, lines: list[str]) -> None:
    assert lines_of(data) == lines


def test_a_line_longer_than_the_limit_is_cut_into_pieces() -> None:
    assert lines_of(b"abcdefghij\nkl\n", max_chars=4) == ["abcd", "efgh", "ij", "kl"]
    splitter = OutputLines(max_chars=4)
    assert splitter.feed(b"x" * 10) == ["xxxx", "xxxx"]  # before any newline arrives
    assert splitter.close() == ["xx"]


def test_a_piece_cut_off_a_long_line_ends_what_came_before_it() -> None:
    # A line of exactly the limit is not cut: a carriage return can still rewrite it.
    assert lines_of(b"abcd\rxy\n", max_chars=4) == ["xy"]
    # The piece cut off replaced the rewrite before it, which does not come back.
    assert lines_of(b"xy\rabcd \n", max_chars=4) == ["abcd"]


OUTPUT = st.lists(st.sampled_from(["a", "bc", " ", "\t", "\n", "\r", "\r\n", "\u00e9", "\u2713",
                                   "\ufffd"]), max_size=60).map("".join).map(str.encode)


@given(OUTPUT, st.lists(st.integers(min_value=0, max_value=80), max_size=6),
       st.integers(min_value=1, max_value=8))
def test_how_the_output_is_split_into_reads_does_not_change_the_lines(
        data: bytes, cuts: list[int], max_chars: int) -> None:
    splitter = OutputLines(max_chars)
    lines: list[str] = []
    start = 0
    for cut in sorted({min(cut, len(data)) for cut in cuts}):  # cuts inside characters too
        lines += splitter.feed(data[start:cut])
        start = cut
    lines += splitter.feed(data[start:]) + splitter.close()
    assert lines == lines_of(data, max_chars)


@given(OUTPUT, st.integers(min_value=1, max_value=8))
def test_every_line_is_one_bounded_non_blank_line(data: bytes, max_chars: int) -> None:
    for line in lines_of(data, max_chars):
        assert line.strip() and line == line.rstrip()
        assert "\n" not in line and "\r" not in line and len(line) <= max_chars


LINE = st.text(st.characters(blacklist_characters="\r\n", blacklist_categories=("Cs",)),
               max_size=20)


@given(st.lists(LINE, max_size=8))
def test_without_carriage_returns_every_non_blank_line_is_kept(texts: list[str]) -> None:
    data = "".join(text + "\n" for text in texts).encode()
    assert lines_of(data, 1000) == [text.rstrip() for text in texts if text.strip()]


def test_the_relay_logs_each_line_naming_the_worker_then_closes_the_pipe(
        caplog: pytest.LogCaptureFixture) -> None:
    names = iter(["spare", "chat", "chat"])  # a spare adopted between two lines
    read, write = os.pipe()
    with caplog.at_level(logging.INFO, logger="llmux.worker.output"):
        relay = OutputRelay(read, lambda: next(names), 4242)
        os.write(write, b"first\n\rbar 1%\rbar 100%\n")
        wait_until(lambda: len(caplog.records) == 2, 5, "two relayed lines")
        os.write(write, b"last words, no newline")
        os.close(write)
        relay.join(5)
    assert [(r.name, r.getMessage(), dict(fields_of(r))) for r in caplog.records] == [
        ("llmux.worker.output", "[worker spare 4242] first", {"worker": "spare", "pid": 4242}),
        ("llmux.worker.output", "[worker chat 4242] bar 100%", {"worker": "chat", "pid": 4242}),
        ("llmux.worker.output", "[worker chat 4242] last words, no newline",
         {"worker": "chat", "pid": 4242})]
    with pytest.raises(OSError):
        os.fstat(read)  # closed at the end


def test_last_words_are_the_last_lines_printed_just_now_cut_short() -> None:
    read, write = os.pipe()
    relay = OutputRelay(read, lambda: "chat", 1)
    os.write(write, b"".join(b"line %d\n" % n for n in range(5)) + b"x" * 400 + b"\n")
    os.close(write)
    relay.join(5)
    assert relay.last_words() == ["line 3", "line 4", "x" * 299 + "\u2026"]
    assert relay.last_words(within_s=60) == relay.last_words()
    time.sleep(0.2)
    assert relay.last_words(within_s=0.1) == []  # old lines do not explain a death now


def test_a_last_line_of_exactly_the_limit_is_not_cut() -> None:
    read, write = os.pipe()
    relay = OutputRelay(read, lambda: "chat", 1)
    os.write(write, b"y" * 300 + b"\n")
    os.close(write)
    relay.join(5)
    assert relay.last_words() == ["y" * 300]


def test_the_line_budget_allows_a_burst_then_its_rate() -> None:
    budget = LineBudget(per_s=4, burst=3)
    assert [budget.take(100.0) for _ in range(4)] == [True, True, True, False]
    assert budget.take(100.125) is False  # half a line back
    assert budget.take(100.25) is True
    assert budget.take(100.25) is False
    assert [budget.take(200.0) for _ in range(4)] == [True, True, True, False]  # no more
    # than the burst, however long it was quiet


@given(st.lists(st.floats(min_value=0, max_value=1000), max_size=200))
def test_the_line_budget_never_allows_more_than_burst_plus_rate_times_time(
        times: list[float]) -> None:
    budget = LineBudget(per_s=5, burst=4)
    times = sorted(times)
    allowed = sum(budget.take(now) for now in times)
    assert allowed <= 4 + 5 * (times[-1] - times[0]) + 1e-9 if times else allowed == 0


def test_a_flood_is_counted_instead_of_logged(caplog: pytest.LogCaptureFixture) -> None:
    read, write = os.pipe()
    flood = BURST_LINES + 500
    started = time.monotonic()
    with caplog.at_level(logging.INFO, logger="llmux.worker.output"):
        relay = OutputRelay(read, lambda: "loud", 7)
        with os.fdopen(write, "wb") as pipe:
            pipe.write(b"".join(b"line %d\n" % n for n in range(flood)))
        relay.join(10)
    took_s = time.monotonic() - started
    lines = [r.getMessage() for r in caplog.records if r.levelname == "INFO"]
    counted = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert lines[:BURST_LINES] == [f"[worker loud 7] line {n}" for n in range(BURST_LINES)]
    # beyond the burst, only what refilled while it ran (a slow machine refills more)
    assert len(lines) <= BURST_LINES + LINES_PER_S * took_s + 1
    count = re.compile(rf"\[worker loud 7\] (\d+) lines of its output not logged \(it "
                       rf"printed more than {LINES_PER_S:g} a second\)")
    counts = [int(count.fullmatch(message)[1]) for message in counted]  # type: ignore[index]
    assert len(lines) + sum(counts) == flood  # every line logged or counted, once
    assert caplog.records[-1].levelname == "WARNING"  # the count comes last
    assert relay.last_words() == [f"line {n}" for n in range(flood - 3, flood)]


class ScriptedBudget:
    """A LineBudget that allows the lines it is told to."""

    allows: list[bool] = []

    def __init__(self) -> None:
        self._allows = iter(self.allows)

    def take(self, now: float) -> bool:
        return next(self._allows)


def test_the_count_of_lines_not_logged_comes_when_lines_are_logged_again(
        caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(output, "LineBudget", ScriptedBudget)
    monkeypatch.setattr(ScriptedBudget, "allows", [True, False, False, True, False])
    read, write = os.pipe()
    with caplog.at_level(logging.INFO, logger="llmux.worker.output"):
        relay = OutputRelay(read, lambda: "loud", 7)
        os.write(write, b"one\ntwo\nthree\nfour\nfive\n")
        os.close(write)
        relay.join(5)
    assert [r.getMessage().removeprefix("[worker loud 7] ") for r in caplog.records] == [
        "one", f"2 lines of its output not logged (it printed more than {LINES_PER_S:g} a "
        "second)", "four", f"1 lines of its output not logged (it printed more than "
        f"{LINES_PER_S:g} a second)"]


def test_a_flood_makes_the_relay_pause_after_each_read(
        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(output, "_FLOOD_PAUSE_S", 0.5)
    read, write = os.pipe()
    started = time.monotonic()
    relay = OutputRelay(read, lambda: "loud", 7)
    with os.fdopen(write, "wb") as pipe:
        pipe.write(b"".join(b"line %d\n" % n for n in range(BURST_LINES + 10)))
    relay.join(10)
    assert time.monotonic() - started >= 0.5  # it paused at least once
