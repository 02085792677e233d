"""Frames a ModelActor sends its worker arrive in the order it sent them.

The worker drops a Cancel for a request id it has not seen (llmux/workers/main.py,
``Requests``), so a Cancel that overtook its Infer would be lost and the request would
run to its end for a client that left. The scripted worker below holds chosen frames
back in ``write``, as a full pipe would, to try to make a later frame overtake; the
last test plays many Infer+Cancel pairs against a real worker process.
"""

from __future__ import annotations

import itertools
import math
import sys
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from typing import Any

import anyio
import pytest

from llmux.actors.events import EventLog
from llmux.actors.messages import (
    Acquire,
    CancelJob,
    Granted,
    Job,
    JobFinished,
    LoadProgress,
    Message,
    Piece,
    Reply,
    Started,
    Status,
    Submit,
    WorkerExited,
    WorkerLoadFailed,
)
from llmux.actors.model_actor import ModelActor, ModelSettings
from llmux.actors.replies import ReplyReceiver, reply_channel
from llmux.actors.running import RunningJobs
from llmux.actors.worker_io import FRAMES_PER_JOB, WorkerIO
from llmux.errors import BadRequest, InternalError, ModelFailed
from llmux.workers import protocol as wp
from llmux.workers.handle import WorkerDied, WorkerHandle
from tests.conftest import live_workers, wait_until

pytestmark = pytest.mark.anyio

_ids = itertools.count(1)


class ScriptedWorker:
    """Stands in for a WorkerHandle. Answers like llmux/workers/main.py: an Infer runs
    until cancelled, a Cancel for an unknown id is dropped. ``hold(frame)`` says whether
    the pipe is full when that frame is written: it and every frame after it wait,
    unwritten, for ``release`` (and a ``drain``)."""

    pid = 4242
    returncode: int | None = None
    escalated = False

    def __init__(self, hold: Callable[[wp.Frame], bool] = lambda frame: False) -> None:
        self.received: list[wp.Frame] = []
        self.killed = False
        self.release = anyio.Event()
        self._hold = hold
        self._unsent: list[wp.Frame] = []
        self._running: set[int] = set()
        self._answers, self._out = anyio.create_memory_object_stream[wp.Frame](math.inf)

    @property
    def unsent_frames(self) -> int:
        return len(self._unsent)

    def write(self, frame: wp.Frame) -> None:
        if self._unsent or (self._hold(frame) and not self.release.is_set()):
            self._unsent.append(frame)
        else:
            self._take(frame)

    async def drain(self) -> None:
        if self._unsent:
            await self.release.wait()
        while self._unsent:
            self._take(self._unsent.pop(0))

    async def send(self, frame: wp.Frame) -> None:
        self.write(frame)
        await self.drain()

    def _take(self, frame: wp.Frame) -> None:
        self.received.append(frame)
        match frame:
            case wp.Load():
                self._answers.send_nowait(wp.Loaded(reported_bytes=1, info={}))
            case wp.Infer(id=request_id):
                self._running.add(request_id)
            case wp.Cancel(id=request_id) if request_id in self._running:
                self._running.discard(request_id)
                self._answers.send_nowait(wp.Done(request_id, {"finish_reason": "cancelled"}))
            case wp.Unload():
                self._answers.close()

    async def receive(self) -> wp.Frame:
        try:
            return await self._out.receive()
        except anyio.EndOfStream:
            raise WorkerDied(f"worker (pid {self.pid}) closed its pipe") from None

    async def stop(self, grace_s: float = 5.0) -> int | None:
        self._answers.close()
        return 0

    def kill(self) -> None:
        self.killed = True
        self._answers.close()

    def sent(self) -> list[tuple[str, int | None]]:
        """What reached the worker after its Load, as (tag, request id)."""
        return [(frame.tag, getattr(frame, "id", None)) for frame in self.received[1:]]


class Arbiter:
    """Grants every Acquire at once."""

    def __init__(self) -> None:
        self.actor: ModelActor | None = None

    def post(self, message: Message) -> None:
        if isinstance(message, Acquire) and self.actor is not None:
            self.actor.tell(Granted(message.model, self))


def settings(max_concurrency: int = 1, **options: Any) -> ModelSettings:
    return ModelSettings(
        model="m", device="cpu", python=sys.executable, load_timeout_s=20.0,
        idle_timeout_s=None, max_queue=64,
        load_spec={"model_id": "m", "type": "llm", "backend": "fake", "model_path": None,
                   "files": {}, "options": options, "device": "cpu",
                   "max_concurrency": max_concurrency},
    )


