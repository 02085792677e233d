"""The worker process: one model, one backend, driven by frames on stdin/stdout.

Run as ``python -m llmux.worker --model-id ID`` by ``WorkerHandle.spawn``. This is
the only place backend modules (and so torch, llama.cpp, ...) are imported. A warm
spare (``llmux/spare.py``) is started as ``--model-id spare --preload MODULE ...``: it
imports those modules before its Hello, then waits for whichever model's Load comes.

Threads: a reader thread owns stdin. It sets a request's cancel event the moment a
Cancel arrives, even while the main thread is deep in a generation, and queues every
other frame for the main thread, which loads the model and runs one request at a
time; a ``concurrent`` backend's requests run instead on a pool of the model's
``max_concurrency`` threads (the actor never sends more at once), and Unload waits for
them (cancelled, they end within a token). Frame writes from any thread go through
one lock, so frames never interleave.

Output: log records go to the server's stderr (``--log-fd``); stdout and stderr are
one pipe that the server relays into its log line by line (``llmux/workers/output.py``),
for whatever libraries print by themselves.

The worker must never outlive the server (guarantee 4): it asks the kernel for
SIGKILL when its parent dies, and also exits when stdin reaches EOF.
"""

from __future__ import annotations

import argparse
import ctypes
import importlib
import logging
import os
import queue
import signal
import sys
import threading
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any, BinaryIO, Final, NoReturn, TextIO

from llmux.backends.base import Backend, InvalidInput
from llmux.logging_setup import ENV as LOG_FORMAT_ENV
from llmux.logging_setup import FORMATS as LOG_FORMATS
from llmux.logging_setup import setup_logging
from llmux.workers.protocol import (
    Cancel,
    Chunk,
    Done,
    Failed,
    Frame,
    FrameDecoder,
    Hello,
    Infer,
    Load,
    Loaded,
    LoadFailed,
    Progress,
    ProtocolError,
    Unload,
    encode,
)

log = logging.getLogger("llmux.worker")

_PR_SET_PDEATHSIG: Final = 1
_READ_BYTES: Final = 1 << 16


def _exit(code: int) -> NoReturn:
    """Leave now: no atexit hooks, which in native runtimes can hang on teardown."""
    logging.shutdown()
    sys.stderr.flush()
    os._exit(code)


def _die_with_parent(parent_pid: int) -> None:
    """Ask Linux to SIGKILL us when the parent dies (best effort), then close the
    race where the parent died before the request took effect."""
    if sys.platform.startswith("linux"):
        try:
            libc = ctypes.CDLL(None, use_errno=True)
            libc.prctl(_PR_SET_PDEATHSIG, int(signal.SIGKILL), 0, 0, 0)
        except (OSError, AttributeError):
            pass  # stdin EOF still ends us
    if os.getppid() != parent_pid:
        _exit(0)


class FrameWriter:
    """Writes whole frames to the protocol pipe; safe from any thread."""

    def __init__(self, pipe: BinaryIO) -> None:
        self._pipe = pipe
        self._lock = threading.Lock()

    def send(self, frame: Frame) -> None:
        """Raises ProtocolError for an unencodable frame; exits if the parent is gone."""
        data = encode(frame)
        with self._lock:
            try:
                self._pipe.write(data)
                self._pipe.flush()
            except OSError:  # BrokenPipeError: nobody reads us any more
                _exit(0)


class Requests:
    """Cancel events of the requests received and not yet finished, by id.

    The reader thread registers an Infer's event before queueing it, so a Cancel
    that follows right behind its Infer always finds it.
    """

    def __init__(self) -> None:
        self._events: dict[int, threading.Event] = {}
        self._lock = threading.Lock()

    def register(self, request_id: int) -> None:
        with self._lock:
            self._events[request_id] = threading.Event()

    def cancel(self, request_id: int) -> None:
        with self._lock:
            event = self._events.get(request_id)
        if event is not None:
            event.set()

    def cancel_all(self) -> None:
        with self._lock:
            for event in self._events.values():
                event.set()

    def take(self, request_id: int) -> threading.Event:
        """The event of a request that starts running; the caller must ``finish`` it."""
        with self._lock:
            return self._events.setdefault(request_id, threading.Event())

    def finish(self, request_id: int) -> None:
        with self._lock:
            self._events.pop(request_id, None)


