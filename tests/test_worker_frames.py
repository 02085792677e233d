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
    Message,
    Reply,
    Started,
    Status,
    Submit,
    WorkerExited,
)
from llmux.actors.model_actor import ModelActor, ModelSettings
from llmux.actors.replies import ReplyReceiver, reply_channel
from llmux.actors.running import RunningJobs
from llmux.actors.worker_io import FRAMES_PER_JOB, WorkerIO
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
    io = WorkerIO("m", RunningJobs(2, 5.0), post=posted.append, spawn_worker=scripted(worker),
                  on_spawned=lambda w: None, on_client_gone=lambda i: None,
                  on_stopped=lambda j, d: None)
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
