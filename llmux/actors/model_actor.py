"""ModelActor: one per physical model; owns its queue and, while loaded, its worker.

The lifecycle is the table below and nothing else sets the state. Requests wait in a
bounded queue with deadlines (``WaitingJobs``); the actor asks its device's arbiter
for room (``Acquire``), loads when ``Granted``, serves up to ``max_concurrency``
jobs at once (``RunningJobs``), and on ``Evict`` finishes the running jobs, unloads,
and reports ``Released``. A load that fails is retried with capped exponential
backoff: on the next request once the backoff is over (requests in between are
answered at once with the reason and ``Retry-After``), or by itself for a model
asked to be loaded (preload, pinned, admin). Before it asks for room, the actor looks
for the model's files (``cannot_load``, in a thread: a hung network filesystem stalls
only that load); a load whose files are missing fails there, so it evicts nothing,
and a request in its backoff has the actor look again, so it loads at once when they
are there (pulled since). A crash counts as a failure too: a lone one is retried at
once, one soon after another failure backs off like a failed load, and a pinned model
reloads by itself (the count and the wait are ``LoadBackoff``, backoff.py). Slow work
runs in the actor's own tasks, which report back through the mailbox: stopping the
worker here, the look for the files, and the worker's I/O (loading it, frames to it
in order, frames from it to the running jobs) in ``WorkerIO`` (worker_io.py).
"""

from __future__ import annotations

import enum
import logging
import math
import signal
import time
from collections.abc import Callable, Mapping
from typing import Any, Final

import anyio
import anyio.to_thread
import attrs

from llmux.actors.arbiter import Mailbox
from llmux.actors.backoff import LoadBackoff
from llmux.actors.base import Actor, Clock
from llmux.actors.events import EventLog
from llmux.actors.messages import (
    Acquire,
    CancelJob,
    Evict,
    Failure,
    FilesChecked,
    Granted,
    Job,
    JobFinished,
    Loaded,
    LoadFailed,
    LoadProgress,
    Message,
    MoveTo,
    Refused,
    Released,
    Releasing,
    Reply,
    RequestLoad,
    RequestUnload,
    Started,
    Status,
    Submit,
    Usage,
    Withdraw,
    WorkerExited,
    WorkerLoadFailed,
    WorkerReady,
    WorkerStopped,
)
from llmux.actors.running import RunningJobs
from llmux.actors.waiting import WaitingJobs
from llmux.actors.worker_io import SpawnWorker, WorkerIO
from llmux.errors import (
    DeadlineExceeded,
    LlmuxError,
    LoadRefused,
    ModelFailed,
    QueueFull,
    ShuttingDown,
)
from llmux.workers import protocol as wp
from llmux.workers.handle import WorkerHandle, describe_exit

log = logging.getLogger(__name__)


class State(enum.Enum):
    UNLOADED = "unloaded"
    LOADING = "loading"
    READY = "ready"
    BUSY = "busy"
    DRAINING = "draining"
    UNLOADING = "unloading"
    FAILED = "failed"


TRANSITIONS: Final[Mapping[State, frozenset[State]]] = {
    State.UNLOADED: frozenset({State.LOADING, State.FAILED}),  # failed: files missing
    State.LOADING: frozenset({State.READY, State.FAILED}),
    State.READY: frozenset({State.BUSY, State.UNLOADING, State.FAILED}),
    State.BUSY: frozenset({State.READY, State.DRAINING, State.FAILED}),
    State.DRAINING: frozenset({State.UNLOADING, State.FAILED}),
    State.UNLOADING: frozenset({State.UNLOADED}),
    State.FAILED: frozenset({State.LOADING, State.FAILED}),
}

CANCEL_GRACE_S = 5.0  # a running job past its deadline gets this long to honour Cancel
STOP_GRACE_S = 5.0


@attrs.frozen(kw_only=True)
class ModelSettings:
    """What a model actor needs from the config."""

    model: str
    device: str
    python: str
    load_spec: dict[str, Any]
    load_timeout_s: float
    idle_timeout_s: float | None
    max_queue: int
    pinned: bool = False  # keep it resident: reloaded by itself after a crash

    @property
    def max_concurrency(self) -> int:
        """Jobs run at once: the load spec's, as the worker sizes its pool by it."""
        return int(self.load_spec.get("max_concurrency") or 1)