def _read_frames(fd: int, inbox: queue.Queue[Frame], requests: Requests) -> None:
    """Reader thread: Cancel (and Unload's implied cancel of everything) acts at once,
    frames go to the main thread; EOF or a garbled stream means the parent is gone
    or broken, so the worker exits."""
    decoder = FrameDecoder()
    while True:
        try:
            data = os.read(fd, _READ_BYTES)
        except OSError:
            data = b""
        if not data:
            log.info("stdin closed: the server is gone, exiting")
            _exit(0)
        try:
            frames = decoder.feed(data)
        except ProtocolError as exc:
            log.error("bad frame from the server: %s", exc)
            _exit(2)
        for frame in frames:
            if isinstance(frame, Cancel):
                requests.cancel(frame.id)
                continue
            if isinstance(frame, Infer):
                requests.register(frame.id)
            elif isinstance(frame, Unload):
                requests.cancel_all()  # nobody will read those answers: stop generating
            inbox.put(frame)


class Worker:
    """The main thread's loop: load once, then serve requests until Unload."""

    def __init__(self, writer: FrameWriter, requests: Requests, log_stream: TextIO) -> None:
        self._writer = writer
        self._requests = requests
        self._log_stream = log_stream
        self._backend: Backend | None = None
        self._pool: ThreadPoolExecutor | None = None  # concurrent backends only

    def handle(self, frame: Frame) -> None:
        match frame:
            case Load(spec=spec):
                self._load(spec)
            case Infer(id=request_id, op=op, payload=payload) if self._pool is not None:
                self._pool.submit(self._infer, request_id, op, payload)
            case Infer(id=request_id, op=op, payload=payload):
                self._infer(request_id, op, payload)
            case Unload():
                log.info("unloading")
                if self._pool is not None:
                    self._pool.shutdown(wait=True)  # the reader cancelled them all
                if self._backend is not None:
                    self._backend.unload()
                _exit(0)
            case _:
                log.warning("ignoring unexpected %s frame", frame.tag)

    def _progress(self, fraction: float, message: str) -> None:
        self._writer.send(Progress(fraction=float(fraction), message=str(message)))

    def _load(self, spec: dict[str, Any]) -> None:
        if self._backend is not None:
            self._writer.send(LoadFailed("this worker already holds a model"))
            return
        _setup_logs(str(spec.get("model_id") or "?"), self._log_stream)  # a spare's model
        log.info("loading with backend %r", spec.get("backend"))
        try:
            from llmux.backends import load_backend_class
            from llmux.backends.options import check_options

            check_options(spec)  # the config's check, again: a backend trusts its options
            backend = load_backend_class(str(spec.get("backend")))(spec)
            info = backend.load(self._progress)
            backend.warmup()
            loaded = Loaded(reported_bytes=backend.footprint_bytes(), info=dict(info))
            encode(loaded)  # an unencodable info is a load failure, not a crash
        except Exception as exc:
            log.exception("load failed")
            self._writer.send(LoadFailed(f"{type(exc).__name__}: {exc}"))
            _exit(1)
        self._backend = backend
        limit = int(spec.get("max_concurrency") or 1)
        if backend.concurrent and limit > 1:
            self._pool = ThreadPoolExecutor(max_workers=limit, thread_name_prefix="infer")
        log.info("loaded, footprint %s bytes, %d request(s) at once", loaded.reported_bytes,
                 limit if self._pool is not None else 1)
        self._writer.send(loaded)

    def _infer(self, request_id: int, op: str, payload: dict[str, Any]) -> None:
        """Run one request to its Done or Failed frame; never raises (on a pool thread,
        an exception would vanish)."""
        cancelled = self._requests.take(request_id)
        try:
            if self._backend is None:
                raise RuntimeError("no model loaded in this worker")
            stream = self._backend.infer(op, payload, cancelled)
            while True:
                try:
                    data = next(stream)
                except StopIteration as stop:
                    done: dict[str, Any] | None = stop.value
                    break
                self._writer.send(Chunk(id=request_id, data=data))
            self._writer.send(Done(id=request_id, data=dict(done or {})))
        except InvalidInput as exc:
            log.info("request %d (%s) refused: %s", request_id, op, exc)
            self._writer.send(Failed(id=request_id, message=str(exc), kind="invalid_request",
                                     param=exc.param, code=exc.code))
        except Exception as exc:
            log.warning("request %d (%s) failed: %s", request_id, op, exc)
            self._writer.send(Failed(id=request_id, message=f"{type(exc).__name__}: {exc}"))
        finally:
            self._requests.finish(request_id)


