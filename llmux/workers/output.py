"""A worker's stray output, relayed into the server's log one record a line.

Stray output is what libraries print to stdout or stderr instead of logging: progress
bars, notices, a native runtime's messages, a dying interpreter's traceback. Written
raw into the server's log, it would break ``--log-format json`` (one object a line)
and would not say which worker printed it. So a worker's stdout and stderr are one
pipe that the server reads (``OutputRelay``). The server, not the worker, reads it,
so what a crashing worker prints last (a native assertion, say) is not lost with it,
and the message of its death quotes it.
The worker's own log records do not take this path: they go straight to the server's
stderr, already formatted, each under a lock every llmux process takes on that file
(``logging_setup.write_record``), so a long one is not cut by another process's line.
"""

from __future__ import annotations

import codecs
import logging
import os
import re
import threading
import time
from collections import deque
from collections.abc import Callable
from typing import Final

from llmux.logging_setup import FIELDS

__all__ = ["MAX_LINE_CHARS", "LineBudget", "OutputLines", "OutputRelay"]

log = logging.getLogger("llmux.worker.output")

MAX_LINE_CHARS: Final = 4096  # a longer line is cut into pieces of this size
LAST_WORDS_LINES: Final = 3  # what a dying worker printed, kept for its death's message
LAST_WORDS_S: Final = 5.0  # ... if it printed them this recently
LINES_PER_S: Final = 50.0  # lines a worker may have logged a second, on average ...
BURST_LINES: Final = 1000  # ... and at once: a flood would cost the server its CPU
_READ_BYTES: Final = 1 << 16
_FLOOD_PAUSE_S: Final = 0.01  # after each read that went over the budget
_BREAKS: Final = re.compile(r"([\r\n])")


class OutputLines:
    """Cuts a byte stream into the lines a terminal would end up showing.

    A carriage return rewrites the line, as progress bars do many times a second: of a
    line's rewrites only the last one that is not blank is kept (a bar that clears
    itself still shows its final state). Blank lines are dropped, trailing blanks
    trimmed, bytes that are not UTF-8 replaced, and a line longer than ``max_chars``
    is cut into pieces, so memory stays bounded whatever the worker prints. How the
    stream is split into reads does not change the lines.
    """

    def __init__(self, max_chars: int = MAX_LINE_CHARS) -> None:
        self._decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self._max_chars = max_chars
        self._shown = ""  # the line's last rewrite that was not blank
        self._partial = ""  # the text since the line's last carriage return

    def feed(self, data: bytes) -> list[str]:
        """The lines that ``data`` completes."""
        return self._split(self._decoder.decode(data))

    def close(self) -> list[str]:
        """The last line, if the stream ended without a newline."""
        return self._split(self._decoder.decode(b"", final=True)) + self._end_line()

    def _split(self, text: str) -> list[str]:
        lines: list[str] = []
        for part in _BREAKS.split(text):
            if part == "\n":
                lines += self._end_line()
            elif part == "\r":
                if self._partial.strip():
                    self._shown = self._partial
                self._partial = ""
            else:
                self._partial += part
                while len(self._partial) > self._max_chars:
                    lines += _shown(self._partial[:self._max_chars])
                    self._partial = self._partial[self._max_chars:]
                    self._shown = ""
        return lines

    def _end_line(self) -> list[str]:
        text = self._partial if self._partial.strip() else self._shown
        self._shown = self._partial = ""
        return _shown(text)


def _shown(text: str) -> list[str]:
    """``text`` as a line of its own, trailing blanks trimmed; none if it is blank."""
    text = text.rstrip()
    return [text] if text else []


class LineBudget:
    """How many lines may be logged: ``burst`` at once, refilled at ``per_s`` a second
    (a token bucket). Logging a line costs the server ~20 µs of CPU, and a worker can
    print far more than that covers: 200,000 lines kept a core of the server busy for
    6 s here, and its /health took up to 156 ms meanwhile (7 ms without them)."""

    def __init__(self, per_s: float = LINES_PER_S, burst: int = BURST_LINES) -> None:
        self._per_s = per_s
        self._burst = float(burst)
        self._left = float(burst)
        self._at: float | None = None

    def take(self, now: float) -> bool:
        """Whether a line may be logged at ``now`` (monotonic seconds); counts it."""
        if self._at is not None:
            self._left = min(self._burst, self._left + (now - self._at) * self._per_s)
        self._at = now
        if self._left < 1:
            return False
        self._left -= 1
        return True


class OutputRelay:
    """Logs every line that arrives on a worker's output pipe as a record of
    ``llmux.worker.output`` naming the worker, from a daemon thread, until every
    writer has closed the pipe; then closes it. Lines beyond the ``LineBudget`` are
    counted instead, and the count is logged when lines may be logged again. Keeps the
    last lines with their time, logged or not: what a worker printed just before it
    died (a native assertion, an import error) says why, and goes into the message of
    its death (``last_words``)."""

    def __init__(self, fd: int, name: Callable[[], str], pid: int) -> None:
        """``fd``: the pipe's read end, owned (closed) here. ``name`` is asked at each
        line: a warm spare takes a model's name when adopted."""
        self._fd = fd
        self._name = name
        self._pid = pid
        self._recent: deque[tuple[float, str]] = deque(maxlen=LAST_WORDS_LINES)
        self._budget = LineBudget()
        self._dropped = 0  # lines not logged since the last that was
        self._thread = threading.Thread(target=self._run, name=f"worker-output-{pid}",
                                        daemon=True)
        self._thread.start()

    def join(self, timeout_s: float) -> None:
        """Wait up to ``timeout_s`` for the pipe's end (every writer has exited)."""
        self._thread.join(timeout_s)

    def last_words(self, within_s: float = LAST_WORDS_S) -> list[str]:
        """The last lines relayed in the past ``within_s`` seconds, cut short."""
        since = time.monotonic() - within_s
        return [_cut(line) for at, line in list(self._recent) if at >= since]

    def _run(self) -> None:
        lines = OutputLines()
        try:
            while data := os.read(self._fd, _READ_BYTES):
                for line in lines.feed(data):
                    self._relay(line)
                if self._dropped:  # a flood: leave the server's other threads the GIL
                    time.sleep(_FLOOD_PAUSE_S)
        except OSError as exc:
            log.warning("[worker %s %d] output pipe failed: %s", self._name(), self._pid, exc)
        finally:
            os.close(self._fd)
        for line in lines.close():
            self._relay(line)
        self._report_dropped()

    def _relay(self, line: str) -> None:
        now = time.monotonic()
        self._recent.append((now, line))
        if not self._budget.take(now):
            self._dropped += 1
            return
        self._report_dropped()
        self._log(logging.INFO, "%s", line)

    def _report_dropped(self) -> None:
        if self._dropped:
            self._log(logging.WARNING, "%d lines of its output not logged (it printed more "
                      "than %g a second)", self._dropped, LINES_PER_S)
            self._dropped = 0

    def _log(self, level: int, message: str, *args: object) -> None:
        worker = self._name()
        log.log(level, "[worker %s %d] " + message, worker, self._pid, *args,
                extra={FIELDS: {"worker": worker, "pid": self._pid}})


def _cut(line: str, limit: int = 300) -> str:
    return line if len(line) <= limit else line[:limit - 1] + "\u2026"
