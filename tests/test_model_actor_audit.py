"""Paths of the model actor that a mutation audit found untested, each driven on an
in-process runtime with real fake-backend workers: an admin load of a failed model, a
running request past its deadline cancelled in its worker, requests in the backoff of
missing files or of an admin load, a refusal for good that ends an admin's wish, a
pinned model that dies while draining, a move while waiting for room, a clean unload
that ends a run of failures, an admin's wish that ends with its load, and requests
queued during an eviction keeping the model's place in the device's queue."""

from __future__ import annotations

import os
import signal
import threading

import anyio
import pytest

from llmux.actors.backoff import LoadBackoff
from llmux.actors.devices import CpuProbe
from llmux.actors.messages import Message, Status
from llmux.actors.model_actor import ModelActor, State
from llmux.errors import DeadlineExceeded, ModelFailed, ShuttingDown
from llmux.runtime import Ticket
from tests.conftest import fake_config, fake_model
from tests.helpers import until
from tests.test_actor_races import MB, PAYLOAD, ShrinkingDevice, running

pytestmark = pytest.mark.anyio


async def test_an_admin_load_of_a_failed_model_loads_it_without_a_request() -> None:
    """A model whose worker crashed is FAILED (not pinned: nothing reloads it by
    itself); an admin load loads it at once, with no request for it."""
    config = {"devices": {"cpu": {"capacity": "1GB"}}, **fake_config(m=fake_model())}
    async with running(config) as runtime:
        actor: ModelActor = runtime.actors["m"]
        await runtime.submit("m", "chat", PAYLOAD, timeout_s=10).collect()
        pid = actor.snapshot()["pid"]
        os.kill(pid, signal.SIGKILL)
        await until(lambda: actor.state is State.FAILED, "failed")
        await anyio.sleep(0.3)  # a lone crash retries on the next request, not by itself
        assert actor.state is State.FAILED
        runtime.load("m")
        await until(lambda: actor.state is State.READY, "loaded again")
        assert actor.snapshot()["pid"] != pid


async def test_a_request_past_its_deadline_is_cancelled_in_its_worker() -> None:
    """A running request reaches its deadline: its client gets DeadlineExceeded and
    the worker is told to stop it, so it stops within a token or so (were it not told,
    it would run on until the cancel grace ran out and the worker were killed)."""
    config = {"devices": {"cpu": {"capacity": "1GB"}},
              **fake_config(m=fake_model(reply="x " * 200, tokens_per_s=20))}
    async with running(config) as runtime:
        actor: ModelActor = runtime.actors["m"]
        short = {"messages": [{"role": "tool", "content": ""}]}  # not the long reply
        await runtime.submit("m", "chat", short, timeout_s=10).collect()  # loaded
        pid = actor.snapshot()["pid"]
        with pytest.raises(DeadlineExceeded):
            await runtime.submit("m", "chat", PAYLOAD, timeout_s=0.5).collect()
        await until(lambda: actor.snapshot()["in_flight"] == 0, "the request gone")
        assert actor.snapshot()["jobs_cancelled"] == 1  # the worker confirmed the cancel
        assert actor.state is State.READY and actor.snapshot()["pid"] == pid
        assert not [e for e in runtime.events.recent() if e.kind == "kill"]