class ModelActor(Actor[Message]):
    def __init__(
        self,
        settings: ModelSettings,
        *,
        arbiter: Mailbox,
        events: EventLog,
        clock: Clock,
        spawn_worker: SpawnWorker = WorkerHandle.spawn,
        cannot_load: Callable[[], str | None] = lambda: None,
    ) -> None:
        super().__init__(settings.model, mailbox_size=settings.max_queue * 2 + 64, clock=clock)
        self.settings = settings
        self._arbiter = arbiter
        self._events = events
        self._state = State.UNLOADED
        self._waiting = WaitingJobs(settings.max_queue)
        self._running = RunningJobs(settings.max_concurrency, CANCEL_GRACE_S)
        self._io = WorkerIO(self.name, self._running, post=self.post,
                            spawn_worker=spawn_worker, on_spawned=self._spawned,
                            on_client_gone=self._cancel, on_stopped=self._note_stopped)
        self._worker: WorkerHandle | None = None
        self._starting: WorkerHandle | None = None  # the load task's, until ready or failed
        self._stopping: WorkerHandle | None = None  # being unloaded, until it has exited
        self._acquiring = False
        self._acquire_deadline = -math.inf  # the Acquire's, while acquiring
        self._acquire_evicts = True  # the Acquire may have others evicted for this model
        self._failed_in_worker = False  # the last load failed in its worker
        self._move_to: MoveTo | None = None  # an admin move waiting for the unload
        self._backoff = LoadBackoff()
        self._cannot_load = cannot_load  # why a load would fail before it starts, or None
        self._files_missing = False  # the last load failed so: a request checks again
        self._look = 0  # the latest look for the files; an older one's answer is stale
        self._looking = False  # a look is under way
        self._progress: float | None = None  # load fraction while LOADING
        self._load_count = 0
        self._jobs_cancelled = 0  # jobs the worker stopped early on a cancel
        self._jobs_started = 0  # jobs sent to a worker, ever
        self._last_used = clock()
        self._last_used_wall: float | None = None
        self._reported = (False, 0, 0)
        self._killed: WorkerHandle | None = None  # the worker killed for ignoring a cancel
        self._started = 0  # jobs started since the worker loaded (the arbiter's turns)
        self._wanted = False  # asked to be loaded without a request: retried on failure
        self._unload_asked: str | None = None  # an admin unload that came while loading

    @property
    def state(self) -> State:
        return self._state

    # -- the one place the state changes ---------------------------------------------------

    def _transition(self, to: State, reason: str) -> None:
        if to not in TRANSITIONS[self._state]:
            raise AssertionError(f"{self.name}: illegal transition {self._state} -> {to}")
        self._events.record(
            self.name, "transition", reason,
            routine={self._state, to} == {State.READY, State.BUSY},
            from_state=self._state.value, to_state=to.value,
        )
        self._state = to

    # -- messages ----------------------------------------------------------------------------

    def handle(self, message: Message) -> None:
        match message:
            case Submit(job=job):
                self._submit(job)
            case CancelJob(job_id=job_id):
                self._cancel(job_id)
            case RequestLoad():
                if self._state in (State.UNLOADED, State.FAILED):
                    self._wanted = True
                    if not self._acquiring:
                        self._acquire(self.clock() + self.settings.load_timeout_s * 2)
                    else:
                        self._ask_more(self.clock() + self.settings.load_timeout_s * 2)
            case Granted(arbiter=arbiter) if not self._acquiring or arbiter is not self._arbiter:
                # withdrawn (its requests left, or a move) before the grant arrived
                arbiter.post(LoadFailed(self.name, "no longer wanted when room was granted"))
            case Granted():
                self._acquiring = False
                self._transition(State.LOADING, "granted by the arbiter")
                self._progress = 0.0
                self.spawn(lambda: self._io.load(
                    python=self.settings.python, spec=self.settings.load_spec,
                    timeout_s=self.settings.load_timeout_s,
                ), "load")
            case Refused(reason=reason, permanent=permanent):
                self._acquiring = False
                self._refused(reason, permanent)
            case Evict(reason=reason):
                self._unload(reason)
            case RequestUnload(reason=reason):
                self._wanted = False
                if self._state is State.LOADING:
                    self._unload_asked = reason  # done once it is loaded, in _pump
                else:
                    self._unload(reason)
            case MoveTo(device=device) as move:
                self._move_to = move
                if self._acquiring:
                    self._acquiring = False
                    self._arbiter.post(Withdraw(self.name))
                self._unload(f"moving to {device}")
            case LoadProgress(fraction=fraction):
                self._progress = fraction
                self._tell_waiting(self._loading_status())
            case WorkerReady(worker=worker, reported_bytes=reported):
                self._ready(worker, reported)
            case WorkerLoadFailed(reason=reason):
                self._load_failed(reason)
            case FilesChecked(look=look, missing=missing, deadline=deadline):
                if look == self._look:
                    self._files_checked(missing, deadline)
            case JobFinished(job_id=job_id):
                self._job_finished(job_id)
            case WorkerExited(worker=worker, reason=reason):
                self._worker_exited(worker, reason)
            case WorkerStopped(worker=worker):
                self._worker_stopped(worker)
            case _:
                log.error("%s: unexpected message %r in state %s", self.name, message, self._state)
        self._pump()

    def _submit(self, job: Job) -> None:
        now = self.clock()
        in_backoff = self._state is State.FAILED and not self._backoff.due(now) \
            and not self._acquiring
        if in_backoff and not self._files_missing:
            self._refuse_in_backoff(job)
            return
        if self._waiting.is_full:
            self._reply_error(job, QueueFull(
                f"{self.name} has {len(self._waiting)} requests waiting, the most it queues; "
                "retry shortly", retry_after_s=2.0,
            ))
            return
        self._waiting.append(job)
        if self._acquiring:
            self._ask_more(job.deadline)
        if self._state is State.LOADING:
            self._send(job, self._loading_status())
        elif in_backoff and not self._looking:  # its files may be there now: look again
            self._look_for_files(None)

    def _refuse_in_backoff(self, job: Job) -> None:
        wait = self._backoff.retry_at - self.clock()
        self._reply_error(job, ModelFailed(
            f"{self.name} failed: {self._backoff.last_error}; next attempt in {wait:.0f} s",
            retry_after_s=wait,
        ))

    def _cancel(self, job_id: int) -> None:
        queued = self._waiting.remove(job_id)
        if queued is not None:
            queued.reply.close()
            return
        running = self._running.get(job_id)
        if running is not None and not running.cancelled:
            running.cancelled = True
            self._io.send(wp.Cancel(job_id))

    def _refused(self, reason: str, permanent: bool) -> None:
        if not permanent:
            # Requests waiting: they outlived the Acquire's deadline, so the timer
            # expires them. A retry by itself: not now; again after a backoff.
            if self._retry_wanted() and not self._waiting:
                self._backoff.defer(self.clock())
            return
        for job in self._waiting.clear():
            self._reply_error(job, LoadRefused(reason))
        if self._wanted and self._state is State.FAILED:
            # pinned or asked for, and it does not fit now (foreign use may shrink):
            # try again after a backoff, not at once and for ever. No transition: no
            # load began (the arbiter's "refuse" event says why).
            self._backoff.load_failed(f"refused: {reason}", self.clock())
        else:
            self._wanted = False

    def _unload(self, reason: str) -> None:
        if self._state is State.READY:
            self._stop_worker(reason)
        elif self._state is State.BUSY:
            count = len(self._running)
            self._transition(State.DRAINING, f"{reason}; finishing the running request"
                             + (f"s ({count})" if count > 1 else ""))
        else:
            log.info("%s: unload (%s) ignored in state %s", self.name, reason, self._state.value)

    def _ready(self, worker: WorkerHandle, reported: int | None) -> None:
        self._starting = None
        self._worker = worker
        self._failed_in_worker = False
        self._backoff.worker_ready(self.clock())
        self._wanted = False
        self._started = 0
        self._load_count += 1
        self._progress = None
        self._last_used = self.clock()
        self._transition(State.READY, f"worker {worker.pid} loaded and warmed up")
        self._arbiter.post(Loaded(self.name, worker.pid, reported))
        self.spawn(self._io.connect(worker), "worker")

    def _load_failed(self, reason: str, *, started: bool = True) -> None:
        """The load failed: in its worker, or (not ``started``) before it asked for
        room, when ``reason`` says why and names the model."""
        self._starting = None
        self._progress = None
        backoff = self._backoff.load_failed(reason, self.clock())
        self._transition(State.FAILED, f"load failed: {reason}; retry in {backoff:.0f} s")
        if started:
            self._failed_in_worker = True
            self._arbiter.post(LoadFailed(self.name, reason))
        for job in self._waiting.clear():
            self._reply_error(job, ModelFailed(
                f"{self.name} failed to load: {reason}" if started else reason,
                retry_after_s=backoff))

    def _job_finished(self, job_id: int) -> None:
        if self._running.pop(job_id) is None:
            return
        self._last_used = self.clock()
        self._last_used_wall = time.time()
        if len(self._running):
            return  # still busy (or draining) with the others
        if self._state is State.BUSY:
            self._transition(State.READY, "request finished")
        elif self._state is State.DRAINING:
            self._stop_worker("drained")

    def _worker_exited(self, worker: WorkerHandle, reason: str) -> None:
        if worker is not self._worker:
            return  # a worker we are already stopping
        self._worker = None
        self._io.disconnect()
        for job in self._running.clear():  # the reader failed those not cancelled
            job.reply.close()
        error = f"worker died: {reason}"
        wait = self._backoff.crashed(error, self.clock())
        # NOTE: pinned means "keep it resident", so it comes back without a request,
        # unless it was on its way out (an admin unload or a move was draining it).
        # preload only means "load at start": such a model reloads on its next request.
        self._wanted = self.settings.pinned and self._state is not State.DRAINING
        then = f"retry in {wait:.0f} s" if wait else "retry at once"
        self._transition(State.FAILED, f"{error}; {then}"
                         + ("; pinned, so it reloads by itself" if self._wanted else ""))
        self._arbiter.post(Released(self.name, error))

    def _worker_stopped(self, worker: WorkerHandle | None) -> None:
        """The worker we unloaded has exited: it served until then, so no failures
        are in a row any more."""
        self._note_signalled(worker)
        self._stopping = None
        self._backoff.worker_stopped()
        self._transition(State.UNLOADED, "worker exited")
        self._arbiter.post(Released(self.name, "unloaded"))

    # -- scheduling --------------------------------------------------------------------------

    def _finish_move(self) -> None:
        """Once unloaded (and released to the old device's arbiter), switch devices
        and load there."""
        move, self._move_to = self._move_to, None
        assert move is not None
        self._arbiter.post(Usage(self.name, False, 0, self._last_used))
        self._arbiter = move.arbiter
        self._reported = (False, 0, 0)
        self.settings = attrs.evolve(self.settings, device=move.device,
                                     load_spec={**self.settings.load_spec,
                                                "device": move.device})
        self._events.record(self.name, "move", f"moved to {move.device}")
        self._backoff.waive()
        self._wanted = True  # an admin asked for it there: loaded with or without requests
        self._acquire(self.clock() + self.settings.load_timeout_s * 2)

    def _pump(self) -> None:
        """Start what the current state allows; then tell the arbiter our load."""
        if self._unload_asked is not None and self._state is not State.LOADING:
            reason, self._unload_asked = self._unload_asked, None
            if self._state is State.READY:
                self._unload(reason)
        if self._move_to is not None:
            if self._state is State.READY:  # the move came while it was loading
                self._unload(f"moving to {self._move_to.device}")
            elif self._state in (State.UNLOADED, State.FAILED) and not self._acquiring:
                self._finish_move()
        if self._state in (State.READY, State.BUSY) and self._waiting:
            while self._waiting and self._running.has_room:
                self._start(self._waiting.popleft())
        elif (
            self._state in (State.UNLOADED, State.FAILED)
            and self._waiting
            and not self._acquiring
            and self._backoff.due(self.clock())
        ):
            self._acquire(self._waiting.latest_deadline())
        elif self._retry_wanted() and self._backoff.retry_by_itself_due(self.clock()):
            self._events.record(self.name, "retry", f"retrying the load (failures in a row: "
                                f"{self._backoff.in_a_row}) after: {self._backoff.last_error}")
            # NOTE: a load that failed in its worker may fail again: retried by itself
            # (nobody waits for it), it takes only free room, else each retry would
            # evict a model in use. A request for it, or an admin load, evicts as usual.
            self._acquire(self.clock() + self.settings.load_timeout_s * 2,
                          evict=not self._failed_in_worker)
        if (self._acquiring and not self._waiting and not self._wanted
                and self._state is not State.LOADING):
            self._acquiring = False  # its requests left: the arbiter plans for nobody
            self._arbiter.post(Withdraw(self.name))
        report = (len(self._running) > 0, len(self._waiting), self._started)
        if report != self._reported:
            self._reported = report
            self._arbiter.post(Usage(self.name, report[0], report[1], self._last_used,
                                     report[2]))

    def _retry_wanted(self) -> bool:
        """A model asked to be loaded (not by a request) whose load failed, or a
        pinned model whose worker crashed."""
        return self._wanted and self._state is State.FAILED and not self._acquiring

    def _acquire(self, deadline: float, *, evict: bool = True) -> None:
        """Ask the arbiter for room to load once the model's files are found: a load
        without them fails before anything is evicted for it."""
        self._acquiring = True
        self._acquire_deadline, self._acquire_evicts = deadline, evict
        self._look_for_files(deadline)

    def _ask_more(self, deadline: float) -> None:
        """A request (or an admin load) came while the model waits for room: the
        arbiter waits until its deadline too, and may evict for it, keeping the
        model's place in its queue (asking anew would put it last)."""
        if deadline <= self._acquire_deadline and self._acquire_evicts:
            return
        self._acquire_deadline = max(self._acquire_deadline, deadline)
        self._acquire_evicts = True
        if not self._looking:  # else the look's answer sends the Acquire
            self._arbiter.post(Acquire(self.name, self._acquire_deadline))

    def _look_for_files(self, deadline: float | None) -> None:
        """Look for the files in a thread, then ``FilesChecked``; a newer look makes
        this one's answer stale."""
        self._look += 1
        self._looking = True
        look = self._look

        async def run() -> None:
            missing = await anyio.to_thread.run_sync(self._cannot_load,
                                                     abandon_on_cancel=True)
            self.post(FilesChecked(look, missing, deadline))

        self.spawn(run, "files")

    def _files_checked(self, missing: str | None, deadline: float | None) -> None:
        self._looking = False
        self._files_missing = missing is not None
        if deadline is None:  # looked again for the requests in a backoff
            if missing is None:
                self._backoff.waive()  # so _pump asks for room for them
            else:
                for job in self._waiting.clear():
                    self._refuse_in_backoff(job)
        elif not self._acquiring:
            return  # withdrawn while it looked: its requests left, or a move came
        elif missing is not None:
            self._acquiring = False
            self._load_failed(missing, started=False)
        else:
            self._arbiter.post(Acquire(self.name, self._acquire_deadline,
                                       evict=self._acquire_evicts))

    def _start(self, job: Job) -> None:
        self._running.add(job)
        self._started += 1
        self._jobs_started += 1
        if self._state is State.READY:
            self._transition(State.BUSY, f"request {job.id} ({job.op})")
        self._send(job, Started())
        self._io.send(wp.Infer(job.id, job.op, job.payload))

    def _stop_worker(self, reason: str) -> None:
        worker, self._worker = self._worker, None
        self._io.disconnect()
        self._stopping = worker  # its pid stays in the state dump until it has exited
        self._transition(State.UNLOADING, reason)
        self._arbiter.post(Releasing(self.name))

        async def stop() -> None:
            if worker is not None:
                await worker.stop(STOP_GRACE_S)
            self.post(WorkerStopped(worker))

        self.spawn(stop, "stop")

    # -- timers ------------------------------------------------------------------------------

    def next_wakeup(self) -> float:
        times = [self._waiting.next_deadline(), self._running.next_deadline()]
        if self._state is State.READY and self.settings.idle_timeout_s is not None:
            times.append(self._last_used + self.settings.idle_timeout_s)
        if self._state is State.FAILED and not self._acquiring:
            if self._waiting:
                times.append(self._backoff.retry_at)
            elif self._wanted:
                times.append(self._backoff.next_retry_by_itself())
        return min(times, default=math.inf)

    def on_timer(self) -> None:
        now = self.clock()
        for job in self._waiting.expire(now):
            self._reply_error(job, DeadlineExceeded(
                f"waited {now - job.enqueued_at:.0f} s for {self.name} "
                f"({self._state.value}) and reached the request deadline",
                retry_after_s=5.0,
            ))
        self._expire_running(now)
        idle = self.settings.idle_timeout_s
        if self._state is State.READY and idle is not None and now - self._last_used >= idle:
            self._stop_worker(f"idle for {idle:.0f} s")
        self._pump()

    # -- the worker (its I/O runs in WorkerIO) ----------------------------------------------

    def _spawned(self, worker: WorkerHandle) -> None:
        """The load task started ``worker``: shown in the state dump, and stopped on
        shutdown even if it is still loading."""
        self._starting = worker

    def _expire_running(self, now: float) -> None:
        """Per running job: past its deadline it fails and is cancelled; still running
        past the cancel grace, the worker ignores cancels and is killed (and with it
        the other running jobs, which fail as in a crash)."""
        for job in self._running.expired(now):
            job.cancelled = True
            self._send(job, Failure(DeadlineExceeded(
                f"{self.name} did not finish within the request deadline"
            )))
            job.reply.close()
            self._io.send(wp.Cancel(job.id))
        if self._running.stuck(now) and self._worker is not None:
            if self._killed is not self._worker:  # the timer repeats until it is reaped
                self._killed = self._worker
                log.warning("%s: worker ignores cancel; killing it", self.name)
                # An event, so /admin/state and the metrics tell this kill from a crash.
                self._events.record(self.name, "kill", "worker ignored cancel past the "
                                    "request deadline: SIGKILL")
            self._worker.kill()

    def _note_signalled(self, worker: WorkerHandle | None) -> None:
        """A worker that ignored unload and had to be signalled is a "kill" event
        (for /admin/state and the metrics); one that exited by itself is not."""
        code = getattr(worker, "returncode", None)
        # NOTE(faults helper): only if stop() itself signalled it; a worker SIGKILLed from
        # outside while unloading did not ignore anything (tests/faults/test_worker_kills).
        if code in (-signal.SIGTERM, -signal.SIGKILL) and getattr(worker, "escalated", True):
            self._events.record(self.name, "kill",
                                f"worker ignored unload and {describe_exit(code)}")

    def _note_stopped(self, job: Job, data: dict[str, Any]) -> None:
        """The worker confirmed a cancel: count it, and say how far it had got."""
        self._jobs_cancelled += 1
        tokens = (data.get("usage") or {}).get("completion_tokens", "?")
        log.info("%s: job %d stopped by its worker after %s tokens", self.name, job.id, tokens)

    # -- replies -----------------------------------------------------------------------------

    def _send(self, job: Job, reply: Reply) -> None:
        try:
            job.reply.send_nowait(reply)
        except (anyio.BrokenResourceError, anyio.ClosedResourceError):
            pass  # status lines are best effort; a gone client is cancelled separately

    def _reply_error(self, job: Job, error: LlmuxError) -> None:
        self._send(job, Failure(error))
        job.reply.close()

    def _loading_status(self) -> Status:
        return Status(f"loading {self.name} ({self._progress or 0.0:.0%})")

    def _tell_waiting(self, reply: Reply) -> None:
        for job in self._waiting:
            self._send(job, reply)

    # -- lifetime ----------------------------------------------------------------------------

    async def cleanup(self) -> None:
        """On shutdown: refuse what waits, stop the worker (graceful, then killed)."""
        for job in [*self._waiting.clear(), *self._running]:
            self._reply_error(job, ShuttingDown("llmux is shutting down", retry_after_s=5.0))
        async with anyio.create_task_group() as tg:
            for worker in {w for w in (self._worker, self._starting) if w is not None}:
                tg.start_soon(worker.stop, 2.0)

    def snapshot(self) -> dict[str, Any]:
        worker = self._worker or self._starting or self._stopping
        return {
            "id": self.name,
            "state": self._state.value,
            "device": self.settings.device,
            "pid": worker.pid if worker is not None else None,
            "queue_depth": len(self._waiting),
            "in_flight": len(self._running),
            "last_used": self._last_used_wall,
            "load_count": self._load_count,
            "jobs_started": self._jobs_started,
            "jobs_cancelled": self._jobs_cancelled,
            "load_progress": self._progress,
            "last_error": self._backoff.last_error,
        }
