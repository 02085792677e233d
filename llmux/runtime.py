"""The runtime: everything behind the HTTP layer, built from a config.

One ``GpuArbiter`` per device, one ``ModelActor`` per physical model, one event
log. ``run()`` starts them in a task group (structured: cancelling it stops every
actor, and each actor's cleanup stops its worker). Resources talk to it through
``resolve()``, ``submit()`` and ``snapshot()`` only.
"""

from __future__ import annotations

import functools
import itertools
import logging
import math
import os
import sys
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import anyio

from llmux.actors.arbiter import GpuArbiter, ModelSpec
from llmux.actors.base import Clock, loop_time
from llmux.actors.devices import DeviceProbe, probe_for
from llmux.actors.events import EventLog
from llmux.actors.footprints import FootprintStore
from llmux.actors.messages import (
    CancelJob,
    Failure,
    Finished,
    Job,
    MoveTo,
    Piece,
    Reply,
    RequestLoad,
    RequestUnload,
    Submit,
)
from llmux.actors.model_actor import ModelActor, ModelSettings, State
from llmux.actors.placement import Rules
from llmux.actors.replies import ReplyReceiver, ReplySender, reply_channel
from llmux.actors.worker_io import SpawnWorker
from llmux.backends import backend_module
from llmux.config import Config, PhysicalModel, VirtualModel
from llmux.errors import BadRequest, ModelNotFound, QueueFull, ShuttingDown
from llmux.leftovers import PID_FILE, WorkerPids
from llmux.metrics import Metrics
from llmux.model_files import cannot_load
from llmux.spare import SparePool
from llmux.workers.handle import WorkerHandle

log = logging.getLogger(__name__)

LOADED_STATES = frozenset({State.READY, State.BUSY, State.DRAINING})


class Ticket:
    """A client's handle on one submitted job: iterate its replies, or cancel it.

    Cancelling removes a queued job at once and stops a running one within a token;
    it is safe to call more than once and after the job ended.
    """

    def __init__(self, job_id: int, actor: ModelActor, replies: ReplyReceiver[Reply]):
        self.job_id = job_id
        self._actor = actor
        self._replies = replies
        self.ended = False
        # Metrics: the HTTP layer hangs a JobWatch here that sees every reply.
        self.watch: Callable[[Reply], None] | None = None

    async def next(self, timeout_s: float = math.inf) -> Reply | None:
        """The next reply; None when the job's stream has ended.

        Raises:
            TimeoutError: nothing arrived within ``timeout_s`` (nothing is lost).
        """
        try:
            if timeout_s == math.inf:  # a cancel scope costs more than the wait itself
                reply = await self._replies.receive()
            else:
                with anyio.fail_after(timeout_s):
                    reply = await self._replies.receive()
        except (anyio.EndOfStream, anyio.ClosedResourceError):
            self.ended = True
            return None
        if self.watch is not None:
            self.watch(reply)
        if isinstance(reply, Finished | Failure):
            self.ended = True
        return reply

    async def collect(self) -> tuple[list[dict[str, Any]], dict[str, Any]]:
        """Wait for the whole reply (non-streaming): the pieces and the final data.

        Raises:
            LlmuxError: the job failed, or its stream ended without an answer.
        """
        pieces: list[dict[str, Any]] = []
        while (reply := await self.next()) is not None:
            match reply:
                case Piece(data=data):
                    pieces.append(data)
                case Finished(data=data):
                    return pieces, data
                case Failure(error=error):
                    raise error
        raise ShuttingDown("the request ended without an answer", retry_after_s=1.0)

    def cancel(self) -> None:
        self._replies.close()
        if self.ended:
            return
        self.ended = True
        self._actor.post(CancelJob(self.job_id))  # never refused: at most one per job


def load_spec(model: PhysicalModel, device: str) -> dict[str, Any]:
    """What the worker needs to load a model."""
    return {
        "model_id": model.id,
        "type": model.type,
        "backend": model.backend,
        "model_path": model.model_path,
        "files": dict(model.files),
        "options": dict(model.options),
        "device": device,
        "max_concurrency": model.max_concurrency,  # the worker's pool, the actor's limit
    }


def spare_imports(config: Config) -> dict[str, list[str]]:
    """Each worker interpreter and what its warm spare imports: ``warm_spare_imports``
    if set, else the backend modules of the models that run on it (so a spare of the
    server's interpreter has torch imported when a transformers model may take it)."""
    explicit = config.policy.warm_spare_imports
    imports: dict[str, list[str]] = {}
    for model in config.physical_models.values():
        modules = imports.setdefault(model.python or sys.executable, [])
        wanted = explicit if explicit is not None else [backend_module(model.backend)]
        modules.extend(module for module in wanted if module not in modules)
    return imports


