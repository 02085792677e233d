"""Real worker subprocesses running the fake backend, driven through WorkerHandle."""

from __future__ import annotations

import contextlib
import io
import logging
import os
import re
import select
import signal
import struct
import subprocess
import sys
import textwrap
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import anyio
import psutil
import pytest

import llmux
from llmux import backends
from llmux.backends.fake import FakeBackend
from llmux.workers import main as worker_main
from llmux.workers import output
from llmux.workers.handle import WorkerDied, WorkerHandle, describe_exit
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
    Unload,
    encode,
)
from tests.conftest import wait_until

pytestmark = pytest.mark.anyio

MiB = 1 << 20
ROOT = Path(llmux.__file__).resolve().parents[1]  # where llmux is imported from


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


def spec(**options: Any) -> dict[str, Any]:
    return {"model_id": "fake-1", "type": "llm", "backend": "fake", "model_path": None,
            "files": [], "options": options, "device": "cpu"}


def chat_payload(text: str = "hello there world", **extra: Any) -> dict[str, Any]:
    return {"messages": [{"role": "user", "content": text}], **extra}


def live_group_members(pgid: int) -> list[int]:
    """Processes of group ``pgid`` that are not zombies (PID 1 here may not reap)."""
    members = []
    for proc in psutil.process_iter():
        try:
            if os.getpgid(proc.pid) == pgid and proc.status() != psutil.STATUS_ZOMBIE:
                members.append(proc.pid)
        except (ProcessLookupError, psutil.Error):
            continue
    return members


def is_gone(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


def poll_until(condition: Any, timeout_s: float) -> bool:
    """Poll ``condition()`` until true or the deadline; signal delivery is async."""
    deadline = time.monotonic() + timeout_s
    while not condition():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.01)
    return True


def assert_group_gone(pgid: int) -> None:
    assert poll_until(lambda: not live_group_members(pgid), 2.0), live_group_members(pgid)


@contextlib.asynccontextmanager
async def running_worker() -> AsyncIterator[WorkerHandle]:
    handle = await WorkerHandle.spawn(python=sys.executable, model_id="fake-1")
    try:
        yield handle
    finally:
        await handle.stop(grace_s=1.0)
        assert_group_gone(handle.pid)


async def load(handle: WorkerHandle, max_concurrency: int = 1, **options: Any) -> list[Frame]:
    await handle.send(Load({**spec(**options), "max_concurrency": max_concurrency}))
    frames = []
    with anyio.fail_after(10):
        while not isinstance(frame := await handle.receive(), Loaded | LoadFailed):
            frames.append(frame)
    return [*frames, frame]


async def collect(handle: WorkerHandle, request_id: int) -> list[Frame]:
    frames = []
    with anyio.fail_after(10):
        while not isinstance(frame := await handle.receive(), Done | Failed):
            frames.append(frame)
    assert all(isinstance(f, Chunk) and f.id == request_id for f in frames)
    return [*frames, frame]


