"""llama.cpp's own log, routed into Python logging, its last errors kept for the
message of a failed load or decode.

llama-cpp-python prints llama.cpp's log itself, by the level numbers of an older ggml.
The llama.cpp it vendors (0.3.36, pinned) numbers them 1 DEBUG, 2 INFO, 3 WARN,
4 ERROR, 5 "continues the previous message", so with ``verbose`` off it printed the
warnings raw and hid the errors: a load failed with "Failed to load model from file"
and nothing said why ("tensor ... data is not within the file bounds", a CUDA
allocation that failed). This module replaces its callback in the worker process:
warnings and errors become log records, debug and info ones too when ``verbose`` is
on, and the last error lines are kept for the message of a failed load or decode.
"""

from __future__ import annotations

import contextlib
import ctypes
import functools
import logging
import threading
from collections import deque
from collections.abc import Iterator
from typing import Any, Final

__all__ = ["LlamaLog", "install"]

log = logging.getLogger("llama.cpp")

LEVELS: Final = {1: logging.DEBUG, 2: logging.INFO, 3: logging.WARNING, 4: logging.ERROR}
CONTINUES: Final = 5
ERRORS_KEPT: Final = 3


class LlamaLog:
    """Assembles llama.cpp's log pieces into lines (a message can come in several calls,
    and progress dots continue the one before) and logs each line at its level."""

    def __init__(self) -> None:
        self.verbose = False
        self._lock = threading.Lock()  # llama.cpp logs from its own threads too
        self._level = logging.INFO
        self._partial = ""
        self._errors: deque[str] = deque(maxlen=ERRORS_KEPT)

    def feed(self, level: int, text: str) -> None:
        """One call of llama.cpp's log callback."""
        with self._lock:
            if level != CONTINUES:
                self._end_line()
                self._level = LEVELS.get(level, logging.INFO)
            *lines, self._partial = (self._partial + text).split("\n")
            for line in lines:
                self._emit(line)

    def take_errors(self) -> list[str]:
        """The last error lines (at most 3) since the last call, oldest first."""
        with self._lock:
            self._end_line()
            errors = list(self._errors)
            self._errors.clear()
            return errors

    @contextlib.contextmanager
    def explaining(self, failure: str, kind: type[Exception] = RuntimeError
                   ) -> Iterator[None]:
        """Within, llama-cpp-python's ``kind`` of exception (a failed load's ValueError
        says only "Failed to load model from file", a failed ``llama_decode``'s
        RuntimeError only "llama_decode returned -3") is raised again as
        "``failure`` (...; llama.cpp: ...)", with the errors llama.cpp logged within."""
        self.take_errors()  # forget those of before
        try:
            yield
        except kind as exc:
            errors = self.take_errors()
            why = f"; llama.cpp: {' | '.join(errors)}" if errors else ""
            raise kind(f"{failure} ({exc}{why})") from exc

    def _end_line(self) -> None:
        if self._partial:
            self._emit(self._partial)
            self._partial = ""

    def _emit(self, line: str) -> None:
        line = line.strip()
        if not line:
            return
        if self._level >= logging.ERROR:
            self._errors.append(line)
        if self._level >= logging.WARNING or self.verbose:
            log.log(self._level, "%s", line)


_log = LlamaLog()


def install(verbose: bool) -> LlamaLog:
    """Route llama.cpp's log of this process into one ``LlamaLog`` (registered once);
    ``verbose`` also logs its debug and info lines."""
    _registered()
    _log.verbose = verbose
    return _log


@functools.cache
def _registered() -> Any:
    """The ctypes callback, registered with llama.cpp; cached, so it lives as long as
    llama.cpp may call it."""
    import llama_cpp  # type: ignore[import-untyped,unused-ignore]

    @llama_cpp.llama_log_callback  # type: ignore[untyped-decorator,unused-ignore]
    def callback(level: int, text: bytes, user_data: ctypes.c_void_p) -> None:
        _log.feed(int(level), text.decode("utf-8", "replace"))

    llama_cpp.llama_log_set(callback, ctypes.c_void_p(0))
    return callback