async def test_a_request_in_the_backoff_of_missing_files_looks_again_and_counts_no_failure(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """The files were missing, so the load failed before asking for room and backs
    off (a minute here). A request in that backoff has the actor look again: still
    missing, it is refused with the backoff's wait and counts no new failure (no load
    is tried for it); once the files are there, it loads at once, in the backoff."""
    monkeypatch.setattr(LoadBackoff, "_wait", lambda self: 60.0)
    config = {"devices": {"cpu": {"capacity": "1GB"}}, **fake_config(m=fake_model())}
    async with running(config) as runtime:
        actor: ModelActor = runtime.actors["m"]
        missing: list[str | None] = ["m: its files are missing; pull them"]
        actor._cannot_load = lambda: missing[0]  # type: ignore[method-assign]
        with pytest.raises(ModelFailed, match=r"^m: its files are missing; pull them$"):
            await runtime.submit("m", "chat", PAYLOAD, timeout_s=10).collect()
        assert actor.state is State.FAILED
        with pytest.raises(ModelFailed, match=r"^m failed: m: its files are missing; pull "
                           r"them; next attempt in \d\d s$") as refused:
            await runtime.submit("m", "chat", PAYLOAD, timeout_s=10).collect()
        assert 30 < (refused.value.retry_after_s or 0) <= 60  # Retry-After: what is left
        failed = [e for e in runtime.events.recent()
                  if e.kind == "transition" and e.to_state == "failed"]
        assert len(failed) == 1, failed
        missing[0] = None  # pulled meanwhile
        pieces, _ = await runtime.submit("m", "chat", PAYLOAD, timeout_s=10).collect()
        assert pieces and actor.snapshot()["load_count"] == 1


async def test_a_request_joins_an_admin_load_that_waits_for_room_in_a_backoff(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """An admin load starts in the backoff of a failed load and waits for a busy
    model's room; a request meanwhile joins that load (it is not refused for the
    backoff, which the admin load overrode) and is served once the room is free."""
    monkeypatch.setattr(LoadBackoff, "_wait", lambda self: 60.0)
    config = {"devices": {"cpu": {"capacity": "300MB"}},
              **fake_config(a=fake_model(reply="x " * 30, tokens_per_s=20), m=fake_model())}
    async with running(config) as runtime:
        actor: ModelActor = runtime.actors["m"]
        missing: list[str | None] = ["m: its files are missing; pull them"]
        actor._cannot_load = lambda: missing[0]  # type: ignore[method-assign]
        with pytest.raises(ModelFailed, match="files are missing"):
            await runtime.submit("m", "chat", PAYLOAD, timeout_s=10).collect()
        missing[0] = None
        long = runtime.submit("a", "chat", PAYLOAD, timeout_s=20)  # a busy for ~1.5 s
        await until(lambda: runtime.actors["a"].state is State.BUSY, "a busy")
        runtime.load("m")
        await until(lambda: runtime.arbiters["cpu"].snapshot()["pending"], "m pending")
        pieces, _ = await runtime.submit("m", "chat", PAYLOAD, timeout_s=20).collect()
        assert pieces and actor.snapshot()["load_count"] == 1
        await long.collect()


async def test_an_admin_load_refused_for_good_is_not_retried_after_a_later_failure() -> None:
    """An admin load is refused for good (a foreign process holds the device), so
    the model is no longer wanted: a later load for a request that fails leaves it
    failed until the next request, with no retries by itself."""
    device = ShrinkingDevice()
    device.foreign = 1000 * MB
    config = {"devices": {"cuda:0": {}},
              **fake_config(m=fake_model(fail_on_load="bad weights"))}
    async with running(config, probes={"cuda:0": device}) as runtime:
        actor: ModelActor = runtime.actors["m"]
        runtime.load("m")
        await until(lambda: any(e.model == "m" and e.kind == "refuse"
                                for e in runtime.events.recent()), "refused")
        device.foreign = 0
        with pytest.raises(ModelFailed, match="bad weights") as failed:
            await runtime.submit("m", "chat", PAYLOAD, timeout_s=10).collect()
        assert failed.value.retry_after_s == 1.0  # the first failure: no refusal counted
        await anyio.sleep(1.5)  # a retry by itself would come after 1 s
        assert actor.state is State.FAILED
        assert not [e for e in runtime.events.recent() if e.kind == "retry"]


async def test_a_pinned_model_whose_worker_dies_while_it_drains_stays_down() -> None:
    """Pinned means kept resident, unless it was on its way out: an admin unload is
    draining it when its worker dies, so it is not loaded again by itself."""
    config = {"devices": {"cpu": {"capacity": "1GB"}},
              **fake_config(kept=fake_model(reply="x " * 100, tokens_per_s=20)
                            | {"pinned": True})}
    async with running(config) as runtime:
        actor: ModelActor = runtime.actors["kept"]
        await until(lambda: actor.state is State.READY, "loaded")
        long = runtime.submit("kept", "chat", PAYLOAD, timeout_s=20)
        await until(lambda: actor.state is State.BUSY, "busy")
        runtime.unload("kept")
        await until(lambda: actor.state is State.DRAINING, "draining")
        os.kill(actor.snapshot()["pid"], signal.SIGKILL)
        with pytest.raises(ModelFailed, match="died"):
            await long.collect()
        await until(lambda: actor.state is State.FAILED, "failed")
        await anyio.sleep(1.0)  # a pinned model's lone crash is retried at once
        assert actor.state is State.FAILED
        assert actor.snapshot()["load_count"] == 1


async def test_a_model_moved_while_it_waits_for_room_withdraws_from_the_old_device() -> None:
    """m waits for a's room on cpu when an admin moves it to cuda:0: it withdraws its
    wait on cpu, so cpu evicts nothing for it when a's request ends."""
    config = {"devices": {"cpu": {"capacity": "300MB"}, "cuda:0": {"capacity": "1GB"}},
              **fake_config(a=fake_model(reply="x " * 30, tokens_per_s=20), m=fake_model())}
    async with running(config, probes={"cpu": CpuProbe(), "cuda:0": CpuProbe()}) as runtime:
        a = runtime.actors["a"]
        await runtime.submit("a", "chat", PAYLOAD).collect()
        long = runtime.submit("a", "chat", PAYLOAD, timeout_s=20)  # a busy for ~1.5 s
        await until(lambda: a.state is State.BUSY, "a busy")
        waiter = runtime.submit("m", "chat", PAYLOAD, timeout_s=20)
        await until(lambda: runtime.arbiters["cpu"].snapshot()["pending"], "m pending")
        runtime.move("m", "cuda:0")
        pieces, _ = await waiter.collect()
        assert pieces and runtime.actors["m"].settings.device == "cuda:0"
        assert not runtime.arbiters["cpu"].snapshot()["pending"]
        await long.collect()
        await until(lambda: a.state is State.READY, "a done")
        await anyio.sleep(0.5)
        assert a.state is State.READY
        assert not [e for e in runtime.events.recent() if e.kind == "evict"]


async def test_a_request_that_comes_during_a_load_hears_of_it_at_once() -> None:
    """A request queued while its model loads is told so at once, not only at the
    load's next progress report (6 s apart here)."""
    config = {"devices": {"cpu": {"capacity": "1GB"}}, **fake_config(m=fake_model(load_time_s=60))}
    async with running(config) as runtime:
        actor: ModelActor = runtime.actors["m"]
        first = runtime.submit("m", "chat", PAYLOAD, timeout_s=120)
        assert isinstance(await first.next(timeout_s=10), Status)  # the load's first report
        assert actor.state is State.LOADING
        second = runtime.submit("m", "chat", PAYLOAD, timeout_s=120)
        reply = await second.next(timeout_s=3)
        assert isinstance(reply, Status) and reply.text.startswith("loading m (")
        first.cancel()
        second.cancel()



async def test_a_look_for_files_whose_request_left_meanwhile_changes_nothing() -> None:
    """The only request leaves while the actor looks for the model's (missing) files:
    the look's answer then concerns nobody, so the model stays unloaded, not failed
    with a backoff that would refuse the next request."""

    answer = threading.Event()

    def slow_look() -> str:  # looks until the test lets it answer
        answer.wait(10)
        return "m: its files are missing; pull them"

    config = {"devices": {"cpu": {"capacity": "1GB"}}, **fake_config(m=fake_model())}
    async with running(config) as runtime:
        actor: ModelActor = runtime.actors["m"]
        actor._cannot_load = slow_look  # type: ignore[method-assign]
        ticket = runtime.submit("m", "chat", PAYLOAD, timeout_s=10)
        await until(lambda: actor._looking, "looking")
        ticket.cancel()
        answer.set()
        await until(lambda: not actor._looking, "the look answered")
        assert actor.state is State.UNLOADED and actor.snapshot()["last_error"] is None


async def test_a_request_running_when_llmux_stops_is_told_so() -> None:
    """llmux stops while a request runs: its client gets ShuttingDown (with a
    Retry-After), not a reply that never ends."""
    config = {"devices": {"cpu": {"capacity": "1GB"}},
              **fake_config(m=fake_model(reply="x " * 100, tokens_per_s=20))}
    async with running(config) as runtime:
        actor: ModelActor = runtime.actors["m"]
        ticket = runtime.submit("m", "chat", PAYLOAD, timeout_s=20)
        await until(lambda: actor.state is State.BUSY, "busy")
    with anyio.fail_after(5), pytest.raises(ShuttingDown, match=r"^llmux is shutting down$") \
            as stopped:
        await ticket.collect()
    assert stopped.value.retry_after_s == 5.0


async def test_a_clean_unload_ends_a_run_of_failures() -> None:
    """A crash after a clean unload is a lone one again, retried at once: the unload
    ended the run of failures that the crash before it began. (Were the run kept, the
    second crash would wait 2 s, and a request would be refused meanwhile.)"""
    config = {"devices": {"cpu": {"capacity": "1GB"}}, **fake_config(m=fake_model())}
    async with running(config) as runtime:
        actor: ModelActor = runtime.actors["m"]

        async def crash_and_reload() -> None:
            await runtime.submit("m", "chat", PAYLOAD, timeout_s=10).collect()
            os.kill(actor.snapshot()["pid"], signal.SIGKILL)
            await until(lambda: actor.state is State.FAILED, "crashed")
            pieces, _ = await runtime.submit("m", "chat", PAYLOAD, timeout_s=10).collect()
            assert pieces  # a lone crash: loaded again at once, no backoff

        await crash_and_reload()
        runtime.unload("m")
        await until(lambda: actor.state is State.UNLOADED, "unloaded")
        await crash_and_reload()


async def test_an_admin_load_is_not_wanted_again_once_it_loaded() -> None:
    """m was loaded by an admin, then evicted for a. Its next load, for a request,
    fails: that failure is the request's, answered to it, and m does not retry by
    itself, as it would for an admin's load. The admin's wish ended with its load."""
    config = {"devices": {"cpu": {"capacity": "300MB"}},
              **fake_config(a=fake_model(), m=fake_model())}
    async with running(config) as runtime:
        m = runtime.actors["m"]
        runtime.load("m")
        await until(lambda: m.state is State.READY, "m loaded by the admin")
        await runtime.submit("a", "chat", PAYLOAD, timeout_s=10).collect()  # evicts m
        await until(lambda: m.state is State.UNLOADED, "m evicted")
        m._cannot_load = lambda: "m: its files are missing"  # type: ignore[method-assign]
        with pytest.raises(ModelFailed, match="files are missing"):
            await runtime.submit("m", "chat", PAYLOAD, timeout_s=10).collect()
        await anyio.sleep(2.0)  # the backoff's first wait is 1 s
        assert not [e for e in runtime.events.recent() if e.kind == "retry"]
        assert m.state is State.FAILED


async def test_requests_queued_during_an_eviction_ask_for_room_until_the_last_deadline() -> None:
    """Two requests come for a while its worker stops (a was evicted for x): a short
    one and a long one. Once the worker has gone, a asks for room until the long one's
    deadline, so it keeps its place in the device's queue when the short one expires:
    a loads before b, asked for after it. (Asking only until the short one's deadline,
    a's wait would time out, and a would ask anew behind b.)"""
    config = {"devices": {"cpu": {"capacity": "300MB"}},  # one model at a time
              "policy": {"min_residency_s": 0},
              **fake_config(a=fake_model(reply="x " * 15, tokens_per_s=20),  # ~0.75 s
                            x=fake_model(reply="x " * 60, tokens_per_s=20),  # ~3 s
                            b=fake_model())}
    quick = {"messages": [{"role": "tool", "content": ""}]}  # not the long reply
    async with running(config) as runtime:
        a = runtime.actors["a"]
        queued: dict[str, Ticket] = {}
        handle = a.handle

        def queue_two_while_its_worker_stops(message: Message) -> None:
            handle(message)
            if a.state is State.UNLOADING and not queued:
                queued["short"] = runtime.submit("a", "chat", quick, timeout_s=1)
                queued["long"] = runtime.submit("a", "chat", quick, timeout_s=30)

        a.handle = queue_two_while_its_worker_stops  # type: ignore[method-assign]
        pending = lambda: [p["model"] for p in runtime.arbiters["cpu"].snapshot()["pending"]]  # noqa: E731
        first = runtime.submit("a", "chat", PAYLOAD, timeout_s=30)
        await until(lambda: a.state is State.BUSY, "a busy")
        for_x = runtime.submit("x", "chat", PAYLOAD, timeout_s=30)
        await until(lambda: "a" in pending(), "a asking for room again")
        for_b = runtime.submit("b", "chat", quick, timeout_s=30)
        await until(lambda: pending() == ["a", "b"], "b asking for room after a")
        await first.collect()
        with pytest.raises(DeadlineExceeded):
            await queued["short"].collect()
        await queued["long"].collect()
        await for_x.collect()
        await for_b.collect()
        loads = [e.model for e in runtime.events.recent()
                 if e.kind == "transition" and e.to_state == "loading"]
        assert loads == ["a", "x", "a", "b"], loads
