"""The server's side of one worker process: spawn, frames in and out, stop, kill.

The worker leads its own process group, so signals reach whatever it started too
(guarantee 4). Stopping is ``Unload``, a grace period, SIGTERM to the group, a grace
period, SIGKILL to the group; the process is always reaped. A dead pipe, a bad frame
or a vanished process all surface as one exception, ``WorkerDied``, whose message
says how the worker ended.

Frames go out by ``write``, which never waits: it puts the frame on the pipe
(non-blocking) and keeps, in order, whatever the pipe could not take yet, for ``drain``
to write when it can. So a model actor sends a frame the moment it decides to, in the
order it decided, without a task hop or a lock per frame.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import signal
import subprocess
from collections import deque
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Final

import anyio
import anyio.abc

from llmux.workers.output import OutputRelay
from llmux.workers.protocol import Frame, FrameDecoder, Hello, ProtocolError, Unload, encode

__all__ = ["WorkerDied", "WorkerHandle"]

log = logging.getLogger(__name__)

_PACKAGE_ROOT: Final = str(Path(__file__).resolve().parents[2])
_EXIT_AFTER_EOF_S: Final = 1.0  # how long a worker that closed its pipe gets to exit
_REAP_TIMEOUT_S: Final = 5.0  # bound on waiting for a SIGKILLed process to be reaped
_OUTPUT_AFTER_EXIT_S: Final = 0.5  # how long the relay gets to read a dead worker's last words
_PIPE_ERRORS: Final = (anyio.EndOfStream, anyio.ClosedResourceError, anyio.BrokenResourceError)


class WorkerDied(Exception):
    """The worker is gone or unusable: its pipe closed, it sent a bad frame, or it
    exited. ``returncode`` is its exit status when known (negative: a signal)."""

    def __init__(self, message: str, *, returncode: int | None = None) -> None:
        super().__init__(message)
        self.returncode = returncode


def describe_exit(returncode: int | None) -> str:
    """``exited with code 3`` / ``was killed by SIGKILL`` / ``is still running``."""
    if returncode is None:
        return "is still running"
    if returncode < 0:
        try:
            name = signal.Signals(-returncode).name
        except ValueError:
            name = f"signal {-returncode}"
        return f"was killed by {name}"
    return f"exited with code {returncode}"


def _child_env(extra: Mapping[str, str] | None) -> dict[str, str]:
    """The server's environment plus ``extra``, with llmux importable even from
    another interpreter's virtualenv."""
    env = dict(os.environ)
    env.update(extra or {})
    path = env.get("PYTHONPATH")
    env["PYTHONPATH"] = _PACKAGE_ROOT + (os.pathsep + path if path else "")
    return env


_stderr_dup: tuple[tuple[int, int], int] | None = None  # (stderr's file, a dup of it)


def _stderr_for_workers() -> int:
    """A dup of stderr for workers to write their log records to (``--log-fd``), made
    once per stderr file and never closed: closing a dup of a file drops every POSIX
    lock this process holds on it, so it would drop the lock another thread may hold
    while it writes a record (``logging_setup.write_record``), and a worker's line
    could cut that record."""
    global _stderr_dup
    stat = os.fstat(2)
    key = (stat.st_dev, stat.st_ino)
    if _stderr_dup is None or _stderr_dup[0] != key:
        _stderr_dup = (key, os.dup(2))  # NOTE: a replaced stderr's dup stays open too
    return _stderr_dup[1]


