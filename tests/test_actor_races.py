"""Interleavings of the model actors and their arbiter that once stranded a model or a
whole device, each driven on an in-process runtime with real fake-backend workers:
a burst of requests filling a mailbox, a grant crossing a Withdraw or a move, a client
leaving while its model waits for room, a permanent refusal of a pinned model, an
admin unload during a load, a retry by itself after a failed load, and a request that
joins a model waiting for room."""

from __future__ import annotations

import logging
import os
import signal
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import anyio
import anyio.lowlevel
import pytest

from llmux.actors.devices import CpuProbe
from llmux.actors.messages import FilesChecked, Message, MoveTo
from llmux.actors.model_actor import ModelActor, State
from llmux.config import parse_config
from llmux.errors import DeadlineExceeded, ModelFailed, QueueFull
from llmux.runtime import Runtime
from tests.conftest import fake_config, fake_model
from tests.helpers import until

pytestmark = pytest.mark.anyio
PAYLOAD = {"messages": [{"role": "user", "content": "hi"}]}
MB = 1 << 20


@asynccontextmanager
async def running(config: dict[str, Any], **kwargs: Any) -> AsyncIterator[Runtime]:
    runtime = Runtime(parse_config(config), **kwargs)
    with anyio.fail_after(30):
        async with anyio.create_task_group() as tg:
            await tg.start(runtime.run)
            yield runtime
            tg.cancel_scope.cancel()


async def test_a_burst_that_fills_the_mailbox_loses_no_internal_message(
        caplog: pytest.LogCaptureFixture) -> None:
    """Clients fill the mailbox in every loop turn while the model loads: the worker's
    ready message still arrives (it was dropped once, leaving the model and its device
    loading for ever)."""
    caplog.set_level(logging.ERROR)
    config = {"devices": {"cpu": {"capacity": "1GB"}}, "policy": {"max_queue_per_model": 4},
              **fake_config(m=fake_model(load_time_s=0.5))}
    async with running(config) as runtime:
        actor = runtime.actors["m"]
        first = runtime.submit("m", "chat", PAYLOAD, timeout_s=20)
        await until(lambda: actor.state is State.LOADING, "loading")
        refused = 0
        with anyio.move_on_after(1.5):
            while True:  # a burst in each loop turn, until QueueFull
                tickets = []
                try:
                    while True:
                        tickets.append(runtime.submit("m", "chat", PAYLOAD, timeout_s=20))
                except QueueFull:
                    refused += 1
                await anyio.lowlevel.checkpoint()
                for ticket in tickets:
                    ticket.cancel()
                await anyio.lowlevel.checkpoint()
        assert refused > 10  # the mailbox was full, many times
        pieces, _ = await first.collect()
        assert pieces and actor.state in (State.READY, State.BUSY)
        assert runtime.arbiters["cpu"].snapshot()["loading"] is None
    assert not [r for r in caplog.records if "lost" in r.getMessage()]


async def test_a_client_that_leaves_while_its_model_waits_for_room_evicts_nothing() -> None:
    """b waits for a's room; b's client leaves: b withdraws at once, so when a's request
    ends, a stays and b is not loaded for nobody."""
    config = {"devices": {"cpu": {"capacity": "300MB"}},
              **fake_config(a=fake_model(reply="x " * 30, tokens_per_s=20), b=fake_model())}
    async with running(config) as runtime:
        a, b = runtime.actors["a"], runtime.actors["b"]
        await runtime.submit("a", "chat", PAYLOAD).collect()
        long = runtime.submit("a", "chat", PAYLOAD)  # a busy for ~1.5 s
        await until(lambda: a.state is State.BUSY, "a busy")
        waiter = runtime.submit("b", "chat", PAYLOAD)
        await until(lambda: runtime.arbiters["cpu"].snapshot()["pending"], "b pending")
        waiter.cancel()
        await until(lambda: not runtime.arbiters["cpu"].snapshot()["pending"], "b withdrawn",
                    within_s=1.0)
        await long.collect()
        await anyio.sleep(0.5)
        assert a.state is State.READY and b.state is State.UNLOADED
        assert not [e for e in runtime.events.recent() if e.kind == "evict"]


async def test_a_grant_that_crosses_a_move_is_given_back_to_the_old_device() -> None:
    """A move lands between the actor's Acquire and the old arbiter's Granted: the old
    device gets its room back (it once stayed 'loading' for ever and granted nothing
    more) and the model loads on the new device, counted in its ledger."""
    config = {"devices": {"cpu": {"capacity": "1GB"}, "cuda:0": {"capacity": "1GB"}},
              **fake_config(m=fake_model(), other=fake_model())}
    runtime_kwargs = {"probes": {"cpu": CpuProbe(), "cuda:0": CpuProbe()}}
    async with running(config, **runtime_kwargs) as runtime:
        actor = runtime.actors["m"]
        handle = actor.handle
        moved = False

        def move_right_after_the_look(message: Message) -> None:
            nonlocal moved
            if isinstance(message, FilesChecked) and message.deadline is not None and not moved:
                moved = True  # the Acquire goes out now; the move is handled before Granted
                actor.tell(MoveTo("cuda:0", runtime.arbiters["cuda:0"]))
            handle(message)

        actor.handle = move_right_after_the_look  # type: ignore[method-assign]
        pieces, _ = await runtime.submit("m", "chat", PAYLOAD, timeout_s=10).collect()
        assert moved and pieces and actor.settings.device == "cuda:0"
        cpu, cuda = runtime.arbiters["cpu"].snapshot(), runtime.arbiters["cuda:0"].snapshot()
        assert cpu["loading"] is None and "m" not in str(cpu["ledger"])
        assert "m" in str(cuda["ledger"])
        other, _ = await runtime.submit("other", "chat", PAYLOAD, timeout_s=10).collect()
        assert other