async def test_spawned_worker_says_hello_and_stops_cleanly(
        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PYTHONPATH", "/elsewhere")
    async with running_worker() as handle:
        # llmux comes first on its path, whichever interpreter runs it
        assert psutil.Process(handle.pid).environ()["PYTHONPATH"] == f"{ROOT}:/elsewhere"
        *command, log_fd = psutil.Process(handle.pid).cmdline()[1:]
        assert command == ["-m", "llmux.worker", "--model-id", "fake-1",
                           "--parent-pid", str(os.getpid()), "--log-fd"]
        # Its log records go to our stderr; its stdout and stderr to the relay's pipe.
        fds = f"/proc/{handle.pid}/fd"
        assert os.readlink(f"{fds}/{log_fd}") == os.readlink("/proc/self/fd/2")
        assert os.readlink(f"{fds}/1") == os.readlink(f"{fds}/2")
        assert os.readlink(f"{fds}/2").startswith("pipe:")
        assert os.getpgid(handle.pid) == handle.pid
        assert handle.returncode is None
        assert await handle.stop() == 0
        assert await handle.stop() == 0
        assert await handle.wait() == 0
        assert not handle.escalated


async def test_load_reports_progress_then_loaded_and_really_uses_the_memory() -> None:
    async with running_worker() as handle:
        rss_before = psutil.Process(handle.pid).memory_info().rss
        frames = await load(handle, footprint="64MiB", load_time_s=0.05)
        growth = psutil.Process(handle.pid).memory_info().rss - rss_before
        *progress, loaded = frames
        assert len(progress) == 11 and all(isinstance(f, Progress) for f in progress)
        assert isinstance(loaded, Loaded)
        assert loaded.reported_bytes == 64 * MiB
        assert loaded.info["context_length"] == 4096
        assert growth >= 0.95 * 64 * MiB


async def test_chat_streams_tokens_then_done_with_usage() -> None:
    async with running_worker() as handle:
        await load(handle)
        await handle.send(Infer(id=1, op="chat", payload=chat_payload()))
        *chunks, done = await collect(handle, 1)
        assert [c.data for c in chunks if isinstance(c, Chunk)] == [
            {"text": "echo: "}, {"text": "hello "}, {"text": "there "}, {"text": "world"}]
        usage = {"prompt_tokens": 3, "completion_tokens": 4, "total_tokens": 7}
        assert done == Done(id=1, data={"finish_reason": "stop", "usage": usage})


async def test_cancel_mid_stream_stops_within_one_token() -> None:
    async with running_worker() as handle:
        await load(handle, tokens_per_s=100, reply="word " * 500)
        await handle.send(Infer(id=7, op="chat", payload=chat_payload()))
        assert isinstance(await handle.receive(), Chunk)
        await handle.send(Cancel(id=7))
        *late_chunks, done = await collect(handle, 7)
        assert len(late_chunks) <= 1
        assert isinstance(done, Done)
        assert done.data["finish_reason"] == "cancelled"
        assert done.data["usage"]["completion_tokens"] <= 2


async def test_a_cancel_right_behind_its_infer_stops_it_before_its_first_token() -> None:
    async with running_worker() as handle:
        await load(handle, tokens_per_s=50, reply="word " * 500)
        await handle.send(Infer(id=1, op="chat", payload=chat_payload()))
        assert isinstance(await handle.receive(), Chunk)
        # Request 2 waits in the worker behind request 1, and its Cancel arrives there.
        handle.write(Infer(id=2, op="chat", payload=chat_payload()))
        handle.write(Cancel(id=2))
        await handle.send(Cancel(id=1))
        assert (await collect(handle, 1))[-1].data["finish_reason"] == "cancelled"  # type: ignore[union-attr]
        assert await collect(handle, 2) == [Done(id=2, data={
            "finish_reason": "cancelled",
            "usage": {"prompt_tokens": 3, "completion_tokens": 0, "total_tokens": 3}})]


async def test_a_second_load_is_refused_and_the_first_model_stays() -> None:
    async with running_worker() as handle:
        await load(handle)
        assert await load(handle) == [LoadFailed(message="this worker already holds a model")]
        await handle.send(Infer(id=1, op="chat", payload=chat_payload("hi")))
        assert isinstance((await collect(handle, 1))[-1], Done)


async def test_a_concurrent_backend_runs_max_concurrency_requests_at_once() -> None:
    async with running_worker() as handle:
        await load(handle, max_concurrency=2, tokens_per_s=50, reply="a b c d e f")
        await handle.send(Infer(id=1, op="chat", payload=chat_payload()))
        await handle.send(Infer(id=2, op="chat", payload=chat_payload()))
        seen: list[tuple[str, int]] = []
        with anyio.fail_after(10):
            while sum(tag == "done" for tag, _ in seen) < 2:
                frame = await handle.receive()
                assert isinstance(frame, Chunk | Done)
                seen.append((frame.tag, frame.id))
        assert seen.index(("chunk", 2)) < seen.index(("done", 1))  # both ran at once


async def test_unload_waits_for_the_requests_running_on_its_threads() -> None:
    """The model is never released under a running request: one that ignores its
    cancel holds the worker until stop escalates."""
    async with running_worker() as handle:
        await load(handle, max_concurrency=2, hang_after_tokens=1)
        await handle.send(Infer(id=1, op="chat", payload=chat_payload()))
        assert isinstance(await handle.receive(), Chunk)
        assert await handle.stop(grace_s=0.3) == -signal.SIGTERM
        assert handle.escalated


def test_unload_releases_what_the_backend_holds_before_the_worker_exits() -> None:
    worker = subprocess.Popen([sys.executable, "-m", "llmux.worker", "--model-id", "child"],
                              stdin=subprocess.PIPE, stdout=subprocess.PIPE)
    assert worker.stdin is not None and worker.stdout is not None
    children: list[psutil.Process] = []
    try:
        read_hello(worker)
        worker.stdin.write(encode(Load(spec(spawn_child=True))))
        worker.stdin.flush()
        assert poll_until(lambda: bool(children.extend(psutil.Process(worker.pid).children())
                                       or children), 10)
        worker.stdin.write(encode(Unload()))
        worker.stdin.flush()
        assert worker.wait(timeout=10) == 0
        assert all(is_gone(child.pid) for child in children)  # the backend's child, killed
    finally:
        for child in children:
            with contextlib.suppress(psutil.Error):
                child.kill()
        worker.kill()
        worker.wait()
        worker.stdin.close()
        worker.stdout.close()


def test_a_load_whose_info_cannot_cross_the_pipe_fails(monkeypatch: pytest.MonkeyPatch) -> None:
    """In this process: only a backend written for the test returns such an info."""
    class OddInfo(FakeBackend):
        def load(self, progress: Any) -> dict[str, Any]:
            return {**super().load(progress), "odd": object()}

    def leave(code: int) -> None:
        raise SystemExit(code)

    monkeypatch.setattr(backends, "load_backend_class", lambda name: OddInfo)
    monkeypatch.setattr(worker_main, "_setup_logs", lambda *args: None)
    monkeypatch.setattr(worker_main, "_exit", leave)
    pipe = io.BytesIO()
    worker = worker_main.Worker(worker_main.FrameWriter(pipe), worker_main.Requests(),
                                sys.stderr)
    with pytest.raises(SystemExit) as exited:
        worker.handle(Load(spec()))
    assert exited.value.code == 1
    *progress, failed = FrameDecoder().feed(pipe.getvalue())
    assert all(isinstance(frame, Progress) for frame in progress)
    assert isinstance(failed, LoadFailed)
    assert failed.message.startswith("ProtocolError: cannot encode loaded frame")


async def test_failed_request_leaves_the_worker_usable() -> None:
    async with running_worker() as handle:
        await load(handle)
        await handle.send(Infer(id=1, op="draw", payload={}))
        assert await collect(handle, 1) == [
            Failed(id=1, message="the fake backend does not support 'draw'",
                   kind="invalid_request")]
        await handle.send(Infer(id=2, op="chat", payload=chat_payload()))
        assert isinstance((await collect(handle, 2))[-1], Done)


async def test_a_refusal_sends_its_code_to_the_server() -> None:
    async with running_worker() as handle:
        await load(handle, context_length=2)
        await handle.send(Infer(id=1, op="chat", payload=chat_payload()))
        assert await collect(handle, 1) == [Failed(
            id=1, message="This model's maximum context length is 2 tokens; the prompt has "
            "3, leaving no room for an answer. Shorten the conversation or the prompt.",
            kind="invalid_request", code="context_length_exceeded")]


async def test_a_frame_longer_than_one_read_arrives_whole() -> None:
    async with running_worker() as handle:
        await load(handle, reply="x" * 300_000)
        await handle.send(Infer(id=1, op="transcribe", payload={"samples": b""}))
        (done,) = await collect(handle, 1)
        assert isinstance(done, Done) and done.data["text"] == "x" * 300_000


async def test_audio_bytes_cross_the_pipe_as_bytes() -> None:
    async with running_worker() as handle:
        await load(handle)
        samples = bytes(4 * 16000)  # one second of float32 silence
        await handle.send(Infer(id=1, op="transcribe", payload={"samples": samples}))
        (done,) = await collect(handle, 1)
        assert isinstance(done, Done) and done.data["duration"] == 1.0
        await handle.send(Infer(id=2, op="speech", payload={"text": "hi there"}))
        *chunks, done = await collect(handle, 2)
        assert [type(c.data["pcm"]) for c in chunks if isinstance(c, Chunk)] == [bytes, bytes]


async def test_frames_a_full_pipe_cannot_take_wait_in_order_until_it_drains() -> None:
    async with running_worker() as handle:
        await load(handle)
        os.kill(handle.pid, signal.SIGSTOP)  # reads nothing: its pipe fills
        try:
            for seconds in (4, 5, 6):  # 256 KiB and more each, the pipe takes 64 KiB
                samples = bytes(4 * 16000 * seconds)
                handle.write(Infer(id=seconds, op="transcribe", payload={"samples": samples}))
            assert handle.unsent_frames == 3  # the first one's rest, and the two after it
        finally:
            os.kill(handle.pid, signal.SIGCONT)
        with anyio.fail_after(10):
            await handle.drain()
        assert handle.unsent_frames == 0
        for seconds in (4, 5, 6):
            (done,) = await collect(handle, seconds)
            assert done == Done(id=seconds, data={"duration": float(seconds), **done.data})


async def test_a_frame_the_full_pipe_cannot_take_at_all_waits_for_drain() -> None:
    def infer(request_id: int) -> Infer:  # a frame of PIPE_BUF bytes: written whole or not
        return Infer(id=request_id, op="transcribe", payload={"samples": bytes(4045)})

    assert len(encode(infer(10))) == select.PIPE_BUF == 4096
    async with running_worker() as handle:
        await load(handle)
        os.kill(handle.pid, signal.SIGSTOP)
        try:
            sent = 0
            while handle.unsent_frames == 0 and sent < 100:
                handle.write(infer(10 + sent))
                sent += 1
            assert handle.unsent_frames == 1  # the pipe took every frame before it
        finally:
            os.kill(handle.pid, signal.SIGCONT)
        with anyio.fail_after(10):
            await handle.drain()
        for request_id in range(10, 10 + sent):
            assert isinstance((await collect(handle, request_id))[-1], Done)


async def test_a_frame_written_when_the_pipe_has_room_again_still_waits_its_turn() -> None:
    async with running_worker() as handle:
        await load(handle)
        os.kill(handle.pid, signal.SIGSTOP)
        try:
            handle.write(Infer(id=4, op="transcribe", payload={"samples": bytes(4 * 16000 * 4)}))
            assert handle.unsent_frames == 1  # its rest
        finally:
            os.kill(handle.pid, signal.SIGCONT)
        await anyio.sleep(0.3)  # the worker empties the pipe, which has room again
        handle.write(Infer(id=1, op="transcribe", payload={"samples": bytes(4 * 16000)}))
        assert handle.unsent_frames == 2
        with anyio.fail_after(10):
            await handle.drain()
        assert [(await collect(handle, n))[-1].data["duration"]  # type: ignore[union-attr]
                for n in (4, 1)] == [4.0, 1.0]


async def test_stdout_noise_from_the_backend_does_not_corrupt_the_protocol(
        caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="llmux.worker.output")
    async with running_worker() as handle:
        assert isinstance((await load(handle, print_noise=True))[-1], Loaded)
        await handle.send(Infer(id=1, op="chat", payload=chat_payload("hi")))
        *chunks, done = await collect(handle, 1)
        assert "".join(c.data["text"] for c in chunks if isinstance(c, Chunk)) == "echo: hi"
        assert isinstance(done, Done)
    # ... and the server logs it, one record a line naming the worker (of a progress
    # bar, where it got to).
    prefix = f"[worker {handle.model_id} {handle.pid}] "
    expected = [prefix + line for where in ["load"] * 10 + ["chat"] for line in (
        f"fake noise from print() during {where}", f"fake noise on fd 1 during {where}",
        f"fake bar {where} 100%")]  # the fake load prints at each of its 10 steps

    def relayed() -> list[str]:
        return [r.getMessage() for r in caplog.records if r.name == "llmux.worker.output"]

    wait_until(lambda: len(relayed()) >= len(expected), 5, "the worker's output relayed")
    assert relayed() == expected


async def test_crash_mid_stream_raises_worker_died_with_the_exit_code() -> None:
    async with running_worker() as handle:
        await load(handle, crash_after_tokens=2)  # the warm-up does not count
        await handle.send(Infer(id=1, op="chat", payload=chat_payload()))
        assert isinstance(await handle.receive(), Chunk)
        assert isinstance(await handle.receive(), Chunk)
        with pytest.raises(WorkerDied, match=r"closed its pipe and exited with code 3; its "
                           r"last output: fake crash after 2 tokens: assertion failed$"):
            await handle.receive()
        assert handle.returncode == 3
        with pytest.raises(WorkerDied, match="cannot take frames: exited with code 3"):
            await handle.send(Infer(id=2, op="chat", payload=chat_payload()))


async def test_fail_on_load_sends_load_failed_then_exits() -> None:
    async with running_worker() as handle:
        frames = await load(handle, fail_on_load="disk on fire")
        assert frames[-1] == LoadFailed(message="RuntimeError: disk on fire")
        with pytest.raises(WorkerDied, match="exited with code 1"):
            await handle.receive()


@pytest.mark.parametrize(
    ("options", "signum"),
    [({}, signal.SIGTERM), ({"ignore_sigterm": True}, signal.SIGKILL)],
    ids=["sigterm", "sigkill"],
)
async def test_stop_of_a_hung_worker_escalates_and_leaves_no_process(
    options: dict[str, Any], signum: signal.Signals
) -> None:
    async with running_worker() as handle:
        await load(handle, hang_after_tokens=1, spawn_child=True, **options)
        members = live_group_members(handle.pid)
        assert len(members) == 2  # the worker and the child it started
        await handle.send(Infer(id=1, op="chat", payload=chat_payload()))
        assert isinstance(await handle.receive(), Chunk)
        await handle.send(Cancel(id=1))  # ignored: the backend hangs
        started = time.monotonic()
        assert await handle.stop(grace_s=0.3) == -signum
        assert time.monotonic() - started < 0.3 * 2 + 1.0
        assert handle.escalated
        assert_group_gone(handle.pid)
        assert all(is_gone(pid) for pid in members)


SLOW_TO_TERMINATE = textwrap.dedent("""
    import os, signal, sys, time
    from llmux.workers.protocol import Hello, encode

    def terminate(*_):
        time.sleep(0.2)  # its cleanup
        os._exit(7)

    signal.signal(signal.SIGTERM, terminate)
    sys.stdout.buffer.write(encode(Hello(pid=os.getpid())))
    sys.stdout.flush()
    while True:
        time.sleep(1)  # ignores its stdin, so the Unload too
""")


def stand_in_python(tmp_path: Path, script: str) -> str:
    """An executable that the handle starts in place of the worker's interpreter."""
    python = tmp_path / "python"
    python.write_text(script)
    python.chmod(0o755)
    return str(python)


def assert_named_worker_gone(error: BaseException) -> None:
    """The error names the worker by its pid, and that process is gone.

    NOTE: by its pid, not by a search for its command line: another may run here."""
    named = re.search(r"\(pid (\d+)\)", str(error))
    assert named is not None and is_gone(int(named[1]))


async def test_stop_gives_a_worker_a_grace_after_sigterm(tmp_path: Path) -> None:
    (tmp_path / "worker.py").write_text(SLOW_TO_TERMINATE)
    python = stand_in_python(tmp_path,
                             f"#!/bin/sh\nexec {sys.executable} {tmp_path / 'worker.py'}\n")
    handle = await WorkerHandle.spawn(python=python, model_id="fake-1")
    assert await handle.stop(grace_s=0.5) == 7
    assert handle.escalated


async def test_stop_during_a_generation_cancels_it_and_exits_cleanly() -> None:
    async with running_worker() as handle:
        await load(handle, tokens_per_s=20, reply="word " * 500)
        await handle.send(Infer(id=1, op="chat", payload=chat_payload()))
        assert isinstance(await handle.receive(), Chunk)
        started = time.monotonic()
        assert await handle.stop(grace_s=5.0) == 0
        assert time.monotonic() - started < 1.0


async def test_stop_of_a_worker_blocked_writing_chunks_nobody_reads_exits_cleanly() -> None:
    async with running_worker() as handle:
        await load(handle, reply="word " * 200_000)
        await handle.send(Infer(id=1, op="chat", payload=chat_payload()))
        await anyio.sleep(0.5)  # nobody receives: its pipe fills and it blocks writing
        assert await handle.stop(grace_s=3.0) == 0
        assert not handle.escalated


async def test_stop_while_another_task_waits_for_a_frame() -> None:
    async with running_worker() as handle:
        await load(handle)

        async def receive() -> None:
            with pytest.raises(WorkerDied, match="closed its pipe"):
                await handle.receive()

        async with anyio.create_task_group() as tg:
            tg.start_soon(receive)
            await anyio.wait_all_tasks_blocked()
            assert await handle.stop(grace_s=1.0) == 0


async def test_stop_completes_even_when_the_caller_is_cancelled() -> None:
    async with running_worker() as handle:
        with anyio.CancelScope() as scope:
            scope.cancel()
            assert await handle.stop(grace_s=1.0) == 0
        assert handle.returncode == 0


async def test_a_write_to_a_worker_that_died_raises_worker_died() -> None:
    async with running_worker() as handle:
        handle.kill()
        with pytest.raises(WorkerDied, match="cannot take frames"):  # EPIPE, once it is gone
            deadline = time.monotonic() + 5
            while time.monotonic() < deadline:
                handle.write(Infer(id=1, op="chat", payload=chat_payload()))
                await anyio.sleep(0.01)


async def test_frames_queued_for_a_worker_that_died_are_dropped() -> None:
    async with running_worker() as handle:
        await load(handle)
        os.kill(handle.pid, signal.SIGSTOP)  # reads nothing: its pipe fills
        handle.write(Infer(id=1, op="transcribe", payload={"samples": bytes(1 << 20)}))
        assert handle.unsent_frames == 1
        handle.kill()
        with pytest.raises(WorkerDied, match="was killed by SIGKILL"):
            await handle.receive()
        assert handle.unsent_frames == 0
        with pytest.raises(WorkerDied, match="cannot take frames: was killed by SIGKILL"):
            handle.write(Infer(id=2, op="chat", payload=chat_payload()))
        await handle.drain()  # nothing left to write


async def test_receive_after_kill_reports_the_signal() -> None:
    async with running_worker() as handle:
        handle.kill()
        handle.kill()
        with pytest.raises(WorkerDied, match="closed its pipe and was killed by SIGKILL"):
            await handle.receive()
        handle.kill()
        assert await handle.stop() == -signal.SIGKILL


async def test_spawn_with_a_missing_interpreter_raises_worker_died() -> None:
    with pytest.raises(WorkerDied, match="cannot start worker fake-1 with /nonexistent/python"):
        await WorkerHandle.spawn(python="/nonexistent/python", model_id="fake-1")


async def test_spawn_of_something_that_is_not_a_worker_raises_worker_died() -> None:
    with pytest.raises(WorkerDied, match="closed its pipe and exited with code 1"):
        await WorkerHandle.spawn(python="/bin/false", model_id="fake-1")


async def test_an_interpreter_that_cannot_run_the_worker_says_why(tmp_path: Path) -> None:
    broken = stand_in_python(
        tmp_path, "#!/bin/sh\necho 'loading...' >&2\necho 'Traceback (most recent call "
        "last):' >&2\necho \"ModuleNotFoundError: No module named 'msgpack'\" >&2\nexit 1\n")
    with pytest.raises(WorkerDied) as caught:
        await WorkerHandle.spawn(python=broken, model_id="fake-1")
    assert str(caught.value).endswith(  # its last 3 lines
        "closed its pipe and exited with code 1; its last output: loading... | Traceback "
        "(most recent call last): | ModuleNotFoundError: No module named 'msgpack'")


async def test_a_worker_that_sends_garbage_is_killed_and_the_message_says_why(
        tmp_path: Path) -> None:
    garbling = stand_in_python(tmp_path,
                               "#!/bin/sh\nprintf '\\377\\377\\377\\377'\nexec sleep 60\n")
    with pytest.raises(WorkerDied, match=r"\(pid \d+\) sent a bad frame \(frame length "
                       r"4294967295 exceeds the \d+ byte limit\) and was killed by SIGKILL$"
                       ) as caught:
        await WorkerHandle.spawn(python=garbling, model_id="fake-1")
    assert_named_worker_gone(caught.value)


async def test_a_worker_whose_first_frame_is_not_hello_is_killed(tmp_path: Path) -> None:
    rude = stand_in_python(tmp_path, f"#!/bin/sh\nexec {sys.executable} -c 'import sys, time\n"
                    "from llmux.workers.protocol import Progress, encode\n"
                    "sys.stdout.buffer.write(encode(Progress(fraction=0.5, message=\"\")))\n"
                    "sys.stdout.flush()\ntime.sleep(60)'\n")
    with pytest.raises(WorkerDied, match=r"\(pid \d+\) sent 'progress' before hello$"
                       ) as caught:
        await WorkerHandle.spawn(python=rude, model_id="fake-1")
    assert_named_worker_gone(caught.value)


async def test_a_worker_that_closed_its_pipe_gets_a_moment_to_exit(tmp_path: Path) -> None:
    slow = stand_in_python(tmp_path, "#!/bin/sh\nexec 1>&-\nsleep 0.3\nexit 5\n")
    with pytest.raises(WorkerDied, match=r"closed its pipe and exited with code 5$"):
        await WorkerHandle.spawn(python=slow, model_id="fake-1")


async def test_last_words_wait_for_the_relay_to_catch_up(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(output, "_FLOOD_PAUSE_S", 0.1)  # the relay lags behind a flood
    loud = stand_in_python(tmp_path, "#!/bin/sh\nseq 1 20000 >&2\n"
                                     "echo 'fatal: the real reason' >&2\nexit 1\n")
    with pytest.raises(WorkerDied, match=r"exited with code 1; its last output: 19999 \| "
                       r"20000 \| fatal: the real reason$"):
        await WorkerHandle.spawn(python=loud, model_id="fake-1")


async def test_spawn_times_out_and_kills_a_silent_interpreter(tmp_path: Path) -> None:
    silent = stand_in_python(tmp_path, "#!/bin/sh\nexec sleep 60\n")
    with pytest.raises(WorkerDied, match=r"\(pid \d+\) did not say hello within 0.3 s"
                       ) as caught:
        await WorkerHandle.spawn(python=silent, model_id="fake-1", start_timeout_s=0.3)
    assert isinstance(caught.value.__cause__, TimeoutError)
    assert_named_worker_gone(caught.value)


def test_worker_exits_when_its_stdin_closes() -> None:
    """Pipe EOF alone (no parent death) ends the worker: the portable safety net."""
    worker = subprocess.Popen([sys.executable, "-m", "llmux.worker", "--model-id", "eof"],
                              stdin=subprocess.PIPE, stdout=subprocess.PIPE)
    assert worker.stdin is not None and worker.stdout is not None
    decoder = FrameDecoder()
    frames: list[Frame] = []
    while not frames:
        frames = decoder.feed(os.read(worker.stdout.fileno(), 4096))
    assert isinstance(frames[0], Hello) and frames[0].pid == worker.pid
    worker.stdin.close()
    assert worker.wait(timeout=5) == 0
    worker.stdout.close()


def read_hello(worker: subprocess.Popen[bytes]) -> None:
    assert worker.stdout is not None
    decoder = FrameDecoder()
    frames: list[Frame] = []
    while not frames:
        frames = decoder.feed(os.read(worker.stdout.fileno(), 4096))
    assert isinstance(frames[0], Hello)


def test_worker_exits_with_code_2_on_a_garbled_frame() -> None:
    worker = subprocess.Popen([sys.executable, "-m", "llmux.worker", "--model-id", "garbled"],
                              stdin=subprocess.PIPE, stdout=subprocess.PIPE)
    assert worker.stdin is not None and worker.stdout is not None
    try:
        read_hello(worker)
        worker.stdin.write(struct.pack(">I", 1) + b"\xc1")  # not msgpack
        worker.stdin.flush()
        assert worker.wait(timeout=5) == 2  # its stdin still open
    finally:
        worker.kill()
        worker.wait()
        worker.stdin.close()
        worker.stdout.close()


def test_sigterm_ends_a_worker_even_if_its_server_ignores_sigterm() -> None:
    """An ignored signal is inherited across exec; stop's SIGTERM must still work."""
    ignoring = signal.signal(signal.SIGTERM, signal.SIG_IGN)
    try:
        worker = subprocess.Popen([sys.executable, "-m", "llmux.worker", "--model-id", "term"],
                                  stdin=subprocess.PIPE, stdout=subprocess.PIPE)
    finally:
        signal.signal(signal.SIGTERM, ignoring)
    assert worker.stdin is not None and worker.stdout is not None
    try:
        read_hello(worker)
        worker.terminate()
        assert worker.wait(timeout=5) == -signal.SIGTERM
    finally:
        worker.kill()
        worker.wait()
        worker.stdin.close()
        worker.stdout.close()


def test_cancels_are_handled_by_the_reader_alone() -> None:
    """The main thread never sees a Cancel (it would log it as unexpected), also one
    for a request that is unknown or already finished."""
    worker = subprocess.Popen([sys.executable, "-m", "llmux.worker", "--model-id", "quiet"],
                              stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE)
    assert worker.stdin is not None and worker.stdout is not None and worker.stderr is not None
    try:
        read_hello(worker)
        frames = [Load(spec()), Infer(id=1, op="chat", payload=chat_payload()), Cancel(id=1),
                  Cancel(id=9), Unload()]
        worker.stdin.write(b"".join(encode(frame) for frame in frames))
        worker.stdin.flush()
        assert worker.wait(timeout=10) == 0
        log = worker.stderr.read().decode()
        assert "unloading" in log and "WARNING" not in log, log
    finally:
        worker.kill()
        worker.wait()
        for pipe in (worker.stdin, worker.stdout, worker.stderr):
            pipe.close()


@pytest.mark.parametrize(("returncode", "said"), [
    (None, "is still running"), (0, "exited with code 0"), (3, "exited with code 3"),
    (-signal.SIGKILL, "was killed by SIGKILL"), (-40, "was killed by signal 40"),
])
def test_how_a_worker_ended_is_described(returncode: int | None, said: str) -> None:
    assert describe_exit(returncode) == said


def test_a_worker_whose_server_died_while_it_started_exits_at_once() -> None:
    """Its parent is then init or a reaper, not the server it names: asking to die
    with that parent would leave it an orphan."""
    not_our_parent = os.getpid() + 1_000_000  # no such process: a server that is gone
    worker = subprocess.Popen([sys.executable, "-m", "llmux.worker", "--model-id", "late",
                               "--parent-pid", str(not_our_parent)],
                              stdin=subprocess.PIPE, stdout=subprocess.PIPE)
    assert worker.stdin is not None and worker.stdout is not None
    assert worker.wait(timeout=10) == 0
    assert worker.stdout.read() == b""  # not even a Hello
    worker.stdin.close()
    worker.stdout.close()


INTERMEDIATE = textwrap.dedent("""
    import sys, anyio
    from llmux.workers.handle import WorkerHandle

    async def main():
        handle = await WorkerHandle.spawn(python=sys.executable, model_id="orphan")
        print(handle.pid, flush=True)
        await anyio.sleep(600)

    anyio.run(main)
""")


def test_worker_dies_when_its_parent_is_killed() -> None:
    parent = subprocess.Popen([sys.executable, "-c", INTERMEDIATE], stdout=subprocess.PIPE,
                              text=True)
    assert parent.stdout is not None
    try:
        worker_pid = int(parent.stdout.readline())
        assert not is_gone(worker_pid)
    finally:
        parent.kill()
        parent.wait()
        parent.stdout.close()
    assert poll_until(lambda: is_gone(worker_pid), 2.0)
