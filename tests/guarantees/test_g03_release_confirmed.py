"""Guarantee 3: "Release is confirmed. The next load is granted only when the freed
memory is seen on the device; many load/unload cycles do not drift."

The arbiter runs as an actor (real time, real tasks) on a scripted device whose
memory shows free only some time after a worker exits, as CUDA memory does.
"""

from __future__ import annotations

import math
import time
from typing import Any

import anyio
import pytest
from anyio.streams.memory import MemoryObjectSendStream

from llmux.actors.arbiter import GpuArbiter, ModelSpec
from llmux.actors.events import EventLog
from llmux.actors.footprints import FootprintStore
from llmux.actors.messages import Acquire, Evict, Granted, Loaded, Released, Releasing
from llmux.actors.placement import Rules

pytestmark = pytest.mark.anyio

MB = 1_000_000
LAG_S = 0.6  # how long the device takes to show an exited worker's memory free
MODELS = {m: ModelSpec(model=m, klass="llm", priority=10, estimate=600 * MB)
          for m in ("a", "b")}


class LaggingDevice:
    """A 1 GB device: a worker holds its bytes until LAG_S after it exited."""

    verify_release = True

    def __init__(self) -> None:
        self.held: dict[int, int] = {}
        self.freed_at: dict[int, float] = {}

    def exit(self, pid: int) -> None:
        self.freed_at[pid] = time.monotonic() + LAG_S

    def total_bytes(self) -> int:
        return 1000 * MB

    def used_bytes(self) -> int:
        now = time.monotonic()
        return sum(b for pid, b in self.held.items() if self.freed_at.get(pid, math.inf) > now)

    def footprint(self, pid: int, used_at_grant: int) -> int:
        return self.held[pid]

    def process_bytes(self, pid: int) -> int | None:
        return self.held[pid] if pid not in self.freed_at else None


class Mailbox:
    def __init__(self, model: str, send: MemoryObjectSendStream[tuple[str, Any]]) -> None:
        self.model, self.send = model, send

    def post(self, message: Any) -> None:
        self.send.send_nowait((self.model, message))


async def test_the_next_load_waits_until_the_freed_memory_shows_on_the_device() -> None:
    device = LaggingDevice()
    events = EventLog()
    arbiter = GpuArbiter(device="cuda:0", capacity=None, safety_margin=0, probe=device,
                         rules=Rules(), models=MODELS, footprints=FootprintStore(None),
                         events=events, clock=anyio.current_time)
    send, told = anyio.create_memory_object_stream[tuple[str, Any]](100)
    arbiter.connect({m: Mailbox(m, send) for m in MODELS})

    async def expect(model: str, kind: type) -> float:
        with anyio.fail_after(10):
            got = await told.receive()
        assert got[0] == model and isinstance(got[1], kind), got
        return time.monotonic()

    async with anyio.create_task_group() as tg:
        await tg.start(arbiter.run)
        pid = 100
        current = None
        for cycle in range(6):  # a and b take turns on a device with room for one
            model = "ab"[cycle % 2]
            arbiter.tell(Acquire(model, anyio.current_time() + 30))
            if current is not None:
                await expect(current, Evict)
                arbiter.tell(Releasing(current))
                device.exit(pid)
                arbiter.tell(Released(current, "evicted"))
                exited = time.monotonic()
            granted = await expect(model, Granted)
            if current is not None:
                assert granted - exited >= LAG_S * 0.9, "granted before the memory was free"
            pid += 1
            device.held[pid] = 550 * MB
            arbiter.tell(Loaded(model, pid, None))
            current = model
            await anyio.sleep(0.05)
            state = arbiter.snapshot()
            # no drift: the ledger holds exactly the one loaded model's measured bytes
            assert [(e["model"], e["bytes"]) for e in state["ledger"]] == [(model, 550 * MB)]
            assert state["used_bytes"] == device.used_bytes() == 550 * MB
        tg.cancel_scope.cancel()
    assert not [e for e in events if e.kind == "release_unverified"]
