"""The warm spare pool's bookkeeping (llmux/spare.py) in process, with stand-in workers
(its spawn, measure, room and quiet are injected): one spare per interpreter, never a
second; a load waits for the spare being started and takes it; a spare starts only
when the machine is quiet and the host ledger has room for its measured size; a
worker's exit brings back a spare that found no room; a spare that dies leaves the
ready list; ``drop`` kills the ready spares and frees their room at once. Real worker
processes: tests/test_spare.py."""

from __future__ import annotations

import itertools
import logging
import sys
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from typing import Any

import anyio
import pytest

from llmux.spare import DEFAULT_SIZE, SPARE_ID, SparePool
from llmux.workers.handle import WorkerDied
from tests.helpers import until

PY = sys.executable
MIB = 2**20
TIMEOUT_S = 10  # everything here is in process: the bound only catches a hang


class FakeWorker:
    """Stands in for a ``WorkerHandle``: says nothing until it exits."""

    _pids = itertools.count(10_000)

    def __init__(self, model_id: str, options: dict[str, Any]) -> None:
        self.pid = next(self._pids)
        self.model_id = model_id
        self.options = options
        self.returncode: int | None = None
        self.killed = False
        self._exited = anyio.Event()

    def exit(self, code: int) -> None:
        if self.returncode is None:
            self.returncode = code
            self._exited.set()

    async def receive(self) -> Any:
        await self._exited.wait()
        raise WorkerDied(f"worker {self.model_id} closed its pipe")

    async def wait(self) -> int:
        await self._exited.wait()
        assert self.returncode is not None
        return self.returncode

    async def stop(self, grace_s: float = 5.0) -> int | None:
        self.exit(0)
        return self.returncode

    def kill(self) -> None:
        self.killed = True
        self.exit(-9)


class Spawner:
    """The pool's ``spawn``: records every worker started; ``gate``, while set, holds
    each start until it is opened."""

    def __init__(self) -> None:
        self.workers: list[FakeWorker] = []
        self.gate: anyio.Event | None = None

    async def __call__(self, *, python: str, model_id: str, **options: Any) -> FakeWorker:
        if self.gate is not None:
            await self.gate.wait()
        worker = FakeWorker(model_id, options)
        self.workers.append(worker)
        return worker

    @property
    def spares(self) -> list[FakeWorker]:
        """The workers started as spares (whatever model took them since)."""
        return [w for w in self.workers if "args" in w.options]


class Ledger:
    """The host ledger's free bytes, as the test sets them."""

    def __init__(self, free: int | None) -> None:
        self.free = free

    def __call__(self) -> int | None:
        return self.free


@asynccontextmanager
async def running(pool: SparePool) -> AsyncIterator[anyio.abc.TaskGroup]:
    with anyio.fail_after(TIMEOUT_S):
        async with anyio.create_task_group() as tg:
            await tg.start(pool.run)
            yield tg
            tg.cancel_scope.cancel()


def make_pool(spawner: Spawner, *, room: Callable[[], int | None] = lambda: None,
              quiet: Callable[[], bool] = lambda: True, size: int = 80 * MIB) -> SparePool:
    return SparePool(preload={PY: ["some.module"]}, enabled=True,
                     spawn=spawner,  # type: ignore[arg-type]
                     measure=lambda pid: size, room=room, quiet=quiet)


def ready(pool: SparePool) -> list[int]:
    return [spare["pid"] for spare in pool.snapshot()["ready"]]


@pytest.mark.anyio
async def test_a_taken_spare_is_replaced_once_and_an_exit_starts_no_second() -> None:
    spawner = Spawner()
    pool = make_pool(spawner)
    async with running(pool):
        await until(lambda: ready(pool), "a ready spare")
        first = spawner.workers[0]
        assert first.model_id == SPARE_ID
        assert first.options["args"] == ["--preload", "some.module"]
        spawner.gate = anyio.Event()  # the next spare's start takes a while
        assert await pool.spawn(python=PY, model_id="a") is first
        assert first.model_id == "a" and pool.handed_out == 1
        await anyio.wait_all_tasks_blocked()
        assert pool.snapshot()["starting"] == [PY]
        first.exit(0)  # the model's worker exits while the next spare still starts
        await anyio.wait_all_tasks_blocked()
        spawner.gate.set()
        await until(lambda: ready(pool), "a ready spare")
        await anyio.wait_all_tasks_blocked()
        assert len(spawner.workers) == 2, "a second spare for one interpreter"
        second = spawner.workers[1]
        assert ready(pool) == [second.pid]
        spawner.gate = None
        b = await pool.spawn(python=PY, model_id="b")
        assert b is second
        await until(lambda: ready(pool), "a ready spare")
        b.exit(0)  # a worker exits while a spare is ready
        await anyio.wait_all_tasks_blocked()
        assert len(spawner.workers) == 3, "a second spare for one interpreter"
        assert ready(pool) == [spawner.workers[2].pid] and pool.handed_out == 2