@asynccontextmanager
async def running_actor(model: ModelSettings, spawn: Any) -> AsyncIterator[ModelActor]:
    arbiter = Arbiter()
    actor = ModelActor(model, arbiter=arbiter, events=EventLog(), clock=time.monotonic,
                       spawn_worker=spawn)
    arbiter.actor = actor
    async with anyio.create_task_group() as tg:
        await tg.start(actor.run)
        yield actor
        tg.cancel_scope.cancel()


def submit(actor: ModelActor) -> tuple[int, ReplyReceiver[Reply]]:
    """Submit a chat job; returns its id and its reply stream."""
    send, receive = reply_channel()
    job = Job(id=next(_ids), op="chat", payload={"messages": [{"role": "user",
              "content": "one two three four five six seven eight"}]},
              deadline=time.monotonic() + 60, reply=send, enqueued_at=time.monotonic())
    actor.tell(Submit(job))
    return job.id, receive


async def until_started(stream: ReplyReceiver[Reply]) -> None:
    """Wait for the job to start, past the status lines of a cold load."""
    with anyio.fail_after(20):
        while (reply := await stream.receive()) != Started():
            assert isinstance(reply, Status), reply


async def replies(stream: ReplyReceiver[Reply]) -> list[Reply]:
    """Everything the job's stream carries until it ends."""
    with anyio.fail_after(2):
        return [reply async for reply in stream]


def scripted(worker: ScriptedWorker) -> Any:
    async def spawn(**_: Any) -> ScriptedWorker:
        return worker
    return spawn


async def test_cancel_sent_while_its_infer_is_being_written_follows_it() -> None:
    worker = ScriptedWorker(hold=lambda frame: isinstance(frame, wp.Infer))
    async with running_actor(settings(), scripted(worker)) as actor:
        job_id, stream = submit(actor)
        with anyio.fail_after(2):
            assert await stream.receive() == Started()
        actor.tell(CancelJob(job_id))
        await anyio.wait_all_tasks_blocked()
        worker.release.set()
        await anyio.wait_all_tasks_blocked()

        assert worker.sent() == [("infer", job_id), ("cancel", job_id)]
        assert await replies(stream) == []  # ended: the worker stopped it
        await anyio.wait_all_tasks_blocked()
        model = actor.snapshot()
        assert (model["jobs_cancelled"], model["in_flight"], model["state"]) == (1, 0, "ready")


async def test_infers_reach_the_worker_in_the_order_their_jobs_started() -> None:
    first: list[int] = []
    worker = ScriptedWorker(hold=lambda frame: isinstance(frame, wp.Infer)
                            and frame.id == first[0])
    async with running_actor(settings(max_concurrency=2), scripted(worker)) as actor:
        first.append(submit(actor)[0])
        second, _ = submit(actor)
        await anyio.wait_all_tasks_blocked()
        worker.release.set()
        await anyio.wait_all_tasks_blocked()

        assert worker.sent() == [("infer", first[0]), ("infer", second)]


async def test_a_worker_that_takes_no_frames_is_killed() -> None:
    worker = ScriptedWorker(hold=lambda frame: True)  # its pipe is full: nothing is written
    posted: list[Message] = []
    io = worker_io(worker, posted, jobs=2)
    async with anyio.create_task_group() as tg:
        tg.start_soon(io.connect(worker))  # type: ignore[arg-type]
        for request_id in range(FRAMES_PER_JOB * 2):  # as many as may wait unwritten
            io.send(wp.Cancel(request_id))
            await anyio.wait_all_tasks_blocked()
        assert not worker.killed

        io.send(wp.Cancel(99))
        assert worker.killed
        with anyio.fail_after(2):
            await anyio.wait_all_tasks_blocked()
        tg.cancel_scope.cancel()
    assert [type(message) for message in posted] == [WorkerExited]


async def test_every_job_cancelled_right_after_it_started_ends_cancelled() -> None:
    """Many Infer+Cancel pairs, two at a time, on a real worker (the fake backend)."""
    model = settings(max_concurrency=2, load_time_s=0.1, tokens_per_s=20)
    async with running_actor(model, WorkerHandle.spawn) as actor:
        for _ in range(10):
            jobs = [submit(actor) for _ in range(2)]
            for job_id, stream in jobs:
                await until_started(stream)
                actor.tell(CancelJob(job_id))
            for _, stream in jobs:
                assert await replies(stream) == []
        assert actor.snapshot()["jobs_cancelled"] == 20
    wait_until(lambda: not live_workers(), 10, "the worker to exit")


async def test_a_worker_still_loading_is_shown_with_its_pid() -> None:
    """The load task tells the actor its worker at once: the state dump shows its pid
    while it loads (and shutdown would stop it)."""
    worker = ScriptedWorker(hold=lambda frame: isinstance(frame, wp.Load))  # never loads
    async with running_actor(settings(), scripted(worker)) as actor:
        submit(actor)
        await anyio.wait_all_tasks_blocked()  # the load waits for its Load frame
        model = actor.snapshot()
        assert (model["state"], model["pid"]) == ("loading", ScriptedWorker.pid)


