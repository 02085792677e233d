"""The GpuArbiter's queue of waiting models and its bookkeeping of turns, loads and
device readings: what the stateful test leaves open. Driven synchronously with
scripted memory and time, as test_arbiter_remeasure does."""

from __future__ import annotations

from typing import Any

from llmux.actors.arbiter import REPLAN_INTERVAL_S, GpuArbiter, ModelSpec
from llmux.actors.events import EventLog
from llmux.actors.footprints import FootprintStore
from llmux.actors.messages import Acquire, Evict, Granted, Loaded, Refused, Usage
from llmux.actors.placement import Rules

MB = 1_000_000
MODELS = {
    "a": ModelSpec(model="a", klass="llm", priority=10, estimate=200 * MB),
    "b": ModelSpec(model="b", klass="llm", priority=10, estimate=200 * MB),
    "c": ModelSpec(model="c", klass="llm", priority=10, estimate=200 * MB),
    "hi": ModelSpec(model="hi", klass="asr", priority=30, estimate=200 * MB),
}


class Probe:
    verify_release = False

    def __init__(self) -> None:
        self.held: dict[int, int] = {}
        self.foreign = 0  # another process's memory on the device

    def total_bytes(self) -> int:
        return 1000 * MB

    def used_bytes(self) -> int:
        return sum(self.held.values()) + self.foreign

    def footprint(self, pid: int, used_at_grant: int) -> int:
        return self.held[pid]

    def process_bytes(self, pid: int) -> int | None:
        return self.held.get(pid)


class Spares:
    """Warm spare workers holding ``held`` bytes until dropped."""

    def __init__(self, held: int) -> None:
        self.held, self.dropped = held, 0

    def held_bytes(self) -> int:
        return self.held

    def drop(self) -> bool:
        had, self.held = self.held > 0, 0
        self.dropped += int(had)
        return had


class World:
    """One device; ``capacity`` None: the probe's total, less foreign use, as in production."""

    def __init__(self, capacity: int | None = 300 * MB, spares: Spares | None = None) -> None:
        self.now = 0.0
        self.probe = Probe()
        self.told: list[tuple[str, Any]] = []
        self.arbiter = GpuArbiter(
            device="cpu", capacity=capacity, safety_margin=0, probe=self.probe,
            rules=Rules(), models=MODELS, footprints=FootprintStore(None), events=EventLog(),
            clock=lambda: self.now, spares=spares,
        )
        self.arbiter.connect({m: _Box(self, m) for m in MODELS})

    def handle(self, message: Any) -> None:
        self.arbiter.handle(message)

    def load(self, model: str, pid: int, nbytes: int = 200 * MB) -> None:
        self.handle(Acquire(model, self.now + 60))
        assert self.got(model, Granted)
        self.probe.held[pid] = nbytes
        self.handle(Loaded(model, pid, None))

    def got(self, model: str, kind: type) -> list[Any]:
        return [msg for m, msg in self.told if m == model and isinstance(msg, kind)]

    def pending(self) -> list[str]:
        return [p["model"] for p in self.arbiter.snapshot()["pending"]]

    def entry(self, model: str) -> dict[str, Any]:
        return next(e for e in self.arbiter.snapshot()["ledger"] if e["model"] == model)


class _Box:
    def __init__(self, world: World, model: str) -> None:
        self.world, self.model = world, model

    def post(self, message: Any) -> None:
        self.world.told.append((self.model, message))


def busy_a() -> World:
    """a loaded and serving on a device with no room for a second model."""
    world = World()
    world.load("a", 101)
    world.handle(Usage("a", True, 0, world.now, 1))
    return world


def test_waiting_models_are_planned_by_priority_then_first_come() -> None:
    world = busy_a()
    for model in ("b", "hi", "c"):
        world.handle(Acquire(model, world.now + 60))
    assert world.pending() == ["hi", "b", "c"]


def test_an_acquire_from_a_model_already_loaded_is_not_queued() -> None:
    # A grant that crossed its Withdraw: the model has its room; queued, it would only
    # hold the queue ("still in the ledger") until its deadline.
    world = World()
    world.load("a", 101)
    world.handle(Acquire("a", world.now + 60))
    assert world.pending() == []


def test_acquiring_again_extends_the_deadline_and_never_shortens_it() -> None:
    world = busy_a()
    world.handle(Acquire("b", world.now + 60))
    world.handle(Acquire("b", world.now + 10))
    world.now += 20
    world.arbiter.on_timer()
    assert world.got("b", Refused) == [] and world.pending() == ["b"]


def test_a_waiting_model_is_refused_when_its_deadline_comes() -> None:
    world = busy_a()
    world.handle(Acquire("b", world.now + 10))
    world.now += 10
    world.arbiter.on_timer()
    [refused] = world.got("b", Refused)
    assert not refused.permanent and refused.reason.startswith("timed out waiting for memory")


