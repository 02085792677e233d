"""Warm spare workers: per worker interpreter, one process that has already started
Python, imported llmux and the runtime modules its models need (their backends' modules,
or ``policy.warm_spare_imports``) and waits for a Load. A model that loads takes it
instead of paying for all that, which is most of a small model's swap cost (importing
torch and transformers alone takes seconds).

``SparePool.spawn`` has ``WorkerHandle.spawn``'s signature, so model actors call it
where they would start a worker: it hands out the spare of that interpreter (or waits
for the one being started, which is ahead of a fresh start), else starts a fresh worker.
A spare is started when the server starts, after one was taken, and when a worker
exits; each start waits (bounded) until no model is loading or computing on the CPU, so
the import does not compete with them for the cores (a model busy on a GPU is no reason
to wait), and only if the host ledger has room for it.

Memory: a spare is host memory. Its measured RSS is counted on the ``cpu`` device's
ledger (``held_bytes``), and it is the first thing to go: when a model needs that room,
the arbiter calls ``drop`` (SIGKILL, at once) instead of evicting a model or waiting.
A spare dies with the server like any worker (parent-death signal, pipe EOF).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Awaitable, Callable, Mapping, Sequence
from typing import Any, Final

import anyio
import anyio.abc
import attrs

from llmux.actors.devices import process_tree_rss
from llmux.workers.handle import WorkerDied, WorkerHandle

__all__ = ["SPARE_ID", "SparePool"]

log = logging.getLogger(__name__)

SPARE_ID: Final = "spare"  # the --model-id of a spare until its Load names the model
QUIET_POLL_S: Final = 0.1
QUIET_WAIT_S: Final = 30.0  # then a spare starts anyway
START_TIMEOUT_S: Final = 120.0  # importing torch on a slow disk takes a while
DEFAULT_SIZE: Final = 64 * 2**20  # the room a spare needs before one was measured

SpawnFn = Callable[..., Awaitable[WorkerHandle]]


@attrs.define(eq=False)
class _Spare:
    python: str
    handle: WorkerHandle
    bytes: int
    scope: anyio.CancelScope = attrs.field(factory=anyio.CancelScope)
    watching: anyio.Event = attrs.field(factory=anyio.Event)  # set when its watcher ends


class SparePool:
    """The warm spares of every interpreter; ``run`` it in the runtime's task group."""

    def __init__(
        self,
        *,
        preload: Mapping[str, Sequence[str]],
        enabled: bool,
        spawn: SpawnFn = WorkerHandle.spawn,
        measure: Callable[[int], int] = process_tree_rss,
        room: Callable[[], int | None] = lambda: None,
        quiet: Callable[[], bool] = lambda: True,
    ) -> None:
        """``preload``: each worker interpreter and the modules its spare imports;
        ``room()``: free bytes of the host ledger (None: not budgeted); ``quiet()``:
        no model is loading or serving, so a spare may start now."""
        self.enabled = enabled
        # Each worker interpreter (a spare per key, in order) and its spare's arguments.
        self._args = {python: [arg for module in modules for arg in ("--preload", module)]
                      for python, modules in preload.items()}
        self._spawn = spawn
        self._measure = measure
        self._room = room
        self._quiet = quiet
        self._ready: dict[str, _Spare] = {}
        self._starting: dict[str, anyio.Event] = {}
        self._wanted: set[str] = set()
        self._sizes: dict[str, int] = {}
        self._tg: anyio.abc.TaskGroup | None = None
        self.handed_out = 0
        self.dropped = 0

    # -- the ledger's view ---------------------------------------------------------------

    def held_bytes(self) -> int:
        """Host memory the ready spares hold (measured RSS)."""
        return sum(spare.bytes for spare in self._ready.values())

    def drop(self) -> bool:
        """Kill every ready spare now, because a model needs the room; True if any was
        there. Their watchers reap them; the next start waits for a worker exit."""
        spares = list(self._ready.values())
        self._ready.clear()
        for spare in spares:
            log.info("dropping the spare worker (pid %d, %d MiB): a model needs the room",
                     spare.handle.pid, spare.bytes >> 20)
            spare.handle.kill()
        self.dropped += len(spares)
        return bool(spares)

    def snapshot(self) -> dict[str, Any]:
        return {
            "enabled": self.enabled,
            "ready": [{"python": s.python, "pid": s.handle.pid, "bytes": s.bytes}
                      for s in self._ready.values()],
            "starting": sorted(self._starting),
            "held_bytes": self.held_bytes(),
            "handed_out": self.handed_out,
            "dropped": self.dropped,
        }

    # -- running -------------------------------------------------------------------------

    async def run(self, *, task_status: anyio.abc.TaskStatus[None] = anyio.TASK_STATUS_IGNORED
                  ) -> None:
        """Start a spare per interpreter, then keep them until cancelled; the spares are
        stopped on the way out (shielded, bounded)."""
        try:
            async with anyio.create_task_group() as tg:
                self._tg = tg
                for python in self._args:
                    self._replenish(python)
                task_status.started()
                await anyio.sleep(math.inf)
        finally:
            self._tg = None
            spares, self._ready = list(self._ready.values()), {}
            with anyio.CancelScope(shield=True):
                async with anyio.create_task_group() as tg:
                    for spare in spares:
                        tg.start_soon(spare.handle.stop, 1.0)

    async def spawn(self, *, python: str, model_id: str, **options: Any) -> WorkerHandle:
        """A worker for ``model_id``: the interpreter's spare if there is one (waiting up
        to ``start_timeout_s`` for one being started), else a fresh one. ``options`` are
        ``WorkerHandle.spawn``'s; a worker that needs its own ``env`` is always fresh.

        Raises:
            WorkerDied: as ``WorkerHandle.spawn``.
        """
        if self.enabled and not options.get("env"):
            if python not in self._ready and python in self._starting:
                with anyio.move_on_after(options.get("start_timeout_s", 30.0)):
                    await self._starting[python].wait()
            spare = self._ready.pop(python, None)
            if spare is not None:
                spare.scope.cancel()
                await spare.watching.wait()  # one reader at a time on the worker's pipe
                if spare.handle.returncode is None:
                    spare.handle.model_id = model_id
                    self.handed_out += 1
                    log.info("%s takes the spare worker (pid %d)", model_id, spare.handle.pid)
                    self._handed(python, spare.handle)
                    return spare.handle
        handle = await self._spawn(python=python, model_id=model_id, **options)
        self._handed(python, handle)
        return handle

    def _handed(self, python: str, handle: WorkerHandle) -> None:
        """A worker went to a model: start the next spare, and another when it exits."""
        if not self.enabled or self._tg is None:
            return
        self._replenish(python)

        async def after_exit() -> None:
            await handle.wait()
            self._replenish(python)

        self._tg.start_soon(after_exit, name=f"spare:after {handle.model_id}")

    def _replenish(self, python: str) -> None:
        if (not self.enabled or self._tg is None or python in self._ready
                or python in self._wanted):
            return
        self._wanted.add(python)
        self._tg.start_soon(self._start, python, name=f"spare:start {python}")

    async def _start(self, python: str) -> None:
        """Start one spare for ``python`` once the machine is quiet and the host ledger
        has room; a failure is logged and waits for the next trigger (no retry loop)."""
        try:
            with anyio.move_on_after(QUIET_WAIT_S):
                # NOTE: polling a cheap predicate; loads and requests post no event here.
                while not self._quiet():  # noqa: ASYNC110
                    await anyio.sleep(QUIET_POLL_S)
            room = self._room()
            need = self._sizes.get(python, DEFAULT_SIZE)
            if room is not None and room < need:
                log.info("no spare worker for %s: %d MiB free on the host ledger, a spare "
                         "takes %d MiB", python, room >> 20, need >> 20)
                return
            started = anyio.Event()
            self._starting[python] = started
            try:
                handle = await self._spawn(python=python, model_id=SPARE_ID,
                                           start_timeout_s=START_TIMEOUT_S,
                                           args=self._args[python])
            except WorkerDied as exc:
                log.warning("cannot start a spare worker for %s: %s", python, exc)
                return
            finally:
                del self._starting[python]
                started.set()
            size = self._measure(handle.pid)
            self._sizes[python] = size
            spare = _Spare(python=python, handle=handle, bytes=size)
            self._ready[python] = spare
            log.info("spare worker ready (pid %d, %d MiB) for %s", handle.pid, size >> 20,
                     python)
            assert self._tg is not None
            self._tg.start_soon(self._watch, spare, name=f"spare:watch {handle.pid}")
        finally:
            self._wanted.discard(python)

    async def _watch(self, spare: _Spare) -> None:
        """Read the spare's pipe while it waits: it says nothing, so EOF means it died
        (and is reaped). Cancelled, without losing a frame, when it is handed out."""
        try:
            with spare.scope:
                frame = await spare.handle.receive()
                log.warning("spare worker (pid %d) sent %r unasked: stopping it",
                            spare.handle.pid, frame)
                await spare.handle.stop(1.0)
        except WorkerDied as exc:
            log.info("spare worker gone: %s", exc)
        finally:
            if self._ready.get(spare.python) is spare:  # not handed out: dead, or shutdown
                del self._ready[spare.python]
                with anyio.CancelScope(shield=True):
                    await spare.handle.stop(1.0)
            spare.watching.set()