async def test_a_worker_may_leave_three_frames_per_job_unwritten() -> None:
    """The limit is FRAMES_PER_JOB = 3 per running job (an Infer, a Cancel, and one
    for a finished job): 3 x 1 frames wait without a kill, the 4th kills."""
    assert FRAMES_PER_JOB == 3
    worker = ScriptedWorker(hold=lambda frame: True)
    io = worker_io(worker, [])
    io.connect(worker)  # type: ignore[arg-type]
    for request_id in range(3):
        io.send(wp.Cancel(request_id))
    assert not worker.killed
    io.send(wp.Cancel(3))
    assert worker.killed


class LoadingWorker(ScriptedWorker):
    """Answers its Load with the given frames; records whether it was stopped."""

    def __init__(self, *answers: wp.Frame, hold: Callable[[wp.Frame], bool] = lambda f: False,
                 ) -> None:
        super().__init__(hold)
        self.answers = answers
        self.stopped = False

    def _take(self, frame: wp.Frame) -> None:
        self.received.append(frame)
        for answer in self.answers:
            self._answers.send_nowait(answer)

    async def stop(self, grace_s: float = 5.0) -> int | None:
        self.stopped = True
        return await super().stop(grace_s)


def worker_io(worker: ScriptedWorker, posted: list[Message], jobs: int = 1) -> WorkerIO:
    """A WorkerIO for ``worker`` running up to ``jobs`` at once, posting to ``posted``."""
    return WorkerIO("m", RunningJobs(jobs, 5.0), post=posted.append,
                    spawn_worker=scripted(worker), on_spawned=lambda w: None,
                    on_client_gone=lambda i: None, on_stopped=lambda j, d: None)


@pytest.mark.parametrize(("answers", "reason"), [
    ((wp.LoadFailed("no such file"),), "no such file"),
    ((wp.Progress(0.5, "half"), wp.Done(1, {})), "unexpected frame during load: Done("),
])
async def test_a_failed_load_stops_its_worker_and_says_why(
        answers: tuple[wp.Frame, ...], reason: str) -> None:
    """The worker's own message (or the frame it should not have sent) is the reason;
    the worker is stopped, not left behind."""
    worker = LoadingWorker(*answers)
    posted: list[Message] = []
    with anyio.fail_after(5):
        await worker_io(worker, posted).load(python=sys.executable, spec={}, timeout_s=5)
    assert worker.stopped and not worker.killed
    assert isinstance(posted[-1], WorkerLoadFailed)
    assert posted[-1].reason.startswith(reason)
    progress = [LoadProgress(0.5, "half")] if isinstance(answers[0], wp.Progress) else []
    assert posted[:-1] == progress


async def test_a_load_cancelled_midway_kills_its_worker() -> None:
    """A load cancelled (shutdown) while its worker loads leaves no process behind."""
    worker = LoadingWorker(hold=lambda frame: True)  # the Load never goes out
    posted: list[Message] = []
    async with anyio.create_task_group() as tg:
        tg.start_soon(lambda: worker_io(worker, posted).load(python=sys.executable, spec={},
                                                          timeout_s=30))
        await anyio.wait_all_tasks_blocked()
        tg.cancel_scope.cancel()
    assert worker.killed and posted == []


class FeedWorker(ScriptedWorker):
    """A worker whose answers the test feeds with ``answer``; ``write`` may raise."""

    def __init__(self, write_error: Exception | None = None) -> None:
        super().__init__()
        self.write_error = write_error

    def answer(self, *frames: wp.Frame) -> None:
        for frame in frames:
            self._answers.send_nowait(frame)

    def write(self, frame: wp.Frame) -> None:
        if self.write_error is not None:
            raise self.write_error
        super().write(frame)


class Served:
    """A WorkerIO serving a FeedWorker, with what it posted and called back."""

    def __init__(self, worker: FeedWorker, limit: int = 4) -> None:
        self.worker = worker
        self.running = RunningJobs(limit, 5.0)
        self.posted: list[Message] = []
        self.stopped: list[tuple[int, dict[str, Any]]] = []
        self.gone: list[int] = []
        self.io = WorkerIO("m", self.running, post=self.posted.append,
                           spawn_worker=scripted(worker), on_spawned=lambda w: None,
                           on_client_gone=self.gone.append,
                           on_stopped=lambda job, data: self.stopped.append((job.id, data)))

    def job(self, *, cancelled: bool = False) -> tuple[Job, ReplyReceiver[Reply]]:
        send, receive = reply_channel()
        job = Job(id=next(_ids), op="chat", payload={}, deadline=time.monotonic() + 60,
                  reply=send, enqueued_at=time.monotonic(), cancelled=cancelled)
        if cancelled:
            send.close()  # as the actor does when it cancels a job
        self.running.add(job)
        return job, receive