def test_acquiring_again_without_eviction_keeps_the_earlier_leave_to_evict() -> None:
    world = busy_a()
    world.handle(Acquire("b", world.now + 60))
    world.handle(Acquire("b", world.now + 60, evict=False))
    world.handle(Usage("a", False, 0, world.now, 1))  # a idles (past its linger)
    world.now += 1
    world.arbiter.on_timer()
    assert world.got("b", Refused) == [] and len(world.got("a", Evict)) == 1


def test_a_model_that_may_not_evict_is_refused_for_now_rather_than_wait() -> None:
    # A busy model holds the room: waiting behind it would hold the queue for nobody.
    world = busy_a()
    world.handle(Acquire("b", world.now + 60, evict=False))
    [refused] = world.got("b", Refused)
    assert not refused.permanent and world.pending() == []


def test_loads_on_a_device_are_one_at_a_time() -> None:
    # A used-memory delta during a load is that model's only if no other loads meanwhile.
    world = World(capacity=1000 * MB)
    world.handle(Acquire("a", 60.0))
    world.handle(Acquire("b", 60.0))
    assert world.got("a", Granted) and not world.got("b", Granted)
    world.probe.held[101] = 200 * MB
    world.handle(Loaded("a", 101, None))
    assert world.got("b", Granted)


def test_a_waiting_model_is_replanned_within_the_replan_interval() -> None:
    world = busy_a()
    world.handle(Acquire("b", world.now + 60))
    assert world.arbiter.next_wakeup() == world.now + REPLAN_INTERVAL_S


def test_a_load_records_how_long_it_took_and_counts_requests_from_zero() -> None:
    world = World()
    world.handle(Acquire("a", 60.0))
    # Reported while it loads: the actor's count from its worker's last life.
    world.handle(Usage("a", False, 1, world.now, 7))
    world.now += 3.0
    world.probe.held[101] = 200 * MB
    world.handle(Loaded("a", 101, None))
    assert world.entry("a")["load_s"] == 3.0
    world.handle(Acquire("b", world.now + 60))  # b waits: a's turn begins
    world.handle(Usage("a", True, 0, world.now, 1))
    assert world.entry("a")["turn_requests"] == 1


def test_a_turn_counts_the_requests_started_since_others_began_to_wait() -> None:
    world = World()
    world.load("a", 101)
    world.handle(Usage("a", True, 0, world.now, 8))  # 8 requests before anyone waited
    world.handle(Acquire("b", world.now + 60))
    assert world.got("a", Evict) == [] and world.entry("a")["turn_requests"] == 0
    world.handle(Usage("a", True, 0, world.now, 16))  # 8 more in its turn: it is over
    assert len(world.got("a", Evict)) == 1


def test_work_reported_before_the_grant_protects_the_fresh_model() -> None:
    world = World()
    world.handle(Usage("a", False, 3, world.now, 0))
    world.handle(Acquire("a", 60.0))
    assert world.entry("a")["queued"] == 3


def test_memory_the_ledger_counts_but_the_device_does_not_show_is_no_spare_room() -> None:
    # While a model loads, its estimate is in the ledger before the device shows it:
    # foreign use is never negative.
    world = World(capacity=None)
    world.handle(Acquire("a", 60.0))
    assert world.arbiter.snapshot()["capacity_bytes"] == 1000 * MB


def test_a_request_event_rereads_a_device_reading_older_than_a_moment() -> None:
    world = World(capacity=None)
    world.load("a", 101, 400 * MB)
    world.handle(Usage("a", True, 0, world.now, 1))
    world.probe.foreign = 500 * MB  # another process: 100 MB left, b needs 200 MB
    world.handle(Acquire("b", world.now + 60))
    assert world.pending() == ["b"]
    world.probe.foreign = 0  # it exits; a's next request start is the next plan
    world.now += 1
    world.handle(Usage("a", True, 0, world.now, 2))
    assert world.got("b", Granted)


def test_an_over_full_device_drops_its_spare_before_it_evicts_a_model() -> None:
    spares = Spares(0)
    world = World(spares=spares)
    world.load("a", 101)
    spares.held = 150 * MB  # a spare started since: 350 MB on the 300 MB device
    world.now += 1
    world.arbiter.on_timer()
    assert spares.dropped == 1 and world.got("a", Evict) == []


def test_a_spare_that_would_spare_no_victim_is_kept() -> None:
    # hi must evict one model with or without the spare's 100 MB: dropping it gains nothing.
    spares = Spares(100 * MB)
    world = World(capacity=500 * MB, spares=spares)
    world.load("a", 101)
    world.load("b", 102)
    world.now += 1
    world.handle(Acquire("hi", world.now + 60))
    assert spares.dropped == 0 and len(world.got("a", Evict)) == 1