class WorkerHandle:
    """One running worker process. Create with ``spawn``.

    Only one task may ``receive`` at a time (the model actor's session task); ``write``
    and ``send`` may be called from any task (frames go out whole, in call order).
    """

    def __init__(self, process: anyio.abc.Process, model_id: str, stdin: int,
                 output: int) -> None:
        """``stdin``: the write end of the worker's stdin pipe, owned (closed) here;
        ``output``: the read end of its stdout and stderr, relayed into the log."""
        self._process = process
        self.model_id = model_id
        self.pid: int = process.pid
        self._decoder = FrameDecoder()
        self._pending: deque[Frame] = deque()
        self._stdin: int | None = stdin
        os.set_blocking(stdin, False)
        self._unsent: deque[memoryview] = deque()  # frames (or their rests) not yet written
        self._drain_lock = anyio.Lock()
        self._receiving = False
        self._stopped = False
        self._output = OutputRelay(output, lambda: self.model_id, self.pid)
        # Whether stop() had to signal the worker: its exit code alone cannot tell that
        # from a signal someone else sent (an operator's kill, the OOM killer).
        self.escalated = False

    def __repr__(self) -> str:
        return f"<WorkerHandle {self.model_id} pid={self.pid} {describe_exit(self.returncode)}>"

    @classmethod
    async def spawn(
        cls,
        *,
        python: str,
        model_id: str,
        env: Mapping[str, str] | None = None,
        start_timeout_s: float = 30.0,
        args: Sequence[str] = (),
    ) -> WorkerHandle:
        """Start ``python -m llmux.worker`` and wait for its Hello.

        ``env`` is added to the server's environment; ``args`` to the worker's command
        line (a spare's ``--preload``). The worker writes its log records to the
        server's stderr (``--log-fd``), so they land in the server log as they are;
        what its libraries print on stdout or stderr is relayed line by line
        (``OutputRelay``).

        Raises:
            WorkerDied: the interpreter cannot start, the worker died or sent
                something else first, or no Hello within ``start_timeout_s``. The
                process group is killed and reaped before raising, and also when the
                caller is cancelled (cancellation then propagates).
        """
        # NOTE: our own pipes for stdin and the output, not anyio's streams: ``write``
        # needs a write that never waits, and the output is read by a thread (the
        # pipes' fds are close-on-exec, other workers never inherit them).
        stdin_read, stdin_write = os.pipe()
        output_read, output_write = os.pipe()
        log_fd = _stderr_for_workers()
        command = [python, "-m", "llmux.worker", "--model-id", model_id,
                   "--parent-pid", str(os.getpid()), "--log-fd", str(log_fd), *args]
        try:
            process = await anyio.open_process(
                command,
                stdin=stdin_read,
                stdout=subprocess.PIPE,
                stderr=output_write,
                pass_fds=(log_fd,),
                env=_child_env(env),
                start_new_session=True,
            )
        except OSError as exc:
            os.close(stdin_write)
            os.close(output_read)
            raise WorkerDied(f"cannot start worker {model_id} with {python}: {exc}") from exc
        except BaseException:
            os.close(stdin_write)
            os.close(output_read)
            raise
        finally:
            for fd in (stdin_read, output_write):
                os.close(fd)
        handle = cls(process, model_id, stdin_write, output_read)
        try:
            with anyio.fail_after(start_timeout_s):
                frame = await handle.receive()
            if not isinstance(frame, Hello):
                raise WorkerDied(f"{handle._name} sent {frame.tag!r} before hello")
        except TimeoutError as exc:
            await handle._abort()
            raise WorkerDied(
                f"{handle._name} did not say hello within {start_timeout_s} s"
            ) from exc
        except BaseException:
            await handle._abort()
            raise
        log.info("started worker %s (pid %d) with %s", model_id, handle.pid, python)
        return handle

    @property
    def _name(self) -> str:
        return f"worker {self.model_id} (pid {self.pid})"

    @property
    def returncode(self) -> int | None:
        """Exit status once the process was reaped (negative: killed by a signal)."""
        return self._process.returncode

    @property
    def unsent_frames(self) -> int:
        """Frames written but not yet taken by the pipe (a full pipe: the worker has
        not read them)."""
        return len(self._unsent)

    def write(self, frame: Frame) -> None:
        """Put ``frame`` on the pipe behind every frame before it; never waits. What
        the pipe cannot take now stays queued, whole, for ``drain``.

        Raises:
            WorkerDied: the pipe is closed (the worker exited or is exiting).
            ProtocolError: the frame cannot be encoded (too big, odd values); the
                worker is unaffected.
        """
        data = memoryview(encode(frame))
        if self._unsent:
            self._unsent.append(data)
            return
        written = self._write_some(data)
        if written < len(data):
            self._unsent.append(data[written:])

    async def drain(self) -> None:
        """Wait until the pipe took every frame written. Cancel-safe: what is not
        written stays queued, in order.

        Raises:
            WorkerDied: the pipe is closed.
        """
        if not self._unsent:
            return
        async with self._drain_lock:
            while self._unsent:
                try:
                    await anyio.wait_writable(self._fd())
                except anyio.ClosedResourceError:  # closed by _abort meanwhile
                    raise self._cannot_take_frames() from None
                head = self._unsent[0]
                written = self._write_some(head)
                if written == len(head):
                    self._unsent.popleft()
                else:
                    self._unsent[0] = head[written:]

    async def send(self, frame: Frame) -> None:
        """``write`` the frame and ``drain``."""
        self.write(frame)
        await self.drain()

    def _fd(self) -> int:
        if self._stdin is None:
            raise self._cannot_take_frames()
        return self._stdin

    def _write_some(self, data: memoryview) -> int:
        """Write what the pipe takes now (0 when it is full)."""
        try:
            return os.write(self._fd(), data)
        except BlockingIOError:
            return 0
        except OSError as exc:  # EPIPE: the worker closed its end
            if exc.errno not in (errno.EPIPE, errno.EBADF):
                log.warning("%s: writing its pipe failed: %s", self._name, exc)
            raise self._cannot_take_frames() from exc

    def _cannot_take_frames(self) -> WorkerDied:
        return WorkerDied(f"{self._name} cannot take frames: {describe_exit(self.returncode)}",
                          returncode=self.returncode)

    async def receive(self) -> Frame:
        """The next frame from the worker. Cancel-safe: no frame is lost.

        Raises:
            WorkerDied: the pipe reached EOF or carried a bad frame. The process
                group has been killed and reaped; the message says how it ended.
        """
        stdout = self._process.stdout
        assert stdout is not None
        while not self._pending:
            self._receiving = True
            try:
                data = await stdout.receive()
            except _PIPE_ERRORS as exc:
                raise await self._died("closed its pipe") from exc
            finally:
                self._receiving = False
            try:
                self._pending.extend(self._decoder.feed(data))
            except ProtocolError as exc:
                raise await self._died(f"sent a bad frame ({exc})") from exc
        return self._pending.popleft()

    async def _died(self, what: str) -> WorkerDied:
        """Give the worker a moment to exit, then make sure it and its group are gone.
        The message ends with what it printed last, if that was just now: why a native
        runtime aborted, or why an interpreter could not start the worker."""
        try:
            with anyio.move_on_after(_EXIT_AFTER_EOF_S):
                await self._process.wait()
        finally:
            await self._abort()
        code = self.returncode
        message = f"{self._name} {what} and {describe_exit(code)}"
        await anyio.to_thread.run_sync(self._output.join, _OUTPUT_AFTER_EXIT_S)
        if words := self._output.last_words():
            message += "; its last output: " + " | ".join(words)
        return WorkerDied(message, returncode=code)

    async def stop(self, grace_s: float = 5.0) -> int | None:
        """Stop the worker and reap it; return its exit status (None: unreapable).

        Unload, up to ``grace_s`` to exit, SIGTERM to the group, up to ``grace_s``,
        SIGKILL to the group. Shielded from cancellation (the worker must not outlive
        a cancelled caller) and bounded by about ``2 * grace_s + 5`` s. Idempotent;
        requests still running in the worker are cancelled by the Unload.
        """
        if self._stopped:
            return self.returncode
        with anyio.CancelScope(shield=True):
            with anyio.move_on_after(grace_s):  # Unload and the exit share one grace
                if self.returncode is None:
                    with contextlib.suppress(WorkerDied):
                        await self.send(Unload())
                await self._wait_draining()
            if self.returncode is None:
                log.warning("%s ignored unload for %s s: SIGTERM", self._name, grace_s)
                self.escalated = True
                self._signal_group(signal.SIGTERM)
                with anyio.move_on_after(grace_s):
                    await self._wait_draining()
            if self.returncode is None:
                log.warning("%s ignored SIGTERM for %s s: SIGKILL", self._name, grace_s)
            await self._abort()
            log.info("%s %s", self._name, describe_exit(self.returncode))
        return self.returncode

    async def _wait_draining(self) -> None:
        """Wait for exit while discarding the worker's output, so a worker blocked
        writing a chunk nobody reads can still see Unload and leave."""
        async with anyio.create_task_group() as tg:
            tg.start_soon(self._discard_output)
            await self._process.wait()
            tg.cancel_scope.cancel()

    async def _discard_output(self) -> None:
        stdout = self._process.stdout
        if stdout is None or self._receiving:
            return  # someone else is reading; two readers on one pipe is an error
        try:
            while True:
                await stdout.receive()
        except _PIPE_ERRORS:
            return

    async def _abort(self) -> None:
        """SIGKILL the group, reap the process and close the pipes; shielded, bounded."""
        with anyio.CancelScope(shield=True):
            self.kill()
            self._close_stdin()
            with anyio.move_on_after(_REAP_TIMEOUT_S):
                await self._process.aclose()
                self._stopped = True
            if not self._stopped:
                log.error("%s did not exit %s s after SIGKILL", self._name, _REAP_TIMEOUT_S)

    def _close_stdin(self) -> None:
        """The worker sees EOF; frames not yet written are dropped with it."""
        if self._stdin is not None:
            anyio.notify_closing(self._stdin)  # a drain waiting on it ends
            os.close(self._stdin)
            self._stdin = None
            self._unsent.clear()

    def kill(self) -> None:
        """SIGKILL the whole process group now. Safe to repeat and after exit (it then
        still reaches processes the worker left in its group)."""
        self._signal_group(signal.SIGKILL)

    def _signal_group(self, sig: signal.Signals) -> None:
        # ESRCH: the group is empty, everything already exited.
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.pid, sig)

    async def wait(self) -> int:
        """Wait until the worker exits; return its exit status."""
        return await self._process.wait()