async def test_the_workers_frames_reach_their_own_jobs() -> None:
    """Chunks and ends go to the job of their id; frames of unknown ids are dropped; a
    cancelled job hears nothing more, and its worker's "cancelled" Done is reported."""
    served = Served(FeedWorker())
    a, a_stream = served.job()
    b, b_stream = served.job(cancelled=True)
    c, c_stream = served.job()
    served.worker.answer(
        wp.Chunk(999, {"text": "lost"}),
        wp.Chunk(a.id, {"text": "hi"}),
        wp.Chunk(b.id, {"text": "late"}),
        wp.Done(b.id, {"finish_reason": "cancelled"}),
        wp.Failed(a.id, "too long", kind="invalid_request", param="messages", code="ctx"),
        wp.Failed(c.id, "CUDA out of memory"),
    )
    async with anyio.create_task_group() as tg:
        tg.start_soon(served.io.connect(served.worker))  # type: ignore[arg-type]
        await anyio.wait_all_tasks_blocked()
        tg.cancel_scope.cancel()

    assert await replies(b_stream) == []
    assert served.stopped == [(b.id, {"finish_reason": "cancelled"})]
    assert served.gone == []  # a cancelled job's closed stream is no client gone
    a_replies = await replies(a_stream)
    assert a_replies[0] == Piece({"text": "hi"}) and len(a_replies) == 2
    error = a_replies[1].error  # type: ignore[attr-defined]
    assert isinstance(error, BadRequest)
    assert (str(error), error.param, error.code) == ("too long", "messages", "ctx")
    [failure] = await replies(c_stream)
    assert isinstance(failure.error, InternalError)  # type: ignore[attr-defined]
    assert str(failure.error) == "m could not complete the request: CUDA out of memory"  # type: ignore[attr-defined]
    assert served.posted == [JobFinished(b.id), JobFinished(a.id), JobFinished(c.id)]


async def test_a_client_gone_mid_stream_is_reported_at_its_next_chunk() -> None:
    served = Served(FeedWorker())
    a, a_stream = served.job()
    a_stream.close()
    served.worker.answer(wp.Chunk(a.id, {"text": "hi"}))
    async with anyio.create_task_group() as tg:
        tg.start_soon(served.io.connect(served.worker))  # type: ignore[arg-type]
        await anyio.wait_all_tasks_blocked()
        tg.cancel_scope.cancel()
    assert served.gone == [a.id]


async def test_a_worker_death_fails_its_live_jobs_and_is_posted_once() -> None:
    """The jobs still wanted get a retryable ModelFailed; a cancelled one nothing; the
    actor hears one WorkerExited (no JobFinished: it clears its jobs itself)."""
    served = Served(FeedWorker())
    _, a_stream = served.job()
    _, b_stream = served.job(cancelled=True)
    with anyio.fail_after(5):
        async with anyio.create_task_group() as tg:
            tg.start_soon(served.io.connect(served.worker))  # type: ignore[arg-type]
            await anyio.wait_all_tasks_blocked()
            served.worker.kill()
    [failure] = await replies(a_stream)
    assert await replies(b_stream) == []
    assert isinstance(failure.error, ModelFailed)  # type: ignore[attr-defined]
    assert [type(m) for m in served.posted] == [WorkerExited]


async def test_a_frame_that_cannot_be_encoded_fails_only_its_request() -> None:
    served = Served(FeedWorker(write_error=wp.ProtocolError("not JSON")))
    served.io.connect(served.worker)  # type: ignore[arg-type]
    a, a_stream = served.job()
    served.io.send(wp.Infer(a.id, "chat", {}))
    [failure] = await replies(a_stream)
    assert isinstance(failure.error, BadRequest)  # type: ignore[attr-defined]
    assert "cannot be passed to the model: not JSON" in str(failure.error)  # type: ignore[attr-defined]
    assert served.posted == [JobFinished(a.id)]
    served.io.send(wp.Cancel(a.id))  # no job: logged, nothing posted
    assert served.posted == [JobFinished(a.id)]


async def test_a_disconnected_worker_is_sent_nothing() -> None:
    worker = FeedWorker()
    served = Served(worker)
    served.io.connect(worker)  # type: ignore[arg-type]
    served.io.send(wp.Cancel(1))
    served.io.disconnect()
    served.io.send(wp.Cancel(2))
    assert worker.sent() == []  # received[0] is the first frame here, not a Load
    assert [frame.id for frame in worker.received] == [1]  # type: ignore[attr-defined]