def _setup_logs(model_id: str, stream: TextIO) -> None:
    """The server's log format (LLMUX_LOG_FORMAT, set by `llmux serve`): JSON lines name
    the worker in fields, text lines in a prefix. Called again once a spare knows its
    model."""
    log_format = os.environ.get(LOG_FORMAT_ENV, "text")
    setup_logging(
        log_format if log_format in LOG_FORMATS else "text",
        os.environ.get("LLMUX_WORKER_LOG_LEVEL", "INFO"),
        stream=stream,
        text_format=f"[worker {model_id} {os.getpid()}] %(levelname)s %(name)s: "
                    "%(message)s",
        static={"worker": model_id, "pid": os.getpid()},
    )


def _preload(modules: Sequence[str]) -> None:
    """Import what a spare's future model will need; a module this interpreter lacks
    is logged and skipped (the spare is still a started interpreter)."""
    for name in modules:
        try:
            importlib.import_module(name)
        except Exception as exc:  # any import-time failure: the load will report it
            log.warning("spare: cannot preload %s: %s", name, exc)


def main(argv: Sequence[str] | None = None) -> None:
    """Entry point of ``python -m llmux.worker``; never returns."""
    parser = argparse.ArgumentParser(prog="llmux.worker")
    parser.add_argument("--model-id", required=True)
    parser.add_argument("--parent-pid", type=int,
                        help="the server's pid: a worker whose server died before it "
                             "could ask to die with it exits at once; default: its parent")
    parser.add_argument("--preload", action="append", default=[],
                        help="a module to import before the Hello (warm spares)")
    parser.add_argument("--log-fd", type=int,
                        help="where log records go (the server's stderr); default 2")
    parent_pid = os.getppid()  # NOTE: read first: the server may die while we start
    args = parser.parse_args(argv)
    _die_with_parent(args.parent_pid or parent_pid)
    # NOTE: a SIGTERM handler installed by Python code would wait for the main
    # thread to reach bytecode; the default action ends us even inside C.
    signal.signal(signal.SIGTERM, signal.SIG_DFL)

    # Keep the protocol on private fds, then point fd 0 at /dev/null and fd 1 at
    # stderr (the output the server relays): native runtimes print to stdout, and
    # children may read stdin.
    proto_in = os.dup(0)
    proto_out = os.dup(1)
    devnull = os.open(os.devnull, os.O_RDONLY)
    os.dup2(devnull, 0)
    os.close(devnull)
    os.dup2(2, 1)
    sys.stdout = sys.stderr

    # Log records go to the server's stderr (--log-fd); stdout and stderr carry only
    # what libraries print, which the server relays as records of its own.
    log_stream = sys.stderr if args.log_fd is None else os.fdopen(args.log_fd, "w")
    logging.captureWarnings(True)  # a library's warnings become records, not raw text
    _setup_logs(args.model_id, log_stream)
    writer = FrameWriter(os.fdopen(proto_out, "wb"))
    requests = Requests()
    inbox: queue.Queue[Frame] = queue.Queue()
    threading.Thread(
        target=_read_frames, args=(proto_in, inbox, requests), name="frame-reader", daemon=True
    ).start()
    _preload(args.preload)
    writer.send(Hello(pid=os.getpid()))
    worker = Worker(writer, requests, log_stream)
    while True:
        worker.handle(inbox.get())
