"""Talking to a llama-server child: HTTP over its unix socket, its server-sent events,
its error messages, and the hook that ties its life to the worker's."""

from __future__ import annotations

import ctypes
import http.client
import json
import os
import signal
import socket
import sys
from collections.abc import Iterator
from typing import Any, Final

__all__ = ["ServerError", "UnixConnection", "client_message", "die_with_parent_hook",
           "error_message", "events"]

_PR_SET_PDEATHSIG: Final = 1


class UnixConnection(http.client.HTTPConnection):
    """HTTP/1.1 over a unix socket."""

    def __init__(self, path: str, timeout: float | None = None) -> None:
        super().__init__("localhost", timeout=timeout)
        self._path = path

    def connect(self) -> None:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        if self.timeout is not None:
            sock.settimeout(self.timeout)
        sock.connect(self._path)
        self.sock = sock


class ServerError(Exception):
    """llama-server answered with an error status; ``status`` is it."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


def error_message(status: int, body: bytes) -> str:
    try:
        error = json.loads(body).get("error") or {}
        return str(error.get("message") or error) if isinstance(error, dict) else str(error)
    except (ValueError, AttributeError):
        return body.decode(errors="replace")[:500] or f"HTTP {status}"


def die_with_parent_hook() -> Any:
    """A ``preexec_fn`` asking Linux to SIGKILL the child when the worker dies; libc is
    looked up here, before the fork, so the child only makes one system call."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        prctl = ctypes.CDLL(None, use_errno=True).prctl
    except (OSError, AttributeError):
        return None
    parent = os.getpid()

    def hook() -> None:
        prctl(_PR_SET_PDEATHSIG, int(signal.SIGKILL), 0, 0, 0)
        if os.getppid() != parent:  # the worker died before the request took effect
            os._exit(1)

    return hook


def events(response: http.client.HTTPResponse) -> Iterator[dict[str, Any]]:
    """The JSON objects of a server-sent event stream (``data:`` and ``error:`` lines)."""
    for raw in response:
        if raw.startswith(b"data: "):
            event: dict[str, Any] = json.loads(raw[6:])
            yield event
        elif raw.startswith(b"error: "):
            yield {"error": raw[7:].decode(errors="replace").strip()}


def client_message(message: str) -> str:
    """llama-server's 400 message in llmux's words where it is a known case."""
    if "exceed" in message and "context" in message:
        return (f"The prompt does not fit in this model's context ({message}). Shorten the "
                "conversation or the prompt.")
    return message
