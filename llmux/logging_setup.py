"""How llmux logs: one line per record, human-readable (``text``) or one JSON object a
line (``json``, for log collectors).

Structured facts ride on a record as ``extra={FIELDS: {...}}`` (the request log, the
lifecycle events): the text format shows them only through the message, which already
says them in words; the JSON format adds them as keys beside ``time``, ``level``,
``logger`` and ``message``. Worker processes inherit the choice through
``LLMUX_LOG_FORMAT``, so their Python logs are JSON too; what their libraries print
by themselves reaches the log as records of the server's (``llmux/workers/output.py``).
"""

from __future__ import annotations

import datetime
import errno
import fcntl
import json
import logging
import os
import sys
import time
from collections.abc import Mapping
from typing import Any, Final, TextIO

FORMATS: Final = ("text", "json")
FIELDS: Final = "llmux_fields"  # the LogRecord attribute carrying structured facts
ENV: Final = "LLMUX_LOG_FORMAT"  # how workers learn the server's format
TEXT_FORMAT: Final = "%(asctime)s %(levelname)s %(name)s: %(message)s"
RESERVED: Final = frozenset({"time", "level", "logger", "message", "exception"})
LOCK_WAIT_S: Final = 0.05  # the longest a record waits for another process's to end
_LOCK_POLL_S: Final = 0.0005


def fields_of(record: logging.LogRecord) -> Mapping[str, Any]:
    """The structured facts a record carries (empty for a plain log call)."""
    fields = getattr(record, FIELDS, None)
    return fields if isinstance(fields, Mapping) else {}


class JsonFormatter(logging.Formatter):
    """One JSON object per record: time (UTC, ISO 8601), level, logger, message, then
    the record's fields and the formatter's ``static`` ones (a worker's model and pid).
    A field named like one of the five fixed keys is dropped rather than overwrite it."""

    def __init__(self, static: Mapping[str, Any] | None = None) -> None:
        super().__init__()
        self.static = dict(static or {})

    def format(self, record: logging.LogRecord) -> str:
        at = datetime.datetime.fromtimestamp(record.created, datetime.UTC)
        line: dict[str, Any] = {
            "time": at.isoformat(timespec="milliseconds").replace("+00:00", "Z"),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        for source in (self.static, fields_of(record)):
            line.update((k, v) for k, v in source.items() if k not in RESERVED)
        if record.exc_info:
            line["exception"] = self.formatException(record.exc_info)
        elif record.stack_info:
            line["exception"] = self.formatStack(record.stack_info)
        # NOTE: default=str so an odd field value degrades to text instead of losing
        # the line; ensure_ascii keeps each object on one line whatever a user sent.
        return json.dumps(line, default=str, ensure_ascii=True)


class _LineHandler(logging.StreamHandler):  # type: ignore[type-arg]
    """Each record as one ``write(2)`` on stderr's file descriptor: the server and its
    workers share that file, and a record split over two writes (a text stream's
    buffer boundary) could be torn by another process's line."""

    def emit(self, record: logging.LogRecord) -> None:
        try:
            line = (self.format(record) + self.terminator).encode("utf-8", "replace")
            self.flush()  # whatever the text stream still holds goes first
            write_record(self.stream.fileno(), line)
        except Exception:
            self.handleError(record)


def write_record(fd: int, data: bytes) -> None:
    """``data`` whole on ``fd``, which the server and its workers all write to.

    A pipe keeps a write whole only up to ``PIPE_BUF`` (4 KB): a longer record (a JSON
    traceback) could be cut by another process's line and break the log. So each
    record is written under a POSIX lock on ``fd``'s file (pipes and sockets take one
    too), which every llmux process takes. The wait is bounded: a process stopped while
    it holds the lock must not stall the server's event loop (the record is then
    written anyway, as it was before the lock); a file that takes no lock is written
    to at once.
    """
    locked = _lock(fd)
    try:
        write_all(fd, data)
    finally:
        if locked:
            fcntl.lockf(fd, fcntl.LOCK_UN)


def _lock(fd: int) -> bool:
    deadline: float | None = None
    while True:
        try:
            fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return True
        except OSError as exc:
            if exc.errno not in (errno.EAGAIN, errno.EACCES):
                return False  # no lock on this kind of file (or not opened for writing)
        now = time.monotonic()
        if deadline is None:
            deadline = now + LOCK_WAIT_S
        elif now >= deadline:
            return False
        time.sleep(_LOCK_POLL_S)


def write_all(fd: int, data: bytes) -> None:
    """``data`` in as few ``write(2)`` calls as the kernel takes: one, unless a signal
    interrupts a long write to a pipe part-way (the rest must follow, not be lost)."""
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view):]


def setup_logging(log_format: str = "text", level: str | None = None, *,
                  text_format: str = TEXT_FORMAT,
                  static: Mapping[str, Any] | None = None,
                  stream: TextIO | None = None) -> None:
    """Send every log record to ``stream`` (stderr by default) in ``log_format``
    ("text" or "json"), replacing whatever handlers the root logger had (safe to call
    again, e.g. once the config named a format). ``level`` defaults to
    ``$LLMUX_LOG_LEVEL``, else INFO.

    Raises:
        ValueError: an unknown format.
    """
    if log_format not in FORMATS:
        raise ValueError(f"unknown log format {log_format!r} (expected one of "
                         f"{', '.join(FORMATS)})")
    # Neither format shows the thread or the process (a worker's lines name it in
    # their prefix): not looking them up saves every record that work.
    logging.logThreads = logging.logProcesses = logging.logMultiprocessing = False
    handler = _LineHandler(stream or sys.stderr)
    handler.setFormatter(JsonFormatter(static) if log_format == "json"
                         else logging.Formatter(text_format))
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    name = (level or os.environ.get("LLMUX_LOG_LEVEL") or "INFO").upper()
    known = logging.getLevelNamesMapping()
    root.setLevel(known.get(name, logging.INFO))
    if name not in known:
        logging.getLogger("llmux").warning(
            "log level %r is not one of DEBUG, INFO, WARNING, ERROR: logging at INFO", name)