class Runtime:
    def __init__(
        self,
        config: Config,
        *,
        probes: Mapping[str, DeviceProbe] | None = None,
        clock: Clock = loop_time,
        spawn_worker: SpawnWorker = WorkerHandle.spawn,
        state_dir: Path | None = None,
    ) -> None:
        self.config = config
        self.events = EventLog()
        self._clock = clock
        self._ids = itertools.count(1)
        footprints = FootprintStore(state_dir / "footprints.json" if state_dir else None)
        # Guarantee 4: a previous instance's leftovers die before our first load.
        self.worker_pids = WorkerPids(state_dir / PID_FILE if state_dir else None)
        spawn_worker = self.worker_pids.track(spawn_worker)
        policy = config.policy
        rules = Rules(strict_priority=policy.strict_priority,
                      min_residency_s=policy.min_residency_s,
                      max_turn_requests=policy.max_turn_requests,
                      max_turn_wait_s=policy.max_turn_wait_s,
                      turn_load_multiple=policy.turn_load_multiple)
        self.arbiters: dict[str, GpuArbiter] = {}
        # Warm spare workers: host memory, so on the cpu ledger (when there is one).
        self.spares = SparePool(
            preload=spare_imports(config), enabled=policy.warm_spare, spawn=spawn_worker,
            room=lambda: self.arbiters["cpu"].snapshot()["free_bytes"]
            if "cpu" in self.arbiters else None,
            quiet=self._quiet_for_a_spare,
        )
        # Every arbiter knows every model: an admin may move a model to any device.
        on_device = list(config.physical_models.values())
        for device_id, device in config.devices.items():
            self.arbiters[device_id] = GpuArbiter(
                device=device_id,
                capacity=device.capacity,
                safety_margin=device.safety_margin,
                probe=(probes or {}).get(device_id) or probe_for(device_id),
                rules=rules,
                models={m.id: ModelSpec(
                    model=m.id, klass=m.priority_class or m.type, priority=m.priority(policy),
                    estimate=m.estimated_vram, group=m.exclusive_group, pinned=m.pinned,
                ) for m in on_device},
                footprints=footprints,
                events=self.events,
                clock=clock,
                spares=self.spares if device_id == "cpu" else None,
            )
        self.actors: dict[str, ModelActor] = {}
        for model in config.physical_models.values():
            device_id = config.device_of(model)
            self.actors[model.id] = ModelActor(
                ModelSettings(
                    model=model.id,
                    device=device_id,
                    python=model.python or sys.executable,
                    load_spec=load_spec(model, device_id),
                    load_timeout_s=model.load_timeout_s,
                    idle_timeout_s=model.idle_timeout_s,
                    max_queue=policy.max_queue_per_model,
                    pinned=model.pinned,
                ),
                arbiter=self.arbiters[device_id],
                events=self.events,
                clock=clock,
                spawn_worker=self.spares.spawn,
                cannot_load=functools.partial(cannot_load, model, config),
            )
        for arbiter in self.arbiters.values():
            arbiter.connect(self.actors)
        # /metrics: counters fed by the event log, gauges read from snapshot() at scrape.
        self.metrics = Metrics(config, self.events, self.snapshot)

    def _quiet_for_a_spare(self) -> bool:
        """Whether a spare may start now: its import takes a core, which a load, or a
        model computing on the CPU, would lose (llama.cpp's threads spin-wait for each
        other: one busy core can halve its speed). A model busy on a GPU is no reason
        to wait: the GPU configs are the ones with spares."""
        return not any(actor.state is State.LOADING or (
            actor.state is State.BUSY and actor.settings.device == "cpu")
            for actor in self.actors.values())

    async def run(self, *, task_status: anyio.abc.TaskStatus[None] = anyio.TASK_STATUS_IGNORED
                  ) -> None:
        """Run every actor until cancelled; preload models once all are up. Kills a
        previous instance's leftovers first; its own pid file goes once all stopped."""
        self.worker_pids.clean_previous()
        try:
            async with anyio.create_task_group() as tg:
                for arbiter in self.arbiters.values():
                    await tg.start(arbiter.run)
                for actor in self.actors.values():
                    await tg.start(actor.run)
                await tg.start(self.spares.run)
                for model in self.config.physical_models.values():
                    if model.preload or model.pinned:
                        self.actors[model.id].tell(RequestLoad())
                log.info("runtime started: %d devices, %d models (pid %d)",
                         len(self.arbiters), len(self.actors), os.getpid())
                task_status.started()
                await anyio.sleep(math.inf)
        finally:
            self.worker_pids.close()

    # -- what resources use -------------------------------------------------------------

    def resolve(self, name: str, visible: Callable[[str], bool] | None = None
                ) -> tuple[VirtualModel, PhysicalModel]:
        """The virtual model a client named, and its physical model. ``visible`` says
        which names the caller may be told of (its key's models); None: every name.

        Raises:
            ModelNotFound: no such virtual model; the message lists the visible names,
                or only says so when the caller may see none.
        """
        virtual = self.config.virtual_models.get(name)
        if virtual is None:
            raise self.not_found(name, visible)
        return virtual, self.config.physical_models[virtual.physical]

    def not_found(self, name: str, visible: Callable[[str], bool] | None = None
                  ) -> ModelNotFound:
        """The 404 for a model name the caller may not be told of: the ``visible`` names
        listed (None: every name), or only that it does not exist when none is."""
        names = ", ".join(sorted(n for n in self.config.virtual_models
                                 if visible is None or visible(n)))
        listed = f" Available models: {names}" if names else ""
        return ModelNotFound(f"The model '{name}' does not exist.{listed}", param="model")

    def submit(self, model: str, op: str, payload: dict[str, Any], *,
               timeout_s: float | None = None) -> Ticket:
        """Queue a job on a physical model; replies arrive on the returned ticket.

        Raises:
            QueueFull: the model's mailbox is full.
            ShuttingDown: the actor has stopped.
        """
        actor = self.actors[model]
        now = self._clock()
        channel: tuple[ReplySender[Reply], ReplyReceiver[Reply]] = reply_channel()
        send, receive = channel
        job = Job(id=next(self._ids), op=op, payload=payload, reply=send, enqueued_at=now,
                  deadline=now + (timeout_s or self.config.policy.request_deadline_s))
        try:
            actor.tell(Submit(job))
        except anyio.WouldBlock:
            send.close()
            receive.close()
            raise QueueFull(f"{model} is saturated; retry shortly", retry_after_s=2.0) from None
        except (anyio.ClosedResourceError, anyio.BrokenResourceError):
            raise ShuttingDown("llmux is shutting down", retry_after_s=5.0) from None
        return Ticket(job.id, actor, receive)

    def load(self, model: str) -> None:
        self.actors[model].tell(RequestLoad())

    def unload(self, model: str, reason: str = "unloaded by an admin") -> None:
        self.actors[model].tell(RequestUnload(reason))

    def move(self, model: str, device: str) -> None:
        """Unload ``model`` (after its running request) and load it on ``device``.

        Raises:
            BadRequest: ``device`` is not configured.
        """
        if device not in self.arbiters:
            raise BadRequest(f"No device '{device}'. Devices: {', '.join(self.arbiters)}",
                             param="device")
        self.actors[model].tell(MoveTo(device, self.arbiters[device]))

    def is_loaded(self, model: str) -> bool:
        return self.actors[model].state in LOADED_STATES

    def health(self) -> dict[str, Any]:
        loaded = [m for m in self.actors if self.is_loaded(m)]
        failed = [m for m, a in self.actors.items() if a.state is State.FAILED]
        return {"status": "ok", "loaded": loaded, "failed": failed}

    def snapshot(self) -> dict[str, Any]:
        """The whole state dump of ``/admin/state``."""
        virtuals: dict[str, list[str]] = {}
        for name, virtual in self.config.virtual_models.items():
            virtuals.setdefault(virtual.physical, []).append(name)
        models = []
        for model_id, actor in self.actors.items():
            physical = self.config.physical_models[model_id]
            footprint, measured = self.arbiters[actor.settings.device].footprint(model_id)
            models.append({
                **actor.snapshot(),
                "type": physical.type,
                "backend": physical.backend,
                "footprint_bytes": footprint,
                "footprint_source": "measured" if measured else "estimated",
                "estimated_bytes": int(physical.estimated_vram),
                "virtual_models": virtuals.get(model_id, []),
            })
        return {
            "devices": [arbiter.snapshot() for arbiter in self.arbiters.values()],
            "models": models,
            "events": [event.to_dict() for event in self.events.recent()],
            "event_subscribers": self.events.subscribers,
            "spares": self.spares.snapshot(),
        }