class ShrinkingDevice:
    """A GPU whose foreign use the test sets; every worker measures 150 MB."""

    verify_release = False

    def __init__(self) -> None:
        self.foreign = 0

    def total_bytes(self) -> int:
        return 1024 * MB

    def used_bytes(self) -> int:
        return self.foreign

    def footprint(self, pid: int, used_at_grant: int) -> int:
        return 150 * MB

    def process_bytes(self, pid: int) -> int | None:
        return None


async def test_a_pinned_model_that_no_longer_fits_backs_off() -> None:
    """A pinned model's worker dies and a foreign process has taken the device: the
    arbiter refuses it for good, and the actor retries after a backoff (it once asked
    again at once, thousands of times a second)."""
    device = ShrinkingDevice()
    config = {"devices": {"cuda:0": {}}, **fake_config(kept=fake_model() | {"pinned": True})}
    async with running(config, probes={"cuda:0": device}) as runtime:
        actor: ModelActor = runtime.actors["kept"]
        await until(lambda: actor.state is State.READY, "loaded")
        device.foreign = 1000 * MB
        os.kill(actor.snapshot()["pid"], signal.SIGKILL)
        await until(lambda: actor.state is State.FAILED, "failed")
        await anyio.sleep(1.5)
        refusals = [e for e in runtime.events.recent()
                    if e.model == "kept" and e.kind == "refuse"]
        assert 1 <= len(refusals) <= 3  # at once, then after 1 s (then 2 s)
        assert actor.state is State.FAILED
        assert actor.snapshot()["last_error"].startswith("refused: kept (llm) needs ")


async def test_an_unload_asked_during_the_load_is_done_once_loaded() -> None:
    config = {"devices": {"cpu": {"capacity": "1GB"}}, **fake_config(m=fake_model(load_time_s=0.5))}
    async with running(config) as runtime:
        actor = runtime.actors["m"]
        runtime.load("m")
        await until(lambda: actor.state is State.LOADING, "loading")
        runtime.unload("m")
        await until(lambda: actor.state is State.UNLOADED, "unloaded after its load")
        assert actor.snapshot()["load_count"] == 1


def loads_begun(runtime: Runtime) -> list[str]:
    return [e.model for e in runtime.events.recent()
            if e.kind == "transition" and e.to_state == "loading"]


async def test_a_retry_by_itself_after_a_failed_load_evicts_nothing() -> None:
    """An admin asked for ``broken``, whose load fails in its worker; meanwhile ``used``
    loads for a request. ``broken`` retries by itself (1 s, 2 s...) but only into
    free room: ``used`` stays (each retry once evicted it, for a load that failed
    again). A request for ``broken`` still evicts for it."""
    config = {"devices": {"cpu": {"capacity": "300MB"}},
              **fake_config(broken=fake_model(fail_on_load="bad weights"), used=fake_model())}
    async with running(config) as runtime:
        broken, used = runtime.actors["broken"], runtime.actors["used"]
        runtime.load("broken")
        await until(lambda: broken.state is State.FAILED, "the first load failed")
        await runtime.submit("used", "chat", PAYLOAD, timeout_s=10).collect()
        await anyio.sleep(3.5)  # the retries at 1 s and 2 s (and so on) came and went
        assert used.state is State.READY
        assert not [e for e in runtime.events.recent() if e.kind == "evict"]
        not_now = [e for e in runtime.events.recent()
                   if e.model == "broken" and e.kind == "refuse"]
        assert not_now and "not retried by itself" in not_now[0].reason
        assert len(not_now) <= 8  # about once a second, not again at once each time
        assert broken.snapshot()["last_error"].endswith("bad weights")  # not the refusal
        # the failure's own 1 s wait is long over: a request loads it at once (the
        # retries by themselves, deferred each second, once refused it nearly always)
        with pytest.raises(ModelFailed, match="bad weights"):
            await runtime.submit("broken", "chat", PAYLOAD, timeout_s=10).collect()
        assert [e.model for e in runtime.events.recent() if e.kind == "evict"] == ["used"]


async def test_a_request_that_joins_a_model_waiting_for_room_keeps_its_place() -> None:
    """``b``'s first request gives up before ``a`` frees the device; a second one,
    which came before ``c``'s, extends ``b``'s wait: ``b`` loads before ``c`` (it
    once asked anew when the first deadline passed, behind ``c``)."""
    config = {"devices": {"cpu": {"capacity": "200MB"}},
              **fake_config(a=fake_model(reply="x " * 40, tokens_per_s=20),
                            b=fake_model(), c=fake_model())}
    async with running(config) as runtime:
        await runtime.submit("a", "chat", PAYLOAD).collect()
        long = runtime.submit("a", "chat", PAYLOAD, timeout_s=20)  # busy for ~2 s
        await until(lambda: runtime.actors["a"].state is State.BUSY, "a busy")
        first_b = runtime.submit("b", "chat", PAYLOAD, timeout_s=0.5)
        await anyio.sleep(0.1)
        second_b = runtime.submit("b", "chat", PAYLOAD, timeout_s=20)
        await anyio.sleep(0.1)
        only_c = runtime.submit("c", "chat", PAYLOAD, timeout_s=20)
        with pytest.raises(DeadlineExceeded):  # it passed while a was busy
            await first_b.collect()
        await long.collect()
        (b_pieces, _), (c_pieces, _) = await second_b.collect(), await only_c.collect()
        assert b_pieces and c_pieces
        assert [m for m in loads_begun(runtime) if m != "a"] == ["b", "c"]
