"""A small actor runtime on anyio.

An actor owns private state, a bounded mailbox and one task that takes messages
one at a time. ``handle()`` never awaits: anything slow (a worker load, a stream
of tokens, an unload) runs as a child task in the actor's own task group and
reports back by posting a fact to the mailbox. So the loop is never blocked and
messages need no locks.

Lifetime is structured: ``await tg.start(actor.run)`` returns once the actor can
receive; cancelling the enclosing task group stops it, and ``cleanup()`` runs
shielded with its own time bound.
"""

from __future__ import annotations

import asyncio
import logging
import math
from collections.abc import Callable
from typing import Generic, TypeVar

import anyio
from anyio.abc import TaskGroup, TaskStatus

from llmux.actors.mailbox import Mailbox

M = TypeVar("M")
Clock = Callable[[], float]

log = logging.getLogger(__name__)

CLEANUP_TIMEOUT_S = 15.0
MIN_WAIT_S = 0.005


def loop_time() -> float:
    """The running event loop's clock: what ``anyio.current_time()`` returns on asyncio
    (llmux runs on Hypercorn's asyncio loop), and what cancel scope deadlines are in.

    NOTE: without anyio's look-up of the running backend (through sniffio) on each call,
    which cost more than the rest of it: the actors read the clock several times per
    request (a submit, each time a mailbox empties, a job's end).
    """
    return asyncio.get_running_loop().time()


class Actor(Generic[M]):
    """Base of ``ModelActor`` and ``GpuArbiter``."""

    def __init__(self, name: str, *, mailbox_size: int, clock: Clock) -> None:
        self.name = name
        self.clock = clock
        self._inbox = Mailbox[M](mailbox_size)
        self._tg: TaskGroup | None = None

    # -- sending ---------------------------------------------------------------------

    def tell(self, message: M) -> None:
        """Post a message without waiting.

        Raises:
            anyio.WouldBlock: the mailbox is full (the caller answers 429/503).
            anyio.ClosedResourceError: the actor has stopped.
        """
        self._inbox.put(message)

    def post(self, message: M) -> None:
        """Post an internal fact. It is never refused for room: clients' requests may
        fill the mailbox, and a lost fact (a worker ready, a job finished, a grant)
        would leave a model, or its whole device, waiting for ever."""
        try:
            self._inbox.put(message, bounded=False)
        except anyio.ClosedResourceError:
            log.debug("%s: stopped, dropped %r", self.name, message)

    # -- running ---------------------------------------------------------------------

    async def run(self, *, task_status: TaskStatus[None] = anyio.TASK_STATUS_IGNORED) -> None:
        """Take messages until cancelled, waking at ``next_wakeup()`` for timers."""
        try:
            async with anyio.create_task_group() as tg:
                self._tg = tg
                task_status.started()
                try:
                    while True:
                        await self._take_messages()
                        self.on_timer()
                finally:
                    self._inbox.close()
        finally:
            with anyio.CancelScope(shield=True), anyio.move_on_after(CLEANUP_TIMEOUT_S):
                await self.cleanup()

    async def _take_messages(self) -> None:
        """Handle messages until the timer (``next_wakeup()``) may be due.

        NOTE: one cancel scope whose deadline only ever moves earlier, not one per
        message: entering a scope, or moving its deadline (the loop's timer) later, costs
        more than handling most messages, and most messages move the next wake-up later
        (a model's idle timeout starts again with each request). So ``on_timer`` may be
        called early, and finds nothing due. Messages come first; a timer already due
        still leaves MIN_WAIT_S for them, so an overdue timer cannot starve them.
        """
        with anyio.CancelScope() as timer:
            while True:
                try:
                    self.handle(self._inbox.take_nowait())
                    continue
                except anyio.WouldBlock:
                    pass
                delay = self.next_wakeup() - self.clock()
                if delay != math.inf:
                    deadline = loop_time() + max(delay, MIN_WAIT_S)
                    if deadline < timer.deadline:
                        timer.deadline = deadline
                self.handle(await self._inbox.take())

    def spawn(self, fn: Callable[[], object], name: str) -> None:
        """Start a child task in this actor's task group."""
        assert self._tg is not None, f"{self.name} is not running"
        self._tg.start_soon(fn, name=f"{self.name}:{name}")  # type: ignore[arg-type]

    # -- to override -------------------------------------------------------------------

    def handle(self, message: M) -> None:
        raise NotImplementedError

    def next_wakeup(self) -> float:
        """Absolute clock time of the next timer; ``math.inf`` for none."""
        return math.inf

    def on_timer(self) -> None:
        """Called when ``next_wakeup()`` passes with no message, and sometimes before
        (when it moved later): act on what is due by the clock, nothing else."""

    async def cleanup(self) -> None:
        """Shielded and time-bounded: release what the actor owns."""