@pytest.mark.anyio
async def test_a_load_waits_for_the_spare_being_started_and_takes_it() -> None:
    """Without ``start_timeout_s``, as a model actor asks: its spawn returns as soon as
    the spare said hello, not when the 30 s default wait is over."""
    spawner = Spawner()
    spawner.gate = anyio.Event()
    pool = make_pool(spawner)
    async with running(pool) as tg:
        await until(lambda: pool.snapshot()["starting"], "a spare starting")
        taken: list[Any] = []

        async def load() -> None:
            taken.append(await pool.spawn(python=PY, model_id="a"))

        tg.start_soon(load)
        await anyio.wait_all_tasks_blocked()
        assert taken == []
        spawner.gate.set()
        with anyio.fail_after(5):
            await until(lambda: taken, "the load to take the spare")
        assert taken == [spawner.workers[0]] and taken[0].model_id == "a"
        assert pool.handed_out == 1


@pytest.mark.anyio
async def test_a_worker_with_its_own_environment_never_takes_the_spare() -> None:
    spawner = Spawner()
    pool = make_pool(spawner)
    async with running(pool):
        await until(lambda: ready(pool), "a ready spare")
        spare = spawner.workers[0]
        worker = await pool.spawn(python=PY, model_id="a", env={"CUDA_VISIBLE_DEVICES": "1"})
        assert worker is not spare and worker.options["env"] == {"CUDA_VISIBLE_DEVICES": "1"}
        assert ready(pool) == [spare.pid] and pool.handed_out == 0
    assert spare.returncode == 0  # the pool's stop stopped its spare (not the model's)
    assert worker.returncode is None


@pytest.mark.anyio
async def test_a_spare_starts_only_once_the_machine_is_quiet() -> None:
    spawner = Spawner()
    asked: list[bool] = []
    busy = True

    def quiet() -> bool:
        asked.append(not busy)
        return not busy

    pool = make_pool(spawner, quiet=quiet)
    async with running(pool):
        # It looked, waited, looked again.
        await until(lambda: len(asked) >= 3, "three looks at the machine")
        assert spawner.workers == [] and pool.snapshot()["starting"] == []
        busy = False
        await until(lambda: ready(pool), "a ready spare")
        assert asked[-1] is True


@pytest.mark.anyio
async def test_a_spare_needs_room_on_the_ledger_for_its_measured_size(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO, logger="llmux.spare")
    spawner = Spawner()
    ledger = Ledger(DEFAULT_SIZE - 1)  # not even the size assumed before a measure
    pool = make_pool(spawner, room=ledger, size=80 * MIB)
    async with running(pool):
        await until(lambda: "no spare worker for" in caplog.text, "the no-room log")
        assert spawner.workers == []
        ledger.free = 100 * MIB
        model = await pool.spawn(python=PY, model_id="a")  # fresh: no spare
        await until(lambda: ready(pool), "a ready spare")  # started after that spawn: 64 MiB fit
        assert pool.held_bytes() == 80 * MIB  # its measured size
        ledger.free = 70 * MIB  # the default size fits, the measured one does not
        caplog.clear()
        assert await pool.spawn(python=PY, model_id="b") is spawner.spares[0]
        await until(lambda: "a spare takes 80 MiB" in caplog.text, "the measure's log")
        assert ready(pool) == [] and len(spawner.spares) == 1
        assert model.returncode is None


@pytest.mark.anyio
async def test_a_worker_exit_brings_back_a_spare_that_found_no_room(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO, logger="llmux.spare")
    spawner = Spawner()
    ledger = Ledger(0)
    pool = make_pool(spawner, room=ledger)
    async with running(pool):
        model = await pool.spawn(python=PY, model_id="a")  # fresh, then no room
        await until(lambda: caplog.text.count("no spare worker for") == 2,
                    "the second no-room log")
        ledger.free = 10**9
        model.exit(0)  # its room is back
        await until(lambda: ready(pool), "a ready spare")
        assert spawner.workers[-1].model_id == SPARE_ID


@pytest.mark.anyio
async def test_a_spare_that_dies_leaves_the_ready_list() -> None:
    spawner = Spawner()
    pool = make_pool(spawner)
    async with running(pool):
        await until(lambda: ready(pool), "a ready spare")
        spare = spawner.workers[0]
        spare.exit(-9)  # killed by somebody else (the OOM killer)
        await until(lambda: not ready(pool), "no ready spare")
        assert pool.held_bytes() == 0
        worker = await pool.spawn(python=PY, model_id="a")
        assert worker is not spare and pool.handed_out == 0


@pytest.mark.anyio
async def test_drop_kills_the_ready_spares_and_frees_their_room_at_once() -> None:
    spawner = Spawner()
    pool = make_pool(spawner, size=80 * MIB)
    async with running(pool):
        await until(lambda: ready(pool), "a ready spare")
        spare = spawner.workers[0]
        assert pool.held_bytes() == 80 * MIB
        assert pool.drop() is True
        assert spare.killed and pool.held_bytes() == 0 and ready(pool) == []
        assert pool.snapshot()["dropped"] == 1
        assert pool.drop() is False  # nothing left to drop: the arbiter must look on
        assert pool.snapshot()["dropped"] == 1
